/* Compaction: which host hugepages to empty (the placement policy), moving
 * their folios out with mm/migrate.c, and collapse of 2 MiB guest regions
 * into order-9 folios. What each backing allows: docs/compaction.md. */
#include "mm_internal.h"
#include "migrate.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* ---- the placement policy (pure: unit-tested without guest memory) */
static bool bits_free(const uint64_t *u, unsigned p, unsigned n)
{
	for (unsigned i = p; i < p + n;) {
		unsigned k = n - (i - p) < 64 - i % 64 ? n - (i - p) : 64 - i % 64;
		uint64_t mask = (k == 64 ? ~0ULL : ((1ULL << k) - 1)) << (i % 64);
		if (u[i / 64] & mask)
			return false;
		i += k;
	}
	return true;
}

static void bits_set(uint64_t *u, unsigned p, unsigned n, bool on)
{
	for (unsigned i = p; i < p + n;) {
		unsigned k = n - (i - p) < 64 - i % 64 ? n - (i - p) : 64 - i % 64;
		uint64_t mask = (k == 64 ? ~0ULL : ((1ULL << k) - 1)) << (i % 64);
		if (on)
			u[i / 64] |= mask;
		else
			u[i / 64] &= ~mask;
		i += k;
	}
}

/* Where pool_place(want = this hugepage) puts a folio: its colour if free,
 * else the first free aligned block. */
static int fit(const struct compact_hp *h, const struct compact_folio *f)
{
	unsigned n = 1u << f->order, colour = (unsigned)(f->gfn & (MM_REGION_PAGES - 1));
	if (h->nr_used + h->nr_bad + n > MM_REGION_PAGES)
		return -1;
	if (bits_free(h->used, colour, n))
		return (int)colour;
	for (unsigned p = 0; p < MM_REGION_PAGES; p += n)
		if (bits_free(h->used, p, n))
			return (int)p;
	return -1;
}

static const struct compact_hp *sort_hps;
static int by_used_asc(const void *a, const void *b)
{
	const struct compact_hp *x = &sort_hps[*(const unsigned *)a], *y = &sort_hps[*(const unsigned *)b];
	return x->nr_used != y->nr_used ? (x->nr_used < y->nr_used ? -1 : 1) : (x->idx < y->idx ? -1 : 1);
}

struct undo { unsigned t, piece, n; };

unsigned compact_plan(struct compact_hp *hps, unsigned nhp, const struct compact_folio *folios,
		      unsigned nfolios, uint64_t budget_pages, uint32_t *dst, uint32_t *emptied)
{
	unsigned *src = malloc((nhp + 1) * sizeof(*src)), *tgt = malloc((nhp + 1) * sizeof(*tgt));
	uint8_t *state = calloc(nhp + 1, 1);   /* 1 emptied, 2 kept (received folios) */
	struct undo *u = malloc((nfolios + 1) * sizeof(*u));
	unsigned nemptied = 0;
	uint64_t moved = 0, free_total = 0;
	if (!src || !tgt || !state || !u)
		goto out;
	for (unsigned i = 0; i < nfolios; i++)
		dst[i] = COMPACT_NO_DST;
	for (unsigned i = 0; i < nhp; i++) {
		src[i] = tgt[i] = i;
		free_total += MM_REGION_PAGES - hps[i].nr_used - hps[i].nr_bad;
	}
	sort_hps = hps;
	qsort(src, nhp, sizeof(*src), by_used_asc);
	for (unsigned i = 0; i < nhp; i++)
		tgt[i] = src[nhp - 1 - i];   /* fullest first */

	for (unsigned si = 0; si < nhp; si++) {
		unsigned s = src[si];
		struct compact_hp *h = &hps[s];
		if (!h->nr_used || h->nr_bad || h->stuck || state[s])
			continue;
		/* Room elsewhere (the source's own free pieces do not count). */
		if (free_total - (MM_REGION_PAGES - h->nr_used) < h->nr_used)
			break;
		if (budget_pages && moved + h->nr_used > budget_pages)
			break;
		/* The folios of this hugepage: a run in the sorted array. */
		unsigned a = 0, b = nfolios;
		while (a < b) {
			unsigned m = (a + b) / 2;
			if (folios[m].hpage < h->idx)
				a = m + 1;
			else
				b = m;
		}
		unsigned pages = 0, nu = 0;
		for (b = a; b < nfolios && folios[b].hpage == h->idx; b++)
			pages += 1u << folios[b].order;
		if (pages != h->nr_used)
			continue;   /* some occupant is not movable */
		bool ok = true;
		/* Largest first: they are the hardest to fit. */
		for (int order = MM_MAX_ORDER; order >= 0 && ok; order--) {
			for (unsigned i = a; i < b && ok; i++) {
				if (folios[i].order != order)
					continue;
				ok = false;
				for (unsigned ti = 0; ti < nhp; ti++) {
					unsigned t = tgt[ti];
					if (t == s || state[t] == 1)
						continue;
					int p = fit(&hps[t], &folios[i]);
					if (p < 0)
						continue;
					unsigned n = 1u << folios[i].order;
					bits_set(hps[t].used, (unsigned)p, n, true);
					hps[t].nr_used += n;
					u[nu++] = (struct undo){ t, (unsigned)p, n };
					dst[i] = hps[t].idx;
					ok = true;
					break;
				}
			}
		}
		if (!ok) {
			while (nu--) {
				bits_set(hps[u[nu].t].used, u[nu].piece, u[nu].n, false);
				hps[u[nu].t].nr_used -= u[nu].n;
			}
			for (unsigned i = a; i < b; i++)
				dst[i] = COMPACT_NO_DST;
			continue;
		}
		for (unsigned k = 0; k < nu; k++)
			state[u[k].t] = 2;
		state[s] = 1;
		free_total -= MM_REGION_PAGES - h->nr_used;   /* it leaves the pool */
		moved += h->nr_used;
		if (emptied)
			emptied[nemptied] = h->idx;
		nemptied++;
	}
out:
	free(src);
	free(tgt);
	free(state);
	free(u);
	return nemptied;
}

