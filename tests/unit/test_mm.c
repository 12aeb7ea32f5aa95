/* Unit tests for mm/: memdesc table, folios (allocate, type change, split,
 * merge, free, lookup from any frame), owner operations, host pool, first
 * touch through userfaultfd, lazy memslots, statistics. No /dev/kvm: the
 * hypervisor is a recording stub, and "the guest" touches memory through
 * mm_guest_base() exactly as KVM's get_user_pages would. */
#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../../mm/mm.h"
#include "../../mm/migrate.h"

#define MiB (1ULL << 20)
#define GiB (1ULL << 30)
#define PG  4096ULL

struct slot_rec { uint32_t slot; uint64_t gpa, size; void *hva; };
static struct slot_rec slot_recs[64];
static int nslot_recs;

static int rec_set_region(void *opaque, uint32_t slot, uint64_t gpa, uint64_t size, void *hva,
			  bool log_dirty)
{
	if (nslot_recs < 64)
		slot_recs[nslot_recs++] = (struct slot_rec){ slot, gpa, size, hva };
	return 0;
}
static const struct mm_hv_ops rec_ops = { .set_region = rec_set_region };

static struct guest_mem *mk(uint64_t ram, enum mm_backing b, uint64_t hole_start, uint64_t hole_end)
{
	struct mm_config c = { .ram_size = ram, .backing = b, .hole_start = hole_start,
			       .hole_end = hole_end, .quiet = true };
	char err[256] = "";
	nslot_recs = 0;
	struct guest_mem *gm = mm_create(&c, &rec_ops, NULL, err, sizeof(err));
	ck_assert_msg(gm != NULL, "mm_create(%s): %s", mm_backing_name(b), err);
	return gm;
}

static struct folio *folio_of(struct guest_mem *gm, uint64_t gfn)
{
	return memdesc_folio(memdesc_lookup(gm, gfn));
}

/* Every frame of every folio in [g0, g1) points at its folio; folios are
 * naturally aligned. Returns the number of folios seen. */
static unsigned check_folios(struct guest_mem *gm, uint64_t g0, uint64_t g1)
{
	unsigned n = 0;
	for (uint64_t g = g0; g < g1;) {
		struct folio *f = folio_of(gm, g);
		if (!f) {
			g++;
			continue;
		}
		ck_assert_uint_eq(f->gfn, g);
		ck_assert_uint_eq(f->gfn & (folio_nr_pages(f) - 1), 0);
		ck_assert_uint_eq(f->piece & (folio_nr_pages(f) - 1), 0);
		for (uint64_t i = 0; i < folio_nr_pages(f); i++)
			if (folio_of(gm, g + i) != f)
				ck_abort_msg("gfn %#llx not in its folio", (unsigned long long)(g + i));
		if (f->hpage != UINT32_MAX - 1)   /* not in a demoted hugetlb region (side file) */
			ck_assert_ptr_eq(mm_pool_piece_owner(gm, f->hpage, f->piece), f);
		g += folio_nr_pages(f);
		n++;
	}
	return n;
}

static void stats_sane(struct guest_mem *gm, const struct mm_stats *st, uint64_t table_pages)
{
	uint64_t sum = 0, fp = 0;
	for (int t = 0; t < MEMDESC_NR_TYPES; t++)
		sum += st->pages[t];
	ck_assert_uint_eq(sum, table_pages);
	for (int k = 0; k <= MM_MAX_ORDER; k++)
		fp += st->folios[k] << k;
	ck_assert_uint_le(fp, st->pages[MEMDESC_FOLIO] + st->pages[MEMDESC_RESERVED]);
	uint64_t occ = 0;
	for (int b = 0; b < MM_OCC_BUCKETS; b++)
		occ += st->occupancy[b];
	ck_assert_uint_eq(occ, st->hugepages_in_use);
}

START_TEST(test_backing_names)
{
	enum mm_backing b;
	const char *names[] = { "auto", "hugetlb", "thp", "memfd", "anon" };
	for (int i = 0; i < 5; i++) {
		ck_assert_int_eq(mm_backing_parse(names[i], &b), 0);
		ck_assert_int_eq(b, i);
		ck_assert_str_eq(mm_backing_name(b), names[i]);
	}
	ck_assert_int_eq(mm_backing_parse("HugeTLB", &b), 0);
	ck_assert_int_eq(b, MM_BACKING_HUGETLB);
	ck_assert_int_eq(mm_backing_parse("huge", &b), -1);
	ck_assert_int_eq(mm_backing_parse(NULL, &b), -1);
	ck_assert_str_eq(memdesc_type_name(MEMDESC_FOLIO), "ram");
	ck_assert_str_eq(memdesc_type_name(MEMDESC_UNBACKED), "unbacked");
	ck_assert_str_eq(mm_occupancy_label(0), "1-63");
	ck_assert_str_eq(mm_occupancy_label(MM_OCC_BUCKETS - 1), "512");
	ck_assert_uint_eq(sizeof(memdesc_t), 8);
	ck_assert_uint_eq(sizeof(struct folio), 32);
}
END_TEST

