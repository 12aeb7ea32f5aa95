/* Guest-physical memory, managed host-side. The only door between the rest of
 * mdvm and guest RAM. mm/ knows nothing of KVM: it reaches the hypervisor only
 * through struct mm_hv_ops, which vmm/ implements with KVM memslot ioctls.
 *
 * Design, layout and locking: docs/memdesc.md. In short: one 8-byte memdesc
 * per 4 KiB guest frame (a tagged pointer, type in the low bits), folios
 * (naturally aligned runs of 2^order frames, order 0..9) allocated from a slab
 * cache of their own, and a host pool of 2 MiB host hugepages behind them.
 * Guest RAM starts unbacked; the first touch (userfaultfd) or an explicit
 * populate allocates a folio and maps its host backing at its GPA. */
#ifndef MDVM_MM_H
#define MDVM_MM_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct guest_mem;

enum mm_backing {
	MM_BACKING_AUTO = 0,  /* best available: hugetlb > thp > memfd > anon */
	MM_BACKING_HUGETLB,   /* hugetlbfs memfd, 2 MiB pages */
	MM_BACKING_THP,       /* anonymous memory + MADV_HUGEPAGE */
	MM_BACKING_MEMFD,     /* shmem memfd, 4 KiB pages */
	MM_BACKING_ANON,      /* anonymous memory, 4 KiB pages */
};
#define MM_BACKING_NR 5
const char *mm_backing_name(enum mm_backing b);
int mm_backing_parse(const char *s, enum mm_backing *out);  /* 0 or -1 */

/* One number from a sysctl or sysfs file: -1 if unreadable; 0 or -1. */
long mm_read_long(const char *path);
int mm_write_long(const char *path, long v);

/* The narrow hypervisor interface mm/ uses. A region is a range of guest
 * physical addresses backed by [hva, hva+size) of this process. */
struct mm_hv_ops {
	/* Create/replace (size > 0) or delete (size == 0) region `slot`.
	 * Returns >= 0 on success, < 0 on failure (errno set). */
	int (*set_region)(void *opaque, uint32_t slot, uint64_t gpa, uint64_t size,
			  void *hva, bool log_dirty);
};

struct mm_config {
	uint64_t ram_size;        /* bytes, multiple of 4 KiB */
	enum mm_backing backing;
	bool reserve_hugepages;   /* may raise /proc/sys/vm/nr_hugepages (root) */
	uint64_t hole_start, hole_end;  /* MMIO hole; RAM above hole_start moves to hole_end */
	/* Optional; zero means the default. */
	unsigned fault_pages;     /* folio size allocated on first touch, in 4 KiB pages:
				   * 1, 2, 4, ... 512; 0 = 512 (one 2 MiB folio) */
	int lazy;                 /* 0: first touch via userfaultfd when available;
				   * -1: populate all RAM at creation (no userfaultfd) */
	uint64_t eager_slot_limit;/* RAM above this gets lazily registered 1 GiB memslots
				   * (see mm_handle_mmio); default 16 GiB, ~0 = never lazy */
	bool quiet;               /* do not print the "backing: ..." line and notes
				   * (tests that mean to touch ballooned pages) */
	void (*log)(void *opaque, const char *msg);  /* instead of stderr */
	void *log_opaque;
};

/* Creates guest RAM and registers it through ops (ops may be NULL: no
 * hypervisor, as in unit tests). On failure returns NULL with err filled.
 * Prints (or passes to cfg->log) one line saying which backing was chosen and
 * why, e.g. "backing: hugetlb (raised nr_hugepages 0 -> 128)". */
struct guest_mem *mm_create(const struct mm_config *cfg, const struct mm_hv_ops *ops,
			    void *opaque, char *err, size_t errlen);
void mm_destroy(struct guest_mem *gm);

enum mm_backing mm_backing(const struct guest_mem *gm);  /* resolved kind */
const char *mm_backing_note(const struct guest_mem *gm); /* why that kind */
uint64_t mm_ram_size(const struct guest_mem *gm);

/* Guest RAM ranges in ascending GPA order (for the e820/PVH map and dumps). */
struct mm_range { uint64_t gpa, size; };
size_t mm_ram_ranges(const struct guest_mem *gm, struct mm_range *out, size_t max);

/* Host pointer to [gpa, gpa+len) if it lies wholly inside one RAM range, else
 * NULL. Populates (allocates backing for) the range first. The pointer is
 * valid while the memory exists; writing through it is a guest-memory write
 * that the caller must report with mm_mark_dirty(). */