/* ---- reclaim */
static bool movable(struct folio *f)
{
	return !(atomic_load(&f->flags) & (FOLIO_HWPOISON | FOLIO_LOCKED | FOLIO_PINNED | FOLIO_MIGRATING));
}

static int by_hpage(const void *a, const void *b)
{
	const struct compact_folio *x = a, *y = b;
	if (x->hpage != y->hpage)
		return x->hpage < y->hpage ? -1 : 1;
	return x->piece < y->piece ? -1 : x->piece > y->piece;
}

/* Snapshot the pool and the folios in it (under gm->lock). */
static int snapshot(struct guest_mem *gm, struct compact_hp **hps_out, unsigned *nhp_out,
		    struct compact_folio **f_out, unsigned *nf_out)
{
	struct mm_pool *p = &gm->pool;
	uint32_t cap = p->next_new;
	struct compact_hp *hps = calloc(cap + 1, sizeof(*hps));
	uint32_t *pos = malloc((cap + 1) * sizeof(*pos));
	unsigned nhp = 0, nf = 0, fcap = 1024;
	struct compact_folio *fs = malloc(fcap * sizeof(*fs));
	if (!hps || !pos || !fs)
		goto nomem;
	for (uint32_t i = 0; i < cap; i++) {
		struct hpage *h = pool_hpage(p, i);
		pos[i] = UINT32_MAX;
		if (!h || !h->live)
			continue;
		pos[i] = nhp;
		hps[nhp].idx = i;
		memcpy(hps[nhp].used, h->used, sizeof(h->used));
		hps[nhp].nr_used = h->nr_used;
		hps[nhp].nr_bad = h->nr_bad;
		nhp++;
	}
	for (size_t r = 0; r < gm->nranges; r++) {
		uint64_t g = gm->ranges[r].gpa >> MM_PAGE_SHIFT, end = g + (gm->ranges[r].size >> MM_PAGE_SHIFT);
		while (g < end) {
			struct folio *f = memdesc_folio(mdt_get(&gm->md, g));
			if (!f) {
				g++;
				continue;
			}
			g = f->gfn + folio_nr_pages(f);
			if (f->hpage >= cap || pos[f->hpage] == UINT32_MAX)
				continue;
			if (!movable(f) || atomic_load(&f->refcount) != 1) {
				hps[pos[f->hpage]].stuck = true;
				continue;
			}
			if (nf == fcap) {
				fcap *= 2;
				struct compact_folio *n = realloc(fs, fcap * sizeof(*fs));
				if (!n)
					goto nomem;
				fs = n;
			}
			fs[nf++] = (struct compact_folio){ f->hpage, f->piece, f->order, f->gfn };
		}
	}
	free(pos);
	qsort(fs, nf, sizeof(*fs), by_hpage);
	*hps_out = hps;
	*nhp_out = nhp;
	*f_out = fs;
	*nf_out = nf;
	return 0;
nomem:
	free(hps);
	free(pos);
	free(fs);
	return -ENOMEM;
}