START_TEST(test_create_layout)
{
	/* 3 GiB + 64 MiB: 3 GiB low, 64 MiB at 4 GiB. */
	struct guest_mem *gm = mk(3 * GiB + 64 * MiB, MM_BACKING_MEMFD, 0xC0000000ULL, 4 * GiB);
	struct mm_range r[4];
	ck_assert_uint_eq(mm_ram_ranges(gm, r, 4), 2);
	ck_assert_uint_eq(r[0].gpa, 0);
	ck_assert_uint_eq(r[0].size, 3 * GiB);
	ck_assert_uint_eq(r[1].gpa, 4 * GiB);
	ck_assert_uint_eq(r[1].size, 64 * MiB);
	ck_assert_int_eq(nslot_recs, 2);
	ck_assert_uint_eq(slot_recs[0].slot, 0);
	ck_assert_uint_eq(slot_recs[0].gpa, 0);
	ck_assert_uint_eq(slot_recs[0].size, 3 * GiB);
	ck_assert_uint_eq(slot_recs[1].slot, 1);
	ck_assert_uint_eq(slot_recs[1].gpa, 4 * GiB);
	ck_assert_ptr_eq(slot_recs[1].hva, (uint8_t *)mm_guest_base(gm) + 4 * GiB);
	ck_assert_uint_eq(((uintptr_t)mm_guest_base(gm)) & (2 * MiB - 1), 0);
	ck_assert_uint_eq(mm_ram_size(gm), 3 * GiB + 64 * MiB);
	ck_assert_int_eq(mm_backing(gm), MM_BACKING_MEMFD);

	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 0)), MEMDESC_UNBACKED);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, (3 * GiB) / PG)), MEMDESC_MMIO);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, (4 * GiB) / PG - 1)), MEMDESC_MMIO);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, (4 * GiB) / PG)), MEMDESC_UNBACKED);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, (4 * GiB + 64 * MiB) / PG)), MEMDESC_MMIO);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 1ULL << 40)), MEMDESC_MMIO);

	struct mm_stats st;
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.pages[MEMDESC_UNBACKED], (3 * GiB + 64 * MiB) / PG);
	ck_assert_uint_eq(st.pages[MEMDESC_MMIO], GiB / PG);
	ck_assert_uint_eq(st.hugepages_in_use, 0);
	ck_assert_uint_eq(st.populated_bytes, 0);
	ck_assert_uint_lt(st.metadata_bytes, 64 * 1024);   /* nothing touched yet */
	stats_sane(gm, &st, (4 * GiB + 64 * MiB) / PG);
	mm_destroy(gm);

	/* Small guest: no RAM above the hole, the hole is still typed. */
	gm = mk(256 * MiB, MM_BACKING_ANON, 0xC0000000ULL, 4 * GiB);
	ck_assert_uint_eq(mm_ram_ranges(gm, r, 4), 1);
	ck_assert_int_eq(nslot_recs, 1);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 0xFEB00)), MEMDESC_MMIO);
	ck_assert_int_eq(mm_mark_reserved(gm, 0xFEB00000ULL, 4096), 0);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 0xFEB00)), MEMDESC_RESERVED);
	ck_assert_ptr_null(memdesc_folio(memdesc_lookup(gm, 0xFEB00)));
	ck_assert_int_eq(mm_mark_reserved(gm, 8 * GiB, 4096), -1);
	mm_destroy(gm);

	char err[128];
	struct mm_config bad = { .ram_size = 4095, .backing = MM_BACKING_MEMFD, .quiet = true };
	ck_assert_ptr_null(mm_create(&bad, NULL, NULL, err, sizeof(err)));
	bad.ram_size = 0;
	ck_assert_ptr_null(mm_create(&bad, NULL, NULL, err, sizeof(err)));
}
END_TEST

static const enum mm_backing backings[] = { MM_BACKING_MEMFD, MM_BACKING_ANON, MM_BACKING_THP };

/* First touch through the window: one 2 MiB folio per touched region. */
START_TEST(test_first_touch)
{
	struct guest_mem *gm = mk(64 * MiB, backings[_i], 0, 0);
	volatile uint8_t *base = mm_guest_base(gm);
	for (uint64_t a = 8 * MiB; a < 16 * MiB; a += PG)
		base[a] = (uint8_t)(a >> 12);
	struct mm_stats st;
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.faults, 4);
	ck_assert_uint_eq(st.folios[MM_MAX_ORDER], 4);
	ck_assert_uint_eq(st.pages[MEMDESC_FOLIO], 4 * 512);
	ck_assert_uint_eq(st.hugepages_in_use, 4);
	ck_assert_uint_eq(st.occupancy[MM_OCC_BUCKETS - 1], 4);
	ck_assert_uint_eq(st.populated_bytes, 8 * MiB);
	stats_sane(gm, &st, 64 * MiB / PG);
	ck_assert_uint_eq(check_folios(gm, 0, 64 * MiB / PG), 4);
	/* lookup from any frame of a folio finds the same folio */
	struct folio *f = folio_of(gm, 8 * MiB / PG);
	ck_assert_ptr_nonnull(f);
	ck_assert_uint_eq(folio_order(f), 9);
	for (uint64_t g = 8 * MiB / PG; g < 10 * MiB / PG; g++)
		ck_assert_ptr_eq(folio_of(gm, g), f);
	ck_assert(folio_test(f, FOLIO_MAPPED));
	ck_assert(folio_test(f, FOLIO_UPTODATE));
	for (uint64_t a = 8 * MiB; a < 16 * MiB; a += PG)
		ck_assert_uint_eq(base[a], (uint8_t)(a >> 12));
	/* reads of never-touched RAM: zero, no allocation */
	uint8_t buf[64];
	memset(buf, 0xaa, sizeof(buf));
	ck_assert_int_eq(mm_read(gm, 32 * MiB, buf, sizeof(buf)), 0);
	for (size_t i = 0; i < sizeof(buf); i++)
		ck_assert_uint_eq(buf[i], 0);
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.folios[MM_MAX_ORDER], 4);
	mm_destroy(gm);
}
END_TEST

START_TEST(test_fault_pages_config)
{
	struct mm_config c = { .ram_size = 16 * MiB, .backing = MM_BACKING_MEMFD, .quiet = true,
			       .fault_pages = 1 };
	char err[128];
	struct guest_mem *gm = mm_create(&c, NULL, NULL, err, sizeof(err));
	ck_assert_ptr_nonnull(gm);
	volatile uint8_t *base = mm_guest_base(gm);
	base[5 * PG] = 1;
	base[6 * PG + 7] = 2;
	struct mm_stats st;
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.folios[0], 2);
	ck_assert_uint_eq(st.faults, 2);
	ck_assert_uint_eq(st.hugepages_in_use, 1);
	ck_assert_uint_eq(st.occupancy[0], 1);   /* 2 of 512 pieces */
	/* both sit in the region's home hugepage at their colour */
	struct folio *a = folio_of(gm, 5), *b = folio_of(gm, 6);
	ck_assert_uint_eq(a->hpage, b->hpage);
	ck_assert_uint_eq(a->piece, 5);
	ck_assert_uint_eq(b->piece, 6);
	ck_assert_int_eq(mm_populate(gm, 4, 4, 2), 0);   /* 4..7: 4 and 7 missing; no order 2 block free */
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 4)), MEMDESC_FOLIO);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 7)), MEMDESC_FOLIO);
	ck_assert_int_eq(folio_merge(gm, 4, 2), 0);
	ck_assert_uint_eq(folio_order(folio_of(gm, 6)), 2);
	ck_assert_uint_eq(base[5 * PG], 1);
	ck_assert_uint_eq(base[6 * PG + 7], 2);
	check_folios(gm, 0, 16 * MiB / PG);
	mm_destroy(gm);
}
END_TEST

