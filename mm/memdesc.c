/* The memdesc table: one 8-byte descriptor per 4 KiB guest frame, stored as a
 * two-level table whose leaves exist only for 2 MiB regions that are not
 * uniform (see docs/memdesc.md). */
#include "mm_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define LEAF_BYTES      (MM_REGION_PAGES * sizeof(memdesc_t))   /* 4 KiB */
#define LEAVES_PER_CHUNK 16                                      /* 64 KiB mmap */

int lazy_array_init(struct lazy_array *a, size_t bytes)
{
	memset(a, 0, sizeof(*a));
	bytes = (bytes + 4095) & ~(size_t)4095;
	if (!bytes)
		bytes = 4096;
	a->p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (a->p == MAP_FAILED) {
		a->p = NULL;
		return -errno;
	}
	a->bytes = bytes;
	a->touched = calloc((bytes / 4096 + 7) / 8, 1);
	if (!a->touched) {
		munmap(a->p, bytes);
		a->p = NULL;
		return -ENOMEM;
	}
	return 0;
}

void lazy_array_free(struct lazy_array *a)
{
	if (a->p)
		munmap(a->p, a->bytes);
	free(a->touched);
	memset(a, 0, sizeof(*a));
}

int mdt_init(struct memdesc_table *t, uint64_t npages)
{
	memset(t, 0, sizeof(*t));
	t->npages = npages;
	t->nregions = (npages + MM_REGION_PAGES - 1) >> REGION_SHIFT;
	return lazy_array_init(&t->top, t->nregions * sizeof(memdesc_t));
}

void mdt_destroy(struct memdesc_table *t)
{
	for (size_t i = 0; i < t->nleaf_chunks; i++)
		munmap(t->leaf_chunks[i], LEAF_BYTES * LEAVES_PER_CHUNK);
	free(t->leaf_chunks);
	lazy_array_free(&t->top);
	memset(t, 0, sizeof(*t));
}

static inline _Atomic memdesc_t *top_entry(const struct memdesc_table *t, uint64_t region)
{
	return (_Atomic memdesc_t *)t->top.p + region;
}

memdesc_t mdt_get(const struct memdesc_table *t, uint64_t gfn)
{
	if (gfn >= t->npages)
		return MEMDESC_MMIO;
	_Atomic memdesc_t *te = top_entry(t, gfn >> REGION_SHIFT);
	for (;;) {
		memdesc_t e = atomic_load_explicit(te, memory_order_acquire);
		if ((e & MEMDESC_TYPE_MASK) != MEMDESC_LEAF)
			return e;
		_Atomic memdesc_t *leaf = (_Atomic memdesc_t *)(uintptr_t)(e & ~MEMDESC_TYPE_MASK);
		memdesc_t v = atomic_load_explicit(&leaf[gfn & (MM_REGION_PAGES - 1)],
						   memory_order_acquire);
		/* The leaf may have been collapsed and recycled meanwhile. */
		if (atomic_load_explicit(te, memory_order_acquire) == e)
			return v;
	}
}

memdesc_t memdesc_lookup(struct guest_mem *gm, uint64_t gfn)
{
	return mdt_get(&gm->md, gfn);
}

bool memdesc_region_uniform(struct guest_mem *gm, uint64_t gfn, memdesc_t *md)
{
	const struct memdesc_table *t = &gm->md;
	if (gfn >= t->npages)
		return false;
	memdesc_t e = atomic_load_explicit(top_entry(t, gfn >> REGION_SHIFT), memory_order_acquire);
	if ((e & MEMDESC_TYPE_MASK) == MEMDESC_LEAF)
		return false;
	*md = e;
	return true;
}

bool mdt_region_is(const struct memdesc_table *t, uint64_t region, memdesc_t v)
{
	return region < t->nregions &&
	       atomic_load_explicit(top_entry(t, region), memory_order_acquire) == v;
}

