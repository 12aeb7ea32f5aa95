/* Randomized operation sequences on mm/, checked after every step against a
 * simple reference model: the type and content of every guest frame. The
 * model does not predict folio shapes (that is the implementation's choice);
 * it checks their invariants: every frame of a folio points at it, folios
 * are naturally aligned in the guest and in their host hugepage, the pool's
 * reverse map and occupancy agree with the folios, and the statistics agree
 * with a recount. The one liberty the implementation has: populating may
 * back never-touched neighbours too (a 2 MiB folio on first touch); those
 * must read as zero. */
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../mm/mm.h"

/* ck_assert costs a write(2) per call (Check logs the location): the
 * per-frame loops use REQUIRE, which only calls into Check on failure. */
#define REQUIRE(cond, ...) do { if (!(cond)) ck_abort_msg(__VA_ARGS__); } while (0)
#define REQ(cond) REQUIRE(cond, "%s:%d: %s", __FILE__, __LINE__, #cond)

#define MiB  (1ULL << 20)
#define PG   4096ULL
#define OFF2 2049

/* RAM [0, 8M) and [12M, 28M); the hole [8M, 12M). */
#define RAM_SIZE   (24 * MiB)
#define HOLE_START (8 * MiB)
#define HOLE_END   (12 * MiB)
#define NPAGES     (28 * MiB / PG)

struct model {
	enum memdesc_type type[NPAGES];
	uint8_t v0[NPAGES], v2[NPAGES];   /* bytes at offset 0 and OFF2 */
};

static bool is_ram(uint64_t g)
{
	uint64_t a = g * PG;
	return a < HOLE_START || (a >= HOLE_END && a < HOLE_END + RAM_SIZE - HOLE_START);
}

static unsigned rnd(unsigned *seed, unsigned n)
{
	return (unsigned)rand_r(seed) % n;
}

/* A frame, biased towards region edges and a small hot area. */
static uint64_t pick_gfn(unsigned *seed)
{
	switch (rnd(seed, 4)) {
	case 0:
		return (rnd(seed, NPAGES / 512) * 512 + (rnd(seed, 2) ? 0 : 511)) % NPAGES;
	case 1:
		return 1024 + rnd(seed, 1024);
	default:
		return rnd(seed, NPAGES);
	}
}

static bool backed(enum memdesc_type t)
{
	return t == MEMDESC_FOLIO || t == MEMDESC_RESERVED;
}

/* Compare implementation and model; accept never-touched -> ram (zero data). */
static void reconcile(struct guest_mem *gm, struct model *m, const char *op, unsigned step)
{
	for (uint64_t g = 0; g < NPAGES; g++) {
		memdesc_t md = memdesc_lookup(gm, g);
		enum memdesc_type t = memdesc_type(md);
		if (t == m->type[g]) {
			if (backed(t) && is_ram(g))
				REQUIRE(memdesc_folio(md), "step %u %s: gfn %#llx %s without folio",
					      step, op, (unsigned long long)g, memdesc_type_name(t));
			continue;
		}
		/* A neighbour's touch may back an untouched page (a larger
		 * folio), never a ballooned one. */
		if (t == MEMDESC_FOLIO && m->type[g] == MEMDESC_UNBACKED &&
		    m->v0[g] == 0 && m->v2[g] == 0) {
			m->type[g] = MEMDESC_FOLIO;
			continue;
		}
		ck_abort_msg("step %u %s: gfn %#llx is %s, model says %s", step, op,
			     (unsigned long long)g, memdesc_type_name(t), memdesc_type_name(m->type[g]));
	}
}

struct hp_use { uint32_t hp; unsigned used; };