START_TEST(test_read_write)
{
	struct guest_mem *gm = mk(64 * MiB, backings[_i], 32 * MiB, 48 * MiB);
	/* RAM: [0, 32M) and [48M, 80M) */
	uint8_t zero[8192] = { 0 }, buf[8192], out[8192];
	struct mm_stats st;
	ck_assert_int_eq(mm_write(gm, 4 * MiB, zero, sizeof(zero)), 0);
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.populated_bytes, 0);   /* zeros into never-touched RAM */
	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = (uint8_t)(i * 7 + 1);
	ck_assert_int_eq(mm_write(gm, 4 * MiB + 100, buf, sizeof(buf)), 0);
	ck_assert_int_eq(mm_read(gm, 4 * MiB + 100, out, sizeof(out)), 0);
	ck_assert_mem_eq(buf, out, sizeof(buf));
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.folios[9], 1);
	ck_assert_uint_eq(st.faults, 0);   /* mm_write populated explicitly */
	struct folio *f = folio_of(gm, 4 * MiB / PG);
	ck_assert(folio_test(f, FOLIO_DIRTY));
	ck_assert_uint_eq(f->gen, mm_dirty_gen(gm));
	/* write across a folio boundary and the end of a range */
	ck_assert_int_eq(mm_write(gm, 6 * MiB - 10, buf, 20), 0);
	ck_assert_int_eq(mm_read(gm, 6 * MiB - 10, out, 20), 0);
	ck_assert_mem_eq(buf, out, 20);
	errno = 0;
	ck_assert_int_eq(mm_write(gm, 32 * MiB - 4, buf, 8), -1);
	ck_assert_int_eq(errno, EFAULT);
	ck_assert_int_eq(mm_read(gm, 40 * MiB, out, 1), -1);
	ck_assert_int_eq(mm_write(gm, 80 * MiB - 8, buf, 8), 0);
	ck_assert_int_eq(mm_write(gm, 80 * MiB - 8, buf, 9), -1);
	/* gpa_to_hva: populates, whole range inside one RAM range */
	uint8_t *h = mm_gpa_to_hva(gm, 50 * MiB, 3 * PG);
	ck_assert_ptr_eq(h, (uint8_t *)mm_guest_base(gm) + 50 * MiB);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 50 * MiB / PG)), MEMDESC_FOLIO);
	h[5] = 42;
	mm_mark_dirty(gm, 50 * MiB, 3 * PG);
	ck_assert(folio_test(folio_of(gm, 50 * MiB / PG), FOLIO_DIRTY));
	ck_assert_ptr_null(mm_gpa_to_hva(gm, 32 * MiB - PG, 2 * PG));
	ck_assert_ptr_null(mm_gpa_to_hva(gm, 100 * MiB, 1));
	/* dirty generation */
	uint32_t g1 = mm_dirty_gen_advance(gm);
	ck_assert_uint_eq(g1, mm_dirty_gen(gm));
	ck_assert_int_eq(memdesc_mark_dirty(gm, 4 * MiB / PG), 0);
	ck_assert_uint_eq(folio_of(gm, 4 * MiB / PG)->gen, g1);
	mm_destroy(gm);
}
END_TEST

START_TEST(test_reserved)
{
	struct guest_mem *gm = mk(16 * MiB, backings[_i], 0, 0);
	/* boot area [0x6000, 0x8000) before anything: reserved folios of its own */
	ck_assert_int_eq(mm_mark_reserved(gm, 0x6000, 0x2000), 0);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 6)), MEMDESC_RESERVED);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 7)), MEMDESC_RESERVED);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 5)), MEMDESC_UNBACKED);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 8)), MEMDESC_UNBACKED);
	struct folio *r = folio_of(gm, 6);
	ck_assert_uint_eq(folio_order(r), 1);
	ck_assert_uint_eq(r->owner, MEMDESC_RESERVED);
	ck_assert_int_eq(mm_write(gm, 0x6000, "boot", 5), 0);
	/* the rest of region 0 fills around it on first touch */
	volatile uint8_t *base = mm_guest_base(gm);
	base[0x1000] = 1;
	base[0x100000] = 2;
	check_folios(gm, 0, 512);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 0x100)), MEMDESC_FOLIO);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 6)), MEMDESC_RESERVED);
	char s[5];
	ck_assert_int_eq(mm_read(gm, 0x6000, s, 5), 0);
	ck_assert_str_eq(s, "boot");
	/* reserving inside an existing 2 MiB folio splits it around the range */
	base[4 * MiB] = 9;
	ck_assert_uint_eq(folio_order(folio_of(gm, 4 * MiB / PG)), 9);
	ck_assert_int_eq(mm_mark_reserved(gm, 4 * MiB + 0x3000, 0x1000), 0);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 4 * MiB / PG + 3)), MEMDESC_RESERVED);
	ck_assert_uint_eq(folio_order(folio_of(gm, 4 * MiB / PG + 3)), 0);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 4 * MiB / PG + 2)), MEMDESC_FOLIO);
	ck_assert_uint_eq(folio_order(folio_of(gm, 4 * MiB / PG + 256)), 8);
	ck_assert_uint_eq(base[4 * MiB], 9);
	check_folios(gm, 0, 16 * MiB / PG);
	struct mm_stats st;
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.pages[MEMDESC_RESERVED], 3);
	stats_sane(gm, &st, 16 * MiB / PG);
	/* merging a reserved page with ram folios is refused */
	ck_assert_int_eq(folio_merge(gm, 4 * MiB / PG, 9), -EINVAL);
	mm_destroy(gm);
}
END_TEST

