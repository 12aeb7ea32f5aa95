/* Unit tests for folio migration and compaction (mm/migrate.c, mm/compact.c)
 * without KVM: the placement policy on synthetic pools, and migrations of
 * real guest memory (memfd, anon, thp; hugetlb when the host has free
 * hugepages) while a writer thread stands in for a vCPU, writing through the
 * guest window as KVM's get_user_pages would. */
#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../mm/mm.h"
#include "../../mm/migrate.h"

#define MiB (1ULL << 20)
#define PG  4096ULL

static struct guest_mem *mkc(uint64_t ram, enum mm_backing b)
{
	struct mm_config c = { .ram_size = ram, .backing = b, .quiet = true };
	char err[256] = "";
	struct guest_mem *gm = mm_create(&c, NULL, NULL, err, sizeof(err));
	ck_assert_msg(gm != NULL, "mm_create(%s): %s", mm_backing_name(b), err);
	return gm;
}

/* ---- placement policy */
static void hp_fill(struct compact_hp *h, uint32_t idx, const struct compact_folio *fs, unsigned nf)
{
	memset(h, 0, sizeof(*h));
	h->idx = idx;
	for (unsigned i = 0; i < nf; i++) {
		if (fs[i].hpage != idx)
			continue;
		for (unsigned p = fs[i].piece; p < fs[i].piece + (1u << fs[i].order); p++)
			h->used[p / 64] |= 1ULL << (p % 64);
		h->nr_used += 1u << fs[i].order;
	}
}

static bool bit(const uint64_t *u, unsigned p) { return u[p / 64] >> (p % 64) & 1; }

/* 8 hugepages, each with every other 4 KiB piece used: half of them can be
 * emptied into the other half, and nothing lands on a used piece. */
START_TEST(test_plan_scattered)
{
	enum { NHP = 8 };
	static struct compact_folio fs[NHP * 256];
	struct compact_hp hps[NHP], orig[NHP];
	uint32_t dst[NHP * 256], emptied[NHP];
	unsigned nf = 0;
	for (uint32_t h = 0; h < NHP; h++)
		for (unsigned p = 0; p < 512; p += 2)
			fs[nf++] = (struct compact_folio){ h, (uint16_t)p, 0, h * 512ULL + p };
	for (uint32_t h = 0; h < NHP; h++)
		hp_fill(&hps[h], h, fs, nf);
	memcpy(orig, hps, sizeof(hps));
	unsigned ne = compact_plan(hps, NHP, fs, nf, 0, dst, emptied);
	ck_assert_uint_eq(ne, NHP / 2);
	bool is_emptied[NHP] = { 0 };
	for (unsigned i = 0; i < ne; i++)
		is_emptied[emptied[i]] = true;
	/* Every folio of an emptied hugepage moves, to a kept one; no other moves. */
	uint64_t landed[NHP][8] = { { 0 } };
	for (unsigned i = 0; i < nf; i++) {
		if (!is_emptied[fs[i].hpage]) {
			ck_assert_uint_eq(dst[i], COMPACT_NO_DST);
			continue;
		}
		ck_assert_uint_ne(dst[i], COMPACT_NO_DST);
		ck_assert(!is_emptied[dst[i]]);
	}
	/* The plan's bitmaps: kept hugepages are now full, with the original
	 * pieces still theirs. */
	for (uint32_t h = 0; h < NHP; h++) {
		if (is_emptied[h])
			continue;
		ck_assert_uint_eq(hps[h].nr_used, 512);
		for (unsigned p = 0; p < 512; p++)
			if (bit(orig[h].used, p))
				ck_assert(bit(hps[h].used, p));
		(void)landed;
	}
}
END_TEST

