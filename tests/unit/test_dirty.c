/* Dirty tracking (mm/dirty.c) against fake sources of dirty frames: a fake
 * KVM-style dirty ring and a fake bitmap; folio aggregation of mdvm's own
 * writes; several consumers at once. No KVM. */
#include <check.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../mm/dirty.h"
#include "../../mm/mm.h"

#define RAM (64ULL << 20)

/* ---- fake source: frames queued by the test, delivered as a ring or a bitmap */
#define FAKE_RING 64
static struct dirty_ring_entry ring[FAKE_RING];
static uint32_t ring_push, ring_fetch;
static uint64_t bitmap[RAM / 4096 / 64];
static bool use_bitmap;
static int starts, stops, harvests;

static void ring_write(uint64_t gfn)
{
	/* Slot 0 covers GPA 0..; slot 1 is a second fake slot at gfn 8192. */
	struct dirty_ring_entry *e = &ring[ring_push++ % FAKE_RING];
	e->slot = gfn >= 8192 ? 1 : 0;
	e->offset = gfn >= 8192 ? gfn - 8192 : gfn;
	__atomic_store_n(&e->flags, DIRTY_RING_F_DIRTY, __ATOMIC_RELEASE);
}

static void fake_write(uint64_t gfn)
{
	if (use_bitmap)
		bitmap[gfn / 64] |= 1ULL << (gfn % 64);
	else
		ring_write(gfn);
}

static int fake_start(void *o) { starts++; return 0; }
static void fake_stop(void *o) { stops++; }
static long fake_harvest(void *o, struct dirty_tracker *t)
{
	static const uint64_t slot_gfn[2] = { 0, 8192 };
	harvests++;
	if (use_bitmap) {
		long n = 0;
		for (size_t i = 0; i < sizeof(bitmap) / 8; i++)
			n += __builtin_popcountll(bitmap[i]);
		dirty_tracker_record_bitmap(t, 0, bitmap, RAM / 4096);
		memset(bitmap, 0, sizeof(bitmap));
		return n;
	}
	bool overflow;
	long n = dirty_ring_harvest(t, ring, FAKE_RING, &ring_fetch, slot_gfn, 2, &overflow);
	for (uint32_t i = 0; i < FAKE_RING; i++)   /* the KVM_RESET_DIRTY_RINGS part */
		if (ring[i].flags & DIRTY_RING_F_RESET)
			ring[i].flags = 0;
	if (overflow)
		dirty_tracker_record(t, 0, RAM / 4096);
	return n;
}

static const struct dirty_source fake = {
	.start = fake_start, .stop = fake_stop, .harvest = fake_harvest,
};

static struct guest_mem *gm;
static struct dirty_tracker *trk;

static void setup(void)
{
	struct mm_config c = { .ram_size = RAM, .backing = MM_BACKING_ANON, .quiet = true };
	char err[256];

	gm = mm_create(&c, NULL, NULL, err, sizeof(err));
	ck_assert_msg(gm != NULL, "%s", err);
	trk = dirty_tracker_create(gm, &fake);
	ck_assert_ptr_nonnull(trk);
	memset(ring, 0, sizeof(ring));
	memset(bitmap, 0, sizeof(bitmap));
	ring_push = ring_fetch = 0;
	starts = stops = harvests = 0;
	use_bitmap = false;
}

static void teardown(void)
{
	dirty_tracker_destroy(trk);
	mm_destroy(gm);
}

/* Collect runs into a flat list of (gfn, nr). */
struct runs { uint64_t g[64], n[64]; int cnt; };
static int collect(void *o, uint64_t gfn, uint64_t nr)
{
	struct runs *r = o;
	ck_assert_int_lt(r->cnt, 64);
	r->g[r->cnt] = gfn;
	r->n[r->cnt++] = nr;
	return 0;
}

static struct runs take_all(struct dirty_log *l)
{
	struct runs r = { .cnt = 0 };
	ck_assert_int_eq(dirty_log_take(l, 0, RAM / 4096, collect, &r), 0);
	return r;
}