START_TEST(test_split_merge)
{
	struct guest_mem *gm = mk(16 * MiB, backings[_i], 0, 0);
	uint64_t g0 = 2 * MiB / PG;
	uint8_t pat[PG];
	for (unsigned i = 0; i < 512; i++) {
		memset(pat, (int)(i + 1), sizeof(pat));
		ck_assert_int_eq(mm_write(gm, (g0 + i) * PG, pat, sizeof(pat)), 0);
	}
	struct folio *f = folio_of(gm, g0);
	uint32_t hp = f->hpage;
	struct mm_stats st;
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.leaf_tables, 0);   /* a 2 MiB folio is one top entry */
	ck_assert_uint_eq(st.folios[9], 1);

	/* split 9 -> 0: 512 folios, same host pieces */
	ck_assert_int_eq(folio_split(gm, g0 + 17, 0), 0);
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.folios[9], 0);
	ck_assert_uint_eq(st.folios[0], 512);
	ck_assert_uint_eq(st.leaf_tables, 1);
	ck_assert_uint_eq(check_folios(gm, g0, g0 + 512), 512);
	for (unsigned i = 0; i < 512; i++) {
		struct folio *p = folio_of(gm, g0 + i);
		ck_assert_uint_eq(p->hpage, hp);
		ck_assert_uint_eq(p->piece, i);
		ck_assert(folio_test(p, FOLIO_DIRTY));
	}
	ck_assert_ptr_eq(folio_of(gm, g0), f);   /* the head descriptor is kept */
	ck_assert_int_eq(folio_split(gm, g0 + 1, 0), -EINVAL);
	ck_assert_int_eq(folio_split(gm, 10 * MiB / PG, 0), -EINVAL);   /* no folio */

	/* merge pairs up to order 3, then all the way */
	ck_assert_int_eq(folio_merge(gm, g0 + 8, 3), 0);
	ck_assert_uint_eq(folio_order(folio_of(gm, g0 + 15)), 3);
	ck_assert_ptr_eq(folio_of(gm, g0 + 15), folio_of(gm, g0 + 8));
	ck_assert_int_eq(folio_merge(gm, g0 + 8, 3), -EINVAL);   /* already order 3 */
	ck_assert_int_eq(folio_merge(gm, g0, 9), 0);
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.folios[9], 1);
	ck_assert_uint_eq(st.folios[0], 0);
	ck_assert_uint_eq(st.folios[3], 0);
	ck_assert_uint_eq(st.leaf_tables, 0);   /* collapsed back to one entry */
	ck_assert_ptr_eq(folio_of(gm, g0 + 511), f);
	ck_assert(folio_test(f, FOLIO_DIRTY));
	for (unsigned i = 0; i < 512; i++) {
		ck_assert_int_eq(mm_read(gm, (g0 + i) * PG + 100, pat, 1), 0);
		ck_assert_uint_eq(pat[0], (uint8_t)(i + 1));
	}
	/* split to an intermediate order */
	ck_assert_int_eq(folio_split(gm, g0, 4), 0);
	ck_assert_uint_eq(check_folios(gm, g0, g0 + 512), 32);
	ck_assert_int_eq(folio_merge(gm, g0, 0), -EINVAL);
	ck_assert_int_eq(folio_merge(gm, g0 + 16, 5), 0);   /* the aligned block containing it */
	ck_assert_ptr_eq(folio_of(gm, g0 + 16), folio_of(gm, g0));
	ck_assert_int_eq(folio_merge(gm, g0 + 32, 5), 0);
	ck_assert_int_eq(folio_merge(gm, g0, 9), 0);

	/* a referenced folio is not split */
	struct folio *held = folio_get_gfn(gm, g0 + 3);
	ck_assert_ptr_eq(held, f);
	ck_assert_int_eq(folio_split(gm, g0, 0), -EBUSY);
	folio_put(held);
	ck_assert_int_eq(folio_split(gm, g0, 8), 0);
	mm_destroy(gm);
}
END_TEST

/* memfd: a moved small folio lives in another hugepage; merging needs
 * host-contiguous pieces (-EXDEV) until it moves back. */
START_TEST(test_move)
{
	struct guest_mem *gm = mk(16 * MiB, backings[_i], 0, 0);
	uint64_t g0 = 4 * MiB / PG;
	uint8_t pat[PG], out[PG];
	for (unsigned i = 0; i < 512; i++) {
		memset(pat, (int)(i * 3 + 1), sizeof(pat));
		ck_assert_int_eq(mm_write(gm, (g0 + i) * PG, pat, sizeof(pat)), 0);
	}
	struct folio *f = folio_of(gm, g0);
	uint32_t hp = f->hpage;
	/* whole 2 MiB folio */
	ck_assert_int_eq(memdesc_move(gm, g0 + 5, MM_HPAGE_ANY), 0);
	ck_assert_ptr_eq(folio_of(gm, g0), f);
	if (mm_backing(gm) == MM_BACKING_MEMFD)
		ck_assert_uint_ne(f->hpage, hp);
	for (unsigned i = 0; i < 512; i++) {
		ck_assert_int_eq(mm_read(gm, (g0 + i) * PG, out, PG), 0);
		memset(pat, (int)(i * 3 + 1), sizeof(pat));
		ck_assert_mem_eq(out, pat, PG);
	}
	volatile uint8_t *base = mm_guest_base(gm);
	ck_assert_uint_eq(base[(g0 + 7) * PG], (uint8_t)(7 * 3 + 1));
	struct mm_hpage_info hi;
	if (mm_backing(gm) == MM_BACKING_MEMFD) {
		/* the old hugepage was emptied and is free again */
		ck_assert_int_eq(mm_pool_hpage_info(gm, hp, &hi), 0);
		ck_assert_uint_eq(hi.nr_used, 0);
		ck_assert(!hi.live);
	}
	ck_assert_ptr_eq(mm_pool_piece_owner(gm, f->hpage, f->piece + 9), f);

	/* a small folio */
	ck_assert_int_eq(folio_split(gm, g0, 0), 0);
	struct folio *s = folio_of(gm, g0 + 9);
	uint32_t shp = s->hpage;
	ck_assert_int_eq(memdesc_move(gm, g0 + 9, MM_HPAGE_ANY), 0);
	ck_assert_int_eq(mm_read(gm, (g0 + 9) * PG, out, PG), 0);
	memset(pat, 9 * 3 + 1, sizeof(pat));
	ck_assert_mem_eq(out, pat, PG);
	base[(g0 + 9) * PG + 1] = 0x55;
	ck_assert_int_eq(mm_read(gm, (g0 + 9) * PG + 1, out, 1), 0);
	ck_assert_uint_eq(out[0], 0x55);
	ck_assert_ptr_eq(mm_pool_piece_owner(gm, s->hpage, s->piece), s);
	if (mm_backing(gm) == MM_BACKING_MEMFD) {
		ck_assert_uint_ne(s->hpage, shp);
		ck_assert_int_eq(folio_merge(gm, g0, 9), -EXDEV);
		/* move it back where it belongs: then the region merges */
		ck_assert_int_eq(memdesc_move(gm, g0 + 9, shp), 0);
		ck_assert_uint_eq(s->hpage, shp);
		ck_assert_uint_eq(s->piece, 9);
	}
	ck_assert_int_eq(folio_merge(gm, g0, 9), 0);
	ck_assert_uint_eq(base[(g0 + 9) * PG + 1], 0x55);
	/* moves of non-RAM do nothing or fail */
	ck_assert_int_eq(memdesc_move(gm, 12 * MiB / PG, MM_HPAGE_ANY), 0);   /* unbacked */
	ck_assert_int_eq(memdesc_move(gm, 1ULL << 30, MM_HPAGE_ANY), -EFAULT); /* not RAM */
	mm_destroy(gm);
}
END_TEST

