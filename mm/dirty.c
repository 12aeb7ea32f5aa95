/* Dirty tracking (dirty.h, docs/dirty-tracking.md).
 *
 * Each log keeps one bit per 4 KiB guest frame: the per-subpage record of
 * a folio. For a 2 MiB folio that is 64 bytes, in a MAP_NORESERVE array that
 * only costs host memory where something was ever dirtied. A folio is dirty
 * when any of its bits is, or when FOLIO_DIRTY is set: mdvm's own writes
 * (memdesc owner path) set only the flag, which a sync folds into the bits
 * of every open log before clearing it. */
#include "dirty.h"
#include "mm_internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define MAX_LOGS 4

struct dirty_log {
	struct dirty_tracker *t;
	_Atomic uint64_t *bits;
	size_t bytes;
	_Atomic uint64_t count;
};

struct dirty_tracker {
	struct guest_mem *gm;
	struct dirty_source src;
	bool has_src, logging;
	uint64_t npages;                 /* frames covered: [0, npages) */
	pthread_mutex_t lock;            /* open/close/sync */
	struct dirty_log *_Atomic logs[MAX_LOGS];
};

/* mm/ has one tracker per guest memory; few processes have more than one
 * guest memory (unit tests), so a small table does. */
static pthread_mutex_t trackers_lock = PTHREAD_MUTEX_INITIALIZER;
static struct dirty_tracker *trackers[16];

struct dirty_tracker *dirty_tracker_create(struct guest_mem *gm, const struct dirty_source *src)
{
	struct mm_range r[8];
	size_t n = mm_ram_ranges(gm, r, 8);
	struct dirty_tracker *t = calloc(1, sizeof(*t));

	if (!t)
		return NULL;
	if (n > 8)
		n = 8;
	t->gm = gm;
	if (src) {
		t->src = *src;
		t->has_src = true;
	}
	for (size_t i = 0; i < n; i++) {
		uint64_t end = (r[i].gpa + r[i].size) >> MM_PAGE_SHIFT;
		if (end > t->npages)
			t->npages = end;
	}
	pthread_mutex_init(&t->lock, NULL);
	pthread_mutex_lock(&trackers_lock);
	for (size_t i = 0; i < sizeof(trackers) / sizeof(trackers[0]); i++)
		if (!trackers[i]) {
			trackers[i] = t;
			break;
		}
	pthread_mutex_unlock(&trackers_lock);
	return t;
}

void dirty_tracker_destroy(struct dirty_tracker *t)
{
	if (!t)
		return;
	pthread_mutex_lock(&trackers_lock);
	for (size_t i = 0; i < sizeof(trackers) / sizeof(trackers[0]); i++)
		if (trackers[i] == t)
			trackers[i] = NULL;
	pthread_mutex_unlock(&trackers_lock);
	for (int i = 0; i < MAX_LOGS; i++)
		if (t->logs[i])
			dirty_log_close(t->logs[i]);
	pthread_mutex_destroy(&t->lock);
	free(t);
}

struct dirty_tracker *dirty_tracker_of(struct guest_mem *gm)
{
	struct dirty_tracker *found = NULL;

	pthread_mutex_lock(&trackers_lock);
	for (size_t i = 0; i < sizeof(trackers) / sizeof(trackers[0]); i++)
		if (trackers[i] && trackers[i]->gm == gm)
			found = trackers[i];
	pthread_mutex_unlock(&trackers_lock);
	return found;
}

void dirty_tracker_note(struct guest_mem *gm, uint64_t gfn, uint64_t nr)
{
	struct dirty_tracker *t = dirty_tracker_of(gm);

	if (!t || !nr)
		return;
	pthread_mutex_lock(&t->lock);
	dirty_tracker_record(t, gfn, nr);
	pthread_mutex_unlock(&t->lock);
}

static inline uint64_t range_mask(unsigned lo, unsigned hi)  /* bits [lo, hi), hi <= 64 */
{
	uint64_t m = hi == 64 ? ~0ULL : (1ULL << hi) - 1;
	return m & ~((1ULL << lo) - 1);
}

static void log_set_word(struct dirty_log *l, uint64_t w, uint64_t mask)
{
	uint64_t old;

	if ((atomic_load_explicit(&l->bits[w], memory_order_relaxed) & mask) == mask)
		return;
	old = atomic_fetch_or_explicit(&l->bits[w], mask, memory_order_release);
	if (mask & ~old)
		atomic_fetch_add_explicit(&l->count, (uint64_t)__builtin_popcountll(mask & ~old),
					  memory_order_relaxed);
}

