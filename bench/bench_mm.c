/* bench_mm: what the memdesc scheme costs (docs/memdesc.md).
 *
 *   cc -O2 -std=gnu11 -D_GNU_SOURCE -pthread -o build/bench_mm bench/bench_mm.c mm/(every .c)
 *   build/bench_mm [--quick]
 *
 * Prints markdown tables: metadata bytes per GiB of guest RAM for a guest of
 * 4 KiB folios and one of 2 MiB folios (and a 1 TiB guest that touches
 * little), then lookup/update throughput, then dirty tracking of 2 MiB folios
 * dirtied sparsely and repeatedly (per-page record vs split; `--dirty` runs
 * only that table). No KVM needed: guest RAM is
 * populated through mm/ directly, or touched through the guest window to
 * take the userfaultfd first-touch path exactly as a vCPU would. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../mm/dirty.h"
#include "../mm/mm.h"

#define MiB (1ULL << 20)
#define GiB (1ULL << 30)
#define PG  4096ULL

static bool quick;

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static struct guest_mem *create(uint64_t ram, enum mm_backing b, unsigned fault_pages, int lazy)
{
	struct mm_config c = { .ram_size = ram, .backing = b, .fault_pages = fault_pages,
			       .lazy = lazy, .quiet = true };
	char err[256];
	struct guest_mem *gm = mm_create(&c, NULL, NULL, err, sizeof(err));
	if (!gm) {
		fprintf(stderr, "bench_mm: mm_create: %s\n", err);
		exit(1);
	}
	return gm;
}

static const char *human(double bytes, char *buf, size_t len)
{
	if (bytes >= 10 * MiB)
		snprintf(buf, len, "%.1f MiB", bytes / MiB);
	else if (bytes >= 10 * 1024)
		snprintf(buf, len, "%.1f KiB", bytes / 1024);
	else
		snprintf(buf, len, "%.0f B", bytes);
	return buf;
}

static void metadata_row(const char *what, uint64_t ram, struct guest_mem *gm, double secs)
{
	struct mm_stats st;
	char a[32], b[32], c[32], d[32], e[32];
	mm_query_stats(gm, &st);
	double gib = (double)ram / GiB, pages = (double)ram / PG;
	double per_gib = (double)st.metadata_bytes / gib;
	uint64_t nf = 0;
	for (int k = 0; k <= MM_MAX_ORDER; k++)
		nf += st.folios[k];
	printf("| %s | %s | %llu | %s | %s | %s | %s | %.2f | %.4f%% | %.2f s |\n", what,
	       human((double)st.populated_bytes, e, sizeof(e)), (unsigned long long)nf,
	       human((double)st.memdesc_bytes / gib, a, sizeof(a)),
	       human((double)st.folio_bytes / gib, b, sizeof(b)),
	       human((double)st.pool_bytes / gib, c, sizeof(c)),
	       human(per_gib, d, sizeof(d)),
	       (double)st.memdesc_bytes / pages, 100.0 * (double)st.metadata_bytes / (double)ram, secs);
}

/* Guests of 4 KiB and 2 MiB folios, every page populated (no host memory is
 * touched: anonymous backing, populated at creation without userfaultfd). */
