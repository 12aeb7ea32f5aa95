/* Memory failure on hugetlb backing (mm/ without KVM): the 2 MiB region is
 * demoted to 4 KiB pages of the side file without reading the failed page,
 * which becomes a hole answered with poison, so an access is caught (SIGBUS
 * here, as KVM gives a vCPU) while a writer keeps writing the rest of the
 * region; compaction never collapses the region while the page is poisoned;
 * a system reset (mm_unpoison_range) gives it fresh memory and collapse then
 * promotes the region back onto a hugetlb page.
 * Needs free hugepages: the fixture raises /proc/sys/vm/nr_hugepages and
 * restores it; without them the test prints why and passes as skipped. */
#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../mm/mm.h"
#include "../../mm/migrate.h"

#define MiB (1ULL << 20)
#define PG  4096ULL
#define NR_HP "/proc/sys/vm/nr_hugepages"
#define WANT_HP 8   /* 16 MiB of guest RAM */

static long hp_old = -1, hp_set = -1;

/* Unchecked fixture: runs in the runner process, so the value is restored
 * even if the (forked) test fails. */
static void hp_raise(void)
{
	hp_old = mm_read_long(NR_HP);
	if (hp_old >= 0 && mm_write_long(NR_HP, hp_old + WANT_HP) == 0)
		hp_set = mm_read_long(NR_HP);
}

static void hp_restore(void)
{
	/* Only if nobody changed it meanwhile. */
	if (hp_set >= 0 && mm_read_long(NR_HP) == hp_set)
		mm_write_long(NR_HP, hp_old);
	hp_set = -1;
}

static sigjmp_buf bus_jmp;
static volatile int bus_code;
static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
	bus_code = si->si_code;
	siglongjmp(bus_jmp, 1);
}

static int touch(volatile uint8_t *p)
{
	struct sigaction sa = { .sa_sigaction = on_sigbus, .sa_flags = SA_SIGINFO }, old;
	sigaction(SIGBUS, &sa, &old);
	bus_code = 0;
	if (sigsetjmp(bus_jmp, 1) == 0)
		(void)*p;
	sigaction(SIGBUS, &old, NULL);
	return bus_code;
}

static uint64_t pat(uint64_t g) { return g * 0x9e3779b97f4a7c15ULL | 1; }

/* Stands in for a vCPU: writes a new value into each page of its range in
 * turn and remembers it; a write lost by the demotion shows at the end. */
struct writer {
	volatile uint8_t *base;
	uint64_t g0, n;
	uint64_t last[256];
	atomic_bool stop;
	atomic_ulong rounds;
};

static void *writer_main(void *arg)
{
	struct writer *w = arg;
	for (uint64_t v = 1; !atomic_load(&w->stop); v++) {
		for (uint64_t i = 0; i < w->n; i++) {
			*(volatile uint64_t *)(w->base + (w->g0 + i) * PG + 8) = v;
			w->last[i] = v;
		}
		atomic_fetch_add(&w->rounds, 1);
	}
	return NULL;
}