void dirty_log_mark(struct dirty_log *l, uint64_t gfn, uint64_t nr)
{
	uint64_t npages = l->t->npages;

	if (gfn >= npages)
		return;
	if (nr > npages - gfn)
		nr = npages - gfn;
	while (nr) {
		unsigned lo = gfn & 63;
		unsigned hi = nr >= 64 - lo ? 64 : lo + (unsigned)nr;
		log_set_word(l, gfn >> 6, range_mask(lo, hi));
		nr -= hi - lo;
		gfn += hi - lo;
	}
}

void dirty_tracker_record(struct dirty_tracker *t, uint64_t gfn, uint64_t nr)
{
	for (int i = 0; i < MAX_LOGS; i++) {
		struct dirty_log *l = atomic_load_explicit(&t->logs[i], memory_order_acquire);
		if (l)
			dirty_log_mark(l, gfn, nr);
	}
}

void dirty_tracker_record_bitmap(struct dirty_tracker *t, uint64_t gfn, const uint64_t *bits,
				 uint64_t nbits)
{
	for (uint64_t w = 0; w < (nbits + 63) / 64; w++) {
		uint64_t v = bits[w];
		if (w == nbits / 64)
			v &= range_mask(0, nbits & 63);
		while (v) {
			unsigned b = (unsigned)__builtin_ctzll(v);
			unsigned e = b;
			while (e < 64 && (v >> e) & 1)
				e++;
			dirty_tracker_record(t, gfn + w * 64 + b, e - b);
			v &= ~range_mask(b, e);
		}
	}
}

struct dirty_log *dirty_log_open(struct dirty_tracker *t, char *err, size_t errlen)
{
	struct dirty_log *l = calloc(1, sizeof(*l));
	int slot = -1;

