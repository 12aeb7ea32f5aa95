/* mm/ internals shared by memdesc.c, folio.c, pool.c, uffd.c and mm.c.
 * Locking (docs/memdesc.md): gm->lock serialises every change of the memdesc
 * table, folios, the pool and mappings; lookups, folio_get/put and
 * mark_dirty are lock-free. Never touch guest memory that may be unbacked
 * while holding gm->lock: the userfaultfd thread needs the lock to resolve it. */
#ifndef MDVM_MM_INTERNAL_H
#define MDVM_MM_INTERNAL_H
#include "mm.h"

#include <pthread.h>
#include <stdatomic.h>

#define HPAGE_SHIFT   21
#define HPAGE_SIZE    (1ULL << HPAGE_SHIFT)
#define REGION_SHIFT  MM_MAX_ORDER              /* gfn >> 9 = guest 2 MiB region */
#define MEMDESC_LEAF  0xfULL                    /* top-level tag: -> 512-entry leaf table */
#define NO_HPAGE      UINT32_MAX
#define NO_REGION     UINT32_MAX
#define SLOT_CHUNK    (1ULL << 30)              /* lazily registered memslot size */

static inline memdesc_t memdesc_make(enum memdesc_type t, const void *p)
{
	return (memdesc_t)(uintptr_t)p | (memdesc_t)t;
}

/* A sparse array in a MAP_NORESERVE mapping: costs host memory only for
 * the 4 KiB pages written; `touched` remembers which, for the statistics. */
struct lazy_array {
	void *p;
	size_t bytes;
	uint8_t *touched;   /* one bit per 4 KiB page */
	size_t ntouched;
};
int  lazy_array_init(struct lazy_array *a, size_t bytes);
/* Host memory it costs: the pages written plus the `touched` bitmap. */
static inline uint64_t lazy_array_cost(const struct lazy_array *a)
{
	return a->p ? a->ntouched * 4096ULL + (a->bytes / 4096 + 7) / 8 : 0;
}
void lazy_array_free(struct lazy_array *a);
static inline void lazy_array_touch(struct lazy_array *a, size_t byte_off)
{
	size_t pg = byte_off >> 12;
	if (!(a->touched[pg >> 3] & (1u << (pg & 7)))) {
		a->touched[pg >> 3] |= (uint8_t)(1u << (pg & 7));
		a->ntouched++;
	}
}

/* Two-level memdesc table: one top entry per guest 2 MiB region, either a
 * memdesc valid for all 512 frames ("uniform") or MEMDESC_LEAF | pointer to
 * a 4 KiB leaf of 512 memdescs. Leaves are type-stable (recycled, never
 * unmapped before mm_destroy) so lock-free readers never fault. */
struct memdesc_table {
	struct lazy_array top;          /* _Atomic memdesc_t[nregions] */
	uint64_t nregions, npages;
	void *leaf_free;                /* free list (first word = next) */
	void **leaf_chunks;             /* mmap'ed chunks of leaves, for munmap */
	size_t nleaf_chunks, leaf_chunks_cap;
	uint64_t leaves_live, leaves_total;
};

/* Per host hugepage allocator state. */
struct hpage {
	uint64_t used[MM_REGION_PAGES / 64];   /* 4 KiB pieces in use */
	uint32_t region;    /* home guest region: folios of it sit at piece = gfn % 512 */
	uint32_t next;      /* free list */
	uint16_t nr_used;
	uint16_t nr_bad;    /* quarantined (memory failure): never reused */
	uint8_t  live;      /* set up (fallocated / mapped); 0 = empty, reusable */
	uint8_t  mapped;    /* hugetlb: mapped whole at its home region's GPA */
	uint8_t  resv;      /* hugetlb, free: its file range holds a reservation */
	uint32_t *owners;   /* folio id + 1 per piece, for occupants that are not
			     * home-coloured; NULL while there are none */
	uint64_t *stale;    /* memfd: free pieces still mapped at their home-colour
			     * GPA (a released page keeps the file mapping, a hole
			     * caught by userfaultfd); NULL while there are none */
};
#define HPAGE_CHUNK 64

struct mm_pool {
	enum mm_backing kind;
	int fd;                     /* hugetlb/memfd: the backing file; else -1 */
	uint64_t capacity;          /* hugepage indices [0, capacity) */
	struct hpage **chunks;      /* capacity / HPAGE_CHUNK lazily allocated chunks */
	uint64_t nchunks, chunks_alloced;
	uint32_t free_head;         /* emptied hugepages, ready for reuse (fd pools) */
	uint32_t next_new;          /* lowest never-used index (fd pools) */
	struct lazy_array home;     /* uint32_t per guest region: hpage + 1 (fd pools) */
	uint64_t in_use;            /* hugepages with nr_used > 0 */
	uint64_t live;              /* hugepages set up */
	uint64_t owners_arrays;
	uint64_t stale_arrays;      /* hpage.stale bitmaps allocated */
	struct lazy_array rflags;   /* uint8_t per guest region: REGION_* */
	int side_fd;                /* hugetlb: 4 KiB shmem file of demoted regions
				     * (region r at offset r * 2 MiB); else -1 */
	uint64_t demoted;           /* regions demoted now */
	uint64_t resv_nr;           /* hugetlb: RAM regions, reserved at creation */
	uint64_t resv_free;         /* hugetlb: free indices holding a reservation */
	struct folio *reuse;        /* pool_place -> map_folio: its mapping is in place */
};
/* Per-region state (pool.rflags). */
#define REGION_ARMED   1u   /* every VMA of the region is registered for userfaultfd
			     * MISSING (+ WP when available): holes fault into mm/ */