static void bench_metadata(void)
{
	uint64_t sizes[] = { 1 * GiB, 16 * GiB };
	printf("## Metadata per GiB of guest RAM\n\n");
	printf("Every page populated at creation (anon backing, `lazy = -1`); metadata = memdesc tables "
	       "+ folio slab cache + pool hugepage states, per GiB of guest RAM. "
	       "Target: <= 8 B per 4 KiB page in the memdesc table plus folio descriptors.\n\n");
	printf("| guest | populated | folios | memdesc/GiB | folios/GiB | pool/GiB | total/GiB | "
	       "memdesc B/page | total %% of RAM | create |\n");
	printf("|---|---|---|---|---|---|---|---|---|---|\n");
	for (unsigned i = 0; i < (quick ? 1u : 2u); i++) {
		for (unsigned fp = 1; fp <= 512; fp *= 512) {
			double t0 = now();
			struct guest_mem *gm = create(sizes[i], MM_BACKING_ANON, fp, -1);
			double t = now() - t0;
			char what[64];
			snprintf(what, sizeof(what), "%llu GiB, %s folios",
				 (unsigned long long)(sizes[i] / GiB), fp == 1 ? "4 KiB" : "2 MiB");
			metadata_row(what, sizes[i], gm, t);
			mm_destroy(gm);
		}
	}
	/* A 4 KiB-folio guest made by splitting 2 MiB folios (the realistic way:
	 * first touch gives 2 MiB folios, splits come later). */
	{
		struct guest_mem *gm = create(GiB, MM_BACKING_ANON, 512, -1);
		double t0 = now();
		for (uint64_t g = 0; g < GiB / PG; g += 512)
			folio_split(gm, g, 0);
		metadata_row("1 GiB, 2 MiB folios split to 4 KiB", GiB, gm, now() - t0);
		mm_destroy(gm);
	}
	/* 1 TiB that touches 256 MiB through the first-touch path. */
	{
		double t0 = now();
		struct guest_mem *gm = create(1ULL << 40, MM_BACKING_MEMFD, 0, 0);
		double tc = now() - t0;
		struct mm_stats st;
		char a[32], b[32];
		mm_query_stats(gm, &st);
		printf("\n1 TiB guest (memfd, userfaultfd first touch): created in %.2f ms, metadata %s; ",
		       tc * 1e3, human((double)st.metadata_bytes, a, sizeof(a)));
		volatile uint8_t *base = mm_guest_base(gm);
		t0 = now();
		for (uint64_t a2 = 0; a2 < 256 * MiB; a2 += PG)
			base[512 * GiB + a2] = 1;
		double tt = now() - t0;
		mm_query_stats(gm, &st);
		printf("after touching 256 MiB (%llu faults, %.1f ms): metadata %s.\n\n",
		       (unsigned long long)st.faults, tt * 1e3, human((double)st.metadata_bytes, b, sizeof(b)));
		mm_destroy(gm);
	}
}