/* Budget, a stuck (pinned) hugepage, a quarantined piece, big folios. */
START_TEST(test_plan_limits)
{
	static struct compact_folio fs[4 * 512];
	struct compact_hp hps[4];
	uint32_t dst[4 * 512], emptied[4];
	unsigned nf = 0;
	/* hp0: 64 pieces (order 6 at 0); hp1: 100 order-0; hp2: 300 order-0; hp3: 400 order-0 */
	fs[nf++] = (struct compact_folio){ 0, 0, 6, 0 };
	for (unsigned p = 0; p < 100; p++)
		fs[nf++] = (struct compact_folio){ 1, (uint16_t)p, 0, 512 + p };
	for (unsigned p = 0; p < 300; p++)
		fs[nf++] = (struct compact_folio){ 2, (uint16_t)p, 0, 1024 + p };
	for (unsigned p = 0; p < 400; p++)
		fs[nf++] = (struct compact_folio){ 3, (uint16_t)p, 0, 1536 + p };
	for (uint32_t h = 0; h < 4; h++)
		hp_fill(&hps[h], h, fs, nf);
	/* budget 64 pages: only hp0 (the sparsest) */
	unsigned ne = compact_plan(hps, 4, fs, nf, 64, dst, emptied);
	ck_assert_uint_eq(ne, 1);
	ck_assert_uint_eq(emptied[0], 0);
	ck_assert_uint_eq(dst[0], 3);   /* the fullest with room for an aligned 64-block */

	for (uint32_t h = 0; h < 4; h++)
		hp_fill(&hps[h], h, fs, nf);
	hps[0].stuck = true;           /* holds a pinned folio */
	hps[1].nr_bad = 1;             /* quarantined piece: can never be given back */
	hps[1].used[7] |= 1ULL << 63;
	ne = compact_plan(hps, 4, fs, nf, 0, dst, emptied);
	ck_assert_uint_eq(ne, 1);      /* hp2 goes (300 fit in 112 + 412 - ...) */
	ck_assert_uint_eq(emptied[0], 2);
	for (unsigned i = 0; i < nf; i++)
		if (fs[i].hpage != 2)
			ck_assert_uint_eq(dst[i], COMPACT_NO_DST);
}
END_TEST

/* ---- migration on real guest memory */
struct writer {
	uint8_t *base;
	uint64_t gpa, size;
	atomic_bool stop, hold;
	atomic_int held;
	atomic_uint_fast64_t rounds;
	atomic_uint_fast64_t lost;    /* a page not holding the previous round: a lost write */
};

/* Stands in for a vCPU: writes its round number into every page, round
 * after round; the last completed round must be what every page holds. */
static void *writer_main(void *arg)
{
	struct writer *w = arg;
	uint64_t round = 0;
	while (!atomic_load(&w->stop)) {
		if (atomic_load(&w->hold)) {
			atomic_store(&w->held, 1);
			while (atomic_load(&w->hold))
				usleep(50);
			atomic_store(&w->held, 0);
		}
		round++;
		for (uint64_t o = 0; o < w->size; o += PG) {
			volatile uint64_t *p = (volatile uint64_t *)(w->base + w->gpa + o);
			if (round > 1 && *p != round - 1)
				atomic_fetch_add(&w->lost, 1);
			*p = round;
		}
		atomic_store(&w->rounds, round);
	}
	return NULL;
}

static int fake_pause(void *opaque)
{
	struct writer *w = opaque;
	atomic_store(&w->hold, true);
	while (!atomic_load(&w->held) && !atomic_load(&w->stop))
		usleep(20);
	return 0;
}
static void fake_resume(void *opaque)
{
	atomic_store(&((struct writer *)opaque)->hold, false);
}

static const enum mm_backing mig_backings[] = { MM_BACKING_MEMFD, MM_BACKING_ANON, MM_BACKING_THP };

/* Move folios back and forth while the writer writes them; no write is lost
 * (uffd-wp blocks it, or the pause stops it), data ends up consistent. */