START_TEST(test_release_balloon)
{
	struct guest_mem *gm = mk(16 * MiB, backings[_i], 0, 0);
	uint64_t g0 = 2 * MiB / PG;
	volatile uint8_t *base = mm_guest_base(gm);
	for (unsigned i = 0; i < 512; i++)
		base[(g0 + i) * PG] = (uint8_t)(i + 1);
	struct folio *f = folio_of(gm, g0);
	uint32_t hp = f->hpage;
	/* balloon 8 pages in the middle: the folio splits around them */
	ck_assert_int_eq(mm_release_range(gm, g0 + 40, 8, MEMDESC_BALLOONED), 0);
	for (unsigned i = 40; i < 48; i++)
		ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g0 + i)), MEMDESC_BALLOONED);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g0 + 39)), MEMDESC_FOLIO);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g0 + 48)), MEMDESC_FOLIO);
	check_folios(gm, g0, g0 + 512);
	struct mm_stats st;
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.pages[MEMDESC_BALLOONED], 8);
	ck_assert_uint_eq(st.pages[MEMDESC_FOLIO], 504);
	ck_assert_uint_eq(st.occupancy[7], 1);   /* 504 of 512 pieces */
	struct mm_hpage_info hi;
	ck_assert_int_eq(mm_pool_hpage_info(gm, hp, &hi), 0);
	ck_assert_uint_eq(hi.nr_used, 504);
	ck_assert_ptr_null(mm_pool_piece_owner(gm, hp, 41));
	uint8_t b;
	ck_assert_int_eq(mm_read(gm, (g0 + 41) * PG, &b, 1), 0);
	ck_assert_uint_eq(b, 0);
	ck_assert_uint_eq(base[(g0 + 39) * PG], 40);
	/* the guest touches a ballooned page: it comes back (deflate), zeroed */
	ck_assert_uint_eq(base[(g0 + 42) * PG], 0);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g0 + 42)), MEMDESC_FOLIO);
	/* ... that page only: its ballooned neighbours stay in the balloon */
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g0 + 41)), MEMDESC_BALLOONED);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g0 + 43)), MEMDESC_BALLOONED);
	/* Ballooned pages in an untouched region: a first touch next to them
	 * backs the untouched pages around it, never the ballooned ones. */
	uint64_t g1 = 6 * MiB / PG;
	ck_assert_int_eq(mm_release_range(gm, g1 + 256, 64, MEMDESC_BALLOONED), 0);
	base[(g1 + 200) * PG] = 7;
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g1 + 200)), MEMDESC_FOLIO);
	for (unsigned i = 256; i < 320; i++)
		ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g1 + i)), MEMDESC_BALLOONED);
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.pages[MEMDESC_BALLOONED], 8 - 1 + 64);
	ck_assert_int_eq(mm_release_range(gm, g1, 512, MEMDESC_UNBACKED), 0);
	/* owner op path: release one page to unbacked */
	ck_assert_int_eq(memdesc_release(gm, g0 + 100, MEMDESC_UNBACKED), 0);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g0 + 100)), MEMDESC_UNBACKED);
	ck_assert_int_eq(memdesc_release(gm, g0 + 100, MEMDESC_BALLOONED), 0);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g0 + 100)), MEMDESC_BALLOONED);
	ck_assert_int_eq(mm_release_range(gm, g0, 1, MEMDESC_POISONED), -EINVAL);
	/* release the whole region: hugepage freed */
	ck_assert_int_eq(mm_release_range(gm, g0, 512, MEMDESC_UNBACKED), 0);
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.pages[MEMDESC_FOLIO], 0);
	ck_assert_uint_eq(st.hugepages_in_use, 0);
	ck_assert_uint_eq(st.leaf_tables, 0);
	ck_assert_uint_eq(base[(g0 + 3) * PG], 0);   /* faults in again, fresh */
	ck_assert_uint_eq(folio_order(folio_of(gm, g0)), 9);
	mm_destroy(gm);
}
END_TEST

START_TEST(test_memory_failure)
{
	struct guest_mem *gm = mk(16 * MiB, backings[_i], 0, 0);
	uint64_t g0 = 6 * MiB / PG;
	volatile uint8_t *base = mm_guest_base(gm);
	for (unsigned i = 0; i < 512; i++)
		base[(g0 + i) * PG] = (uint8_t)(i + 1);
	uint32_t hp = folio_of(gm, g0)->hpage;
	ck_assert_int_eq(memdesc_memory_failure(gm, g0 + 77), 0);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g0 + 77)), MEMDESC_POISONED);
	check_folios(gm, g0, g0 + 512);
	/* only that page is lost */
	for (unsigned i = 0; i < 512; i++)
		if (i != 77)
			ck_assert_uint_eq(base[(g0 + i) * PG], (uint8_t)(i + 1));
	uint8_t b;
	errno = 0;
	ck_assert_int_eq(mm_read(gm, (g0 + 77) * PG, &b, 1), -1);
	ck_assert_int_eq(errno, EIO);
	ck_assert_int_eq(mm_write(gm, (g0 + 77) * PG, &b, 1), -1);
	ck_assert_int_eq(memdesc_mark_dirty(gm, g0 + 77), -EIO);
	ck_assert_int_eq(memdesc_move(gm, g0 + 77, MM_HPAGE_ANY), -EIO);
	ck_assert_int_eq(memdesc_release(gm, g0 + 77, MEMDESC_UNBACKED), -EBUSY);
	ck_assert_int_eq(memdesc_memory_failure(gm, g0 + 77), 0);
	/* a release over it leaves it poisoned */
	ck_assert_int_eq(mm_release_range(gm, g0 + 64, 64, MEMDESC_BALLOONED), 0);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g0 + 77)), MEMDESC_POISONED);
	struct mm_hpage_info hi;
	ck_assert_int_eq(mm_pool_hpage_info(gm, hp, &hi), 0);
	if (mm_backing(gm) == MM_BACKING_MEMFD)
		ck_assert_uint_eq(hi.nr_bad, 1);   /* the host piece is never reused */
	/* unbacked / not RAM */
	ck_assert_int_eq(memdesc_memory_failure(gm, 14 * MiB / PG), 0);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 14 * MiB / PG)), MEMDESC_UNBACKED);
	ck_assert_int_eq(memdesc_memory_failure(gm, 1ULL << 30), -EFAULT);
	/* a reserved (firmware) page: poisoned, and the caller is told */
	ck_assert_int_eq(mm_mark_reserved(gm, 0x6000, 0x1000), 0);
	ck_assert_int_eq(memdesc_memory_failure(gm, 6), -EIO);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 6)), MEMDESC_POISONED);
	struct mm_stats st;
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.pages[MEMDESC_POISONED], 2);
	stats_sane(gm, &st, 16 * MiB / PG);
	mm_destroy(gm);
}
END_TEST

