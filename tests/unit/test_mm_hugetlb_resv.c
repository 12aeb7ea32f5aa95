/* hugetlb backing reserves every RAM region's hugepage at creation (issue #3):
 * reserved, not populated (HugePages_Rsvd up, HugePages_Free unchanged);
 * first touch consumes the reservation; a released region's page is
 * re-reserved; a second guest that does not fit falls back (auto) or fails
 * (explicit) with the count. The fixture makes exactly AVAIL hugepages free
 * and unreserved and restores nr_hugepages; without them the tests skip. */
#include <check.h>
#include <stdio.h>
#include <string.h>

#include "../../mm/mm.h"

#define MiB (1ULL << 20)
#define NR_HP "/proc/sys/vm/nr_hugepages"
#define AVAIL 8

static long hp_old = -1, hp_set = -1;

static long meminfo(const char *key)
{
	char line[128];
	long v = -1;
	size_t n = strlen(key);
	FILE *f = fopen("/proc/meminfo", "r");
	while (f && fgets(line, sizeof(line), f))
		if (!strncmp(line, key, n) && line[n] == ':')
			sscanf(line + n + 1, "%ld", &v);
	if (f)
		fclose(f);
	return v;
}

static long avail(void) { return meminfo("HugePages_Free") - meminfo("HugePages_Rsvd"); }

/* Unchecked fixture: runs in the runner process, restored even if a test fails. */
static void hp_setup(void)
{
	hp_old = mm_read_long(NR_HP);
	if (hp_old < 0)
		return;
	mm_write_long(NR_HP, hp_old + AVAIL - avail());
	hp_set = mm_read_long(NR_HP);
}

static void hp_teardown(void)
{
	if (hp_set >= 0 && mm_read_long(NR_HP) == hp_set)
		mm_write_long(NR_HP, hp_old);
	hp_set = -1;
}

static struct guest_mem *mk(uint64_t ram, enum mm_backing b, char *err, size_t errlen)
{
	struct mm_config c = { .ram_size = ram, .backing = b, .quiet = true };
	return mm_create(&c, NULL, NULL, err, errlen);
}

START_TEST(test_reserve_not_populate)
{
	char err[256] = "";
	if (avail() != AVAIL) {
		fprintf(stderr, "test_reserve_not_populate: skipped, cannot make %d hugepages free\n", AVAIL);
		return;
	}
	long free0 = meminfo("HugePages_Free");
	struct guest_mem *gm = mk(8 * MiB, MM_BACKING_HUGETLB, err, sizeof(err));
	ck_assert_msg(gm, "%s", err);
	/* 4 regions reserved, none populated (lazy first touch). */
	ck_assert_int_eq(meminfo("HugePages_Free"), free0);
	ck_assert_int_eq(avail(), AVAIL - 4);
	/* Touching one consumes its reservation: the sum stays. */
	ck_assert_int_eq(mm_populate(gm, 0, 512, 9), 0);
	ck_assert_int_eq(meminfo("HugePages_Free"), free0 - 1);
	ck_assert_int_eq(avail(), AVAIL - 4);
	/* Released: the page goes back but stays reserved for this guest. */
	ck_assert_int_eq(mm_release_range(gm, 0, 512, MEMDESC_UNBACKED), 0);
	ck_assert_int_eq(meminfo("HugePages_Free"), free0);
	ck_assert_int_eq(avail(), AVAIL - 4);
	/* Someone else takes every unreserved hugepage: all 4 regions still fill. */
	struct guest_mem *other = mk(2 * (AVAIL - 4) * MiB, MM_BACKING_HUGETLB, err, sizeof(err));
	ck_assert_msg(other, "%s", err);
	ck_assert_int_eq(avail(), 0);
	ck_assert_int_eq(mm_populate(gm, 0, 4 * 512, 9), 0);
	uint8_t b = 0x5a, r = 0;
	ck_assert_int_eq(mm_write(gm, 8 * MiB - 1, &b, 1), 0);
	ck_assert_int_eq(mm_read(gm, 8 * MiB - 1, &r, 1), 0);
	ck_assert_int_eq(r, 0x5a);
	mm_destroy(other);
	mm_destroy(gm);
	ck_assert_int_eq(avail(), AVAIL);
	ck_assert_int_eq(meminfo("HugePages_Free"), free0);
}
END_TEST

START_TEST(test_second_guest_falls_back)
{
	char err[256] = "";
	if (avail() != AVAIL) {
		fprintf(stderr, "test_second_guest_falls_back: skipped, cannot make %d hugepages free\n", AVAIL);
		return;
	}
	struct guest_mem *a = mk(10 * MiB, MM_BACKING_AUTO, err, sizeof(err));
	ck_assert_msg(a, "%s", err);
	ck_assert_int_eq(mm_backing(a), MM_BACKING_HUGETLB);
	struct guest_mem *b = mk(10 * MiB, MM_BACKING_AUTO, err, sizeof(err));
	ck_assert_msg(b, "%s", err);
	ck_assert_int_ne(mm_backing(b), MM_BACKING_HUGETLB);
	ck_assert_msg(strstr(mm_backing_note(b), "hugetlb: only 3 of 5 hugepages could be reserved"),
		      "note: %s", mm_backing_note(b));
	ck_assert_ptr_null(mk(10 * MiB, MM_BACKING_HUGETLB, err, sizeof(err)));
	ck_assert_msg(strstr(err, "hugetlb backing: only 3 of 5 hugepages could be reserved"), "err: %s", err);
	ck_assert_int_eq(mm_populate(a, 0, 5 * 512, 9), 0);
	ck_assert_int_eq(mm_populate(b, 0, 5 * 512, 9), 0);
	mm_destroy(b);
	mm_destroy(a);
	ck_assert_int_eq(avail(), AVAIL);
}
END_TEST

Suite *mm_hugetlb_resv_suite(void)
{
	Suite *s = suite_create("mm_hugetlb_resv");
	TCase *tc = tcase_create("reserve");
	tcase_add_unchecked_fixture(tc, hp_setup, hp_teardown);
	tcase_set_timeout(tc, 30);
	tcase_add_test(tc, test_reserve_not_populate);
	tcase_add_test(tc, test_second_guest_falls_back);
	suite_add_tcase(s, tc);
	return s;
}