static void migrate_under_writes(enum mm_backing b, enum mm_migrate_method m)
{
	struct guest_mem *gm = mkc(16 * MiB, b);
	uint8_t *base = mm_guest_base(gm);
	ck_assert_int_eq(mm_populate(gm, (4 * MiB) / PG, (2 * MiB) / PG, 9), 0);
	ck_assert_int_eq(folio_split(gm, (4 * MiB) / PG, 4), 0);   /* 32 x 64 KiB */
	struct writer w = { .base = base, .gpa = 4 * MiB, .size = 2 * MiB };
	struct mm_pause_ops po = { fake_pause, fake_resume, &w };
	struct mm_migrate_ctx c;
	int rc = mm_migrate_begin(gm, &c, m, &po);
	if (rc == -EOPNOTSUPP) {
		mm_destroy(gm);
		return;   /* no uffd-wp on this host */
	}
	ck_assert_int_eq(rc, 0);
	pthread_t t;
	ck_assert_int_eq(pthread_create(&t, NULL, writer_main, &w), 0);
	while (atomic_load(&w.rounds) < 2)
		usleep(100);
	unsigned moved = 0;
	for (int pass = 0; pass < 6; pass++) {
		for (uint64_t g = (4 * MiB) / PG; g < (6 * MiB) / PG; g += 16) {
			rc = mm_migrate_folio(gm, &c, g, MM_HPAGE_ANY);
			ck_assert_msg(rc == 0, "%s/%s: %s", mm_backing_name(b), mm_migrate_method_name(m),
				      mm_migrate_strerror(rc));
			moved++;
		}
	}
	mm_migrate_end(gm, &c);
	uint64_t r0 = atomic_load(&w.rounds);
	while (atomic_load(&w.rounds) < r0 + 2)
		usleep(100);
	atomic_store(&w.stop, true);
	pthread_join(t, NULL);
	uint64_t last = atomic_load(&w.rounds);
	ck_assert_msg(atomic_load(&w.lost) == 0, "%s/%s: %llu writes lost", mm_backing_name(b),
		      mm_migrate_method_name(m), (unsigned long long)atomic_load(&w.lost));
	for (uint64_t o = 0; o < 2 * MiB; o += PG) {
		uint64_t v = *(uint64_t *)(base + 4 * MiB + o);
		/* the writer may have stopped mid-round: last or last + 1 */
		ck_assert_msg(v == last || v == last + 1, "%s/%s: page +0x%llx holds round %llu, last %llu",
			      mm_backing_name(b), mm_migrate_method_name(m), (unsigned long long)o,
			      (unsigned long long)v, (unsigned long long)last);
	}
	ck_assert_uint_eq(c.st.folios_moved, moved);
	if (m == MM_MIGRATE_PAUSE)
		ck_assert_uint_gt(c.st.pauses, 0);
	else
		ck_assert_uint_eq(c.st.pauses, 0);
	mm_destroy(gm);
}

START_TEST(test_migrate_wp)
{
	migrate_under_writes(mig_backings[_i], MM_MIGRATE_WP);
}
END_TEST

START_TEST(test_migrate_pause)
{
	migrate_under_writes(mig_backings[_i], MM_MIGRATE_PAUSE);
}
END_TEST

/* Poisoned, pinned, already-migrating folios are refused, never read. */
START_TEST(test_migrate_refusals)
{
	struct guest_mem *gm = mkc(16 * MiB, MM_BACKING_MEMFD);
	ck_assert_int_eq(mm_populate(gm, 0, (4 * MiB) / PG, 9), 0);
	ck_assert_int_eq(folio_split(gm, 0, 0), 0);
	/* poison frame 5: on memfd its backing is gone; reading it would SIGBUS */
	ck_assert_int_eq(memdesc_memory_failure(gm, 5), 0);
	struct folio *f = memdesc_folio(memdesc_lookup(gm, 7));
	atomic_fetch_or(&f->flags, FOLIO_PINNED);
	struct folio *g = memdesc_folio(memdesc_lookup(gm, 9));
	atomic_fetch_or(&g->flags, FOLIO_MIGRATING);
	struct folio *h = memdesc_folio(memdesc_lookup(gm, 11));
	atomic_fetch_or(&h->flags, FOLIO_HWPOISON);
	struct folio *l = memdesc_folio(memdesc_lookup(gm, 13));
	atomic_fetch_or(&l->flags, FOLIO_LOCKED);
	struct mm_migrate_ctx c;
	ck_assert_int_eq(mm_migrate_begin(gm, &c, MM_MIGRATE_PAUSE, NULL), 0);
	ck_assert_int_eq(mm_migrate_folio(gm, &c, 5, MM_HPAGE_ANY), MM_MIGRATE_POISONED);
	ck_assert_int_eq(mm_migrate_folio(gm, &c, 7, MM_HPAGE_ANY), MM_MIGRATE_PINNED);
	ck_assert_int_eq(mm_migrate_folio(gm, &c, 9, MM_HPAGE_ANY), MM_MIGRATE_MIGRATING);
	ck_assert_int_eq(mm_migrate_folio(gm, &c, 11, MM_HPAGE_ANY), MM_MIGRATE_POISONED);
	ck_assert_int_eq(mm_migrate_folio(gm, &c, 13, MM_HPAGE_ANY), MM_MIGRATE_LOCKED);
	struct folio *r = folio_get_gfn(gm, 15);
	ck_assert_int_eq(mm_migrate_folio(gm, &c, 15, MM_HPAGE_ANY), MM_MIGRATE_BUSY);
	folio_put(r);
	ck_assert_int_eq(mm_migrate_folio(gm, &c, 15, MM_HPAGE_ANY), 0);
	mm_migrate_end(gm, &c);
	ck_assert_uint_eq(c.st.folios_moved, 1);
	ck_assert_uint_eq(c.st.refused_poisoned, 2);
	ck_assert_uint_eq(c.st.refused_pinned, 1);
	ck_assert_uint_eq(c.st.refused_migrating, 1);
	ck_assert_uint_eq(c.st.refused_locked, 1);
	ck_assert_uint_eq(c.st.refused_busy, 1);
	ck_assert_str_eq(mm_migrate_strerror(MM_MIGRATE_PINNED), "pinned");
	atomic_fetch_and(&g->flags, ~(uint32_t)FOLIO_MIGRATING);
	atomic_fetch_and(&l->flags, ~(uint32_t)FOLIO_LOCKED);
	/* Compaction walks past the poisoned page (it would SIGBUS if read). */
	struct mm_compact_req req = { .mode = MM_COMPACT_RECLAIM, .method = MM_MIGRATE_PAUSE };
	struct mm_compact_result res;
	ck_assert_int_eq(mm_compact(gm, &req, NULL, &res), 0);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, 5)), MEMDESC_POISONED);
	mm_destroy(gm);
}
END_TEST

