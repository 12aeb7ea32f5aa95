/* The host pool: 2 MiB host hugepages (a hugetlbfs or shmem memfd, or the
 * anonymous guest window itself) carved into 4 KiB pieces for folios, and the
 * mappings of folio backing into the guest window. */
#include "mm_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif
#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26)
#endif

static bool pool_is_fd(const struct mm_pool *p) { return p->fd >= 0; }

uint64_t pool_offset(uint32_t hpage, unsigned piece)
{
	return ((uint64_t)hpage << HPAGE_SHIFT) + ((uint64_t)piece << MM_PAGE_SHIFT);
}

/* hugetlbfs reserves the pages of a shared mapping at mmap time and keeps
 * the reservation with the file after munmap (until the range is punched or
 * truncated); fallocate of a reserved range then cannot fail. */
static int hugetlb_reserve(struct mm_pool *p, uint64_t first, uint64_t n)
{
	void *m = mmap(NULL, n << HPAGE_SHIFT, PROT_READ | PROT_WRITE, MAP_SHARED, p->fd,
		       (off_t)(first << HPAGE_SHIFT));
	if (m == MAP_FAILED)
		return -1;
	munmap(m, n << HPAGE_SHIFT);
	return 0;
}

int pool_init(struct guest_mem *gm, char *err, size_t errlen)
{
	struct mm_pool *p = &gm->pool;
	memset(p, 0, sizeof(*p));
	p->kind = gm->backing;
	p->fd = -1;
	p->side_fd = -1;
	p->free_head = NO_HPAGE;
	if (lazy_array_init(&p->rflags, gm->md.nregions) < 0) {
		snprintf(err, errlen, "out of address space");
		return -1;
	}
	if (p->kind == MM_BACKING_HUGETLB || p->kind == MM_BACKING_MEMFD) {
		uint64_t ram_regions = 0;
		for (size_t i = 0; i < gm->nranges; i++)
			ram_regions += (gm->ranges[i].size + HPAGE_SIZE - 1) >> HPAGE_SHIFT;
		p->capacity = ram_regions + 64 + ram_regions / 64;   /* headroom for moves */
		unsigned fl = MFD_CLOEXEC;
		if (p->kind == MM_BACKING_HUGETLB)
			fl |= MFD_HUGETLB | MFD_HUGE_2MB;
		p->fd = memfd_create(p->kind == MM_BACKING_HUGETLB ? "mdvm-ram-hugetlb" : "mdvm-ram", fl);
		if (p->fd < 0) {
			snprintf(err, errlen, "memfd_create: %s", strerror(errno));
			return -1;
		}
		if (ftruncate(p->fd, (off_t)(p->capacity << HPAGE_SHIFT)) < 0) {
			snprintf(err, errlen, "sizing the guest RAM file: %s", strerror(errno));
			return -1;
		}
		if (lazy_array_init(&p->home, gm->md.nregions * sizeof(uint32_t)) < 0) {
			snprintf(err, errlen, "out of address space");
			return -1;
		}
		/* Demoted hugetlb regions keep their pages here, 4 KiB each,
		 * region r at offset r * 2 MiB (sparse: only live pages cost). */
		if (p->kind == MM_BACKING_HUGETLB) {
			p->side_fd = memfd_create("mdvm-ram-demoted", MFD_CLOEXEC);
			if (p->side_fd < 0 || ftruncate(p->side_fd, (off_t)(gm->md.nregions << HPAGE_SHIFT)) < 0) {
				snprintf(err, errlen, "side file for demoted regions: %s", strerror(errno));
				return -1;
			}
		}
	} else {
		p->capacity = gm->md.nregions;   /* identity: hugepage i = guest region i */
	}
	p->nchunks = (p->capacity + HPAGE_CHUNK - 1) / HPAGE_CHUNK;
	p->chunks = calloc(p->nchunks, sizeof(*p->chunks));
	if (!p->chunks) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	if (p->kind == MM_BACKING_HUGETLB) {
		/* Reserve a hugepage for every RAM region now, so first touch can
		 * never find none (a SIGBUS mid-run); populates nothing. */
		p->resv_nr = 0;
		for (size_t i = 0; i < gm->nranges; i++)
			p->resv_nr += (gm->ranges[i].size + HPAGE_SIZE - 1) >> HPAGE_SHIFT;
		if (hugetlb_reserve(p, 0, p->resv_nr) < 0) {
			snprintf(err, errlen, "reserving %llu hugepages: %s",
				 (unsigned long long)p->resv_nr, strerror(errno));
			p->resv_nr = 0;
			return -2;
		}
		p->resv_free = p->resv_nr;
	}
	return 0;
}

void pool_destroy(struct guest_mem *gm)
{
	struct mm_pool *p = &gm->pool;
	if (p->chunks) {
		for (uint64_t c = 0; c < p->nchunks; c++) {
			if (!p->chunks[c])
				continue;
			for (unsigned i = 0; i < HPAGE_CHUNK; i++) {
				free(p->chunks[c][i].owners);
				free(p->chunks[c][i].stale);
			}
			free(p->chunks[c]);
		}
		free(p->chunks);
	}
	lazy_array_free(&p->home);
	lazy_array_free(&p->rflags);
	if (p->fd >= 0)
		close(p->fd);
	if (p->side_fd >= 0)
		close(p->side_fd);
	memset(p, 0, sizeof(*p));
	p->fd = p->side_fd = -1;
}