static sigjmp_buf bus_jmp;
static volatile int bus_code;
static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
	bus_code = si->si_code;
	siglongjmp(bus_jmp, 1);
}

/* Touching a poisoned page is a SIGBUS (as KVM gives a vCPU); a system
 * reset replaces it with fresh memory. */
START_TEST(test_unpoison)
{
	struct guest_mem *gm = mk(16 * MiB, backings[_i], 0, 0);
	uint64_t g0 = 6 * MiB / PG;
	volatile uint8_t *base = mm_guest_base(gm);
	for (unsigned i = 0; i < 512; i++)
		base[(g0 + i) * PG] = (uint8_t)(i + 1);
	uint32_t hp = folio_of(gm, g0)->hpage;
	ck_assert_int_eq(memdesc_memory_failure(gm, g0 + 5), 0);

	struct sigaction sa = { .sa_sigaction = on_sigbus, .sa_flags = SA_SIGINFO }, old;
	sigaction(SIGBUS, &sa, &old);
	bus_code = 0;
	if (sigsetjmp(bus_jmp, 1) == 0)
		(void)base[(g0 + 5) * PG];
	sigaction(SIGBUS, &old, NULL);
	/* BUS_MCEERR_AR with CONFIG_MEMORY_FAILURE, else BUS_ADRERR (this host) */
	ck_assert_msg(bus_code == BUS_MCEERR_AR || bus_code == BUS_ADRERR, "si_code %d", bus_code);

	/* release/balloon leave it poisoned; unpoison replaces it */
	ck_assert_int_eq(mm_release_range(gm, g0 + 5, 1, MEMDESC_UNBACKED), 0);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g0 + 5)), MEMDESC_POISONED);
	ck_assert_int_eq(mm_unpoison_range(gm, g0, 512), 1);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g0 + 5)), MEMDESC_UNBACKED);
	uint8_t b = 0xff;
	ck_assert_int_eq(mm_read(gm, (g0 + 5) * PG, &b, 1), 0);
	ck_assert_uint_eq(b, 0);
	ck_assert_uint_eq(base[(g0 + 5) * PG], 0);   /* fresh page, first touch */
	base[(g0 + 5) * PG] = 0x77;
	struct folio *f = folio_of(gm, g0 + 5);
	ck_assert_ptr_nonnull(f);
	ck_assert_ptr_eq(mm_pool_piece_owner(gm, f->hpage, f->piece), f);
	ck_assert_uint_eq(base[(g0 + 6) * PG], 7);
	struct mm_hpage_info hi;
	ck_assert_int_eq(mm_pool_hpage_info(gm, hp, &hi), 0);
	if (mm_backing(gm) == MM_BACKING_MEMFD) {
		ck_assert_uint_eq(hi.nr_bad, 1);   /* the failed piece is not reused */
		ck_assert(f->hpage != hp || f->piece != 5);
	}
	ck_assert_int_eq(mm_unpoison_range(gm, 0, 16 * MiB / PG), 0);
	check_folios(gm, 0, 16 * MiB / PG);
	mm_destroy(gm);
}
END_TEST

START_TEST(test_owner_ops)
{
	for (int t = 0; t < MEMDESC_NR_TYPES; t++) {
		const struct memdesc_ops *o = memdesc_ops((enum memdesc_type)t);
		ck_assert_ptr_nonnull(o);
		ck_assert_str_eq(o->name, memdesc_type_name((enum memdesc_type)t));
		ck_assert(o->mark_dirty && o->move && o->memory_failure && o->release);
	}
	struct guest_mem *gm = mk(8 * MiB, MM_BACKING_MEMFD, 4 * MiB, 6 * MiB);
	ck_assert_int_eq(memdesc_mark_dirty(gm, 5 * MiB / PG), -EFAULT);   /* mmio */
	ck_assert_int_eq(memdesc_release(gm, 5 * MiB / PG, MEMDESC_UNBACKED), -EFAULT);
	ck_assert_int_eq(memdesc_mark_dirty(gm, 0), 0);                    /* unbacked: nothing */
	ck_assert_int_eq(mm_mark_reserved(gm, 5 * MiB, PG), 0);            /* device page */
	ck_assert_int_eq(memdesc_mark_dirty(gm, 5 * MiB / PG), -EFAULT);
	ck_assert_int_eq(memdesc_move(gm, 5 * MiB / PG, MM_HPAGE_ANY), -EFAULT);
	mm_destroy(gm);
}
END_TEST

START_TEST(test_lazy_slots)
{
	struct mm_config c = { .ram_size = 4 * GiB, .backing = MM_BACKING_MEMFD, .quiet = true,
			       .hole_start = 3 * GiB, .hole_end = 4 * GiB,
			       .eager_slot_limit = 256 * MiB };
	char err[128];
	nslot_recs = 0;
	struct guest_mem *gm = mm_create(&c, &rec_ops, NULL, err, sizeof(err));
	ck_assert_ptr_nonnull(gm);
	struct mm_stats st;
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.slots_total, 4);   /* 3 x 1 GiB low, 1 GiB high */
	ck_assert_uint_eq(st.slots_registered, 1);
	ck_assert_int_eq(nslot_recs, 1);
	ck_assert_uint_eq(slot_recs[0].gpa, 0);
	ck_assert_uint_eq(slot_recs[0].size, GiB);
	/* a KVM MMIO exit on RAM without a slot: registered, access done */
	uint8_t data[8] = { 1, 2, 3, 4, 5, 6, 7, 8 }, out[8] = { 0 };
	ck_assert(mm_handle_mmio(gm, 4 * GiB + 0x1000, data, 8, true));
	ck_assert_int_eq(nslot_recs, 2);
	ck_assert_uint_eq(slot_recs[1].gpa, 4 * GiB);
	ck_assert_uint_eq(slot_recs[1].slot, 3);
	ck_assert(mm_handle_mmio(gm, 4 * GiB + 0x1000, out, 8, false));
	ck_assert_mem_eq(data, out, 8);
	ck_assert(!mm_handle_mmio(gm, 3 * GiB + 5, out, 4, false));   /* the hole: real MMIO */
	/* populating explicitly registers the slot too */
	ck_assert_int_eq(mm_write(gm, 2 * GiB + 5, data, 8), 0);
	ck_assert_int_eq(nslot_recs, 3);
	ck_assert_uint_eq(slot_recs[2].gpa, 2 * GiB);
	ck_assert(mm_ensure_slot(gm, GiB + 8));
	ck_assert(!mm_ensure_slot(gm, GiB + 8));
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.slots_registered, 4);
	mm_destroy(gm);
}
END_TEST