#define REGION_DEMOTED 2u   /* hugetlb region whose pages live in the 4 KiB side
			     * file, mapped whole from it; its hugetlb page is gone */
#define SIDE_HPAGE (NO_HPAGE - 1)   /* f->hpage of a folio in a demoted region */

/* Folio slab cache: 16 KiB slabs of 512 descriptors; type-stable. */
#define FOLIO_SLAB_SHIFT 9
#define FOLIO_SLAB_SIZE  (1u << FOLIO_SLAB_SHIFT)
struct folio_cache {
	struct folio **slabs;
	uint32_t nslabs, cap;
	struct folio *free;         /* linked through gfn */
	uint64_t live;
};

struct mm_slot {
	uint64_t gpa, size;
	_Atomic bool registered;  /* changed under slot_lock only */
	_Atomic bool pending;     /* populated RAM in it: register soon */
};

struct guest_mem {
	struct mm_config cfg;
	enum mm_backing backing;
	char note[256];
	const struct mm_hv_ops *ops;
	void *opaque;
	pthread_mutex_t lock;

	uint8_t *base;              /* host address of GPA 0 (2 MiB aligned) */
	uint64_t span;              /* bytes of GPA space covered (table) */
	size_t nranges;
	struct mm_range ranges[2];
	unsigned fault_order;

	struct memdesc_table md;
	struct folio_cache fc;
	struct mm_pool pool;

	/* Memslots are registered under slot_lock, never under gm->lock and
	 * never on the uffd thread: KVM_SET_USER_MEMORY_REGION waits for an
	 * SRCU grace period, and a vCPU blocked in a userfaultfd fault is inside
	 * KVM's SRCU read section, waiting for the uffd thread. */
	pthread_mutex_t slot_lock;
	struct mm_slot *slots;
	uint32_t nslots;
	_Atomic uint32_t slots_registered;
	_Atomic bool slots_pending;
	bool lazy_slots;

	int uffd, stop_fd;
	bool uffd_running, have_poison;
	bool have_wp;               /* uffd write-protect on every backing (mm/migrate.c) */
	pthread_t uffd_thread;

	uint64_t pages[MEMDESC_NR_TYPES];
	uint64_t folios[MM_MAX_ORDER + 1];
	_Atomic uint64_t faults;
	_Atomic uint32_t dirty_gen;

	long hp_old, hp_new;        /* nr_hugepages we raised (restored on destroy) */
};