/* ---- per-region state */
unsigned region_flags(struct guest_mem *gm, uint64_t region)
{
	struct lazy_array *a = &gm->pool.rflags;
	return a->p && region < gm->md.nregions ? ((uint8_t *)a->p)[region] : 0;
}

static void region_flags_set(struct guest_mem *gm, uint64_t region, unsigned set, unsigned clear)
{
	struct lazy_array *a = &gm->pool.rflags;
	if (!a->p || region >= gm->md.nregions)
		return;
	lazy_array_touch(a, region);
	uint8_t *v = (uint8_t *)a->p + region;
	*v = (uint8_t)((*v & ~clear) | set);
}

/* The RAM part of region r: [*gpa, *gpa + *len). */
static bool region_ram(struct guest_mem *gm, uint64_t region, uint64_t *gpa, uint64_t *len)
{
	uint64_t lo = region << HPAGE_SHIFT, hi = lo + HPAGE_SIZE;
	for (size_t i = 0; i < gm->nranges; i++) {
		uint64_t a = gm->ranges[i].gpa, b = a + gm->ranges[i].size;
		a = a > lo ? a : lo;
		b = b < hi ? b : hi;
		if (a < b) {
			*gpa = a;
			*len = b - a;
			return true;
		}
	}
	return false;
}

int region_arm(struct guest_mem *gm, uint64_t region)
{
	uint64_t gpa, len;
	if (region_flags(gm, region) & REGION_ARMED)
		return 0;
	if (gm->uffd < 0 || !region_ram(gm, region, &gpa, &len))
		return -EOPNOTSUPP;
	int rc = uffd_arm_range(gm, gpa, len);
	if (!rc)
		region_flags_set(gm, region, REGION_ARMED, 0);
	return rc;
}

static void stale_forget(struct guest_mem *gm, uint64_t gpa, uint64_t len);

void region_rearm(struct guest_mem *gm, uint64_t gpa, uint64_t len)
{
	stale_forget(gm, gpa, len);
	for (uint64_t r = gpa >> HPAGE_SHIFT; r <= (gpa + len - 1) >> HPAGE_SHIFT; r++) {
		if (!(region_flags(gm, r) & REGION_ARMED))
			continue;
		uint64_t lo = r << HPAGE_SHIFT, hi = lo + HPAGE_SIZE;
		lo = lo > gpa ? lo : gpa;
		hi = hi < gpa + len ? hi : gpa + len;
		if (uffd_arm_range(gm, lo, hi - lo))
			region_flags_set(gm, r, 0, REGION_ARMED);   /* arm it whole next time */
	}
}

static uint64_t side_offset(uint64_t gfn)
{
	return gfn << MM_PAGE_SHIFT;   /* region r at r * 2 MiB, page at its colour */
}

struct hpage *pool_hpage(struct mm_pool *p, uint32_t idx)
{
	if (idx >= p->capacity || !p->chunks[idx / HPAGE_CHUNK])
		return NULL;
	return &p->chunks[idx / HPAGE_CHUNK][idx % HPAGE_CHUNK];
}

static struct hpage *hpage_get(struct mm_pool *p, uint32_t idx)
{
	if (idx >= p->capacity)
		return NULL;
	struct hpage **c = &p->chunks[idx / HPAGE_CHUNK];
	if (!*c) {
		*c = calloc(HPAGE_CHUNK, sizeof(struct hpage));
		if (!*c)
			return NULL;
		for (unsigned i = 0; i < HPAGE_CHUNK; i++) {
			(*c)[i].region = NO_REGION;
			(*c)[i].next = NO_HPAGE;
		}
		p->chunks_alloced++;
	}
	return &(*c)[idx % HPAGE_CHUNK];
}

static uint32_t *home_slot(struct mm_pool *p, uint64_t region)
{
	return (uint32_t *)p->home.p + region;
}

static uint32_t home_get(struct mm_pool *p, uint64_t region)
{
	return p->home.p ? *home_slot(p, region) : 0;   /* hpage + 1, 0 = none */
}

static void home_set(struct mm_pool *p, uint64_t region, uint32_t v)
{
	if (!p->home.p)
		return;
	lazy_array_touch(&p->home, region * sizeof(uint32_t));
	*home_slot(p, region) = v;
}

static bool block_free(const struct hpage *h, unsigned p, unsigned n)
{
	if (n >= 64) {
		for (unsigned w = p / 64; w < (p + n) / 64; w++)
			if (h->used[w])
				return false;
		return true;
	}
	uint64_t mask = ((1ULL << n) - 1) << (p % 64);
	return !(h->used[p / 64] & mask);
}

static void block_set(struct hpage *h, unsigned p, unsigned n, bool on)
{
	for (unsigned i = p; i < p + n;) {
		unsigned k = n - (i - p) < 64 - i % 64 ? n - (i - p) : 64 - i % 64;
		uint64_t mask = (k == 64 ? ~0ULL : ((1ULL << k) - 1)) << (i % 64);
		if (on)
			h->used[i / 64] |= mask;
		else
			h->used[i / 64] &= ~mask;
		i += k;
	}
}

