/* Folio migration and compaction (mm/migrate.c, mm/compact.c): move a live
 * folio's data to another host location while vCPUs run, and empty sparse
 * host hugepages so their memory goes back to the host. Design and
 * measurements: docs/compaction.md. mm/ stops the vCPUs (when it must) only
 * through struct mm_pause_ops, which vmm/ implements. */
#ifndef MDVM_MIGRATE_H
#define MDVM_MIGRATE_H
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include "mm.h"

enum mm_migrate_method {
	MM_MIGRATE_AUTO = 0,  /* uffd-wp when the host has it, else pause */
	MM_MIGRATE_WP,        /* userfaultfd write-protect the folio, copy, remap, wake */
	MM_MIGRATE_PAUSE,     /* stop the vCPUs, copy, remap, resume them */
};
const char *mm_migrate_method_name(enum mm_migrate_method m);
bool mm_migrate_have_wp(struct guest_mem *gm);

/* Stop / restart every vCPU (out of guest mode, no writes to guest RAM).
 * Called without any mm/ lock held. */
struct mm_pause_ops {
	int  (*pause)(void *opaque);   /* 0 or -errno */
	void (*resume)(void *opaque);
	void *opaque;
};

/* Why a folio was not moved; -errno values returned by mm_migrate_folio. */
#define MM_MIGRATE_POISONED  (-EHWPOISON)  /* a page of it had a memory failure */
#define MM_MIGRATE_LOCKED    (-ENOLCK)     /* locked (split, I/O) */
#define MM_MIGRATE_PINNED    (-EPERM)      /* pinned (device memory) */
#define MM_MIGRATE_MIGRATING (-EALREADY)   /* already being migrated */
#define MM_MIGRATE_BUSY      (-EBUSY)      /* referenced by someone */
const char *mm_migrate_strerror(int rc);

struct mm_migrate_stats {
	uint64_t folios_moved, bytes_moved;
	uint64_t refused_poisoned, refused_locked, refused_pinned, refused_migrating, refused_busy;
	uint64_t pauses, pause_ns_max, pause_ns_total;  /* vCPUs stopped (pause method) */
	uint64_t wp_ns_max, wp_ns_total;                /* folio write-protected (wp method):
							 * the longest a writer can stall */
	uint64_t copy_ns_total;
	uint64_t regions_demoted, regions_promoted;     /* hugetlb <-> 4 KiB side file */
};

/* One migration session (a compaction run). */
struct mm_migrate_ctx {
	enum mm_migrate_method method;     /* resolved by mm_migrate_begin */
	const struct mm_pause_ops *pause;  /* may be NULL: nothing runs (tests, paused VM) */
	uint64_t pause_budget_bytes;       /* pause method: bytes copied per stop (0: 2 MiB) */
	struct mm_migrate_stats st;
	/* private */
	bool paused;
	uint64_t paused_bytes, pause_t0;
};

/* Resolve the method (AUTO -> WP if available). -EOPNOTSUPP if WP was asked
 * for and the host lacks it. */
int  mm_migrate_begin(struct guest_mem *gm, struct mm_migrate_ctx *c, enum mm_migrate_method m,
		      const struct mm_pause_ops *pause);
void mm_migrate_end(struct guest_mem *gm, struct mm_migrate_ctx *c);  /* resumes vCPUs */

/* Move the folio owning gfn to host hugepage dst (MM_HPAGE_ANY: anywhere
 * but where it is). Never reads a poisoned, locked, pinned, referenced or
 * migrating folio: returns MM_MIGRATE_* (counted in c->st) instead.
 * -ENOENT: no folio at gfn; -EOPNOTSUPP: hugetlb folio smaller than 2 MiB;
 * -ENOSPC: no room in dst. Call without gm->lock and no folio reference. */
int  mm_migrate_folio(struct guest_mem *gm, struct mm_migrate_ctx *c, uint64_t gfn, uint32_t dst);

/* hugetlb demotion: copy the live pages of 2 MiB guest region r (a region
 * mapped whole from one hugetlb page) to a 4 KiB-granular shmem side file,
 * map the region from it and give the hugetlb page back: the host gets the
 * region's free pages back. Promotion is the reverse, for a region whose
 * 512 pages all have folios (collapse). Same refusals and methods as
 * mm_migrate_folio; -EINVAL if r is not in the right state. */
int  mm_demote_region(struct guest_mem *gm, struct mm_migrate_ctx *c, uint64_t region);
int  mm_promote_region(struct guest_mem *gm, struct mm_migrate_ctx *c, uint64_t region);

/* ------------------------------------------------------------------------
 * Compaction (mm/compact.c). */
enum mm_compact_mode {
	MM_COMPACT_RECLAIM = 0,  /* empty the sparsest hugepages, give them back */
	MM_COMPACT_COLLAPSE,     /* gather each 2 MiB guest region into one order-9 folio */
};
struct mm_compact_req {
	enum mm_compact_mode mode;
	enum mm_migrate_method method;
	uint64_t budget_bytes;         /* stop after copying this much (0: no limit) */
	uint64_t gpa, size;            /* collapse: the range (size 0: all RAM) */
	unsigned collapse_min_pages;   /* collapse: populate holes only if the region has at
					* least this many backed pages (0: 448; 512: never
					* fill holes, only regions the guest filled) */
	unsigned demote_min_free;      /* reclaim, hugetlb: demote a region only with at least
					* this many free pages (0: 64) */
};
struct mm_compact_result {
	struct mm_migrate_stats mig;
	enum mm_migrate_method method;
	uint64_t hugepages_freed;      /* pool hugepages emptied and given back */
	uint64_t bytes_returned;       /* host memory (file blocks) given back */
	uint64_t regions_collapsed;    /* 2 MiB regions now one order-9 folio */
	uint64_t regions_demoted, regions_promoted;
	uint64_t map_budget_folios;    /* memfd reclaim: moves the VMA budget allowed (0: none) */
	uint64_t hugepages_in_use_before, hugepages_in_use_after;
	uint64_t host_bytes_before, host_bytes_after;
	uint64_t ns;
	const char *note;              /* what this backing can and cannot do, or NULL */
};
int mm_compact(struct guest_mem *gm, const struct mm_compact_req *req, const struct mm_pause_ops *pause,
	       struct mm_compact_result *res);

/* Host memory behind guest RAM: allocated blocks of the backing file
 * (hugetlb, memfd), or -1 for anonymous backings (see the process RSS). */
int64_t mm_host_bytes(struct guest_mem *gm);
/* hugetlb regions living in 4 KiB pages of the side file now. */
uint64_t mm_regions_demoted(struct guest_mem *gm);

/* The placement policy, exposed for unit tests: which hugepages to empty and
 * where each folio goes. in: one entry per live hugepage; folios: the
 * movable folios of each (hpage index, piece, order), sorted by hpage. Returns the number of
 * hugepages it plans to empty; dst[i] is the destination of folios[i]
 * (NO_DST: stays). Greedy: sparsest first, into the fullest that fit. */
struct compact_hp {
	uint32_t idx;
	uint64_t used[MM_REGION_PAGES / 64];  /* pieces used (quarantined ones too) */
	unsigned nr_used, nr_bad;
	bool stuck;                           /* holds a folio that must not move */
};
struct compact_folio { uint32_t hpage; uint16_t piece; uint8_t order; uint64_t gfn; };
#define COMPACT_NO_DST UINT32_MAX
unsigned compact_plan(struct compact_hp *hps, unsigned nhp, const struct compact_folio *folios,
		      unsigned nfolios, uint64_t budget_pages, uint32_t *dst, uint32_t *emptied);
#endif
