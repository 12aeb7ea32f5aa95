/* Folios: descriptors from their own slab cache, references, split/merge,
 * and the owner operation tables behind every memdesc type. */
#include "mm_internal.h"

#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---- slab cache */
int folio_cache_init(struct folio_cache *c)
{
	memset(c, 0, sizeof(*c));
	return 0;
}

void folio_cache_destroy(struct folio_cache *c)
{
	for (uint32_t i = 0; i < c->nslabs; i++)
		free(c->slabs[i]);
	free(c->slabs);
	memset(c, 0, sizeof(*c));
}

struct folio *folio_alloc(struct guest_mem *gm)
{
	struct folio_cache *c = &gm->fc;
	if (!c->free) {
		if (c->nslabs == c->cap) {
			uint32_t cap = c->cap ? 2 * c->cap : 16;
			struct folio **n = realloc(c->slabs, cap * sizeof(*n));
			if (!n)
				return NULL;
			c->slabs = n;
			c->cap = cap;
		}
		struct folio *s = aligned_alloc(64, FOLIO_SLAB_SIZE * sizeof(struct folio));
		if (!s)
			return NULL;
		memset(s, 0, FOLIO_SLAB_SIZE * sizeof(struct folio));
		uint32_t base = c->nslabs << FOLIO_SLAB_SHIFT;
		c->slabs[c->nslabs++] = s;
		for (int i = FOLIO_SLAB_SIZE - 1; i >= 0; i--) {
			s[i].id = base + (uint32_t)i;
			s[i].gfn = (uint64_t)(uintptr_t)c->free;
			c->free = &s[i];
		}
	}
	struct folio *f = c->free;
	c->free = (struct folio *)(uintptr_t)f->gfn;
	uint32_t id = f->id;
	memset(f, 0, sizeof(*f));
	f->id = id;
	f->hpage = NO_HPAGE;
	atomic_store_explicit(&f->refcount, 1, memory_order_release);
	c->live++;
	return f;
}

/* f must be frozen (refcount 0). Its memory stays a struct folio. */
void folio_free(struct guest_mem *gm, struct folio *f)
{
	struct folio_cache *c = &gm->fc;
	atomic_store_explicit(&f->flags, 0, memory_order_relaxed);
	f->gfn = (uint64_t)(uintptr_t)c->free;
	c->free = f;
	c->live--;
}

struct folio *folio_by_id(struct guest_mem *gm, uint32_t id)
{
	if ((id >> FOLIO_SLAB_SHIFT) >= gm->fc.nslabs)
		return NULL;
	return &gm->fc.slabs[id >> FOLIO_SLAB_SHIFT][id & (FOLIO_SLAB_SIZE - 1)];
}

/* ---- references */
static bool folio_try_get(struct folio *f)
{
	int32_t r = atomic_load_explicit(&f->refcount, memory_order_relaxed);
	while (r > 0)
		if (atomic_compare_exchange_weak_explicit(&f->refcount, &r, r + 1,
							  memory_order_acquire, memory_order_relaxed))
			return true;
	return false;
}

void folio_put(struct folio *f)
{
	int32_t r = atomic_fetch_sub_explicit(&f->refcount, 1, memory_order_release);
	if (r <= 1)
		abort();   /* the table's reference is only dropped by freezing */
}

struct folio *folio_get_gfn(struct guest_mem *gm, uint64_t gfn)
{
	for (;;) {
		memdesc_t md = mdt_get(&gm->md, gfn);
		struct folio *f = memdesc_folio(md);
		if (!f)
			return NULL;
		if (!folio_try_get(f)) {
			sched_yield();   /* frozen: being split, merged or freed */
			continue;
		}
		if (mdt_get(&gm->md, gfn) == md)
			return f;
		folio_put(f);
	}
}

int folio_ref_freeze(struct folio *f)
{
	for (int i = 0; i < 10000; i++) {
		int32_t one = 1;
		if (atomic_compare_exchange_strong_explicit(&f->refcount, &one, 0,
							    memory_order_acquire, memory_order_relaxed))
			return 0;
		sched_yield();
	}
	return -EBUSY;
}