static bool stale_test(const struct hpage *h, unsigned piece)
{
	return h->stale && (h->stale[piece / 64] >> (piece % 64) & 1);
}

static bool block_stale(const struct hpage *h, unsigned p, unsigned n)
{
	for (unsigned i = p; h->stale && i < p + n; i++)
		if (stale_test(h, i))
			return true;
	return false;
}

static int hpage_find_block(const struct hpage *h, unsigned order)
{
	unsigned n = 1u << order;
	if (h->nr_used + h->nr_bad + n > MM_REGION_PAGES)
		return -1;
	/* Pieces still mapped at their home GPA last: reusing one costs a
	 * placeholder mapping there. */
	for (int pass = 0; pass < 2; pass++)
		for (unsigned p = 0; p < MM_REGION_PAGES; p += n)
			if (block_free(h, p, n) && (pass || !block_stale(h, p, n)))
				return (int)p;
	return -1;
}

/* hugetlb: take a free index holding a reservation (resv) or one without
 * (!resv) off the free list, or the never-used end if it is of that kind
 * (never-used indices below resv_nr are reserved). NO_HPAGE if none. */
static uint32_t hpage_take_hugetlb(struct mm_pool *p, bool resv)
{
	for (uint32_t *pp = &p->free_head; *pp != NO_HPAGE; pp = &pool_hpage(p, *pp)->next) {
		struct hpage *h = pool_hpage(p, *pp);
		if (!h->resv == !resv) {
			uint32_t idx = *pp;
			*pp = h->next;
			return idx;
		}
	}
	if (p->next_new < p->capacity && (p->next_new < p->resv_nr) == resv && hpage_get(p, p->next_new)) {
		pool_hpage(p, p->next_new)->resv = resv;
		return p->next_new++;
	}
	return NO_HPAGE;
}

/* Set up a fresh hugepage (reused or never used). hugetlb: first touch
 * (resv_ok) takes a reserved one first; promotion of a demoted region
 * (which gave its reservation up) only an unreserved one. */
static int hpage_new(struct guest_mem *gm, uint32_t *out, bool resv_ok)
{
	struct mm_pool *p = &gm->pool;
	uint32_t idx = NO_HPAGE;
	struct hpage *h;
	if (p->kind == MM_BACKING_HUGETLB) {
		if (resv_ok)
			idx = hpage_take_hugetlb(p, true);
		if (idx == NO_HPAGE)
			idx = hpage_take_hugetlb(p, false);
		if (idx == NO_HPAGE)
			return p->free_head == NO_HPAGE && p->next_new >= p->capacity ? -ENOSPC : -ENOMEM;
		h = pool_hpage(p, idx);
	} else if (p->free_head != NO_HPAGE) {
		idx = p->free_head;
		h = pool_hpage(p, idx);
		p->free_head = h->next;
	} else if (p->next_new < p->capacity) {
		idx = p->next_new;
		h = hpage_get(p, idx);
		if (!h)
			return -ENOMEM;
		p->next_new++;
	} else {
		return -ENOSPC;
	}
	if (p->kind == MM_BACKING_HUGETLB &&
	    fallocate(p->fd, 0, (off_t)pool_offset(idx, 0), (off_t)HPAGE_SIZE) < 0) {
		int e = errno;
		h->next = p->free_head;
		p->free_head = idx;
		return e == ENOSPC ? -ENOMEM : -e;
	}
	if (h->resv) {
		h->resv = 0;
		p->resv_free--;
	}
	h->live = 1;
	h->region = NO_REGION;
	h->next = NO_HPAGE;
	p->live++;
	*out = idx;
	return 0;
}

/* ---- stale pieces (memfd): free, punched, still mapped at their home GPA */

static void stale_mark(struct guest_mem *gm, struct hpage *h, unsigned piece, unsigned n)
{
	if (!h->stale) {
		if (!(h->stale = calloc(MM_REGION_PAGES / 64, sizeof(uint64_t))))
			return;   /* the caller then unmaps instead */
		gm->pool.stale_arrays++;
	}
	for (unsigned i = piece; i < piece + n; i++)
		h->stale[i / 64] |= 1ULL << (i % 64);
}

static void stale_clear(struct hpage *h, unsigned piece, unsigned n)
{
	if (!h->stale)
		return;
	for (unsigned i = piece; i < piece + n; i++)
		h->stale[i / 64] &= ~(1ULL << (i % 64));
}

/* Point the home GPAs of h's stale pieces in [piece, piece+n) elsewhere (a
 * placeholder): the pieces are about to hold something else. */
static int stale_unmap(struct guest_mem *gm, struct hpage *h, unsigned piece, unsigned n)
{
	for (unsigned i = piece; i < piece + n;) {
		if (!stale_test(h, i)) {
			i++;
			continue;
		}
		unsigned j = i;
		while (j < piece + n && stale_test(h, j))
			j++;
		int rc = placeholder_init(gm, (((uint64_t)h->region << REGION_SHIFT) + i) << MM_PAGE_SHIFT,
					  (uint64_t)(j - i) << MM_PAGE_SHIFT);
		if (rc)
			return rc;
		stale_clear(h, i, j - i);
		i = j;
	}
	return 0;
}