/* Mappings this process has and may have (vm.max_map_count). */
static long count_lines(const char *path)
{
	FILE *f = fopen(path, "r");
	char buf[65536];
	long n = 0;
	size_t k;
	if (!f)
		return -1;
	while ((k = fread(buf, 1, sizeof(buf), f)) > 0)
		for (size_t i = 0; i < k; i++)
			n += buf[i] == '\n';
	fclose(f);
	return n;
}

/* How many 4 KiB-folio moves the mapping budget allows: a folio moved out of
 * its home hugepage becomes a VMA of its own at its GPA, and the piece it
 * lands on may need a placeholder at the GPA that still mapped it: up to 4
 * new VMAs. Compaction uses at most half of the headroom below
 * vm.max_map_count, so the guest's own releases and faults never hit it. */
static uint64_t map_budget_moves(void)
{
	long max = mm_read_long("/proc/sys/vm/max_map_count"), now = count_lines("/proc/self/maps");
	if (max <= 0 || now < 0)
		return 0;
	long room = (max - now) / 2;
	return room > 0 ? (uint64_t)room / 4 : 0;
}

static int reclaim(struct guest_mem *gm, const struct mm_compact_req *req, struct mm_migrate_ctx *c,
		   struct mm_compact_result *res)
{
	struct compact_hp *hps;
	struct compact_folio *fs;
	unsigned nhp, nf;
	pthread_mutex_lock(&gm->lock);
	int rc = snapshot(gm, &hps, &nhp, &fs, &nf);
	pthread_mutex_unlock(&gm->lock);
	if (rc)
		return rc;
	uint32_t *dst = malloc((nf + 1) * sizeof(*dst)), *emptied = malloc((nhp + 1) * sizeof(*emptied));
	if (!dst || !emptied) {
		rc = -ENOMEM;
		goto out;
	}
	uint64_t budget = req->budget_bytes >> MM_PAGE_SHIFT, moves = map_budget_moves();
	res->map_budget_folios = moves;
	if (!budget || moves < budget)
		budget = moves ? moves : 1;   /* pages >= folios: conservative */
	unsigned ne = compact_plan(hps, nhp, fs, nf, budget, dst, emptied);
	if (moves <= nf)
		res->note = "memfd: stopped at the mapping budget (half the headroom below "
			    "vm.max_map_count; 4 KiB pieces moved out of their home hugepage are "
			    "one mapping each)";
	for (unsigned i = 0; i < nf; i++) {
		if (dst[i] == COMPACT_NO_DST)
			continue;
		/* The folio may have changed since the snapshot (split, freed,
		 * moved by the guest's balloon): move whatever owns the frame
		 * now if it still sits in the planned source. */
		struct folio *f = folio_get_gfn(gm, fs[i].gfn);
		bool same = f && f->hpage == fs[i].hpage && f->gfn == fs[i].gfn;
		if (f)
			folio_put(f);
		if (same)
			mm_migrate_folio(gm, c, fs[i].gfn, dst[i]);
	}
	mm_migrate_end(gm, c);
	for (unsigned i = 0; i < ne; i++) {
		struct mm_hpage_info hi;
		if (mm_pool_hpage_info(gm, emptied[i], &hi) == 0 && !hi.live)
			res->hugepages_freed++;
	}
out:
	free(dst);
	free(emptied);
	free(hps);
	free(fs);
	return rc;
}

/* ---- hugetlb: demote sparse regions to 4 KiB pages of the side file */
static int demote_sparse(struct guest_mem *gm, const struct mm_compact_req *req, struct mm_migrate_ctx *c,
			 struct mm_compact_result *res)
{
	unsigned min_free = req->demote_min_free ? req->demote_min_free : 64;
	for (size_t ri = 0; ri < gm->nranges; ri++) {
		uint64_t lo = (gm->ranges[ri].gpa + HPAGE_SIZE - 1) >> HPAGE_SHIFT;
		uint64_t hi = (gm->ranges[ri].gpa + gm->ranges[ri].size) >> HPAGE_SHIFT;
		for (uint64_t r = lo; r < hi; r++) {
			if (req->budget_bytes && c->st.bytes_moved >= req->budget_bytes)
				return 0;
			pthread_mutex_lock(&gm->lock);
			struct hpage *h = pool_region_home(gm, r, NULL);
			bool sparse = h && h->mapped && !h->nr_bad && h->nr_used &&
				      MM_REGION_PAGES - h->nr_used >= min_free &&
				      !(region_flags(gm, r) & REGION_DEMOTED);
			pthread_mutex_unlock(&gm->lock);
			if (sparse && mm_demote_region(gm, c, r) == 0)
				res->hugepages_freed++;
		}
	}
	return 0;
}