void mm_log(struct guest_mem *gm, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* memdesc.c */
int  mdt_init(struct memdesc_table *t, uint64_t npages);
void mdt_destroy(struct memdesc_table *t);
memdesc_t mdt_get(const struct memdesc_table *t, uint64_t gfn);
/* Locked: set [gfn, gfn+nr) to v, keep gm->pages[] counts. */
void mdt_set_range(struct guest_mem *gm, uint64_t gfn, uint64_t nr, memdesc_t v);
uint64_t mdt_bytes(const struct memdesc_table *t);
/* Is the top entry of region r uniform and equal to v? */
bool mdt_region_is(const struct memdesc_table *t, uint64_t region, memdesc_t v);

/* folio.c */
int  folio_cache_init(struct folio_cache *c);
void folio_cache_destroy(struct folio_cache *c);
struct folio *folio_alloc(struct guest_mem *gm);
void folio_free(struct guest_mem *gm, struct folio *f);
struct folio *folio_by_id(struct guest_mem *gm, uint32_t id);
int  folio_ref_freeze(struct folio *f);         /* 1 -> 0, spinning briefly; -EBUSY */
void folio_ref_unfreeze(struct folio *f);       /* 0 -> 1 */
int  folio_split_locked(struct guest_mem *gm, struct folio *f, unsigned new_order);
/* Split f so that every resulting folio lies wholly inside or outside [lo, hi). */
int  folio_split_around(struct guest_mem *gm, struct folio *f, uint64_t lo, uint64_t hi);
int  folio_release_locked(struct guest_mem *gm, struct folio *f, enum memdesc_type new_type,
			  uint64_t lo, uint64_t hi);
int  folio_poison_locked(struct guest_mem *gm, uint64_t gfn);

/* pool.c */
int  pool_init(struct guest_mem *gm, char *err, size_t errlen);
void pool_destroy(struct guest_mem *gm);
struct hpage *pool_hpage(struct mm_pool *p, uint32_t idx);   /* NULL if never set up */
/* Place f (gfn, order set) in the pool: sets f->hpage/piece. want: a hugepage
 * index or MM_HPAGE_ANY; avoid: a hugepage not to use (moves) or NO_HPAGE.
 * *new_region_map: hugetlb: the region's hugepage was just set up and must
 * be mapped. */
int  pool_place(struct guest_mem *gm, struct folio *f, uint32_t want, uint32_t avoid,
		bool *new_region_map);
void pool_unplace(struct guest_mem *gm, struct folio *f, bool punch);
void pool_unplace_release(struct guest_mem *gm, struct folio *f);   /* release path: may keep the mapping */
void pool_quarantine(struct guest_mem *gm, uint32_t hpage, unsigned piece);
void pool_unquarantine(struct guest_mem *gm, uint32_t hpage, unsigned piece);
/* hugetlb: the home hugepage of guest region r (NULL if none). */
struct hpage *pool_region_home(struct guest_mem *gm, uint64_t region, uint32_t *idx);
void pool_update_owner(struct guest_mem *gm, struct folio *f);
uint64_t pool_offset(uint32_t hpage, unsigned piece);
uint64_t pool_bytes(const struct mm_pool *p);
bool pool_home_coloured(struct guest_mem *gm, const struct folio *f);
/* Mapping of guest RAM host backing (pool.c). */
int  map_folio(struct guest_mem *gm, struct folio *f, bool new_region_map);
/* Return [gfn, gfn+nr) to the never-touched placeholder (first touch faults again). */
int  unmap_range(struct guest_mem *gm, uint64_t gfn, uint64_t nr);
int  placeholder_init(struct guest_mem *gm, uint64_t gpa, uint64_t size);
unsigned region_flags(struct guest_mem *gm, uint64_t region);
/* Register the whole of region r (its RAM part) for userfaultfd MISSING
 * (+WP): released pages can then stay holes of the existing mapping instead
 * of one placeholder VMA each. 0 or -errno. */
int  region_arm(struct guest_mem *gm, uint64_t region);
/* After an mmap inside [gpa, gpa+len) of an armed region: register it too. */
void region_rearm(struct guest_mem *gm, uint64_t gpa, uint64_t len);
/* Copy a folio's data (its host pieces hpage/piece, mapped at gpa) to dst
 * without touching holes through the guest window (that would fault into
 * userfaultfd, whose thread needs gm->lock). 0 or -errno. */
int  folio_copy_out(struct guest_mem *gm, uint32_t hpage, unsigned piece, uint64_t gpa,
		    uint64_t len, void *dst);
/* A userfaultfd MISSING fault on a page that has a folio (a hole of an armed
 * mapping): give it memory. Under gm->lock. */
void resolve_folio_fault(struct guest_mem *gm, struct folio *f, uint64_t gfn);
/* hugetlb demotion (pool.c): move region r's folios to the side file
 * bookkeeping (after their data was copied there) / back onto hugepage idx. */
void pool_demote_region(struct guest_mem *gm, uint64_t region);
int  pool_promote_region(struct guest_mem *gm, uint64_t region, uint32_t idx);
int  pool_hpage_new(struct guest_mem *gm, uint32_t *idx);
/* Memory failure of gfn in a hugetlb region mapped whole (migrate.c): demote
 * the region under write protection without reading gfn, which stays a
 * hole of the side file. 0 or -errno (-EOPNOTSUPP: no uffd write protect). */
int  demote_for_failure_locked(struct guest_mem *gm, uint64_t gfn);
void pool_hpage_drop(struct guest_mem *gm, uint32_t idx);   /* a fresh, unused one */

/* uffd.c */
int  uffd_start(struct guest_mem *gm, char *why, size_t whylen);
void uffd_stop(struct guest_mem *gm);
int  uffd_register_range(struct guest_mem *gm, uint64_t gpa, uint64_t size);
int  uffd_unregister_range(struct guest_mem *gm, uint64_t gpa, uint64_t size);
int  uffd_poison(struct guest_mem *gm, uint64_t gpa, uint64_t size);
/* Write-protect [gpa, gpa+size) (registering it for WP first) or wake its
 * blocked writers; writers block until the range is remapped or woken. */
int  uffd_wp_range(struct guest_mem *gm, uint64_t gpa, uint64_t size);
int  uffd_unprotect_range(struct guest_mem *gm, uint64_t gpa, uint64_t size);
void uffd_wake_range(struct guest_mem *gm, uint64_t gpa, uint64_t size);
/* Register for MISSING, and WP when the host has it (mode of every range). */
int  uffd_arm_range(struct guest_mem *gm, uint64_t gpa, uint64_t size);
int  uffd_zeropage(struct guest_mem *gm, uint64_t gpa, uint64_t size);

/* mm.c */
bool gfn_is_ram(const struct guest_mem *gm, uint64_t gfn);
int  release_range_locked(struct guest_mem *gm, uint64_t gfn, uint64_t nr,
			  enum memdesc_type new_type);
int  populate_locked(struct guest_mem *gm, uint64_t gfn, uint64_t nr, unsigned order_max,
		     enum memdesc_type owner);
void slot_mark_needed(struct guest_mem *gm, uint64_t gpa);   /* under gm->lock */

#endif