/* [gpa, gpa+len) was just mapped to something else: its home hugepage's
 * pieces are no longer mapped there. */
static void stale_forget(struct guest_mem *gm, uint64_t gpa, uint64_t len)
{
	if (gm->pool.kind != MM_BACKING_MEMFD)
		return;
	for (uint64_t g = gpa >> MM_PAGE_SHIFT; g < (gpa + len) >> MM_PAGE_SHIFT;) {
		uint64_t r = g >> REGION_SHIFT, e = (r + 1) << REGION_SHIFT;
		if (e > (gpa + len) >> MM_PAGE_SHIFT)
			e = (gpa + len) >> MM_PAGE_SHIFT;
		struct hpage *h = pool_region_home(gm, r, NULL);
		if (h && h->stale && h->region == r)
			stale_clear(h, (unsigned)(g & (MM_REGION_PAGES - 1)), (unsigned)(e - g));
		g = e;
	}
}

static void hpage_release(struct guest_mem *gm, uint32_t idx, struct hpage *h)
{
	struct mm_pool *p = &gm->pool;
	if (h->stale) {
		/* Its file range will be reused: no GPA may map it any more. */
		if (stale_unmap(gm, h, 0, MM_REGION_PAGES)) {
			mm_log(gm, "pool hugepage %u kept out of reuse: cannot unmap its old mapping", idx);
			return;
		}
		free(h->stale);
		h->stale = NULL;
		p->stale_arrays--;
	}
	if (p->kind == MM_BACKING_HUGETLB) {
		fallocate(p->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			  (off_t)pool_offset(idx, 0), (off_t)HPAGE_SIZE);
		/* The punch dropped its reservation too. Re-reserve while the
		 * guest's non-demoted regions could need it (a released region is
		 * touched again); demotion gives it back to the host. */
		if (p->live - 1 + p->resv_free < p->resv_nr - p->demoted &&
		    hugetlb_reserve(p, idx, 1) == 0) {
			h->resv = 1;
			p->resv_free++;
		}
	}
	if (h->region != NO_REGION && home_get(p, h->region) == idx + 1)
		home_set(p, h->region, 0);
	if (h->owners) {
		free(h->owners);
		h->owners = NULL;
		p->owners_arrays--;
	}
	h->live = 0;
	h->mapped = 0;
	h->region = NO_REGION;
	p->live--;
	if (pool_is_fd(p)) {
		h->next = p->free_head;
		p->free_head = idx;
	}
}

bool pool_home_coloured(struct guest_mem *gm, const struct folio *f)
{
	struct hpage *h = pool_hpage(&gm->pool, f->hpage);
	return h && h->region == (f->gfn >> REGION_SHIFT) &&
	       f->piece == (f->gfn & (MM_REGION_PAGES - 1));
}

/* Keep the reverse map (piece -> folio) right for f's pieces. Home-coloured
 * folios need no entry: the owner of piece i is memdesc(region * 512 + i). */
void pool_update_owner(struct guest_mem *gm, struct folio *f)
{
	struct mm_pool *p = &gm->pool;
	struct hpage *h = pool_hpage(p, f->hpage);
	if (!h)
		return;
	uint64_t region = f->gfn >> REGION_SHIFT;
	bool colour = f->piece == (f->gfn & (MM_REGION_PAGES - 1));
	if (colour && h->region == NO_REGION && pool_is_fd(p) && home_get(p, region) == 0) {
		h->region = (uint32_t)region;     /* adopt: the region's home now */
		home_set(p, region, f->hpage + 1);
	}
	unsigned n = 1u << f->order;
	if (colour && h->region == region) {
		if (h->owners)
			memset(h->owners + f->piece, 0, n * sizeof(uint32_t));
		return;
	}
	if (!h->owners) {
		h->owners = calloc(MM_REGION_PAGES, sizeof(uint32_t));
		if (!h->owners)
			abort();
		p->owners_arrays++;
	}
	for (unsigned i = 0; i < n; i++)
		h->owners[f->piece + i] = f->id + 1;
}

