/* The e820 map the loaders hand to the guest (vmm/boot_pvh.c) is read off the
 * memdesc types: the guest's view of reserved memory and mdvm's agree. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../vmm/boot_pvh.c"

#define MiB (1ULL << 20)
#define GiB (1ULL << 30)

static struct guest_mem *mk(uint64_t ram, uint64_t hole_start, uint64_t hole_end)
{
	struct mm_config c = { .ram_size = ram, .backing = MM_BACKING_MEMFD, .quiet = true,
			       .hole_start = hole_start, .hole_end = hole_end };
	char err[256];
	struct guest_mem *gm = mm_create(&c, NULL, NULL, err, sizeof(err));
	ck_assert_msg(gm, "mm_create: %s", err);
	return gm;
}

/* Every page of the map has the memdesc type its entry says; the entries
 * are sorted, do not overlap and cover exactly the guest's RAM. */
static void check_agrees(struct guest_mem *gm, const struct boot_e820 *map, size_t n)
{
	uint64_t covered = 0, prev_end = 0;
	for (size_t i = 0; i < n; i++) {
		ck_assert_uint_ge(map[i].addr, prev_end);
		ck_assert_uint_gt(map[i].size, 0);
		ck_assert_uint_eq(map[i].addr % MM_PAGE_SIZE, 0);
		ck_assert_uint_eq(map[i].size % MM_PAGE_SIZE, 0);
		if (i && map[i - 1].addr + map[i - 1].size == map[i].addr)
			ck_assert_uint_ne(map[i - 1].type, map[i].type);   /* runs are merged */
		for (uint64_t g = map[i].addr >> MM_PAGE_SHIFT; g < (map[i].addr + map[i].size) >> MM_PAGE_SHIFT; g++) {
			bool resv = memdesc_type(memdesc_lookup(gm, g)) == MEMDESC_RESERVED;
			ck_assert_msg(resv == (map[i].type == BOOT_E820_RESERVED),
				      "gfn 0x%llx: e820 type %u, memdesc %s", (unsigned long long)g,
				      map[i].type, memdesc_type_name(memdesc_type(memdesc_lookup(gm, g))));
		}
		covered += map[i].size;
		prev_end = map[i].addr + map[i].size;
	}
	ck_assert_uint_eq(covered, mm_ram_size(gm));
}

START_TEST(test_memmap_pvh)
{
	struct guest_mem *gm = mk(64 * MiB, 0, 0);
	struct boot_e820 map[16];
	mm_mark_reserved(gm, MDVM_BOOT_AREA_START, MDVM_BOOT_AREA_END - MDVM_BOOT_AREA_START);
	mm_mark_reserved(gm, MDVM_ACPI_GPA, MDVM_ACPI_SIZE);
	size_t n = boot_memmap(gm, map, 16);
	/* RAM, boot area, RAM, legacy range (ACPI inside), RAM. */
	ck_assert_uint_eq(n, 5);
	ck_assert_uint_eq(map[1].addr, MDVM_BOOT_AREA_START);
	ck_assert_uint_eq(map[1].type, BOOT_E820_RESERVED);
	ck_assert_uint_eq(map[3].addr, MDVM_LEGACY_START);
	ck_assert_uint_eq(map[3].addr + map[3].size, MDVM_LEGACY_END);
	check_agrees(gm, map, n);
	mm_destroy(gm);
}
END_TEST

/* A reserved page anywhere (here one in high RAM, above the hole) shows up,
 * and RAM split by the MMIO hole gives two RAM entries. */
START_TEST(test_memmap_hole_and_high_reserved)
{
	struct guest_mem *gm = mk(3 * GiB + 64 * MiB, 3 * GiB, 4 * GiB);
	struct boot_e820 map[16];
	mm_mark_reserved(gm, MDVM_LINUX_AREA_START, MDVM_LINUX_AREA_END - MDVM_LINUX_AREA_START);
	mm_mark_reserved(gm, 4 * GiB + 2 * MiB + 0x3000, 0x1000);
	size_t n = boot_memmap(gm, map, 16);
	check_agrees(gm, map, n);
	bool high = false;
	for (size_t i = 0; i < n; i++)
		if (map[i].type == BOOT_E820_RESERVED && map[i].addr == 4 * GiB + 2 * MiB + 0x3000)
			high = map[i].size == 0x1000;
	ck_assert(high);
	mm_destroy(gm);
}
END_TEST

Suite *boot_suite(void)
{
	Suite *s = suite_create("boot");
	TCase *tc = tcase_create("memmap");
	tcase_set_timeout(tc, 30);
	tcase_add_test(tc, test_memmap_pvh);
	tcase_add_test(tc, test_memmap_hole_and_high_reserved);
	suite_add_tcase(s, tc);
	return s;
}