static void check_source_path(bool bitmap_mode)
{
	char err[128];
	struct dirty_log *l;
	struct runs r;

	use_bitmap = bitmap_mode;
	l = dirty_log_open(trk, err, sizeof(err));
	ck_assert_msg(l != NULL, "%s", err);
	ck_assert_int_eq(starts, 1);
	/* Pages 3, 4, 5 (a run), 100, and one in the second slot. */
	fake_write(3); fake_write(4); fake_write(5); fake_write(100); fake_write(8192 + 7);
	fake_write(4);   /* twice: counted once */
	ck_assert_int_eq(dirty_log_sync(l), 5);
	ck_assert_uint_eq(dirty_log_count(l), 5);
	ck_assert(dirty_log_test(l, 0, 4));      /* frame 3 */
	ck_assert(!dirty_log_test(l, 6, 94));
	r = take_all(l);
	ck_assert_int_eq(r.cnt, 3);
	ck_assert_uint_eq(r.g[0], 3); ck_assert_uint_eq(r.n[0], 3);
	ck_assert_uint_eq(r.g[1], 100); ck_assert_uint_eq(r.n[1], 1);
	ck_assert_uint_eq(r.g[2], 8199); ck_assert_uint_eq(r.n[2], 1);
	ck_assert_uint_eq(dirty_log_count(l), 0);
	/* Taken frames are clean until written again. */
	ck_assert_int_eq(dirty_log_sync(l), 0);
	ck_assert_int_eq(take_all(l).cnt, 0);
	fake_write(100);
	ck_assert_int_eq(dirty_log_sync(l), 1);
	r = take_all(l);
	ck_assert_int_eq(r.cnt, 1);
	ck_assert_uint_eq(r.g[0], 100);
	dirty_log_close(l);
	ck_assert_int_eq(stops, 1);
}

START_TEST(ring_path) { check_source_path(false); }
END_TEST

START_TEST(bitmap_path) { check_source_path(true); }
END_TEST

START_TEST(ring_overrun_reports_everything)
{
	char err[128];
	struct dirty_log *l = dirty_log_open(trk, err, sizeof(err));

	/* The producer overruns the ring (as kvm_pvm does): 100 pushes into 64
	 * entries. Lost entries must not mean lost pages. */
	for (int i = 0; i < 100; i++)
		ring_write(1000 + i);
	dirty_log_sync(l);
	ck_assert_uint_eq(dirty_log_count(l), RAM / 4096);
	for (int i = 0; i < 100; i++)
		ck_assert(dirty_log_test(l, 1000 + i, 1));
	take_all(l);
	/* And the ring is usable again, from wherever the producer is. */
	ring_write(5000);
	ring_write(5001);
	ck_assert_int_eq(dirty_log_sync(l), 2);
	struct runs r = take_all(l);
	ck_assert_int_eq(r.cnt, 1);
	ck_assert_uint_eq(r.g[0], 5000);
	ck_assert_uint_eq(r.n[0], 2);
	dirty_log_close(l);
}
END_TEST

START_TEST(own_writes_aggregate_on_folios)
{
	char err[128];
	struct dirty_log *l = dirty_log_open(trk, err, sizeof(err));
	uint8_t b = 1;
	struct runs r;

	/* Back 2 MiB at 8 MiB as one folio, and one 4 KiB folio at 32 MiB. */
	ck_assert_int_eq(mm_populate(gm, 2048, 512, 9), 0);
	ck_assert_int_eq(mm_populate(gm, 8192, 1, 0), 0);
	dirty_log_sync(l);
	take_all(l);
	/* mdvm's own write (devices, loaders) goes through the owner path:
	 * FOLIO_DIRTY on the folio; a sync folds it into the log as the
	 * whole folio (a folio is dirty when any of its pages is). */
	ck_assert_int_eq(mm_write(gm, (2048 + 17) * 4096ULL, &b, 1), 0);
	ck_assert_int_eq(mm_write(gm, 8192 * 4096ULL, &b, 1), 0);
	struct folio *f = folio_get_gfn(gm, 2048);
	ck_assert_ptr_nonnull(f);
	ck_assert(folio_test(f, FOLIO_DIRTY));
	folio_put(f);
	dirty_log_sync(l);
	f = folio_get_gfn(gm, 2048);
	ck_assert(!folio_test(f, FOLIO_DIRTY));   /* folded */
	folio_put(f);
	r = take_all(l);
	ck_assert_int_eq(r.cnt, 2);
	ck_assert_uint_eq(r.g[0], 2048); ck_assert_uint_eq(r.n[0], 512);
	ck_assert_uint_eq(r.g[1], 8192); ck_assert_uint_eq(r.n[1], 1);
	/* A vCPU write (from the source) inside the large folio: only that page. */
	fake_write(2048 + 300);
	dirty_log_sync(l);
	r = take_all(l);
	ck_assert_int_eq(r.cnt, 1);
	ck_assert_uint_eq(r.g[0], 2348); ck_assert_uint_eq(r.n[0], 1);
	dirty_log_close(l);
}
END_TEST