int pool_place(struct guest_mem *gm, struct folio *f, uint32_t want, uint32_t avoid,
	       bool *new_region_map)
{
	struct mm_pool *p = &gm->pool;
	uint64_t region = f->gfn >> REGION_SHIFT;
	unsigned colour = f->gfn & (MM_REGION_PAGES - 1), n = 1u << f->order;
	uint32_t idx = NO_HPAGE;
	int piece = -1, rc;
	struct hpage *h = NULL;

	*new_region_map = false;
	p->reuse = NULL;
	if (region_flags(gm, region) & REGION_DEMOTED) {
		/* Demoted hugetlb region: its page in the side file, at its colour. */
		f->hpage = SIDE_HPAGE;
		f->piece = (uint16_t)colour;
		return 0;
	}
	if (!pool_is_fd(p)) {
		/* Anonymous memory: the hugepage is the guest region itself. */
		idx = (uint32_t)region;
		h = hpage_get(p, idx);
		if (!h)
			return -ENOMEM;
		if (!h->live) {
			h->live = 1;
			h->region = (uint32_t)region;
			p->live++;
		}
		if (!block_free(h, colour, n))
			return -EEXIST;
		piece = (int)colour;
		goto found;
	}
	if (want != MM_HPAGE_ANY) {
		h = pool_hpage(p, want);
		if (!h || !h->live) {
			if (want >= p->capacity)
				return -EINVAL;
			/* Take it off the free list or the never-used end. */
			if (want >= p->next_new) {
				while (p->next_new <= want) {
					struct hpage *x = hpage_get(p, p->next_new);
					if (!x)
						return -ENOMEM;
					x->resv = p->kind == MM_BACKING_HUGETLB && p->next_new < p->resv_nr;
					if (p->next_new != want) {
						x->next = p->free_head;
						p->free_head = p->next_new;
					}
					p->next_new++;
				}
			} else {
				uint32_t *pp = &p->free_head;
				while (*pp != NO_HPAGE && *pp != want)
					pp = &pool_hpage(p, *pp)->next;
				if (*pp != want)
					return -EINVAL;
				*pp = pool_hpage(p, want)->next;
			}
			h = pool_hpage(p, want);
			if (p->kind == MM_BACKING_HUGETLB &&
			    fallocate(p->fd, 0, (off_t)pool_offset(want, 0), (off_t)HPAGE_SIZE) < 0) {
				h->next = p->free_head;
				p->free_head = want;
				return -ENOMEM;
			}
			if (h->resv) {
				h->resv = 0;
				p->resv_free--;
			}
			h->live = 1;
			h->region = NO_REGION;
			h->next = NO_HPAGE;
			p->live++;
		}
		idx = want;
		if (block_free(h, colour, n))
			piece = (int)colour;
		else
			piece = hpage_find_block(h, f->order);
		if (piece < 0)
			return -ENOSPC;
		goto found;
	}
	uint32_t home = home_get(p, region);
	if (avoid == NO_HPAGE && home) {
		idx = home - 1;
		h = pool_hpage(p, idx);
		if (block_free(h, colour, n)) {
			piece = (int)colour;
			/* hugetlb: a home kept (quarantined piece) but unmapped */
			*new_region_map = p->kind == MM_BACKING_HUGETLB && !h->mapped;
			goto found;
		}
		if (p->kind == MM_BACKING_HUGETLB)
			return -EEXIST;   /* cannot happen: the region maps its home */
	}
	if (avoid == NO_HPAGE && !home) {
		if ((rc = hpage_new(gm, &idx, true)))
			return rc;
		h = pool_hpage(p, idx);
		h->region = (uint32_t)region;
		home_set(p, region, idx + 1);
		piece = (int)colour;
		*new_region_map = p->kind == MM_BACKING_HUGETLB;
		goto found;
	}
	if (p->kind == MM_BACKING_HUGETLB) {
		/* A move of a whole region: a fresh hugepage (the old one's
		 * reservation comes back when it is released). */
		if ((rc = hpage_new(gm, &idx, true)))
			return rc;
		h = pool_hpage(p, idx);
		piece = 0;
		goto found;
	}
	/* memfd: any hugepage with room, else a fresh one. */
	for (uint32_t i = 0; i < p->next_new; i++) {
		struct hpage *x = pool_hpage(p, i);
		if (i == avoid || !x || !x->live)
			continue;
		int pc = hpage_find_block(x, f->order);
		if (pc >= 0) {
			idx = i;
			h = x;
			piece = pc;
			goto found;
		}
	}
	if ((rc = hpage_new(gm, &idx, true)))
		return rc;
	h = pool_hpage(p, idx);
	piece = 0;
found:
	if (h->stale) {
		/* A stale piece taken by anything but its own page at its home GPA:
		 * that GPA must stop mapping it first. */
		bool own = h->region == region && (unsigned)piece == colour, all = own;
		for (unsigned i = 0; all && i < n; i++)
			all = stale_test(h, (unsigned)piece + i);
		if (!own && (rc = stale_unmap(gm, h, (unsigned)piece, n)))
			return rc;
		/* Its own home GPA still maps these pieces: map_folio need not. */
		stale_clear(h, (unsigned)piece, n);
		if (all)
			p->reuse = f;
	}
	block_set(h, (unsigned)piece, n, true);
	if (h->nr_used == 0)
		p->in_use++;
	h->nr_used = (uint16_t)(h->nr_used + n);
	f->hpage = idx;
	f->piece = (uint16_t)piece;
	pool_update_owner(gm, f);
	return 0;
}

void pool_unplace(struct guest_mem *gm, struct folio *f, bool punch)
{
	struct mm_pool *p = &gm->pool;
	if (f->hpage == SIDE_HPAGE) {
		if (punch)
			fallocate(p->side_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
				  (off_t)side_offset(f->gfn), (off_t)folio_nr_pages(f) << MM_PAGE_SHIFT);
		return;
	}
	struct hpage *h = pool_hpage(p, f->hpage);
	if (!h)
		return;
	unsigned n = 1u << f->order;
	block_set(h, f->piece, n, false);
	if (h->owners)
		memset(h->owners + f->piece, 0, n * sizeof(uint32_t));
	h->nr_used = (uint16_t)(h->nr_used - n);
	if (punch && p->kind == MM_BACKING_MEMFD)
		fallocate(p->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			  (off_t)pool_offset(f->hpage, f->piece), (off_t)n << MM_PAGE_SHIFT);
	if (h->nr_used == 0) {
		p->in_use--;
		if (h->nr_bad == 0)
			hpage_release(gm, f->hpage, h);
	}
}

