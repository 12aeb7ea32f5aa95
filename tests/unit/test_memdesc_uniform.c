/* memdesc_region_uniform: whole 2 MiB regions of one memdesc are reported
 * as such (untouched RAM, a 2 MiB folio); a region with a small folio in it
 * is not. */
#include <check.h>

#include "../../mm/mm.h"

static int nop_set_region(void *opaque, uint32_t slot, uint64_t gpa, uint64_t size, void *hva,
			  bool log_dirty)
{
	return 0;
}
static const struct mm_hv_ops nop_ops = { .set_region = nop_set_region };

START_TEST(test_region_uniform)
{
	struct mm_config c = { .ram_size = 64ULL << 20, .backing = MM_BACKING_MEMFD, .quiet = true };
	char err[256] = "";
	struct guest_mem *gm = mm_create(&c, &nop_ops, NULL, err, sizeof(err));
	ck_assert_msg(gm != NULL, "%s", err);
	memdesc_t md = 1;

	/* Untouched: uniform, unbacked. */
	ck_assert(memdesc_region_uniform(gm, 512 * 3 + 7, &md));
	ck_assert_int_eq(memdesc_type(md), MEMDESC_UNBACKED);
	/* One 4 KiB folio in region 4: not uniform; region 5 still is. */
	ck_assert_int_eq(mm_populate(gm, 512 * 4 + 3, 1, 0), 0);
	ck_assert(!memdesc_region_uniform(gm, 512 * 4, &md));
	ck_assert(memdesc_region_uniform(gm, 512 * 5, &md));
	/* A 2 MiB folio: uniform, and the memdesc is that folio's. */
	ck_assert_int_eq(mm_populate(gm, 512 * 6, 512, 9), 0);
	ck_assert(memdesc_region_uniform(gm, 512 * 6 + 100, &md));
	ck_assert(memdesc_folio(md) != NULL);
	ck_assert_int_eq(folio_order(memdesc_folio(md)), 9);
	ck_assert(memdesc_folio(md) == memdesc_folio(memdesc_lookup(gm, 512 * 6 + 511)));
	/* Beyond RAM: no. */
	ck_assert(!memdesc_region_uniform(gm, (64ULL << 20) / 4096 + 512, &md));
	mm_destroy(gm);
}
END_TEST

Suite *memdesc_uniform_suite(void)
{
	Suite *s = suite_create("memdesc_uniform");
	TCase *tc = tcase_create("core");
	tcase_add_test(tc, test_region_uniform);
	suite_add_tcase(s, tc);
	return s;
}