static uint64_t pat(uint64_t gfn) { return gfn * 0x9e3779b97f4a7c15ULL + 1; }

/* Free every other page of 8 MiB (scattered), reclaim: half the hugepages
 * come back, data of the rest intact; then collapse regions back. */
START_TEST(test_reclaim_and_collapse_memfd)
{
	struct guest_mem *gm = mkc(32 * MiB, MM_BACKING_MEMFD);
	uint8_t *base = mm_guest_base(gm);
	const uint64_t g0 = (8 * MiB) / PG, n = (8 * MiB) / PG;
	for (uint64_t g = g0; g < g0 + n; g++)
		*(uint64_t *)(base + g * PG) = pat(g);   /* first touch through the window */
	for (uint64_t g = g0 + 1; g < g0 + n; g += 2)
		ck_assert_int_eq(mm_release_range(gm, g, 1, MEMDESC_BALLOONED), 0);
	struct mm_stats st;
	mm_query_stats(gm, &st);
	uint64_t in_use = st.hugepages_in_use;
	struct mm_compact_req req = { .mode = MM_COMPACT_RECLAIM, .method = MM_MIGRATE_AUTO };
	struct mm_compact_result res;
	ck_assert_int_eq(mm_compact(gm, &req, NULL, &res), 0);
	ck_assert_uint_eq(res.hugepages_freed, 2);
	ck_assert_uint_eq(res.mig.folios_moved, 512);
	ck_assert_uint_eq(res.hugepages_in_use_after, in_use - 2);
	for (uint64_t g = g0; g < g0 + n; g += 2)
		ck_assert_uint_eq(*(uint64_t *)(base + g * PG), pat(g));
	/* A second run has nothing to do. */
	ck_assert_int_eq(mm_compact(gm, &req, NULL, &res), 0);
	ck_assert_uint_eq(res.mig.folios_moved, 0);

	/* Collapse: the guest takes its pages back (deflate), then each
	 * region is gathered into one hugepage and merged. */
	for (uint64_t g = g0 + 1; g < g0 + n; g += 2)
		*(uint64_t *)(base + g * PG) = pat(g);
	req.mode = MM_COMPACT_COLLAPSE;
	req.gpa = 8 * MiB;
	req.size = 8 * MiB;
	ck_assert_int_eq(mm_compact(gm, &req, NULL, &res), 0);
	ck_assert_uint_eq(res.regions_collapsed, 4);
	for (uint64_t g = g0; g < g0 + n; g += 512) {
		struct folio *f = memdesc_folio(memdesc_lookup(gm, g));
		ck_assert_ptr_nonnull(f);
		ck_assert_uint_eq(folio_order(f), 9);
	}
	for (uint64_t g = g0; g < g0 + n; g++)
		ck_assert_uint_eq(*(uint64_t *)(base + g * PG), pat(g));
	mm_destroy(gm);
}
END_TEST