void folio_ref_unfreeze(struct folio *f)
{
	atomic_store_explicit(&f->refcount, 1, memory_order_release);
}

static inline uint32_t folio_flags_get(struct folio *f)
{
	return atomic_load_explicit(&f->flags, memory_order_relaxed);
}

/* ---- split / merge */
int folio_split_locked(struct guest_mem *gm, struct folio *f, unsigned new_order)
{
	if (new_order >= f->order)
		return -EINVAL;
	unsigned old = f->order;
	uint64_t n = 1ULL << (old - new_order), step = 1ULL << new_order;
	/* Descriptors first: out of memory leaves the folio as it was. */
	struct folio *one[1], **ts = n - 1 <= 1 ? one : malloc((n - 1) * sizeof(*ts));
	if (!ts)
		return -ENOMEM;
	for (uint64_t i = 0; i < n - 1; i++) {
		if (!(ts[i] = folio_alloc(gm))) {
			while (i--) {
				atomic_store(&ts[i]->refcount, 0);
				folio_free(gm, ts[i]);
			}
			if (ts != one)
				free(ts);
			return -ENOMEM;
		}
	}
	int rc = folio_ref_freeze(f);
	if (rc) {
		for (uint64_t i = 0; i < n - 1; i++) {
			atomic_store(&ts[i]->refcount, 0);
			folio_free(gm, ts[i]);
		}
		if (ts != one)
			free(ts);
		return rc;
	}
	uint32_t flags = folio_flags_get(f);
	for (uint64_t i = 1; i < n; i++) {
		struct folio *t = ts[i - 1];
		t->gfn = f->gfn + i * step;
		t->order = (uint8_t)new_order;
		t->owner = f->owner;
		t->hpage = f->hpage;
		t->piece = (uint16_t)(f->piece + i * step);
		atomic_store_explicit(&t->flags, flags, memory_order_relaxed);
		atomic_store_explicit(&t->gen, atomic_load(&f->gen), memory_order_relaxed);
		pool_update_owner(gm, t);
		mdt_set_range(gm, t->gfn, step, memdesc_make((enum memdesc_type)t->owner, t));
	}
	f->order = (uint8_t)new_order;
	gm->folios[old]--;
	gm->folios[new_order] += n;
	folio_ref_unfreeze(f);
	if (ts != one)
		free(ts);
	return 0;
}

int folio_split_around(struct guest_mem *gm, struct folio *f, uint64_t lo, uint64_t hi)
{
	uint64_t s = f->gfn, e = f->gfn + folio_nr_pages(f);
	if (hi <= s || lo >= e || (lo <= s && hi >= e))
		return 0;
	struct folio *second;
	int rc = folio_split_locked(gm, f, f->order - 1u);
	if (rc)
		return rc;
	second = memdesc_folio(mdt_get(&gm->md, s + folio_nr_pages(f)));
	rc = folio_split_around(gm, f, lo, hi);
	if (!rc)
		rc = folio_split_around(gm, second, lo, hi);
	return rc;
}

int folio_split(struct guest_mem *gm, uint64_t gfn, unsigned new_order)
{
	pthread_mutex_lock(&gm->lock);
	struct folio *f = memdesc_folio(mdt_get(&gm->md, gfn));
	int rc = f ? folio_split_locked(gm, f, new_order) : -EINVAL;
	pthread_mutex_unlock(&gm->lock);
	return rc;
}