void *mm_gpa_to_hva(struct guest_mem *gm, uint64_t gpa, uint64_t len);
/* Copy in/out of guest RAM; -1 (errno EFAULT) if any byte is not RAM.
 * mm_read of never-touched RAM reads zeros without allocating; mm_write
 * populates and marks the pages dirty through the memdesc owner path
 * (writing zeros to never-touched RAM allocates nothing). */
int mm_read(struct guest_mem *gm, uint64_t gpa, void *buf, size_t len);
int mm_write(struct guest_mem *gm, uint64_t gpa, const void *buf, size_t len);
void mm_mark_dirty(struct guest_mem *gm, uint64_t gpa, uint64_t len);
/* Type a range as reserved/firmware (boot structures, device pages). RAM
 * pages stay backed (own folios); pages in the hole are typed only. */
int mm_mark_reserved(struct guest_mem *gm, uint64_t gpa, uint64_t len);

/* Lazily registered memslots (RAM > eager_slot_limit; KVM with shadow paging
 * costs ~10 bytes of host memory per 4 KiB of memslot). Call on every
 * KVM_EXIT_MMIO before device dispatch: returns true if gpa was guest RAM
 * without a memslot; the slot is then registered and the access completed on
 * guest RAM (data filled for reads). Instruction fetches from such RAM fail
 * in KVM (emulation error): call mm_ensure_slot(gpa of RIP) and re-enter. */
bool mm_handle_mmio(struct guest_mem *gm, uint64_t gpa, uint8_t *data, uint32_t len,
		    bool is_write);
bool mm_ensure_slot(struct guest_mem *gm, uint64_t gpa);  /* true: slot newly created */

/* ------------------------------------------------------------------------
 * memdesc: one 8-byte word per 4 KiB guest frame (gfn = gpa >> 12). A tagged
 * pointer: type in the low 4 bits, an owner pointer (or 0) above them.
 * memdesc value 0 is "unbacked", so untouched tables are all zero. */
#define MM_PAGE_SHIFT   12
#define MM_PAGE_SIZE    (1ULL << MM_PAGE_SHIFT)
#define MM_MAX_ORDER    9                  /* 2 MiB folio */
#define MM_REGION_PAGES (1u << MM_MAX_ORDER)

typedef uint64_t memdesc_t;

enum memdesc_type {
	MEMDESC_UNBACKED = 0,  /* RAM never touched (or released): reads as zero, no host memory */
	MEMDESC_FOLIO,         /* guest RAM folio -> struct folio */
	MEMDESC_RESERVED,      /* reserved/firmware -> struct folio (RAM) or none (hole) */
	MEMDESC_BALLOONED,     /* given back by the guest's balloon; no host memory */
	MEMDESC_POISONED,      /* memory failure; never read again */
	MEMDESC_MMIO,          /* MMIO hole: not RAM */
	MEMDESC_NR_TYPES,
};
#define MEMDESC_TYPE_MASK 0xfULL

static inline enum memdesc_type memdesc_type(memdesc_t md)
{
	return (enum memdesc_type)(md & MEMDESC_TYPE_MASK);
}
const char *memdesc_type_name(enum memdesc_type t);  /* "unbacked", "ram", "reserved", ... */

/* Flags of a folio (atomic bit operations). */
enum folio_flag {
	FOLIO_DIRTY    = 1u << 0,  /* written since the last dirty-generation sweep */
	FOLIO_LOCKED   = 1u << 1,  /* being moved or split; data may be in flight */
	FOLIO_UPTODATE = 1u << 2,  /* host backing holds valid data */
	FOLIO_HWPOISON = 1u << 3,  /* a page of it had a memory failure */
	FOLIO_MAPPED   = 1u << 4,  /* host backing mapped at its GPA */
	FOLIO_PINNED   = 1u << 5,  /* must not move (e.g. device DMA ring) */
	FOLIO_MIGRATING = 1u << 6, /* its data is being copied elsewhere (mm/migrate.c) */
};

/* A folio: 2^order guest frames, naturally aligned, backed by 2^order
 * consecutive 4 KiB pieces of one host hugepage. 32 bytes, from a slab cache. */
struct folio {
	uint64_t gfn;                 /* first guest frame */
	_Atomic uint32_t flags;       /* enum folio_flag */
	_Atomic int32_t refcount;     /* 1 while owned by the memdesc table; 0 = frozen/free */
	uint32_t hpage;               /* host hugepage index in the pool */
	uint16_t piece;               /* first 4 KiB piece within it (aligned to 2^order) */
	uint8_t order;                /* 0 .. MM_MAX_ORDER */
	uint8_t owner;                /* enum memdesc_type of its pages (FOLIO or RESERVED) */
	_Atomic uint32_t gen;         /* dirty/migration generation of the last mark_dirty */
	uint32_t id;                  /* index in the folio cache (for reverse maps) */
} __attribute__((aligned(32)));