START_TEST(test_poison_hugetlb_region)
{
	struct mm_config cfg = { .ram_size = 16 * MiB, .backing = MM_BACKING_HUGETLB, .quiet = true };
	char err[256] = "";
	struct guest_mem *gm = mm_create(&cfg, NULL, NULL, err, sizeof(err));
	if (!gm) {
		printf("test_poison_hugetlb_region: skipped: no hugetlb backing (%s; nr_hugepages %ld -> %ld)\n",
		       err, hp_old, hp_set);
		return;
	}
	if (!mm_migrate_have_wp(gm)) {
		printf("test_poison_hugetlb_region: skipped: no userfaultfd write protect for hugetlbfs\n");
		mm_destroy(gm);
		return;
	}
	volatile uint8_t *base = mm_guest_base(gm);
	const uint64_t r = 2, g0 = r * 512, bad = g0 + 5;   /* region 4..6 MiB */
	for (uint64_t g = g0; g < g0 + 512; g++)
		*(volatile uint64_t *)(base + g * PG) = pat(g);
	ck_assert_int_eq(folio_order(memdesc_folio(memdesc_lookup(gm, g0))), 9);
	int64_t hb0 = mm_host_bytes(gm);

	struct writer w = { .base = base, .g0 = g0 + 256, .n = 256 };
	pthread_t t;
	ck_assert_int_eq(pthread_create(&t, NULL, writer_main, &w), 0);
	while (atomic_load(&w.rounds) < 2)
		;
	ck_assert_int_eq(memdesc_memory_failure(gm, bad), 0);
	unsigned long r0 = atomic_load(&w.rounds);
	while (atomic_load(&w.rounds) < r0 + 2)
		;
	atomic_store(&w.stop, true);
	pthread_join(t, NULL);

	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, bad)), MEMDESC_POISONED);
	ck_assert_uint_eq(mm_regions_demoted(gm), 1);
	/* The 2 MiB hugetlb page went back; 511 pages of the side file instead. */
	ck_assert_int_eq(hb0 - mm_host_bytes(gm), PG);
	for (uint64_t g = g0; g < g0 + 512; g++) {
		if (g == bad)
			continue;
		ck_assert_uint_eq(*(volatile uint64_t *)(base + g * PG), pat(g));
		ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g)), MEMDESC_FOLIO);
		if (g >= w.g0)
			ck_assert_uint_eq(*(volatile uint64_t *)(base + g * PG + 8), w.last[g - w.g0]);
	}
	/* Never read by mm/, and an access is caught. */
	uint8_t b;
	ck_assert_int_eq(mm_read(gm, bad * PG, &b, 1), -1);
	int code = touch(base + bad * PG);
	ck_assert_msg(code == BUS_MCEERR_AR || code == BUS_ADRERR, "si_code %d", code);
	ck_assert_int_eq(memdesc_memory_failure(gm, bad + 1), 0);   /* demoted already: 4 KiB path */
	ck_assert_int_eq(touch(base + (bad + 1) * PG) != 0, 1);

	/* Compaction leaves the region alone while it holds poison. */
	struct mm_compact_req req = { .mode = MM_COMPACT_COLLAPSE, .gpa = g0 * PG, .size = 2 * MiB };
	struct mm_compact_result res;
	ck_assert_int_eq(mm_compact(gm, &req, NULL, &res), 0);
	ck_assert_uint_eq(res.regions_collapsed, 0);
	ck_assert_uint_eq(res.regions_promoted, 0);
	ck_assert_uint_eq(mm_regions_demoted(gm), 1);
	struct mm_migrate_ctx c;
	ck_assert_int_eq(mm_migrate_begin(gm, &c, MM_MIGRATE_WP, NULL), 0);
	ck_assert_int_eq(mm_promote_region(gm, &c, r), MM_MIGRATE_POISONED);
	mm_migrate_end(gm, &c);
	ck_assert_int_eq(touch(base + bad * PG) != 0, 1);

	/* System reset: fresh zeroed pages; then collapse promotes the region. */
	ck_assert_int_eq(mm_unpoison_range(gm, 0, 16 * MiB / PG), 2);
	ck_assert_int_eq(touch(base + bad * PG), 0);
	ck_assert_uint_eq(*(volatile uint64_t *)(base + bad * PG), 0);
	ck_assert_uint_eq(*(volatile uint64_t *)(base + (bad + 1) * PG), 0);
	*(volatile uint64_t *)(base + bad * PG) = pat(bad);
	*(volatile uint64_t *)(base + (bad + 1) * PG) = pat(bad + 1);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, bad)), MEMDESC_FOLIO);
	ck_assert_int_eq(mm_compact(gm, &req, NULL, &res), 0);
	ck_assert_uint_eq(res.regions_promoted, 1);
	ck_assert_uint_eq(res.regions_collapsed, 1);
	ck_assert_uint_eq(mm_regions_demoted(gm), 0);
	ck_assert_int_eq(folio_order(memdesc_folio(memdesc_lookup(gm, g0))), 9);
	for (uint64_t g = g0; g < g0 + 512; g++)
		ck_assert_uint_eq(*(volatile uint64_t *)(base + g * PG), pat(g));
	ck_assert_int_eq(mm_host_bytes(gm), hb0);
	mm_destroy(gm);
}
END_TEST

Suite *mce_hugetlb_suite(void)
{
	Suite *s = suite_create("mce_hugetlb");
	TCase *tc = tcase_create("poison");
	tcase_add_unchecked_fixture(tc, hp_raise, hp_restore);
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_poison_hugetlb_region);
	suite_add_tcase(s, tc);
	return s;
}