static void check_structure(struct guest_mem *gm, struct model *m, const char *op, unsigned step)
{
	static struct hp_use hps[NPAGES];
	unsigned nhp = 0;
	uint64_t folios[MM_MAX_ORDER + 1] = { 0 }, pages[MEMDESC_NR_TYPES] = { 0 };
	for (uint64_t g = 0; g < NPAGES; g++)
		pages[m->type[g]]++;
	for (uint64_t g = 0; g < NPAGES;) {
		struct folio *f = memdesc_folio(memdesc_lookup(gm, g));
		if (!f) {
			g++;
			continue;
		}
		uint64_t n = folio_nr_pages(f);
		REQUIRE(f->gfn == g, "step %u %s: folio at %#llx starts at %#llx", step, op,
			      (unsigned long long)g, (unsigned long long)f->gfn);
		REQ((g & (n - 1)) == (0));
		REQ((f->piece & (n - 1)) == (0));
		REQ((f->owner) == (m->type[g]));
		REQ((f->refcount) == (1));
		REQ(!folio_test(f, FOLIO_LOCKED));
		for (uint64_t i = 0; i < n; i++)
			REQ(memdesc_folio(memdesc_lookup(gm, g + i)) == f);
		REQ(mm_pool_piece_owner(gm, f->hpage, f->piece) == f);
		REQ(mm_pool_piece_owner(gm, f->hpage, f->piece + (unsigned)n - 1) == f);
		folios[f->order]++;
		unsigned i;
		for (i = 0; i < nhp && hps[i].hp != f->hpage; i++)
			;
		if (i == nhp)
			hps[nhp++] = (struct hp_use){ f->hpage, 0 };
		hps[i].used += (unsigned)n;
		g += n;
	}
	struct mm_stats st;
	mm_query_stats(gm, &st);
	for (int t = 0; t < MEMDESC_NR_TYPES; t++)
		REQUIRE(st.pages[t] == pages[t], "step %u %s: %s pages %llu, recount %llu", step,
			      op, memdesc_type_name(t), (unsigned long long)st.pages[t],
			      (unsigned long long)pages[t]);
	for (int k = 0; k <= MM_MAX_ORDER; k++)
		REQUIRE(st.folios[k] == folios[k], "step %u %s: order-%d folios %llu, recount %llu",
			      step, op, k, (unsigned long long)st.folios[k], (unsigned long long)folios[k]);
	REQ((st.hugepages_in_use) == (nhp));
	uint64_t occ[MM_OCC_BUCKETS] = { 0 };
	for (unsigned i = 0; i < nhp; i++) {
		struct mm_hpage_info hi;
		REQ(mm_pool_hpage_info(gm, hps[i].hp, &hi) == 0);
		REQUIRE(hi.nr_used == hps[i].used, "step %u %s: hugepage %u uses %u, folios %u",
			      step, op, hps[i].hp, hi.nr_used, hps[i].used);
		REQ(hi.live);
		occ[hps[i].used >= 512 ? MM_OCC_BUCKETS - 1 : hps[i].used / 64]++;
	}
	for (int b = 0; b < MM_OCC_BUCKETS; b++)
		REQ((st.occupancy[b]) == (occ[b]));
}

static void check_data(struct guest_mem *gm, struct model *m, const char *op, unsigned step)
{
	for (uint64_t g = 0; g < NPAGES; g++) {
		uint8_t b[3];
		if (!is_ram(g)) {
			REQ(mm_read(gm, g * PG, b, 1) == -1);
			continue;
		}
		if (m->type[g] == MEMDESC_POISONED) {
			errno = 0;
			REQ(mm_read(gm, g * PG, b, 1) == -1);
			REQ((errno) == (EIO));
			continue;
		}
		REQ(mm_read(gm, g * PG, &b[0], 1) == 0);
		REQ(mm_read(gm, g * PG + OFF2, &b[1], 1) == 0);
		REQ(mm_read(gm, g * PG + 1000, &b[2], 1) == 0);
		REQUIRE(b[0] == m->v0[g] && b[1] == m->v2[g] && b[2] == 0,
			      "step %u %s: gfn %#llx holds %02x %02x %02x, model %02x %02x 00", step, op,
			      (unsigned long long)g, b[0], b[1], b[2], m->v0[g], m->v2[g]);
	}
}