	if (!l) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	l->t = t;
	l->bytes = ((t->npages + 63) / 64) * 8;
	if (!l->bytes)
		l->bytes = 8;
	/* Untouched parts of the record cost no host memory. */
	l->bits = mmap(NULL, l->bytes, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (l->bits == MAP_FAILED) {
		snprintf(err, errlen, "dirty log: mmap: %s", strerror(errno));
		free(l);
		return NULL;
	}
	pthread_mutex_lock(&t->lock);
	for (int i = 0; i < MAX_LOGS; i++)
		if (!t->logs[i]) {
			slot = i;
			break;
		}
	if (slot < 0) {
		pthread_mutex_unlock(&t->lock);
		snprintf(err, errlen, "too many dirty logs open (max %d)", MAX_LOGS);
		goto fail;
	}
	atomic_store_explicit(&t->logs[slot], l, memory_order_release);
	if (t->has_src && !t->logging && t->src.start) {
		int rc = t->src.start(t->src.opaque);
		if (rc < 0) {
			atomic_store(&t->logs[slot], NULL);
			pthread_mutex_unlock(&t->lock);
			snprintf(err, errlen, "cannot start dirty logging: %s", strerror(-rc));
			goto fail;
		}
	}
	t->logging = true;
	pthread_mutex_unlock(&t->lock);
	return l;
fail:
	munmap((void *)l->bits, l->bytes);
	free(l);
	return NULL;
}

void dirty_log_close(struct dirty_log *l)
{
	struct dirty_tracker *t;
	bool any = false;

	if (!l)
		return;
	t = l->t;
	pthread_mutex_lock(&t->lock);
	for (int i = 0; i < MAX_LOGS; i++) {
		if (t->logs[i] == l)
			atomic_store_explicit(&t->logs[i], NULL, memory_order_release);
		else if (t->logs[i])
			any = true;
	}
	if (!any && t->logging) {
		if (t->has_src && t->src.stop)
			t->src.stop(t->src.opaque);
		t->logging = false;
	}
	/* A source recording outside our lock (a vCPU whose ring filled up)
	 * may still hold l: one more harvest waits for it under the source's
	 * own lock; later records see l unpublished. */
	if (t->has_src && t->src.harvest)
		t->src.harvest(t->src.opaque, t);
	pthread_mutex_unlock(&t->lock);
	munmap((void *)l->bits, l->bytes);
	free(l);
}

/* FOLIO_DIRTY -> page records in every log, flag cleared. */
static void fold_folio_flags(struct dirty_tracker *t)
{
	struct guest_mem *gm = t->gm;
	struct mm_range r[8];
	size_t n = mm_ram_ranges(gm, r, 8);

	if (n > 8)
		n = 8;
	for (size_t i = 0; i < n; i++) {
		uint64_t gfn = r[i].gpa >> MM_PAGE_SHIFT, end = (r[i].gpa + r[i].size) >> MM_PAGE_SHIFT;
		while (gfn < end) {
			memdesc_t md = memdesc_lookup(gm, gfn);
			struct folio *f;

			if (!memdesc_folio(md)) {
				/* A whole 2 MiB region of one non-folio kind (never
				 * touched, released): one look, not 512. */
				if (!(gfn & (MM_REGION_PAGES - 1)) &&
				    mdt_region_is(&gm->md, gfn >> REGION_SHIFT, md))
					gfn += MM_REGION_PAGES;
				else
					gfn++;
				continue;
			}
			f = folio_get_gfn(gm, gfn);
			if (!f) {
				gfn++;
				continue;
			}
			uint64_t next = folio_gfn(f) + folio_nr_pages(f);
			if (folio_test(f, FOLIO_DIRTY)) {
				atomic_fetch_and_explicit(&f->flags, ~(uint32_t)FOLIO_DIRTY,
							  memory_order_acq_rel);
				dirty_tracker_record(t, folio_gfn(f), folio_nr_pages(f));
			}
			folio_put(f);
			gfn = next > gfn ? next : gfn + 1;
		}
	}
}

long dirty_log_sync(struct dirty_log *l)
{
	struct dirty_tracker *t = l->t;
	uint64_t before = atomic_load(&l->count);
	long rc = 0;

	pthread_mutex_lock(&t->lock);
	if (t->has_src && t->src.harvest)
		rc = t->src.harvest(t->src.opaque, t);
	fold_folio_flags(t);
	pthread_mutex_unlock(&t->lock);
	if (rc < 0)
		return rc;
	uint64_t after = atomic_load(&l->count);
	return after > before ? (long)(after - before) : 0;
}

uint64_t dirty_log_count(struct dirty_log *l)
{
	return atomic_load_explicit(&l->count, memory_order_relaxed);
}

bool dirty_log_test(struct dirty_log *l, uint64_t gfn, uint64_t nr)
{
	uint64_t npages = l->t->npages;

	if (gfn >= npages)
		return false;
	if (nr > npages - gfn)
		nr = npages - gfn;
	while (nr) {
		unsigned lo = gfn & 63;
		unsigned hi = nr >= 64 - lo ? 64 : lo + (unsigned)nr;
		if (atomic_load_explicit(&l->bits[gfn >> 6], memory_order_acquire) & range_mask(lo, hi))
			return true;
		nr -= hi - lo;
		gfn += hi - lo;
	}
	return false;
}

int dirty_log_take(struct dirty_log *l, uint64_t gfn, uint64_t nr, dirty_run_fn fn, void *opaque)
{
	uint64_t npages = l->t->npages, run_start = 0, run_len = 0;
	int rc;

	if (gfn >= npages)
		return 0;
	if (nr > npages - gfn)
		nr = npages - gfn;
	while (nr) {
		unsigned lo = gfn & 63;
		unsigned hi = nr >= 64 - lo ? 64 : lo + (unsigned)nr;
		uint64_t mask = range_mask(lo, hi), w = gfn >> 6, v;

		v = atomic_load_explicit(&l->bits[w], memory_order_relaxed) & mask;
		if (v) {
			v = atomic_fetch_and_explicit(&l->bits[w], ~mask, memory_order_acq_rel) & mask;
			atomic_fetch_sub_explicit(&l->count, (uint64_t)__builtin_popcountll(v),
						  memory_order_relaxed);
		}
		for (unsigned b = lo; b < hi; b++) {
			uint64_t g = (w << 6) + b;
			if ((v >> b) & 1) {
				if (run_len && run_start + run_len == g) {
					run_len++;
					continue;
				}
				if (run_len && (rc = fn(opaque, run_start, run_len)))
					return rc;
				run_start = g;
				run_len = 1;
			} else if (!v) {
				break;   /* nothing more in this word */
			}
		}
		nr -= hi - lo;
		gfn += hi - lo;
	}
	if (run_len)
		return fn(opaque, run_start, run_len);
	return 0;
}

long dirty_ring_harvest(struct dirty_tracker *t, struct dirty_ring_entry *ring, uint32_t size,
			uint32_t *fetch, const uint64_t *slot_gfn, uint32_t nslots, bool *overflow)
{
	uint32_t found = 0, last = *fetch;

	for (uint32_t k = 0; k < size; k++) {
		uint32_t pos = (*fetch + k) % size;
		struct dirty_ring_entry *e = &ring[pos];
		uint32_t fl = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);
		if (!(fl & DIRTY_RING_F_DIRTY) || (fl & DIRTY_RING_F_RESET))
			continue;
		uint32_t id = e->slot & 0xffff;   /* address space in the high half: only 0 is RAM */
		if ((e->slot >> 16) == 0 && id < nslots && slot_gfn[id] != UINT64_MAX && t)
			dirty_tracker_record(t, slot_gfn[id] + e->offset, 1);
		__atomic_store_n(&e->flags, DIRTY_RING_F_RESET, __ATOMIC_RELEASE);
		found++;
		last = pos + 1;
	}
	*fetch = last % size;
	if (overflow)
		*overflow = found >= size;
	return found;
}