/* 1 TiB: created lazily, costs almost nothing until touched. */
START_TEST(test_one_tebibyte)
{
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	struct guest_mem *gm = mk(1ULL << 40, MM_BACKING_MEMFD, 3 * GiB, 4 * GiB);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
	ck_assert_msg(ms < 500, "creating a 1 TiB guest took %.1f ms", ms);
	struct mm_stats st;
	mm_query_stats(gm, &st);
	ck_assert_uint_lt(st.metadata_bytes, 256 * 1024);
	ck_assert_uint_eq(st.slots_registered, 1);
	volatile uint8_t *base = mm_guest_base(gm);
	for (uint64_t a = 0; a < 64 * MiB; a += PG)
		base[600 * GiB + a] = 1;
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.faults, 32);
	ck_assert_uint_eq(st.folios[9], 32);
	ck_assert_uint_eq(st.populated_bytes, 64 * MiB);
	ck_assert_uint_lt(st.metadata_bytes, 512 * 1024);
	/* the uffd thread never registers memslots (KVM would wait for vCPUs
	 * blocked on it); a vCPU's MMIO exit or any other caller does */
	ck_assert_uint_eq(st.slots_registered, 1);
	ck_assert(mm_ensure_slot(gm, 600 * GiB));
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.slots_registered, 2);
	stats_sane(gm, &st, (1ULL << 40) / PG + GiB / PG);
	mm_destroy(gm);
}
END_TEST

/* hugetlb only if this host has free 2 MiB pages (the suite does not raise
 * nr_hugepages). */
START_TEST(test_hugetlb)
{
	struct mm_config c = { .ram_size = 8 * MiB, .backing = MM_BACKING_HUGETLB, .quiet = true };
	char err[256];
	struct guest_mem *gm = mm_create(&c, NULL, NULL, err, sizeof(err));
	if (!gm) {
		ck_assert_ptr_nonnull(strstr(err, "hugetlb"));
		fprintf(stderr, "test_hugetlb: skipped, no free hugepages (%s)\n", err);
		return;
	}
	ck_assert_int_eq(mm_mark_reserved(gm, 0x6000, 0x2000), 0);
	/* the region is mapped whole: every page of it has a folio */
	ck_assert_uint_eq(check_folios(gm, 0, 512) > 2, 1);
	for (uint64_t g = 0; g < 512; g++)
		ck_assert_ptr_nonnull(folio_of(gm, g));
	volatile uint8_t *base = mm_guest_base(gm);
	base[3 * MiB] = 7;
	ck_assert_uint_eq(folio_order(folio_of(gm, 3 * MiB / PG)), 9);
	ck_assert_int_eq(folio_split(gm, 3 * MiB / PG, 0), 0);
	ck_assert_int_eq(memdesc_move(gm, 3 * MiB / PG, MM_HPAGE_ANY), -EOPNOTSUPP);
	ck_assert_int_eq(mm_release_range(gm, 3 * MiB / PG, 1, MEMDESC_UNBACKED), -EOPNOTSUPP);
	ck_assert_int_eq(mm_release_range(gm, 3 * MiB / PG + 1, 1, MEMDESC_BALLOONED), 0);
	ck_assert_int_eq(folio_merge(gm, 3 * MiB / PG, 1), -EINVAL);
	ck_assert_int_eq(mm_release_range(gm, 2 * MiB / PG, 512, MEMDESC_UNBACKED), 0);
	struct mm_stats st;
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.hugepages_in_use, 1);
	ck_assert_uint_eq(base[3 * MiB], 0);   /* faults in a fresh, zeroed hugepage */
	base[4 * MiB] = 1;
	ck_assert_int_eq(memdesc_move(gm, 4 * MiB / PG, MM_HPAGE_ANY), 0);
	ck_assert_uint_eq(base[4 * MiB], 1);
	/* poison demotes the region to 4 KiB side-file pages (userfaultfd
	 * write protect; else the hugepage stays, its piece quarantined); the
	 * poisoned page survives a release; touching the region maps it again */
	ck_assert_int_eq(memdesc_memory_failure(gm, 4 * MiB / PG + 3), 0);
	bool demoted = mm_regions_demoted(gm) == 1;
	ck_assert_int_eq(mm_release_range(gm, 4 * MiB / PG, 512, MEMDESC_UNBACKED), 0);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 4 * MiB / PG + 3)), MEMDESC_POISONED);
	ck_assert_uint_eq(base[4 * MiB + 8 * PG], 0);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 4 * MiB / PG + 8)), MEMDESC_FOLIO);
	base[4 * MiB + 8 * PG] = 5;
	ck_assert_int_eq(mm_unpoison_range(gm, 4 * MiB / PG, 512), 1);
	/* demoted: a fresh 4 KiB page at the next touch; else the zeroed piece */
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 4 * MiB / PG + 3)),
			 demoted ? MEMDESC_UNBACKED : MEMDESC_FOLIO);
	ck_assert_uint_eq(base[4 * MiB + 3 * PG], 0);
	ck_assert_uint_eq(base[4 * MiB + 8 * PG], 5);
	for (uint64_t g = 4 * MiB / PG; g < 6 * MiB / PG; g++)
		if (!demoted || g == 4 * MiB / PG + 3 || g == 4 * MiB / PG + 8)
			ck_assert_ptr_nonnull(folio_of(gm, g));
	check_folios(gm, 0, 8 * MiB / PG);
	mm_destroy(gm);
}
END_TEST

/* hugetlb deflate of part of a 2 MiB page (issue: ballooned pages left
 * ballooned after deflate): a ballooned page of a still mapped hugetlb
 * region becomes a 4 KiB folio again on its own piece, with what the piece
 * holds (zeroed at inflate, or what the guest wrote after asking to
 * deflate); folios there stay RAM when asked to become unbacked, unsplit;
 * only memory really given back counts as freed. */