static inline struct folio *memdesc_folio(memdesc_t md)
{
	enum memdesc_type t = memdesc_type(md);
	return (t == MEMDESC_FOLIO || t == MEMDESC_RESERVED)
		? (struct folio *)(uintptr_t)(md & ~MEMDESC_TYPE_MASK) : NULL;
}
static inline unsigned folio_order(const struct folio *f) { return f->order; }
static inline uint64_t folio_nr_pages(const struct folio *f) { return 1ULL << f->order; }
static inline uint64_t folio_gfn(const struct folio *f) { return f->gfn; }
static inline bool folio_test(struct folio *f, enum folio_flag fl)
{
	return __atomic_load_n(&f->flags, __ATOMIC_ACQUIRE) & fl;
}

/* Lock-free (read-mostly) lookup: the memdesc of guest frame gfn; frames
 * outside the table read as MEMDESC_MMIO. A folio pointer obtained this way
 * may be split/freed concurrently: use folio_try_get() to hold it. */
memdesc_t memdesc_lookup(struct guest_mem *gm, uint64_t gfn);
/* True when every frame of the 2 MiB region holding gfn has the one memdesc
 * *md (untouched RAM, a 2 MiB folio): walkers skip it in one step. */
bool memdesc_region_uniform(struct guest_mem *gm, uint64_t gfn, memdesc_t *md);
/* Take a reference on the folio that currently owns gfn (NULL if none);
 * folio_put() drops it. While held the folio is not split, merged, moved or freed. */
struct folio *folio_get_gfn(struct guest_mem *gm, uint64_t gfn);
void folio_put(struct folio *f);

/* Owner operations: every memdesc type has a table. The generic entry points
 * below find the owner of any guest frame and call its operation; they are
 * what migration, compaction, balloon and memory-failure code go through.
 * Return 0 or -errno. The generic entry points call move, memory_failure and
 * release with the guest_mem lock held, mark_dirty without (lock-free).
 * Never call them (or anything that takes the lock) while holding a folio
 * reference. Per-type behaviour: docs/memdesc.md. */
#define MM_HPAGE_ANY UINT32_MAX
struct memdesc_ops {
	const char *name;
	/* Record a write to gfn (lock-free; dirty flag + generation). */
	int (*mark_dirty)(struct guest_mem *gm, memdesc_t md, uint64_t gfn);
	/* Move the owner's data to another host location (hugepage dst, or any):
	 * copy, then MAP_FIXED/mremap it over the GPA. vCPUs must not write the
	 * folio meanwhile (pause them, or the caller write-protects). */
	int (*move)(struct guest_mem *gm, memdesc_t md, uint64_t gfn, uint32_t dst_hpage);
	/* The host memory behind gfn failed: gfn becomes POISONED (its folio is
	 * split so only that page is lost); the host piece is never reused. */
	int (*memory_failure)(struct guest_mem *gm, memdesc_t md, uint64_t gfn);
	/* Give up gfn's host memory: gfn becomes new_type (UNBACKED, BALLOONED). */
	int (*release)(struct guest_mem *gm, memdesc_t md, uint64_t gfn, enum memdesc_type new_type);
};
const struct memdesc_ops *memdesc_ops(enum memdesc_type t);
int memdesc_mark_dirty(struct guest_mem *gm, uint64_t gfn);
int memdesc_move(struct guest_mem *gm, uint64_t gfn, uint32_t dst_hpage);
int memdesc_memory_failure(struct guest_mem *gm, uint64_t gfn);
int memdesc_release(struct guest_mem *gm, uint64_t gfn, enum memdesc_type new_type);

/* Explicit population (what the first-touch handler does): allocate folios of
 * at most `order` (MM_ORDER_DEFAULT: cfg.fault_order) covering every unbacked
 * RAM frame in [gfn, gfn+nr) and map them. 0 or -errno. */
#define MM_ORDER_DEFAULT (-1)
int mm_populate(struct guest_mem *gm, uint64_t gfn, uint64_t nr, int order);
/* Release [gfn, gfn+nr): folios are split as needed, host memory returned,
 * frames become new_type (UNBACKED or BALLOONED). hugetlb: a ballooned page
 * of a still mapped 2 MiB region made UNBACKED gets its piece back as a
 * 4 KiB folio; folios there cannot become UNBACKED (-EOPNOTSUPP, left as
 * they are, the rest of the range is released). Changed frames are recorded
 * in the dirty tracker (a migration sends their new type). */
int mm_release_range(struct guest_mem *gm, uint64_t gfn, uint64_t nr, enum memdesc_type new_type);
/* The same; *freed (not NULL) is increased by the host memory actually given
 * back in bytes (hugetlb: whole 2 MiB pages and demoted regions' pages). */