static int folio_merge_locked(struct guest_mem *gm, uint64_t gfn, unsigned order)
{
	if (order > MM_MAX_ORDER || order == 0)
		return -EINVAL;
	uint64_t n = 1ULL << order, b = gfn & ~(n - 1);
	if (b + n > gm->md.npages)
		return -EINVAL;
	struct folio *head = memdesc_folio(mdt_get(&gm->md, b));
	if (!head || head->gfn != b || head->order >= order)
		return -EINVAL;
	if (head->piece & (n - 1))
		return -EXDEV;
	memdesc_t hmd = mdt_get(&gm->md, b);
	/* Check every member first. */
	for (uint64_t g = b; g < b + n;) {
		memdesc_t md = mdt_get(&gm->md, g);
		struct folio *f = memdesc_folio(md);
		if (!f || memdesc_type(md) != memdesc_type(hmd) || f->gfn != g || f->order >= order)
			return -EINVAL;
		if (folio_flags_get(f) & (FOLIO_HWPOISON | FOLIO_LOCKED))
			return -EBUSY;
		if (f->hpage != head->hpage || f->piece != head->piece + (g - b))
			return -EXDEV;
		g += folio_nr_pages(f);
	}
	/* Freeze all; back out if one is in use. */
	uint64_t g;
	int rc = 0;
	for (g = b; g < b + n;) {
		struct folio *f = memdesc_folio(mdt_get(&gm->md, g));
		if ((rc = folio_ref_freeze(f)))
			break;
		g += folio_nr_pages(f);
	}
	if (rc) {
		for (uint64_t u = b; u < g;) {
			struct folio *f = memdesc_folio(mdt_get(&gm->md, u));
			if (!f)
				abort();
			folio_ref_unfreeze(f);
			u += folio_nr_pages(f);
		}
		return rc;
	}
	uint32_t or_flags = 0, and_flags = ~0u, gen = 0;
	for (g = b; g < b + n;) {
		struct folio *f = memdesc_folio(mdt_get(&gm->md, g));
		uint32_t fl = folio_flags_get(f), fg = atomic_load(&f->gen);
		or_flags |= fl;
		and_flags &= fl;
		if ((int32_t)(fg - gen) > 0 || g == b)
			gen = fg;
		g += folio_nr_pages(f);
		gm->folios[f->order]--;
		if (f != head)
			folio_free(gm, f);
	}
	head->order = (uint8_t)order;
	atomic_store(&head->flags, (or_flags & (FOLIO_DIRTY | FOLIO_PINNED)) |
				   (and_flags & (FOLIO_UPTODATE | FOLIO_MAPPED)));
	atomic_store(&head->gen, gen);
	gm->folios[order]++;
	pool_update_owner(gm, head);
	mdt_set_range(gm, b, n, hmd);
	folio_ref_unfreeze(head);
	return 0;
}

int folio_merge(struct guest_mem *gm, uint64_t gfn, unsigned order)
{
	pthread_mutex_lock(&gm->lock);
	int rc = folio_merge_locked(gm, gfn, order);
	pthread_mutex_unlock(&gm->lock);
	return rc;
}

/* ---- release / poison (locked) */

/* f lies wholly inside [lo, hi), the range being released. */
int folio_release_locked(struct guest_mem *gm, struct folio *f, enum memdesc_type new_type,
			 uint64_t lo, uint64_t hi)
{
	uint64_t gfn = f->gfn, nr = folio_nr_pages(f);
	if (folio_flags_get(f) & FOLIO_PINNED)
		return -EBUSY;
	if (gm->backing == MM_BACKING_HUGETLB && f->hpage != SIDE_HPAGE) {
		/* 2 MiB mappings: only a whole region gives memory back; a
		 * ballooned part keeps its (zeroed) backing until then. */
		uint64_t r0 = gfn & ~(uint64_t)(MM_REGION_PAGES - 1);
		bool outside = false, others = false;
		for (uint64_t g = r0; g < r0 + MM_REGION_PAGES; g++) {
			if (g >= gfn && g < gfn + nr)
				continue;
			if (memdesc_folio(mdt_get(&gm->md, g))) {
				others = true;
				outside |= g < lo || g >= hi;
			}
		}
		if (outside && new_type == MEMDESC_UNBACKED)
			return -EOPNOTSUPP;
		int rc = folio_ref_freeze(f);
		if (rc)
			return rc;
		if (outside)
			memset(gm->base + (gfn << MM_PAGE_SHIFT), 0, nr << MM_PAGE_SHIFT);
		mdt_set_range(gm, gfn, nr, memdesc_make(new_type, NULL));
		gm->folios[f->order]--;
		pool_unplace(gm, f, true);
		folio_free(gm, f);
		/* Nothing of the region is backed now: unmap it; its ballooned
		 * pages fault into mm/ again when touched. */
		if (!others)
			unmap_range(gm, r0, MM_REGION_PAGES);
		return 0;
	}
	int rc = folio_ref_freeze(f);
	if (rc)
		return rc;
	mdt_set_range(gm, gfn, nr, memdesc_make(new_type, NULL));
	gm->folios[f->order]--;
	pool_unplace_release(gm, f);
	folio_free(gm, f);
	return 0;
}