static _Atomic memdesc_t *leaf_alloc(struct memdesc_table *t)
{
	if (!t->leaf_free) {
		if (t->nleaf_chunks == t->leaf_chunks_cap) {
			size_t cap = t->leaf_chunks_cap ? 2 * t->leaf_chunks_cap : 16;
			void **n = realloc(t->leaf_chunks, cap * sizeof(*n));
			if (!n)
				return NULL;
			t->leaf_chunks = n;
			t->leaf_chunks_cap = cap;
		}
		uint8_t *c = mmap(NULL, LEAF_BYTES * LEAVES_PER_CHUNK, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (c == MAP_FAILED)
			return NULL;
		t->leaf_chunks[t->nleaf_chunks++] = c;
		for (int i = LEAVES_PER_CHUNK - 1; i >= 0; i--) {
			void **l = (void **)(c + (size_t)i * LEAF_BYTES);
			*l = t->leaf_free;
			t->leaf_free = l;
		}
		t->leaves_total += LEAVES_PER_CHUNK;
	}
	void **l = t->leaf_free;
	t->leaf_free = *l;
	t->leaves_live++;
	return (_Atomic memdesc_t *)l;
}

/* The leaf stays readable (type-stable): a racing reader re-checks the top entry. */
static void leaf_free(struct memdesc_table *t, _Atomic memdesc_t *leaf)
{
	void **l = (void **)leaf;
	*l = t->leaf_free;
	t->leaf_free = l;
	t->leaves_live--;
}

static void top_store(struct memdesc_table *t, uint64_t region, memdesc_t v)
{
	lazy_array_touch(&t->top, region * sizeof(memdesc_t));
	atomic_store_explicit(top_entry(t, region), v, memory_order_release);
}

/* Collapse a leaf whose 512 entries are equal into a uniform top entry. */
static void leaf_try_collapse(struct memdesc_table *t, uint64_t region, _Atomic memdesc_t *leaf)
{
	memdesc_t v0 = atomic_load_explicit(&leaf[0], memory_order_relaxed);
	for (unsigned i = 1; i < MM_REGION_PAGES; i++)
		if (atomic_load_explicit(&leaf[i], memory_order_relaxed) != v0)
			return;
	top_store(t, region, v0);
	leaf_free(t, leaf);
}

void mdt_set_range(struct guest_mem *gm, uint64_t gfn, uint64_t nr, memdesc_t v)
{
	struct memdesc_table *t = &gm->md;
	enum memdesc_type nt = memdesc_type(v);
	uint64_t end = gfn + nr;

	if (end > t->npages)
		end = t->npages;
	while (gfn < end) {
		uint64_t region = gfn >> REGION_SHIFT;
		unsigned lo = gfn & (MM_REGION_PAGES - 1);
		uint64_t left = end - gfn;
		unsigned hi = left >= MM_REGION_PAGES - lo ? MM_REGION_PAGES : lo + (unsigned)left;
		memdesc_t e = atomic_load_explicit(top_entry(t, region), memory_order_relaxed);
		bool is_leaf = (e & MEMDESC_TYPE_MASK) == MEMDESC_LEAF;
		_Atomic memdesc_t *leaf = is_leaf ? (_Atomic memdesc_t *)(uintptr_t)(e & ~MEMDESC_TYPE_MASK)
						  : NULL;

		if (lo == 0 && hi == MM_REGION_PAGES) {
			/* Whole region: one uniform entry. */
			if (is_leaf) {
				for (unsigned i = 0; i < MM_REGION_PAGES; i++)
					gm->pages[memdesc_type(atomic_load_explicit(&leaf[i],
								memory_order_relaxed))]--;
			} else {
				gm->pages[memdesc_type(e)] -= MM_REGION_PAGES;
			}
			gm->pages[nt] += MM_REGION_PAGES;
			top_store(t, region, v);
			if (is_leaf)
				leaf_free(t, leaf);
		} else {
			if (!is_leaf) {
				if (e == v)
					goto next;
				leaf = leaf_alloc(t);
				if (!leaf)
					abort();   /* 4 KiB of metadata: nothing sane to do */
				for (unsigned i = 0; i < MM_REGION_PAGES; i++)
					atomic_store_explicit(&leaf[i], e, memory_order_relaxed);
				top_store(t, region, (memdesc_t)(uintptr_t)leaf | MEMDESC_LEAF);
			}
			for (unsigned i = lo; i < hi; i++) {
				memdesc_t old = atomic_load_explicit(&leaf[i], memory_order_relaxed);
				gm->pages[memdesc_type(old)]--;
				gm->pages[nt]++;
				atomic_store_explicit(&leaf[i], v, memory_order_release);
			}
			leaf_try_collapse(t, region, leaf);
		}
next:
		gfn += hi - lo;
	}
}

uint64_t mdt_bytes(const struct memdesc_table *t)
{
	return lazy_array_cost(&t->top) + t->leaves_total * LEAF_BYTES;
}

static const char *const type_names[MEMDESC_NR_TYPES] = {
	[MEMDESC_UNBACKED] = "unbacked",
	[MEMDESC_FOLIO] = "ram",
	[MEMDESC_RESERVED] = "reserved",
	[MEMDESC_BALLOONED] = "ballooned",
	[MEMDESC_POISONED] = "poisoned",
	[MEMDESC_MMIO] = "mmio",
};

const char *memdesc_type_name(enum memdesc_type t)
{
	return (unsigned)t < MEMDESC_NR_TYPES ? type_names[t] : "?";
}