/* ---- throughput */
static uint64_t xorshift(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

struct lookup_arg {
	struct guest_mem *gm;
	uint64_t npages, ops, seed, sink;
	int kind;   /* 0 lookup, 1 mark_dirty, 2 folio_get/put */
};

static void *lookup_thread(void *p)
{
	struct lookup_arg *a = p;
	uint64_t s = a->seed, sink = 0;
	for (uint64_t i = 0; i < a->ops; i++) {
		uint64_t g = xorshift(&s) % a->npages;
		switch (a->kind) {
		case 0:
			sink += memdesc_lookup(a->gm, g);
			break;
		case 1:
			memdesc_mark_dirty(a->gm, g);
			break;
		default: {
			struct folio *f = folio_get_gfn(a->gm, g);
			if (f) {
				sink += f->order;
				folio_put(f);
			}
		}
		}
	}
	a->sink = sink;
	return NULL;
}

static double run_threads(struct guest_mem *gm, uint64_t npages, int kind, int nthreads, uint64_t ops)
{
	pthread_t th[8];
	struct lookup_arg a[8];
	double t0 = now();
	for (int i = 0; i < nthreads; i++) {
		a[i] = (struct lookup_arg){ gm, npages, ops, 0x9e3779b97f4a7c15ULL * (uint64_t)(i + 1), 0, kind };
		pthread_create(&th[i], NULL, lookup_thread, &a[i]);
	}
	for (int i = 0; i < nthreads; i++)
		pthread_join(th[i], NULL);
	return (double)ops * nthreads / (now() - t0);
}

static void row(const char *what, double ops_per_s, const char *note)
{
	if (ops_per_s >= 1e6)
		printf("| %s | %.1f M | %s |\n", what, ops_per_s / 1e6, note);
	else if (ops_per_s >= 1e4)
		printf("| %s | %.0f k | %s |\n", what, ops_per_s / 1e3, note);
	else
		printf("| %s | %.0f | %s |\n", what, ops_per_s, note);
}

static void bench_throughput(void)
{
	uint64_t ram = 4 * GiB, npages = ram / PG, ops = quick ? 2000000 : 20000000;
	printf("## Lookup and update throughput\n\n");
	printf("4 GiB guest, random frames, ops per second (2 host CPUs here).\n\n");
	printf("| operation | ops/s | note |\n|---|---|---|\n");
	for (unsigned fp = 512; fp >= 1; fp /= 512) {
		struct guest_mem *gm = create(ram, MM_BACKING_ANON, fp, -1);
		const char *sz = fp == 1 ? "4 KiB folios" : "2 MiB folios";
		char what[96];
		snprintf(what, sizeof(what), "memdesc_lookup, %s, 1 thread", sz);
		row(what, run_threads(gm, npages, 0, 1, ops), fp == 1 ? "top entry + leaf" : "top entry only");
		snprintf(what, sizeof(what), "memdesc_lookup, %s, 2 threads", sz);
		row(what, run_threads(gm, npages, 0, 2, ops), "lock-free, read-only");
		snprintf(what, sizeof(what), "folio_get_gfn + folio_put, %s", sz);
		row(what, run_threads(gm, npages, 2, 1, ops / 2), "refcount inc-not-zero + recheck");
		snprintf(what, sizeof(what), "memdesc_mark_dirty (owner op), %s", sz);
		row(what, run_threads(gm, npages, 1, 1, ops / 2), "lock-free: flag + generation");
		snprintf(what, sizeof(what), "memdesc_mark_dirty, %s, 2 threads", sz);
		row(what, run_threads(gm, npages, 1, 2, ops / 2), "same folios from 2 threads");
		mm_destroy(gm);
		if (fp == 1)
			break;
	}
	/* structural updates */
	{
		struct guest_mem *gm = create(GiB, MM_BACKING_ANON, 512, -1);
		unsigned n = quick ? 100 : 512;
		double t0 = now();
		for (unsigned i = 0; i < n; i++) {
			folio_split(gm, (uint64_t)i * 512, 0);
			folio_merge(gm, (uint64_t)i * 512, 9);
		}
		double t = now() - t0;
		row("folio_split 2 MiB -> 512 x 4 KiB + folio_merge back (pairs/s)", n / t,
		    "511 descriptors + a leaf table each way");
		t0 = now();
		uint64_t pages = 0;
		for (unsigned i = 0; i < n; i++) {
			folio_split(gm, (uint64_t)i * 512, 8);
			pages += 512;
		}
		t = now() - t0;
		row("folio_split 2 MiB -> 2 x 1 MiB (splits/s)", n / t, "");
		mm_destroy(gm);
	}
	{
		struct guest_mem *gm = create(4 * GiB, MM_BACKING_MEMFD, 0, 0);
		unsigned n = quick ? 256 : 2048;
		double t0 = now();
		for (unsigned i = 0; i < n; i++)
			mm_populate(gm, (uint64_t)i * 512, 512, 9);
		double t = now() - t0;
		row("mm_populate 2 MiB folio, memfd (folios/s)", n / t, "pool + mmap(MAP_FIXED)");
		t0 = now();
		for (unsigned i = 0; i < n; i++)
			mm_release_range(gm, (uint64_t)i * 512, 512, MEMDESC_UNBACKED);
		t = now() - t0;
		row("mm_release_range 2 MiB, memfd (folios/s)", n / t,
		    "placeholder mmap + uffd register + PUNCH_HOLE");
		volatile uint8_t *base = mm_guest_base(gm);
		t0 = now();
		for (unsigned i = 0; i < n; i++)
			base[(uint64_t)i * 2 * MiB + 64] = 1;
		t = now() - t0;
		row("first touch via userfaultfd, memfd (2 MiB faults/s)", n / t,
		    "fault, folio, MAP_FIXED, wake; no data touched");
		unsigned nm = n / 16;
		for (unsigned i = 0; i < nm; i++)   /* give them data: a move copies 2 MiB */
			memset((uint8_t *)base + (uint64_t)i * 2 * MiB, (int)i, 2 * MiB);
		t0 = now();
		for (unsigned i = 0; i < nm; i++)
			memdesc_move(gm, (uint64_t)i * 512, MM_HPAGE_ANY);
		t = now() - t0;
		row("memdesc_move 2 MiB folio with data, memfd (moves/s)", nm / t,
		    "copy 2 MiB to a new hugepage + MAP_FIXED + PUNCH_HOLE old");
		mm_destroy(gm);
	}
	{
		struct guest_mem *gm = create(4 * GiB, MM_BACKING_ANON, 0, 0);
		unsigned n = quick ? 256 : 2048;
		volatile uint8_t *base = mm_guest_base(gm);
		double t0 = now();
		for (unsigned i = 0; i < n; i++)
			base[(uint64_t)i * 2 * MiB + 64] = 1;
		double t = now() - t0;
		row("first touch via userfaultfd, anon (2 MiB faults/s)", n / t,
		    "fault, folio, UFFDIO_UNREGISTER, wake");
		mm_destroy(gm);
	}
	printf("\n");
}

/* ---- dirty tracking of large folios dirtied sparsely and repeatedly
 * (docs/dirty-tracking.md): keep the 2 MiB folio and record pages in the
 * log's bitmap (mdvm), or split it into 4 KiB folios the first time. Per
 * round, as a migration iteration does: the harvest records the pages
 * (dirty_tracker_record, what vmm/dirty_kvm.c calls), then dirty_log_sync +
 * dirty_log_take, and the bytes vmm/migration.c would send for the runs
 * taken (a record per folio piece: 16 B header, presence bitmap, 4 KiB per
 * page; pages assumed non-zero). */
struct sent {
	struct guest_mem *gm;
	uint64_t bytes, records, folios_dirty, last_folio;
};

static int count_sent(void *opaque, uint64_t gfn, uint64_t nr)
{
	struct sent *c = opaque;
	uint64_t end = gfn + nr;
	while (gfn < end) {
		struct folio *f = folio_get_gfn(c->gm, gfn);
		uint64_t fs = f ? folio_gfn(f) : gfn, fe = f ? fs + folio_nr_pages(f) : gfn + 1;
		uint64_t n = (fe < end ? fe : end) - gfn;
		if (f)
			folio_put(f);
		c->bytes += 16 + 8 * ((n + 63) / 64) + n * PG;
		c->records++;
		if (gfn / 512 != c->last_folio) {   /* 2 MiB regions touched */
			c->folios_dirty++;
			c->last_folio = gfn / 512;
		}
		gfn += n;
	}
	return 0;
}

static void bench_dirty_sparse(void)
{
	const uint64_t ram = 256 * MiB, npages = ram / PG;
	const unsigned hot = 32, rounds = quick ? 200 : 2000;
	const unsigned ks[] = { 1, 8 };

	printf("## Dirty tracking: 2 MiB folios dirtied sparsely and repeatedly\n\n");
	printf("256 MiB guest of 2 MiB folios (anon); each round dirties k random pages in each of "
	       "%u folios, then harvest-records them, syncs and takes the log (as one migration "
	       "iteration); %u rounds. Bytes/round: what migration would send for the runs taken "
	       "(16 B record + presence bitmap + 4 KiB per page; folio-only: the whole folio).\n\n",
	       hot, rounds);
	printf("| strategy | k | record ns/page | sync+take us/round | bytes sent/round | records/round "
	       "| one-time cost | metadata of the %u folios |\n", hot);
	printf("|---|---|---|---|---|---|---|---|\n");
	for (unsigned ki = 0; ki < sizeof(ks) / sizeof(ks[0]); ki++) {
		unsigned k = ks[ki];
		double folio_only = 0;
		for (int split = 0; split <= 1; split++) {
			struct guest_mem *gm = create(ram, MM_BACKING_ANON, 512, -1);
			struct dirty_tracker *t = dirty_tracker_create(gm, NULL);
			char err[256];
			struct dirty_log *l = dirty_log_open(t, err, sizeof(err));
			struct sent c = { .gm = gm, .last_folio = UINT64_MAX };
			uint64_t s = 0x9e3779b97f4a7c15ULL * (k + 1), hot_gfn[64];
			struct mm_stats st0, st1;
			if (!l) {
				fprintf(stderr, "bench_mm: dirty_log_open: %s\n", err);
				exit(1);
			}
			for (unsigned h = 0; h < hot; h++)   /* spread over the guest */
				hot_gfn[h] = (uint64_t)h * (npages / hot);
			mm_query_stats(gm, &st0);
			double t_split = 0;
			if (split) {
				double t0 = now();
				for (unsigned h = 0; h < hot; h++)
					folio_split(gm, hot_gfn[h], 0);
				t_split = now() - t0;
			}
			mm_query_stats(gm, &st1);
			dirty_log_sync(l);
			dirty_log_take(l, 0, npages, count_sent, &c);
			c = (struct sent){ .gm = gm, .last_folio = UINT64_MAX };
			double t_rec = 0, t_sync = 0;
			for (unsigned r = 0; r < rounds; r++) {
				uint64_t g[64 * 8];
				for (unsigned h = 0; h < hot; h++)
					for (unsigned j = 0; j < k; j++)
						g[h * k + j] = hot_gfn[h] + xorshift(&s) % 512;
				double t0 = now();
				for (unsigned i = 0; i < hot * k; i++)
					dirty_tracker_record(t, g[i], 1);
				double t1 = now();
				dirty_log_sync(l);
				c.last_folio = UINT64_MAX;
				dirty_log_take(l, 0, npages, count_sent, &c);
				t_sync += now() - t1;
				t_rec += t1 - t0;
			}
			if (!split)
				folio_only = (double)c.folios_dirty / rounds * (16 + 64 + 512 * PG);
			char b1[32], b2[32], one[48];
			if (split)
				snprintf(one, sizeof(one), "split: %.1f us per folio", t_split * 1e6 / hot);
			else
				snprintf(one, sizeof(one), "-");
			printf("| %s | %u | %.1f | %.1f | %s | %.1f | %s | %s |\n",
			       split ? "split to 4 KiB folios" : "per-page record (mdvm)", k,
			       t_rec * 1e9 / ((double)rounds * hot * k), t_sync * 1e6 / rounds,
			       human((double)c.bytes / rounds, b1, sizeof(b1)), (double)c.records / rounds, one,
			       human(split ? (double)(st1.folio_bytes + st1.memdesc_bytes) -
					     (double)(st0.folio_bytes + st0.memdesc_bytes) : 0, b2, sizeof(b2)));
			dirty_log_close(l);
			dirty_tracker_destroy(t);
			mm_destroy(gm);
		}
		char b[32];
		printf("| folio-only (whole folio resent) | %u | - | - | %s | %.1f | - | - |\n", k,
		       human(folio_only, b, sizeof(b)), (double)hot);
	}
	printf("\n");
}

int main(int argc, char **argv)
{
	bool dirty_only = false;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--quick")) {
			quick = true;
		} else if (!strcmp(argv[i], "--dirty")) {
			dirty_only = true;
		} else {
			fprintf(stderr, "usage: bench_mm [--quick] [--dirty]\n");
			return 2;
		}
	}
	printf("# mm/ memdesc benchmark\n\n");
	printf("sizeof(memdesc_t) = %zu, sizeof(struct folio) = %zu\n\n", sizeof(memdesc_t),
	       sizeof(struct folio));
	if (!dirty_only) {
		bench_metadata();
		bench_throughput();
	}
	bench_dirty_sparse();
	return 0;
}