int folio_poison_locked(struct guest_mem *gm, uint64_t gfn)
{
	struct folio *f = memdesc_folio(mdt_get(&gm->md, gfn));
	if (!f)
		return -EINVAL;
	/* hugetlb maps 2 MiB at a time: to unmap one 4 KiB page the region
	 * goes to 4 KiB pages of the side file first (the failed page is not
	 * copied). If it cannot, the page stays mapped: poisoned for mm/, but
	 * a guest access is not caught. */
	if (gm->backing == MM_BACKING_HUGETLB && f->hpage != SIDE_HPAGE) {
		int drc = demote_for_failure_locked(gm, gfn);
		if (drc)
			mm_log(gm, "memory failure at GPA 0x%llx: cannot demote its hugetlb region (%s); "
			       "the page stays mapped", (unsigned long long)(gfn << MM_PAGE_SHIFT),
			       strerror(drc < 0 ? -drc : EBUSY));
		f = memdesc_folio(mdt_get(&gm->md, gfn));
	}
	int rc = folio_split_around(gm, f, gfn, gfn + 1);
	if (rc)
		return rc;
	f = memdesc_folio(mdt_get(&gm->md, gfn));
	if ((rc = folio_ref_freeze(f)))
		return rc;
	uint32_t hp = f->hpage;
	unsigned piece = f->piece;
	bool demoted = hp == SIDE_HPAGE;   /* 4 KiB pages of the side file */
	mdt_set_range(gm, gfn, 1, memdesc_make(MEMDESC_POISONED, NULL));
	gm->folios[0]--;
	if (demoted)
		madvise(gm->base + (gfn << MM_PAGE_SHIFT), MM_PAGE_SIZE, MADV_DONTNEED);
	else if (gm->backing != MM_BACKING_HUGETLB)
		unmap_range(gm, gfn, 1);
	pool_unplace(gm, f, true);
	if (gm->backing != MM_BACKING_ANON && gm->backing != MM_BACKING_THP)
		pool_quarantine(gm, hp, piece);
	folio_free(gm, f);
	/* Accesses to the page now fault into mm/; answer them with poison. */
	if (gm->uffd >= 0 && (gm->backing != MM_BACKING_HUGETLB || demoted))
		uffd_poison(gm, gfn << MM_PAGE_SHIFT, MM_PAGE_SIZE);
	return 0;
}

/* ---- owner operations */
static int folio_op_mark_dirty(struct guest_mem *gm, memdesc_t md, uint64_t gfn)
{
	struct folio *f = folio_get_gfn(gm, gfn);
	if (!f)
		return memdesc_mark_dirty(gm, gfn);   /* changed owner meanwhile */
	atomic_fetch_or_explicit(&f->flags, FOLIO_DIRTY, memory_order_release);
	atomic_store_explicit(&f->gen, atomic_load_explicit(&gm->dirty_gen, memory_order_relaxed),
			      memory_order_release);
	folio_put(f);
	return 0;
}