START_TEST(two_consumers)
{
	char err[128];
	struct dirty_log *a = dirty_log_open(trk, err, sizeof(err));
	struct dirty_log *b = dirty_log_open(trk, err, sizeof(err));
	uint8_t v = 7;

	ck_assert_int_eq(starts, 1);   /* logging started once */
	ck_assert_int_eq(mm_populate(gm, 4096, 1, 0), 0);
	fake_write(10);
	ck_assert_int_eq(mm_write(gm, 4096 * 4096ULL, &v, 1), 0);
	dirty_log_sync(a);
	/* b sees both although a's sync harvested and cleared the flag. */
	ck_assert(dirty_log_test(b, 10, 1));
	ck_assert(dirty_log_test(b, 4096, 1));
	take_all(a);
	ck_assert_uint_eq(dirty_log_count(a), 0);
	ck_assert_uint_eq(dirty_log_count(b), 2);
	dirty_log_close(a);
	ck_assert_int_eq(stops, 0);
	dirty_log_close(b);
	ck_assert_int_eq(stops, 1);
}
END_TEST

START_TEST(take_stops_early_and_bounds)
{
	char err[128];
	struct dirty_log *l = dirty_log_open(trk, err, sizeof(err));

	dirty_log_mark(l, 60, 10);           /* spans a 64-bit word boundary */
	dirty_log_mark(l, RAM / 4096 - 1, 5);  /* clipped at the end */
	ck_assert_uint_eq(dirty_log_count(l), 11);
	struct runs r = { .cnt = 0 };
	ck_assert_int_eq(dirty_log_take(l, 62, 4, collect, &r), 0);   /* part of the run */
	ck_assert_int_eq(r.cnt, 1);
	ck_assert_uint_eq(r.g[0], 62); ck_assert_uint_eq(r.n[0], 4);
	ck_assert_uint_eq(dirty_log_count(l), 7);
	r = take_all(l);
	ck_assert_int_eq(r.cnt, 3);
	ck_assert_uint_eq(r.g[0], 60); ck_assert_uint_eq(r.n[0], 2);
	ck_assert_uint_eq(r.g[1], 66); ck_assert_uint_eq(r.n[1], 4);
	ck_assert_uint_eq(r.g[2], RAM / 4096 - 1); ck_assert_uint_eq(r.n[2], 1);
	dirty_log_close(l);
}
END_TEST

/* Releasing pages (balloon inflate, free page reporting) and replacing
 * poisoned ones change a page without a guest write: the frames are
 * recorded so a migration sends their new type. Nothing changed, nothing
 * recorded. */
START_TEST(released_frames_recorded)
{
	char err[128];
	struct dirty_log *l = dirty_log_open(trk, err, sizeof(err));
	struct runs r;

	ck_assert_int_eq(mm_populate(gm, 2048, 512, 9), 0);
	dirty_log_sync(l);
	take_all(l);
	ck_assert_int_eq(mm_release_range(gm, 2058, 4, MEMDESC_BALLOONED), 0);
	r = take_all(l);
	ck_assert_int_eq(r.cnt, 1);
	ck_assert_uint_eq(r.g[0], 2058); ck_assert_uint_eq(r.n[0], 4);
	ck_assert_int_eq(mm_release_range(gm, 2058, 4, MEMDESC_BALLOONED), 0);   /* already */
	ck_assert_int_eq(take_all(l).cnt, 0);
	/* reported (to unbacked), and deflated */
	ck_assert_int_eq(mm_release_range(gm, 2100, 2, MEMDESC_UNBACKED), 0);
	ck_assert_int_eq(mm_release_range(gm, 2058, 4, MEMDESC_UNBACKED), 0);
	r = take_all(l);
	ck_assert_int_eq(r.cnt, 2);
	ck_assert_uint_eq(r.g[0], 2058); ck_assert_uint_eq(r.n[0], 4);
	ck_assert_uint_eq(r.g[1], 2100); ck_assert_uint_eq(r.n[1], 2);
	/* a sync does not lose them (nothing else dirty) */
	ck_assert_int_eq(mm_release_range(gm, 2200, 1, MEMDESC_BALLOONED), 0);
	dirty_log_sync(l);
	ck_assert(dirty_log_test(l, 2200, 1));
	take_all(l);
	/* poisoned -> unbacked (reset) */
	ck_assert_int_eq(memdesc_memory_failure(gm, 2300), 0);
	dirty_log_sync(l);
	take_all(l);
	ck_assert_int_eq(mm_unpoison_range(gm, 2300, 1), 1);
	r = take_all(l);
	ck_assert_int_eq(r.cnt, 1);
	ck_assert_uint_eq(r.g[0], 2300); ck_assert_uint_eq(r.n[0], 1);
	dirty_log_close(l);
}
END_TEST

Suite *dirty_suite(void)
{
	Suite *s = suite_create("dirty");
	TCase *tc = tcase_create("dirty");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, ring_path);
	tcase_add_test(tc, bitmap_path);
	tcase_add_test(tc, ring_overrun_reports_everything);
	tcase_add_test(tc, own_writes_aggregate_on_folios);
	tcase_add_test(tc, two_consumers);
	tcase_add_test(tc, take_stops_early_and_bounds);
	tcase_add_test(tc, released_frames_recorded);
	suite_add_tcase(s, tc);
	return s;
}