void pool_quarantine(struct guest_mem *gm, uint32_t hpage, unsigned piece)
{
	struct hpage *h = pool_hpage(&gm->pool, hpage);
	if (!h)
		return;
	block_set(h, piece, 1, true);
	h->nr_bad++;
	if (h->nr_used == 0 && !h->live) {
		h->live = 1;   /* keep it out of reuse */
		gm->pool.live++;
	}
}

/* A quarantined piece given back (hugetlb unpoison: the simulated failure
 * did not really lose the 2 MiB page). */
void pool_unquarantine(struct guest_mem *gm, uint32_t hpage, unsigned piece)
{
	struct hpage *h = pool_hpage(&gm->pool, hpage);
	if (!h || !h->nr_bad || !(h->used[piece / 64] >> (piece % 64) & 1))
		return;
	block_set(h, piece, 1, false);
	h->nr_bad--;
	if (h->nr_used == 0 && h->nr_bad == 0 && !h->mapped)
		hpage_release(gm, hpage, h);
}

uint64_t pool_bytes(const struct mm_pool *p)
{
	return p->nchunks * sizeof(void *) + p->chunks_alloced * HPAGE_CHUNK * sizeof(struct hpage) +
	       p->owners_arrays * MM_REGION_PAGES * sizeof(uint32_t) +
	       p->stale_arrays * MM_REGION_PAGES / 8 + lazy_array_cost(&p->home) +
	       lazy_array_cost(&p->rflags);
}

/* ---- mappings in the guest window */
int placeholder_init(struct guest_mem *gm, uint64_t gpa, uint64_t size)
{
	void *at = gm->base + gpa;
	if (mmap(at, size, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0) == MAP_FAILED)
		return -errno;
	if (gm->pool.home.p)
		stale_forget(gm, gpa, size);
	if (gm->backing == MM_BACKING_THP)
		madvise(at, size, MADV_HUGEPAGE);
	if (gm->uffd >= 0)
		return uffd_register_range(gm, gpa, size);
	return 0;
}

int map_folio(struct guest_mem *gm, struct folio *f, bool new_region_map)
{
	struct mm_pool *p = &gm->pool;
	uint64_t gpa = f->gfn << MM_PAGE_SHIFT, len = folio_nr_pages(f) << MM_PAGE_SHIFT;
	bool armed = region_flags(gm, f->gfn >> REGION_SHIFT) & REGION_ARMED;
	int rc = 0;
	if (f->hpage == SIDE_HPAGE)
		goto done;   /* demoted: the side file is mapped whole; holes fault in */
	switch (p->kind) {
	case MM_BACKING_HUGETLB:
		if (new_region_map) {
			uint64_t rgpa = gpa & ~(HPAGE_SIZE - 1);
			if (mmap(gm->base + rgpa, HPAGE_SIZE, PROT_READ | PROT_WRITE,
				 MAP_SHARED | MAP_FIXED, p->fd, (off_t)pool_offset(f->hpage, 0)) == MAP_FAILED) {
				rc = -errno;
			} else {
				pool_hpage(p, f->hpage)->mapped = 1;
				region_rearm(gm, rgpa, HPAGE_SIZE);
			}
		}
		break;
	case MM_BACKING_MEMFD: {
		/* A released page taken back at its home piece: the file range
		 * is still mapped there (a hole, caught by userfaultfd). */
		bool reuse = p->reuse == f;
		p->reuse = NULL;
		if (!reuse) {
			if (mmap(gm->base + gpa, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, p->fd,
				 (off_t)pool_offset(f->hpage, f->piece)) == MAP_FAILED)
				rc = -errno;
			else
				region_rearm(gm, gpa, len);
		}
		break;
	}
	default:
		/* Anonymous: stop intercepting; the kernel allocates on touch
		 * (a THP when the whole 2 MiB VMA range is ours). An armed region
		 * stays registered (unregistering a piece splits its VMA): its
		 * holes are filled by resolve_folio_fault. */
		if (gm->uffd >= 0 && !armed)
			rc = uffd_unregister_range(gm, gpa, len);
		break;
	}
done:
	if (!rc)
		atomic_fetch_or(&f->flags, FOLIO_MAPPED | FOLIO_UPTODATE);
	return rc;
}

struct hpage *pool_region_home(struct guest_mem *gm, uint64_t region, uint32_t *idx)
{
	uint32_t home = home_get(&gm->pool, region);
	if (!home)
		return NULL;
	if (idx)
		*idx = home - 1;
	return pool_hpage(&gm->pool, home - 1);
}