static int folio_op_move(struct guest_mem *gm, memdesc_t md, uint64_t gfn, uint32_t dst)
{
	struct folio *f = memdesc_folio(md);
	if (folio_flags_get(f) & (FOLIO_PINNED | FOLIO_HWPOISON))
		return -EBUSY;
	if (gm->backing == MM_BACKING_HUGETLB && (f->order < MM_MAX_ORDER || f->hpage == SIDE_HPAGE))
		return -EOPNOTSUPP;   /* a hugetlb mapping moves 2 MiB at a time */
	int rc = folio_ref_freeze(f);
	if (rc)
		return rc;
	uint64_t gpa = f->gfn << MM_PAGE_SHIFT, len = folio_nr_pages(f) << MM_PAGE_SHIFT;
	uint8_t *at = gm->base + gpa;
	atomic_fetch_or(&f->flags, FOLIO_LOCKED);
	if (gm->pool.fd < 0) {
		/* Anonymous: fresh pages, copy, mremap over the GPA. */
		uint64_t al = len >= HPAGE_SIZE ? HPAGE_SIZE : MM_PAGE_SIZE;
		uint8_t *raw = mmap(NULL, len + al, PROT_READ | PROT_WRITE,
				    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (raw == MAP_FAILED) {
			rc = -errno;
			goto out;
		}
		uint8_t *n = (uint8_t *)(((uintptr_t)raw + al - 1) & ~(uintptr_t)(al - 1));
		if (gm->backing == MM_BACKING_THP)
			madvise(n, len, MADV_HUGEPAGE);
		if ((rc = folio_copy_out(gm, f->hpage, f->piece, gpa, len, n))) {
			munmap(raw, len + al);
			goto out;
		}
		if (mremap(n, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, at) == MAP_FAILED) {
			rc = -errno;
			munmap(raw, len + al);
			goto out;
		}
		if (n > raw)
			munmap(raw, (size_t)(n - raw));
		if (n + len < raw + len + al)
			munmap(n + len, (size_t)(raw + len + al - (n + len)));
		region_rearm(gm, gpa, len);
		goto out;
	}
	struct folio old = *f;
	bool dummy;
	rc = pool_place(gm, f, dst, old.hpage, &dummy);
	if (rc) {
		f->hpage = old.hpage;
		f->piece = old.piece;
		goto out;
	}
	uint64_t off = pool_offset(f->hpage, f->piece);
	void *tmp = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, gm->pool.fd,
			 (off_t)off);
	if (tmp == MAP_FAILED) {
		rc = -errno;
		goto undo;
	}
	rc = folio_copy_out(gm, old.hpage, old.piece, gpa, len, tmp);
	munmap(tmp, len);
	if (rc)
		goto undo;
	if (mmap(at, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, gm->pool.fd,
		 (off_t)off) == MAP_FAILED) {
		rc = -errno;
		goto undo;
	}
	region_rearm(gm, gpa, len);
	struct folio nw = *f;
	*f = old;                  /* release the old pieces */
	pool_unplace(gm, f, true);
	f->hpage = nw.hpage;
	f->piece = nw.piece;
	pool_update_owner(gm, f);
	if (gm->backing == MM_BACKING_HUGETLB)
		pool_hpage(&gm->pool, f->hpage)->mapped = 1;
	goto out;
undo:
	pool_unplace(gm, f, true);
	f->hpage = old.hpage;
	f->piece = old.piece;
out:
	atomic_fetch_and(&f->flags, ~(uint32_t)FOLIO_LOCKED);
	if (!rc)
		atomic_store(&f->gen, atomic_load(&gm->dirty_gen));
	folio_ref_unfreeze(f);
	return rc;
}

static int folio_op_memory_failure(struct guest_mem *gm, memdesc_t md, uint64_t gfn)
{
	return folio_poison_locked(gm, gfn);
}

static int folio_op_release(struct guest_mem *gm, memdesc_t md, uint64_t gfn,
			    enum memdesc_type new_type)
{
	return release_range_locked(gm, gfn, 1, new_type);
}

static int reserved_op_mark_dirty(struct guest_mem *gm, memdesc_t md, uint64_t gfn)
{
	return memdesc_folio(md) ? folio_op_mark_dirty(gm, md, gfn) : -EFAULT;
}
static int reserved_op_move(struct guest_mem *gm, memdesc_t md, uint64_t gfn, uint32_t dst)
{
	return memdesc_folio(md) ? folio_op_move(gm, md, gfn, dst) : -EFAULT;
}
static int reserved_op_memory_failure(struct guest_mem *gm, memdesc_t md, uint64_t gfn)
{
	if (!memdesc_folio(md))
		return -EFAULT;
	int rc = folio_poison_locked(gm, gfn);
	return rc ? rc : -EIO;   /* firmware data lost: the caller decides */
}
static int reserved_op_release(struct guest_mem *gm, memdesc_t md, uint64_t gfn,
			       enum memdesc_type new_type)
{
	return memdesc_folio(md) ? release_range_locked(gm, gfn, 1, new_type) : -EFAULT;
}