int mm_release_range_freed(struct guest_mem *gm, uint64_t gfn, uint64_t nr,
			   enum memdesc_type new_type, uint64_t *freed);

/* Replace the poisoned frames of [gfn, gfn+nr) with fresh never-touched RAM
 * (system reset, as QEMU does): they read as zero and get new host memory on
 * the next touch; the failed host pieces stay quarantined (hugetlb: the
 * piece is zeroed and reused — the 2 MiB page cannot be replaced 4 KiB at a
 * time). Release/balloon never do this. Returns frames replaced or -errno. */
long mm_unpoison_range(struct guest_mem *gm, uint64_t gfn, uint64_t nr);
/* Poison page gfn through its memdesc owner (backing a never-touched page
 * first, so the guest still finds the error there): 0 when it is POISONED
 * now (recorded dirty for a migration in progress), else -errno. *reserved
 * (may be NULL): it was a reserved (firmware) page. */
int mm_poison_page(struct guest_mem *gm, uint64_t gfn, bool *reserved);

/* Split the folio containing gfn into folios of new_order (< its order).
 * -EBUSY if it is referenced, -EINVAL if no folio / bad order. */
int folio_split(struct guest_mem *gm, uint64_t gfn, unsigned new_order);
/* Merge the naturally aligned 2^order block at gfn, wholly made of smaller
 * folios of one owner type whose host pieces are consecutive and aligned in
 * one hugepage, into one folio. -EXDEV: not host-contiguous (move first). */
int folio_merge(struct guest_mem *gm, uint64_t gfn, unsigned order);

/* The host pool, for compaction/migration code and tests. Host hugepage
 * idx (fd backings: file offset idx * 2 MiB; anon/thp: guest region idx). */
struct mm_hpage_info {
	bool live;            /* set up (host memory may be behind it) */
	uint32_t region;      /* home guest 2 MiB region, or UINT32_MAX */
	unsigned nr_used;     /* 4 KiB pieces used by folios */
	unsigned nr_bad;      /* pieces quarantined after a memory failure */
};
int mm_pool_hpage_info(struct guest_mem *gm, uint32_t idx, struct mm_hpage_info *out);  /* 0 / -ENOENT */
/* Which folio uses piece `piece` of host hugepage idx (NULL if free). Locked
 * snapshot: the folio may change afterwards unless the caller holds it. */
struct folio *mm_pool_piece_owner(struct guest_mem *gm, uint32_t idx, unsigned piece);

/* The guest RAM window as KVM sees it (GPA 0 at the returned address).
 * Touching never-populated RAM through it takes the first-touch path
 * (userfaultfd), exactly as a vCPU does: tests use it to drive mm/ without KVM. */
void *mm_guest_base(struct guest_mem *gm);

/* Dirty generation: bumped by mm_dirty_gen_advance(); folios record it on
 * mark_dirty (folio-granular dirty tracking for live migration). */
uint32_t mm_dirty_gen(struct guest_mem *gm);
uint32_t mm_dirty_gen_advance(struct guest_mem *gm);

/* ------------------------------------------------------------------------ */
#define MM_OCC_BUCKETS 9   /* pieces used per in-use hugepage: 1-63, 64-127, ..., 448-511, 512 */
struct mm_stats {
	uint64_t ram_size;
	enum mm_backing backing;
	uint64_t pages[MEMDESC_NR_TYPES];      /* 4 KiB frames by memdesc type (hole included) */
	uint64_t folios[MM_MAX_ORDER + 1];     /* live folios by order */
	uint64_t hugepages_in_use;             /* host hugepages with at least one piece used */
	uint64_t hugepages_total;              /* pool hugepages ever set up (incl. free ones) */
	uint64_t occupancy[MM_OCC_BUCKETS];
	uint64_t metadata_bytes;               /* all of the below */
	uint64_t memdesc_bytes;                /* memdesc tables: top level (resident pages) + leaves */
	uint64_t folio_bytes;                  /* folio slab cache */
	uint64_t pool_bytes;                   /* hugepage states, reverse maps */
	uint64_t leaf_tables;                  /* 4 KiB second-level memdesc tables */
	uint64_t faults;                       /* first-touch faults handled (userfaultfd) */
	uint64_t populated_bytes;              /* guest RAM with host backing (folios) */
	uint32_t slots_registered, slots_total;
	uint32_t dirty_gen;
};
void mm_query_stats(struct guest_mem *gm, struct mm_stats *st);
const char *mm_occupancy_label(unsigned bucket);  /* "1-63", ..., "512" */

#endif