/* ---- collapse */
/* Frames of region r: backed folio frames, holes (unbacked/ballooned), and
 * whether anything forbids a 2 MiB folio (poison, reserved, pinned, MMIO). */
static void region_census(struct guest_mem *gm, uint64_t r, unsigned *backed, unsigned *holes,
			  bool *blocked, bool *whole)
{
	uint64_t g0 = r << REGION_SHIFT;
	*backed = *holes = 0;
	*blocked = false;
	memdesc_t m0 = mdt_get(&gm->md, g0);
	struct folio *f0 = memdesc_folio(m0);
	*whole = memdesc_type(m0) == MEMDESC_FOLIO && f0 && f0->order == MM_MAX_ORDER;
	if (*whole || mdt_region_is(&gm->md, r, m0)) {
		/* one 2 MiB folio, or uniformly untouched/ballooned/...: nothing to do */
		*blocked = !*whole;
		return;
	}
	for (uint64_t g = g0; g < g0 + MM_REGION_PAGES; g++) {
		memdesc_t md = mdt_get(&gm->md, g);
		switch (memdesc_type(md)) {
		case MEMDESC_FOLIO:
			(*backed)++;
			if (!movable(memdesc_folio(md)))
				*blocked = true;
			break;
		case MEMDESC_UNBACKED:
		case MEMDESC_BALLOONED:
			(*holes)++;
			break;
		default:
			*blocked = true;
		}
	}
}

static uint32_t piece_owner_locked_gfn(struct guest_mem *gm, uint32_t hp, unsigned piece, uint64_t *gfn)
{
	struct folio *f = mm_pool_piece_owner(gm, hp, piece);
	if (!f)
		return 0;
	*gfn = f->gfn;
	return 1;
}

/* memfd: bring every folio of region r to its colour in one hugepage. */
static int gather_region(struct guest_mem *gm, struct mm_migrate_ctx *c, uint64_t r, uint64_t budget)
{
	uint64_t g0 = r << REGION_SHIFT;
	uint32_t dst;
	pthread_mutex_lock(&gm->lock);
	struct hpage *home = pool_region_home(gm, r, &dst);
	if (!home || home->nr_bad) {
		struct folio *f = memdesc_folio(mdt_get(&gm->md, g0));
		dst = f ? f->hpage : NO_HPAGE;
		struct hpage *h = f ? pool_hpage(&gm->pool, dst) : NULL;
		if (!h || h->nr_bad)
			dst = NO_HPAGE;
	}
	pthread_mutex_unlock(&gm->lock);
	if (dst == NO_HPAGE)
		return -EAGAIN;
	/* 1: whatever sits in dst and is not one of ours at its colour leaves. */
	for (unsigned p = 0; p < MM_REGION_PAGES; p++) {
		uint64_t gfn;
		if (!piece_owner_locked_gfn(gm, dst, p, &gfn))
			continue;
		if ((gfn >> REGION_SHIFT) == r && (gfn & (MM_REGION_PAGES - 1)) == p)
			continue;
		if (budget && c->st.bytes_moved >= budget)
			return -EAGAIN;
		int rc = mm_migrate_folio(gm, c, gfn, MM_HPAGE_ANY);
		if (rc)
			return rc;
	}
	/* 2: ours come in, each to its colour (now free). */
	for (uint64_t g = g0; g < g0 + MM_REGION_PAGES;) {
		struct folio *f = folio_get_gfn(gm, g);
		if (!f)
			return -EAGAIN;
		uint64_t next = f->gfn + folio_nr_pages(f);
		bool there = f->hpage == dst && f->piece == (f->gfn & (MM_REGION_PAGES - 1));
		folio_put(f);
		if (!there) {
			if (budget && c->st.bytes_moved >= budget)
				return -EAGAIN;
			int rc = mm_migrate_folio(gm, c, g, dst);
			if (rc)
				return rc;
		}
		g = next;
	}
	return 0;
}