static int none_op_mark_dirty(struct guest_mem *gm, memdesc_t md, uint64_t gfn) { return 0; }
static int none_op_move(struct guest_mem *gm, memdesc_t md, uint64_t gfn, uint32_t dst) { return 0; }
static int none_op_memory_failure(struct guest_mem *gm, memdesc_t md, uint64_t gfn) { return 0; }
static int none_op_release(struct guest_mem *gm, memdesc_t md, uint64_t gfn,
			   enum memdesc_type new_type)
{
	return release_range_locked(gm, gfn, 1, new_type);
}

static int poisoned_op_mark_dirty(struct guest_mem *gm, memdesc_t md, uint64_t gfn) { return -EIO; }
static int poisoned_op_move(struct guest_mem *gm, memdesc_t md, uint64_t gfn, uint32_t dst) { return -EIO; }
static int poisoned_op_release(struct guest_mem *gm, memdesc_t md, uint64_t gfn,
			       enum memdesc_type new_type) { return -EBUSY; }

static int mmio_op_mark_dirty(struct guest_mem *gm, memdesc_t md, uint64_t gfn) { return -EFAULT; }
static int mmio_op_move(struct guest_mem *gm, memdesc_t md, uint64_t gfn, uint32_t dst) { return -EFAULT; }
static int mmio_op_memory_failure(struct guest_mem *gm, memdesc_t md, uint64_t gfn) { return -EFAULT; }
static int mmio_op_release(struct guest_mem *gm, memdesc_t md, uint64_t gfn,
			   enum memdesc_type new_type) { return -EFAULT; }

static const struct memdesc_ops owner_ops[MEMDESC_NR_TYPES] = {
	[MEMDESC_UNBACKED] = { "unbacked", none_op_mark_dirty, none_op_move,
			       none_op_memory_failure, none_op_release },
	[MEMDESC_FOLIO] = { "ram", folio_op_mark_dirty, folio_op_move,
			    folio_op_memory_failure, folio_op_release },
	[MEMDESC_RESERVED] = { "reserved", reserved_op_mark_dirty, reserved_op_move,
			       reserved_op_memory_failure, reserved_op_release },
	[MEMDESC_BALLOONED] = { "ballooned", none_op_mark_dirty, none_op_move,
				none_op_memory_failure, none_op_release },
	[MEMDESC_POISONED] = { "poisoned", poisoned_op_mark_dirty, poisoned_op_move,
			       none_op_memory_failure, poisoned_op_release },
	[MEMDESC_MMIO] = { "mmio", mmio_op_mark_dirty, mmio_op_move,
			   mmio_op_memory_failure, mmio_op_release },
};

const struct memdesc_ops *memdesc_ops(enum memdesc_type t)
{
	return (unsigned)t < MEMDESC_NR_TYPES ? &owner_ops[t] : &owner_ops[MEMDESC_MMIO];
}

int memdesc_mark_dirty(struct guest_mem *gm, uint64_t gfn)
{
	memdesc_t md = mdt_get(&gm->md, gfn);
	return memdesc_ops(memdesc_type(md))->mark_dirty(gm, md, gfn);
}

int memdesc_move(struct guest_mem *gm, uint64_t gfn, uint32_t dst_hpage)
{
	pthread_mutex_lock(&gm->lock);
	memdesc_t md = mdt_get(&gm->md, gfn);
	int rc = memdesc_ops(memdesc_type(md))->move(gm, md, gfn, dst_hpage);
	pthread_mutex_unlock(&gm->lock);
	return rc;
}

int memdesc_memory_failure(struct guest_mem *gm, uint64_t gfn)
{
	pthread_mutex_lock(&gm->lock);
	memdesc_t md = mdt_get(&gm->md, gfn);
	int rc = memdesc_ops(memdesc_type(md))->memory_failure(gm, md, gfn);
	pthread_mutex_unlock(&gm->lock);
	return rc;
}

int memdesc_release(struct guest_mem *gm, uint64_t gfn, enum memdesc_type new_type)
{
	pthread_mutex_lock(&gm->lock);
	memdesc_t md = mdt_get(&gm->md, gfn);
	int rc = memdesc_ops(memdesc_type(md))->release(gm, md, gfn, new_type);
	pthread_mutex_unlock(&gm->lock);
	return rc;
}