START_TEST(test_hugetlb_partial_deflate)
{
	struct mm_config c = { .ram_size = 8 * MiB, .backing = MM_BACKING_HUGETLB, .quiet = true };
	char err[256];
	struct guest_mem *gm = mm_create(&c, NULL, NULL, err, sizeof(err));
	if (!gm) {
		ck_assert_ptr_nonnull(strstr(err, "hugetlb"));
		return;   /* no hugepages here: skip */
	}
	volatile uint8_t *base = mm_guest_base(gm);
	uint64_t g0 = 2 * MiB / PG, freed = 0;
	for (uint64_t g = g0; g < g0 + 512; g++)
		base[g * PG] = (uint8_t)(g | 1);
	struct mm_stats st0, st;
	mm_query_stats(gm, &st0);
	/* inflate the top 256 pages: the hugepage stays (half of it is in use) */
	ck_assert_int_eq(mm_release_range_freed(gm, g0 + 256, 256, MEMDESC_BALLOONED, &freed), 0);
	ck_assert_uint_eq(freed, 0);
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.hugepages_total, st0.hugepages_total);
	ck_assert_uint_eq(st.pages[MEMDESC_BALLOONED], 256);
	ck_assert_uint_eq(base[(g0 + 300) * PG], 0);   /* zeroed */
	/* folios of the mapped region cannot become unbacked: left whole */
	ck_assert_int_eq(mm_release_range(gm, g0 + 10, 1, MEMDESC_UNBACKED), -EOPNOTSUPP);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g0 + 10)), MEMDESC_FOLIO);
	ck_assert_uint_eq(folio_order(folio_of(gm, g0 + 10)), 8);
	/* deflate from a target that is not a multiple of 2 MiB: 0x1f00-style */
	base[(g0 + 261) * PG] = 0x5a;   /* the guest used it once it asked for it */
	ck_assert_int_eq(mm_release_range(gm, g0 + 256, 16, MEMDESC_UNBACKED), 0);
	for (uint64_t g = g0 + 256; g < g0 + 272; g++) {
		ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g)), MEMDESC_FOLIO);
		ck_assert_ptr_nonnull(folio_of(gm, g));
	}
	ck_assert_uint_eq(base[(g0 + 256) * PG], 0);
	ck_assert_uint_eq(base[(g0 + 261) * PG], 0x5a);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g0 + 272)), MEMDESC_BALLOONED);
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.pages[MEMDESC_BALLOONED], 240);
	check_folios(gm, 0, 8 * MiB / PG);
	/* written data survives; mm_write/mm_read go through the new folio */
	uint8_t v = 0x77, r = 0;
	ck_assert_int_eq(mm_write(gm, (g0 + 262) * PG + 5, &v, 1), 0);
	ck_assert_int_eq(mm_read(gm, (g0 + 262) * PG + 5, &r, 1), 0);
	ck_assert_uint_eq(r, 0x77);
	ck_assert_uint_eq(base[(g0 + 1) * PG], (uint8_t)((g0 + 1) | 1));
	/* the whole region ballooned: the hugepage goes back, and counts */
	freed = 0;
	ck_assert_int_eq(mm_release_range_freed(gm, g0, 512, MEMDESC_BALLOONED, &freed), 0);
	ck_assert_uint_eq(freed, 2 * MiB);
	mm_query_stats(gm, &st);
	ck_assert_uint_eq(st.hugepages_total, st0.hugepages_total - 1);
	/* deflate of an unmapped region: plain unbacked, zero on touch */
	ck_assert_int_eq(mm_release_range(gm, g0, 512, MEMDESC_UNBACKED), 0);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g0 + 300)), MEMDESC_UNBACKED);
	ck_assert_uint_eq(base[(g0 + 300) * PG], 0);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g0 + 300)), MEMDESC_FOLIO);
	check_folios(gm, 0, 8 * MiB / PG);
	mm_destroy(gm);
}
END_TEST

/* Lock-free lookups and mark_dirty on other threads while the main thread
 * splits, merges and moves the same folios. */
struct race { struct guest_mem *gm; uint64_t g0; volatile int stop; uint64_t bad; };

static void *race_reader(void *arg)
{
	struct race *r = arg;
	unsigned seed = 1;
	while (!r->stop) {
		uint64_t g = r->g0 + (rand_r(&seed) % 1024);
		memdesc_t md = memdesc_lookup(r->gm, g);
		if (memdesc_type(md) != MEMDESC_FOLIO)
			r->bad++;
		struct folio *f = folio_get_gfn(r->gm, g);
		if (!f || g < f->gfn || g >= f->gfn + folio_nr_pages(f))
			r->bad++;
		if (f)
			folio_put(f);
		memdesc_mark_dirty(r->gm, g);
		uint8_t b;
		mm_read(r->gm, g * PG, &b, 1);
		if (b != (uint8_t)g)
			r->bad++;
	}
	return NULL;
}

START_TEST(test_concurrent_lookup)
{
	struct guest_mem *gm = mk(16 * MiB, MM_BACKING_MEMFD, 0, 0);
	struct race r = { .gm = gm, .g0 = 4 * MiB / PG };
	for (uint64_t g = r.g0; g < r.g0 + 1024; g++) {
		uint8_t b = (uint8_t)g;
		mm_write(gm, g * PG, &b, 1);
	}
	pthread_t th[2];
	for (int i = 0; i < 2; i++)
		pthread_create(&th[i], NULL, race_reader, &r);
	for (int it = 0; it < 200; it++) {
		uint64_t g = r.g0 + (it % 2) * 512;
		int rc = folio_split(gm, g, (unsigned)(it % 9));
		ck_assert(rc == 0 || rc == -EBUSY);
		rc = folio_merge(gm, g, 9);
		ck_assert(rc == 0 || rc == -EBUSY || rc == -EINVAL);
		if (it % 10 == 0)
			memdesc_move(gm, g, MM_HPAGE_ANY);
	}
	r.stop = 1;
	for (int i = 0; i < 2; i++)
		pthread_join(th[i], NULL);
	ck_assert_uint_eq(r.bad, 0);
	mm_destroy(gm);
}
END_TEST

Suite *mm_suite(void)
{
	Suite *s = suite_create("mm");
	TCase *tc = tcase_create("core");
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_backing_names);
	tcase_add_test(tc, test_create_layout);
	tcase_add_loop_test(tc, test_first_touch, 0, 3);
	tcase_add_test(tc, test_fault_pages_config);
	tcase_add_loop_test(tc, test_read_write, 0, 3);
	tcase_add_loop_test(tc, test_reserved, 0, 3);
	tcase_add_loop_test(tc, test_split_merge, 0, 3);
	tcase_add_loop_test(tc, test_move, 0, 3);
	tcase_add_loop_test(tc, test_release_balloon, 0, 3);
	tcase_add_loop_test(tc, test_memory_failure, 0, 3);
	tcase_add_loop_test(tc, test_unpoison, 0, 3);
	tcase_add_test(tc, test_owner_ops);
	tcase_add_test(tc, test_lazy_slots);
	tcase_add_test(tc, test_one_tebibyte);
	tcase_add_test(tc, test_hugetlb);
	tcase_add_test(tc, test_hugetlb_partial_deflate);
	tcase_add_test(tc, test_concurrent_lookup);
	suite_add_tcase(s, tc);
	return s;
}