/* hugetlb: 2 MiB folios move whole; smaller ones are refused; collapse is
 * metadata only. Needs free hugepages on the host. */
START_TEST(test_hugetlb_moves)
{
	struct mm_config cfg = { .ram_size = 16 * MiB, .backing = MM_BACKING_HUGETLB, .quiet = true };
	char err[256];
	struct guest_mem *gm = mm_create(&cfg, NULL, NULL, err, sizeof(err));
	if (!gm)
		return;   /* no free hugepages here */
	uint8_t *base = mm_guest_base(gm);
	for (uint64_t g = 0; g < (4 * MiB) / PG; g++)
		*(uint64_t *)(base + g * PG) = pat(g);
	struct mm_migrate_ctx c;
	ck_assert_int_eq(mm_migrate_begin(gm, &c, MM_MIGRATE_AUTO, NULL), 0);
	ck_assert_int_eq(mm_migrate_folio(gm, &c, 0, MM_HPAGE_ANY), 0);
	ck_assert_int_eq(folio_split(gm, 512, 0), 0);
	ck_assert_int_eq(mm_migrate_folio(gm, &c, 512, MM_HPAGE_ANY), -EOPNOTSUPP);
	mm_migrate_end(gm, &c);
	struct mm_compact_req req = { .mode = MM_COMPACT_COLLAPSE };
	struct mm_compact_result res;
	ck_assert_int_eq(mm_compact(gm, &req, NULL, &res), 0);
	ck_assert_uint_eq(res.regions_collapsed, 1);
	ck_assert_uint_eq(folio_order(memdesc_folio(memdesc_lookup(gm, 512))), 9);
	for (uint64_t g = 0; g < (4 * MiB) / PG; g++)
		ck_assert_uint_eq(*(uint64_t *)(base + g * PG), pat(g));
	mm_destroy(gm);
}
END_TEST

static long nr_maps(void)
{
	FILE *f = fopen("/proc/self/maps", "r");
	long n = 0;
	int ch;
	while ((ch = fgetc(f)) != EOF)
		n += ch == '\n';
	fclose(f);
	return n;
}

static long max_maps(void)
{
	FILE *f = fopen("/proc/sys/vm/max_map_count", "r");
	long v = 65530;
	if (f && fscanf(f, "%ld", &v) != 1)
		v = 65530;
	if (f)
		fclose(f);
	return v;
}

/* Every other page of 256 MiB released (32768 scattered pages: one VMA each,
 * and one for each freed page between them, used to be 65536 mappings, the
 * default vm.max_map_count): the mappings stay few, a released page reads
 * zero and comes back on touch, the rest keeps its data, and compaction
 * stays inside its mapping budget. */
static const enum mm_backing rel_backings[] = { MM_BACKING_MEMFD, MM_BACKING_ANON, MM_BACKING_THP };
START_TEST(test_scattered_release_mappings)
{
	enum mm_backing b = rel_backings[_i];
	const uint64_t ram = 256 * MiB, n = ram / PG;
	struct guest_mem *gm = mkc(ram, b);
	uint8_t *base = mm_guest_base(gm);
	for (uint64_t g = 0; g < n; g++)
		*(uint64_t *)(base + g * PG) = pat(g);
	long m0 = nr_maps();
	for (uint64_t g = 0; g < n; g += 2)
		ck_assert_int_eq(mm_release_range(gm, g, 1, MEMDESC_BALLOONED), 0);
	long m1 = nr_maps();
	ck_assert_msg(m1 < m0 + 1000, "%s: %ld mappings before, %ld after the release",
		      mm_backing_name(b), m0, m1);
	for (uint64_t g = 0; g < n; g++)
		ck_assert_uint_eq(*(uint64_t *)(base + g * PG), g & 1 ? pat(g) : 0);
	/* Touching released pages gives them back memory (deflate), in place. */
	for (uint64_t g = 0; g < n; g += 128) {
		*(uint64_t *)(base + g * PG) = pat(g);
		ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g)), MEMDESC_FOLIO);
	}
	ck_assert_int_lt(nr_maps(), m0 + 1000);
	struct mm_compact_req req = { .mode = MM_COMPACT_RECLAIM, .method = MM_MIGRATE_AUTO };
	struct mm_compact_result res;
	ck_assert_int_eq(mm_compact(gm, &req, NULL, &res), 0);
	ck_assert_int_lt(nr_maps(), max_maps() / 2 + m1);
	for (uint64_t g = 1; g < n; g += 2)
		ck_assert_uint_eq(*(uint64_t *)(base + g * PG), pat(g));
	mm_destroy(gm);
}
END_TEST