static int collapse(struct guest_mem *gm, const struct mm_compact_req *req, struct mm_migrate_ctx *c,
		    struct mm_compact_result *res)
{
	unsigned min_pages = req->collapse_min_pages ? req->collapse_min_pages : 448;
	for (size_t ri = 0; ri < gm->nranges; ri++) {
		uint64_t lo = gm->ranges[ri].gpa, hi = lo + gm->ranges[ri].size;
		if (req->size) {
			lo = lo > req->gpa ? lo : req->gpa;
			hi = hi < req->gpa + req->size ? hi : req->gpa + req->size;
		}
		lo = (lo + HPAGE_SIZE - 1) & ~(HPAGE_SIZE - 1);
		hi &= ~(HPAGE_SIZE - 1);
		for (uint64_t gpa = lo; gpa < hi; gpa += HPAGE_SIZE) {
			if (req->budget_bytes && c->st.bytes_moved >= req->budget_bytes)
				return 0;
			uint64_t r = gpa >> HPAGE_SHIFT, g0 = gpa >> MM_PAGE_SHIFT;
			unsigned backed, holes;
			bool blocked, whole;
			pthread_mutex_lock(&gm->lock);
			region_census(gm, r, &backed, &holes, &blocked, &whole);
			pthread_mutex_unlock(&gm->lock);
			/* hugetlb: the region's 2 MiB page is mapped whole anyway,
			 * so its holes cost no host memory to fill. */
			bool demoted = region_flags(gm, r) & REGION_DEMOTED;
			bool free_holes = gm->backing == MM_BACKING_HUGETLB && !demoted;
			if (whole || blocked || !backed || (backed < min_pages && !free_holes))
				continue;
			if (holes && min_pages >= MM_REGION_PAGES)
				continue;   /* only regions the guest filled itself */
			/* Holes get memory of their own: a 2 MiB folio has no holes. */
			if (holes && mm_populate(gm, g0, MM_REGION_PAGES, MM_MAX_ORDER))
				continue;
			/* A demoted region goes back onto a hugetlb page first. */
			if (demoted && mm_promote_region(gm, c, r))
				continue;
			if (gm->pool.fd >= 0 && gm->backing != MM_BACKING_HUGETLB &&
			    gather_region(gm, c, r, req->budget_bytes))
				continue;
			if (folio_merge(gm, g0, MM_MAX_ORDER))
				continue;
			/* THP: the merged folio is copied into a fresh 2 MiB-aligned
			 * MADV_HUGEPAGE area, so the kernel backs it with one THP. */
			if (gm->backing == MM_BACKING_THP)
				mm_migrate_folio(gm, c, g0, MM_HPAGE_ANY);
			res->regions_collapsed++;
		}
	}
	return 0;
}

int mm_compact(struct guest_mem *gm, const struct mm_compact_req *req, const struct mm_pause_ops *pause,
	       struct mm_compact_result *res)
{
	struct mm_migrate_ctx c;
	struct mm_stats st;
	memset(res, 0, sizeof(*res));
	int rc = mm_migrate_begin(gm, &c, req->method, pause);
	if (rc)
		return rc;
	res->method = c.method;
	uint64_t t0 = now_ns();
	mm_query_stats(gm, &st);
	res->hugepages_in_use_before = st.hugepages_in_use;
	int64_t hb = mm_host_bytes(gm);
	res->host_bytes_before = hb > 0 ? (uint64_t)hb : 0;
	if (req->mode == MM_COMPACT_COLLAPSE) {
		rc = collapse(gm, req, &c, res);
	} else {
		switch (gm->backing) {
		case MM_BACKING_MEMFD:
			rc = reclaim(gm, req, &c, res);
			break;
		case MM_BACKING_HUGETLB:
			rc = demote_sparse(gm, req, &c, res);
			break;
		default:
			res->note = "anonymous memory: freed 4 KiB pages went back at release; "
				    "the kernel compacts physical memory";
			break;
		}
	}
	mm_migrate_end(gm, &c);
	res->mig = c.st;
	res->regions_demoted = c.st.regions_demoted;
	res->regions_promoted = c.st.regions_promoted;
	mm_query_stats(gm, &st);
	res->hugepages_in_use_after = st.hugepages_in_use;
	hb = mm_host_bytes(gm);
	res->host_bytes_after = hb > 0 ? (uint64_t)hb : 0;
	if (res->host_bytes_before > res->host_bytes_after)
		res->bytes_returned = res->host_bytes_before - res->host_bytes_after;
	res->ns = now_ns() - t0;
	return rc;
}

uint64_t mm_regions_demoted(struct guest_mem *gm)
{
	pthread_mutex_lock(&gm->lock);
	uint64_t n = gm->pool.demoted;
	pthread_mutex_unlock(&gm->lock);
	return n;
}