int unmap_range(struct guest_mem *gm, uint64_t gfn, uint64_t nr)
{
	uint64_t gpa = gfn << MM_PAGE_SHIFT, len = nr << MM_PAGE_SHIFT;
	if (gm->pool.kind == MM_BACKING_HUGETLB) {
		/* whole regions only */
		for (uint64_t r = gfn >> REGION_SHIFT; r < (gfn + nr + MM_REGION_PAGES - 1) >> REGION_SHIFT; r++) {
			struct hpage *h = pool_region_home(gm, r, NULL);
			if (h)
				h->mapped = 0;
		}
	}
	if (gm->pool.fd < 0) {
		if (gm->uffd < 0) {
			madvise(gm->base + gpa, len, MADV_DONTNEED);
			return 0;
		}
		/* Register whole regions, before dropping the pages (a touch in
		 * between must fault into mm/): per-page registrations would
		 * split the VMA into one per page. */
		int rc = 0;
		for (uint64_t r = gfn >> REGION_SHIFT; r <= (gfn + nr - 1) >> REGION_SHIFT && !rc; r++)
			rc = region_arm(gm, r);
		if (rc)
			rc = uffd_register_range(gm, gpa, len);
		madvise(gm->base + gpa, len, MADV_DONTNEED);
		return rc;
	}
	return placeholder_init(gm, gpa, len);
}

/* Release of a memfd folio: keep its file mapping when it sits at its home
 * piece (a hole the armed region's userfaultfd catches; no new VMA) and mark
 * the pieces stale, else unmap it. Then free the pieces. */
void pool_unplace_release(struct guest_mem *gm, struct folio *f)
{
	struct mm_pool *p = &gm->pool;
	struct hpage *h = pool_hpage(p, f->hpage);
	bool keep = false;
	if (p->kind == MM_BACKING_MEMFD && h && pool_home_coloured(gm, f) &&
	    region_arm(gm, f->gfn >> REGION_SHIFT) == 0) {
		stale_mark(gm, h, f->piece, (unsigned)folio_nr_pages(f));
		keep = h->stale != NULL;
	}
	if (!keep && f->hpage != SIDE_HPAGE)
		unmap_range(gm, f->gfn, folio_nr_pages(f));
	pool_unplace(gm, f, true);
}

/* ---- userfaultfd faults on backed pages, copies that avoid them */
void resolve_folio_fault(struct guest_mem *gm, struct folio *f, uint64_t gfn)
{
	struct mm_pool *p = &gm->pool;
	uint64_t len = folio_nr_pages(f) << MM_PAGE_SHIFT;
	int rc = 0;
	bool armed = region_flags(gm, f->gfn >> REGION_SHIFT) & REGION_ARMED;
	if (f->hpage == SIDE_HPAGE) {
		rc = fallocate(p->side_fd, 0, (off_t)side_offset(f->gfn), (off_t)len) < 0 ? -errno : 0;
	} else if (p->kind == MM_BACKING_MEMFD && armed) {
		/* A hole of the folio's own file range (kept mapping). */
		rc = fallocate(p->fd, 0, (off_t)pool_offset(f->hpage, f->piece), (off_t)len) < 0 ? -errno : 0;
	} else if (p->kind == MM_BACKING_MEMFD) {
		/* Not armed: its GPA should map the file already; map it again
		 * rather than let the toucher fault for ever. */
		if (mmap(gm->base + (f->gfn << MM_PAGE_SHIFT), len, PROT_READ | PROT_WRITE,
			 MAP_SHARED | MAP_FIXED, p->fd, (off_t)pool_offset(f->hpage, f->piece)) == MAP_FAILED)
			rc = -errno;
	} else if (p->fd < 0) {
		rc = uffd_zeropage(gm, gfn << MM_PAGE_SHIFT, MM_PAGE_SIZE);
		if (rc == -ENOENT)
			rc = 0;   /* not registered (any more): the kernel fills it */
	}
	if (rc) {
		mm_log(gm, "guest RAM: cannot back GPA 0x%llx: %s",
		       (unsigned long long)(gfn << MM_PAGE_SHIFT), strerror(-rc));
		uffd_poison(gm, gfn << MM_PAGE_SHIFT, MM_PAGE_SIZE);   /* SIGBUS beats a hang */
	}
}

int folio_copy_out(struct guest_mem *gm, uint32_t hpage, unsigned piece, uint64_t gpa,
		   uint64_t len, void *dst)
{
	struct mm_pool *p = &gm->pool;
	if (p->fd >= 0) {
		/* From the file: holes read as zero without faulting or allocating. */
		int fd = hpage == SIDE_HPAGE ? p->side_fd : p->fd;
		uint64_t off = hpage == SIDE_HPAGE ? side_offset(gpa >> MM_PAGE_SHIFT) : pool_offset(hpage, piece);
		for (uint64_t done = 0; done < len;) {
			ssize_t n = pread(fd, (uint8_t *)dst + done, len - done, (off_t)(off + done));
			if (n <= 0)
				return n < 0 ? -errno : -EIO;
			done += (uint64_t)n;
		}
		return 0;
	}
	uint8_t *at = gm->base + gpa;
	if (!(region_flags(gm, gpa >> HPAGE_SHIFT) & REGION_ARMED)) {
		memcpy(dst, at, len);   /* unregistered: a hole reads as the zero page */
		return 0;
	}
	/* Armed anonymous memory: a hole would fault into userfaultfd. Copy
	 * the present (or swapped) pages; holes stay holes (zero). */
	int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (pm < 0)
		return -errno;
	uint64_t ents[64];
	int rc = 0;
	for (uint64_t o = 0; o < len && !rc; o += 64 * MM_PAGE_SIZE) {
		uint64_t k = (len - o) >> MM_PAGE_SHIFT;
		if (k > 64)
			k = 64;
		off_t at_off = (off_t)(((uintptr_t)(at + o) >> MM_PAGE_SHIFT) * 8);
		if (pread(pm, ents, k * 8, at_off) != (ssize_t)(k * 8)) {
			rc = -EIO;
			break;
		}
		for (uint64_t i = 0; i < k; i++) {
			uint8_t *d = (uint8_t *)dst + o + (i << MM_PAGE_SHIFT);
			if (ents[i] >> 62)   /* present (63) or swapped (62) */
				memcpy(d, at + o + (i << MM_PAGE_SHIFT), MM_PAGE_SIZE);
		}
	}
	close(pm);
	return rc;
}