/* hugetlb demotion: a half-free region's live pages go to the 4 KiB side
 * file while a writer writes them, the hugetlb page goes back; touching a
 * freed page then costs 4 KiB; collapse promotes the region back onto a
 * hugetlb page. No write is lost either way. Needs free hugepages. */
static void demote_under_writes(enum mm_migrate_method m)
{
	struct mm_config cfg = { .ram_size = 16 * MiB, .backing = MM_BACKING_HUGETLB, .quiet = true };
	char err[256];
	struct guest_mem *gm = mm_create(&cfg, NULL, NULL, err, sizeof(err));
	if (!gm)
		return;   /* no free hugepages here */
	uint8_t *base = mm_guest_base(gm);
	const uint64_t r = 2, g0 = r * 512;   /* region 4..6 MiB */
	for (uint64_t g = g0; g < g0 + 512; g++)
		*(uint64_t *)(base + g * PG) = pat(g);
	/* The upper half goes (a balloon); the writer keeps the lower half. */
	ck_assert_int_eq(mm_release_range(gm, g0 + 256, 256, MEMDESC_BALLOONED), 0);
	int64_t hb0 = mm_host_bytes(gm);
	struct writer w = { .base = base, .gpa = g0 * PG, .size = 1 * MiB };
	struct mm_pause_ops po = { fake_pause, fake_resume, &w };
	pthread_t t;
	ck_assert_int_eq(pthread_create(&t, NULL, writer_main, &w), 0);
	while (atomic_load(&w.rounds) < 2)
		usleep(100);
	struct mm_migrate_ctx c;
	int rc = mm_migrate_begin(gm, &c, m, &po);
	if (rc == -EOPNOTSUPP)
		goto out;
	ck_assert_int_eq(rc, 0);
	ck_assert_int_eq(mm_demote_region(gm, &c, r), 0);
	ck_assert_int_eq(mm_demote_region(gm, &c, r), -EINVAL);   /* already */
	mm_migrate_end(gm, &c);
	ck_assert_uint_eq(c.st.regions_demoted, 1);
	ck_assert_uint_eq(mm_regions_demoted(gm), 1);
	/* 2 MiB hugetlb page gone, 1 MiB of 4 KiB pages instead */
	ck_assert_int_eq(hb0 - mm_host_bytes(gm), 1 * MiB);
	uint64_t r0 = atomic_load(&w.rounds);
	while (atomic_load(&w.rounds) < r0 + 2)
		usleep(100);
	/* A freed page of the demoted region: reads zero, touch costs 4 KiB. */
	ck_assert_uint_eq(*(volatile uint64_t *)(base + (g0 + 300) * PG), 0);
	*(uint64_t *)(base + (g0 + 300) * PG) = pat(g0 + 300);
	ck_assert_int_eq(memdesc_type(memdesc_lookup(gm, g0 + 300)), MEMDESC_FOLIO);
	ck_assert_int_eq(hb0 - mm_host_bytes(gm), 1 * MiB - PG);
	/* Released again (4 KiB granular now), and poison works per page. */
	ck_assert_int_eq(mm_release_range(gm, g0 + 300, 1, MEMDESC_UNBACKED), 0);
	ck_assert_int_eq(hb0 - mm_host_bytes(gm), 1 * MiB);
	/* The guest takes the rest back; collapse promotes while it writes. */
	for (uint64_t g = g0 + 256; g < g0 + 512; g++)
		*(uint64_t *)(base + g * PG) = pat(g);
	ck_assert_int_eq(mm_migrate_begin(gm, &c, m, &po), 0);
	struct mm_compact_req req = { .mode = MM_COMPACT_COLLAPSE, .method = m, .gpa = g0 * PG,
				      .size = 2 * MiB };
	struct mm_compact_result res;
	ck_assert_int_eq(mm_compact(gm, &req, &po, &res), 0);
	ck_assert_uint_eq(res.regions_promoted, 1);
	ck_assert_uint_eq(res.regions_collapsed, 1);
	ck_assert_uint_eq(mm_regions_demoted(gm), 0);
	ck_assert_uint_eq(folio_order(memdesc_folio(memdesc_lookup(gm, g0))), 9);
	ck_assert_int_eq(mm_host_bytes(gm), hb0);   /* side pages punched */
	r0 = atomic_load(&w.rounds);
	while (atomic_load(&w.rounds) < r0 + 2)
		usleep(100);
out:
	atomic_store(&w.stop, true);
	pthread_join(t, NULL);
	ck_assert_msg(atomic_load(&w.lost) == 0, "%s: %llu writes lost", mm_migrate_method_name(m),
		      (unsigned long long)atomic_load(&w.lost));
	uint64_t last = atomic_load(&w.rounds);
	for (uint64_t g = g0; g < g0 + 256; g++) {
		uint64_t v = *(uint64_t *)(base + g * PG);
		ck_assert(v == last || v == last + 1);
	}
	for (uint64_t g = g0 + 256; rc == 0 && g < g0 + 512; g++)
		ck_assert_uint_eq(*(uint64_t *)(base + g * PG), pat(g));
	mm_destroy(gm);
}