static void zero_page(struct model *m, uint64_t g)
{
	m->v0[g] = m->v2[g] = 0;
}

static void run_model(enum mm_backing backing, unsigned seed, unsigned steps, unsigned fault_pages)
{
	static struct model m;
	struct mm_config c = { .ram_size = RAM_SIZE, .backing = backing, .hole_start = HOLE_START,
			       .hole_end = HOLE_END, .quiet = true, .fault_pages = fault_pages };
	char err[256];
	struct guest_mem *gm = mm_create(&c, NULL, NULL, err, sizeof(err));
	ck_assert_msg(gm != NULL, "%s", err);
	volatile uint8_t *base = mm_guest_base(gm);
	memset(&m, 0, sizeof(m));
	for (uint64_t g = 0; g < NPAGES; g++)
		m.type[g] = is_ram(g) ? MEMDESC_UNBACKED : MEMDESC_MMIO;
	reconcile(gm, &m, "create", 0);

	for (unsigned step = 1; step <= steps; step++) {
		uint64_t g = pick_gfn(&seed), n = 1 + rnd(&seed, rnd(&seed, 4) ? 8 : 700);
		uint64_t end = g + n > NPAGES ? NPAGES : g + n;
		unsigned order = rnd(&seed, MM_MAX_ORDER + 1);
		uint8_t v = (uint8_t)(1 + rnd(&seed, 255));
		const char *op = "?";
		int rc;
		switch (rnd(&seed, 12)) {
		case 0:   /* mdvm writes a byte */
			op = "write";
			rc = mm_write(gm, g * PG, &v, 1);
			if (!is_ram(g) || m.type[g] == MEMDESC_POISONED) {
				ck_assert_int_eq(rc, -1);
				break;
			}
			ck_assert_int_eq(rc, 0);
			if (!backed(m.type[g]))
				m.type[g] = MEMDESC_FOLIO;
			m.v0[g] = v;
			ck_assert(folio_test(memdesc_folio(memdesc_lookup(gm, g)), FOLIO_DIRTY));
			break;
		case 1:   /* the "guest" touches a page: first-touch path */
		case 2:
			op = "touch";
			if (!is_ram(g) || m.type[g] == MEMDESC_POISONED)
				break;
			base[g * PG + OFF2] = v;
			if (!backed(m.type[g]))
				m.type[g] = MEMDESC_FOLIO;
			m.v2[g] = v;
			break;
		case 3:
			op = "populate";
			ck_assert_int_eq(mm_populate(gm, g, n, (int)order), 0);
			for (uint64_t x = g; x < end; x++)
				if (is_ram(x) && (m.type[x] == MEMDESC_UNBACKED || m.type[x] == MEMDESC_BALLOONED))
					m.type[x] = MEMDESC_FOLIO;
			break;
		case 4:
			op = "split";
			rc = folio_split(gm, g, order);
			ck_assert(rc == 0 || rc == -EINVAL);
			break;
		case 5:
			op = "merge";
			rc = folio_merge(gm, g, order);
			ck_assert_msg(rc == 0 || rc == -EINVAL || rc == -EXDEV, "merge: %d", rc);
			break;
		case 6: { /* release / balloon */
			enum memdesc_type nt = rnd(&seed, 2) ? MEMDESC_BALLOONED : MEMDESC_UNBACKED;
			op = nt == MEMDESC_BALLOONED ? "balloon" : "release";
			ck_assert_int_eq(mm_release_range(gm, g, n, nt), 0);
			for (uint64_t x = g; x < end; x++) {
				if (!is_ram(x) || m.type[x] == MEMDESC_POISONED)
					continue;
				m.type[x] = nt;
				zero_page(&m, x);
			}
			break;
		}
		case 7:
			op = "poison";
			if (rnd(&seed, 3))
				break;   /* keep poison rare */
			rc = memdesc_memory_failure(gm, g);
			if (!is_ram(g)) {
				ck_assert_int_eq(rc, -EFAULT);
			} else if (m.type[g] == MEMDESC_FOLIO) {
				ck_assert_int_eq(rc, 0);
				m.type[g] = MEMDESC_POISONED;
			} else if (m.type[g] == MEMDESC_RESERVED) {
				ck_assert_int_eq(rc, -EIO);
				m.type[g] = MEMDESC_POISONED;
			} else {
				ck_assert_int_eq(rc, 0);
			}
			break;
		case 8:
			op = "move";
			rc = memdesc_move(gm, g, rnd(&seed, 3) ? MM_HPAGE_ANY : rnd(&seed, 32));
			if (!is_ram(g) && m.type[g] != MEMDESC_RESERVED)
				ck_assert_int_eq(rc, -EFAULT);
			else if (m.type[g] == MEMDESC_POISONED)
				ck_assert_int_eq(rc, -EIO);
			else
				ck_assert_msg(rc == 0 || rc == -ENOSPC || rc == -EFAULT || rc == -EINVAL,
					      "move: %d", rc);
			break;
		case 9:
			op = "reserve";
			if (rnd(&seed, 3))
				break;
			n = 1 + rnd(&seed, 4);
			end = g + n > NPAGES ? NPAGES : g + n;
			rc = mm_mark_reserved(gm, g * PG, n * PG);
			if (g + n > NPAGES) {
				ck_assert_int_eq(rc, -1);   /* beyond the table: ERANGE, nothing done */
				break;
			}
			ck_assert_msg(rc == 0, "step %u: mark_reserved(%#llx, %llu): %s", step,
				      (unsigned long long)g, (unsigned long long)n, strerror(errno));
			for (uint64_t x = g; x < end; x++) {
				if (m.type[x] == MEMDESC_POISONED)
					continue;
				m.type[x] = MEMDESC_RESERVED;
			}
			break;
		case 11: { /* system reset: poisoned -> fresh */
			op = "unpoison";
			long want = 0;
			for (uint64_t x = g; x < end; x++)
				if (m.type[x] == MEMDESC_POISONED && is_ram(x)) {
					m.type[x] = MEMDESC_UNBACKED;
					zero_page(&m, x);
					want++;
				}
			ck_assert_int_eq(mm_unpoison_range(gm, g, n), want);
			break;
		}
		case 10:
			op = "dirty";
			rc = memdesc_mark_dirty(gm, g);
			if (m.type[g] == MEMDESC_FOLIO) {
				ck_assert_int_eq(rc, 0);
				ck_assert(folio_test(memdesc_folio(memdesc_lookup(gm, g)), FOLIO_DIRTY));
			}
			break;
		}
		reconcile(gm, &m, op, step);
		check_structure(gm, &m, op, step);
		if (step % 64 == 0 || step == steps)
			check_data(gm, &m, op, step);
	}
	mm_destroy(gm);
}

START_TEST(test_model_memfd) { run_model(MM_BACKING_MEMFD, 1000 + (unsigned)_i, 1500, 0); }
END_TEST
START_TEST(test_model_anon) { run_model(MM_BACKING_ANON, 2000 + (unsigned)_i, 1500, 0); }
END_TEST
START_TEST(test_model_thp) { run_model(MM_BACKING_THP, 3000 + (unsigned)_i, 1000, 0); }
END_TEST
START_TEST(test_model_small_faults) { run_model(MM_BACKING_MEMFD, 4000 + (unsigned)_i, 1000, 4); }
END_TEST

Suite *mm_model_suite(void)
{
	Suite *s = suite_create("mm_model");
	TCase *tc = tcase_create("random");
	tcase_set_timeout(tc, 300);
	tcase_add_loop_test(tc, test_model_memfd, 0, 3);
	tcase_add_loop_test(tc, test_model_anon, 0, 2);
	tcase_add_loop_test(tc, test_model_thp, 0, 1);
	tcase_add_loop_test(tc, test_model_small_faults, 0, 2);
	suite_add_tcase(s, tc);
	return s;
}