/* ---- hugetlb demotion: the data has been copied to / from the side file
 * and the region remapped by mm/migrate.c; here the bookkeeping. */
int pool_hpage_new(struct guest_mem *gm, uint32_t *idx)
{
	return hpage_new(gm, idx, false);   /* promotion: see hpage_new */
}

void pool_hpage_drop(struct guest_mem *gm, uint32_t idx)
{
	struct hpage *h = pool_hpage(&gm->pool, idx);
	if (h && h->live && !h->nr_used)
		hpage_release(gm, idx, h);
}

void pool_demote_region(struct guest_mem *gm, uint64_t region)
{
	uint64_t g0 = region << REGION_SHIFT;
	/* Counted first: the punch of its hugepage then keeps no reservation. */
	region_flags_set(gm, region, REGION_DEMOTED, 0);
	gm->pool.demoted++;
	for (uint64_t g = g0; g < g0 + MM_REGION_PAGES;) {
		struct folio *f = memdesc_folio(mdt_get(&gm->md, g));
		if (!f) {
			g++;
			continue;
		}
		pool_unplace(gm, f, false);   /* the last one punches the hugepage */
		f->hpage = SIDE_HPAGE;
		f->piece = (uint16_t)(f->gfn & (MM_REGION_PAGES - 1));
		g = f->gfn + folio_nr_pages(f);
	}
}

int pool_promote_region(struct guest_mem *gm, uint64_t region, uint32_t idx)
{
	struct mm_pool *p = &gm->pool;
	struct hpage *h = pool_hpage(p, idx);
	uint64_t g0 = region << REGION_SHIFT;
	if (!h || !h->live || h->nr_used)
		return -EINVAL;
	h->region = (uint32_t)region;
	home_set(p, region, idx + 1);
	h->mapped = 1;
	for (uint64_t g = g0; g < g0 + MM_REGION_PAGES;) {
		struct folio *f = memdesc_folio(mdt_get(&gm->md, g));
		if (!f) {
			g++;
			continue;
		}
		unsigned n = (unsigned)folio_nr_pages(f);
		f->hpage = idx;
		f->piece = (uint16_t)(f->gfn & (MM_REGION_PAGES - 1));
		block_set(h, f->piece, n, true);
		if (h->nr_used == 0)
			p->in_use++;
		h->nr_used = (uint16_t)(h->nr_used + n);
		pool_update_owner(gm, f);
		g = f->gfn + n;
	}
	fallocate(p->side_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(region << HPAGE_SHIFT),
		  (off_t)HPAGE_SIZE);
	region_flags_set(gm, region, 0, REGION_DEMOTED);
	p->demoted--;
	return 0;
}

/* ---- inspection */
int mm_pool_hpage_info(struct guest_mem *gm, uint32_t idx, struct mm_hpage_info *out)
{
	pthread_mutex_lock(&gm->lock);
	struct hpage *h = pool_hpage(&gm->pool, idx);
	if (h) {
		out->live = h->live;
		out->region = h->region;
		out->nr_used = h->nr_used;
		out->nr_bad = h->nr_bad;
	}
	pthread_mutex_unlock(&gm->lock);
	return h ? 0 : -ENOENT;
}

struct folio *mm_pool_piece_owner(struct guest_mem *gm, uint32_t idx, unsigned piece)
{
	struct folio *f = NULL;
	if (piece >= MM_REGION_PAGES)
		return NULL;
	pthread_mutex_lock(&gm->lock);
	struct hpage *h = pool_hpage(&gm->pool, idx);
	if (h && h->nr_used && (h->used[piece / 64] >> (piece % 64) & 1)) {
		if (h->owners && h->owners[piece])
			f = folio_by_id(gm, h->owners[piece] - 1);
		else if (h->region != NO_REGION)
			f = memdesc_folio(mdt_get(&gm->md, ((uint64_t)h->region << REGION_SHIFT) + piece));
		/* a quarantined piece has no folio */
		if (f && (f->hpage != idx || piece < f->piece || piece >= f->piece + folio_nr_pages(f)))
			f = NULL;
	}
	pthread_mutex_unlock(&gm->lock);
	return f;
}