START_TEST(test_demote_wp)
{
	demote_under_writes(MM_MIGRATE_WP);
}
END_TEST

START_TEST(test_demote_pause)
{
	demote_under_writes(MM_MIGRATE_PAUSE);
}
END_TEST

/* hugetlb reclaim: every other page of 8 MiB freed, compaction demotes the
 * four regions and the host gets the freed memory back. */
START_TEST(test_reclaim_hugetlb)
{
	struct mm_config cfg = { .ram_size = 16 * MiB, .backing = MM_BACKING_HUGETLB, .quiet = true };
	char err[256];
	struct guest_mem *gm = mm_create(&cfg, NULL, NULL, err, sizeof(err));
	if (!gm)
		return;
	uint8_t *base = mm_guest_base(gm);
	const uint64_t g0 = (8 * MiB) / PG, n = (8 * MiB) / PG;
	for (uint64_t g = g0; g < g0 + n; g++)
		*(uint64_t *)(base + g * PG) = pat(g);
	for (uint64_t g = g0 + 1; g < g0 + n; g += 2)
		ck_assert_int_eq(mm_release_range(gm, g, 1, MEMDESC_BALLOONED), 0);
	struct mm_compact_req req = { .mode = MM_COMPACT_RECLAIM, .method = MM_MIGRATE_AUTO };
	struct mm_compact_result res;
	ck_assert_int_eq(mm_compact(gm, &req, NULL, &res), 0);
	ck_assert_uint_eq(res.regions_demoted, 4);
	ck_assert_uint_eq(res.hugepages_freed, 4);
	ck_assert_uint_eq(res.bytes_returned, 4 * MiB);   /* 8 MiB hugetlb out, 4 MiB 4 KiB pages in */
	for (uint64_t g = g0; g < g0 + n; g++)
		ck_assert_uint_eq(*(uint64_t *)(base + g * PG), g & 1 ? 0 : pat(g));
	ck_assert_int_eq(mm_compact(gm, &req, NULL, &res), 0);
	ck_assert_uint_eq(res.regions_demoted, 0);
	mm_destroy(gm);
}
END_TEST

Suite *compact_suite(void)
{
	Suite *s = suite_create("compact");
	TCase *tc = tcase_create("core");
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_plan_scattered);
	tcase_add_test(tc, test_plan_limits);
	tcase_add_loop_test(tc, test_migrate_wp, 0, 3);
	tcase_add_loop_test(tc, test_migrate_pause, 0, 3);
	tcase_add_test(tc, test_migrate_refusals);
	tcase_add_test(tc, test_reclaim_and_collapse_memfd);
	tcase_add_test(tc, test_hugetlb_moves);
	tcase_add_loop_test(tc, test_scattered_release_mappings, 0, 3);
	tcase_add_test(tc, test_demote_wp);
	tcase_add_test(tc, test_demote_pause);
	tcase_add_test(tc, test_reclaim_hugetlb);
	suite_add_tcase(s, tc);
	return s;
}
