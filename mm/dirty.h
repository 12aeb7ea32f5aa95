/* Dirty tracking of guest memory, folio-granular with a per-page record.
 * One interface for every consumer (live migration now, snapshots later):
 * a consumer opens a dirty_log, syncs it, and takes the dirty frames out of
 * it; frames written after that are reported again by the next sync.
 *
 * Where dirty frames come from is a dirty_source: vmm/dirty_kvm.c (KVM's
 * dirty ring or dirty bitmap) in mdvm, a fake in the unit tests. Writes that
 * mdvm makes itself (mm_write, devices) go through the memdesc owner path
 * and set FOLIO_DIRTY; a sync turns those into page records too, so nothing
 * escapes. Design and measurements: docs/dirty-tracking.md. */
#ifndef MDVM_DIRTY_H
#define MDVM_DIRTY_H
#include <stdbool.h>
#include <stdint.h>
#include "mm.h"

struct dirty_log;
struct dirty_tracker;

struct dirty_source {
	/* Start/stop logging in the hypervisor. 0 or -errno. */
	int  (*start)(void *opaque);
	void (*stop)(void *opaque);
	/* Report every frame dirtied since the last harvest with
	 * dirty_tracker_record*(), then re-arm (write-protect) them. Returns
	 * frames reported or -errno. Any thread; serialised by the tracker. */
	long (*harvest)(void *opaque, struct dirty_tracker *t);
	void *opaque;
};

/* One tracker per guest memory. src may be NULL (no hypervisor: only
 * mdvm's own writes are seen). */
struct dirty_tracker *dirty_tracker_create(struct guest_mem *gm, const struct dirty_source *src);
void dirty_tracker_destroy(struct dirty_tracker *t);
struct dirty_tracker *dirty_tracker_of(struct guest_mem *gm);  /* NULL if none */
/* Frames [gfn, gfn+nr) changed without a guest write (released, poisoned):
 * recorded in every open log of gm's tracker, if any. Takes the tracker's
 * lock, so a log being closed meanwhile is never written after its free;
 * not for sources (they record lock-free, below). */
void dirty_tracker_note(struct guest_mem *gm, uint64_t gfn, uint64_t nr);

/* Called by sources (from harvest, or from a vCPU whose ring filled up):
 * frames [gfn, gfn+nr) / set bits of `bits` (bit i = frame gfn+i) were
 * written. Recorded in every open log. Lock-free. */
void dirty_tracker_record(struct dirty_tracker *t, uint64_t gfn, uint64_t nr);
void dirty_tracker_record_bitmap(struct dirty_tracker *t, uint64_t gfn, const uint64_t *bits,
				 uint64_t nbits);

/* A dirty ring as KVM lays it out (struct kvm_dirty_gfn): entries are
 * pushed in order with DIRTY set; the harvester sets RESET. The whole ring
 * is scanned, so a producer that overran it (overwriting entries) cannot
 * desynchronise us; a ring found entirely dirty may have lost entries and
 * is reported in *overflow: record everything dirty then.
 * slot_gfn[s] is the first frame of slot s (UINT64_MAX: no such slot). */
struct dirty_ring_entry {
	uint32_t flags;
	uint32_t slot;
	uint64_t offset;
};
#define DIRTY_RING_F_DIRTY 1u
#define DIRTY_RING_F_RESET 2u
long dirty_ring_harvest(struct dirty_tracker *t, struct dirty_ring_entry *ring, uint32_t size,
			uint32_t *fetch, const uint64_t *slot_gfn, uint32_t nslots, bool *overflow);

/* A consumer's view. The first open starts hypervisor logging, the last
 * close stops it. A new log is empty: the consumer copies everything once
 * after opening (frames written meanwhile are in the log). */
struct dirty_log *dirty_log_open(struct dirty_tracker *t, char *err, size_t errlen);
void dirty_log_close(struct dirty_log *l);
/* Harvest the source and fold FOLIO_DIRTY (mdvm's own writes) into every
 * log. Returns frames newly recorded in this log, or -errno. */
long dirty_log_sync(struct dirty_log *l);
/* Frames currently recorded dirty in this log. */
uint64_t dirty_log_count(struct dirty_log *l);
/* Take the dirty frames of [gfn, gfn+nr) out of the log: fn is called for
 * each maximal run of dirty frames, in ascending order; the bits are
 * cleared (atomically) before fn sees them, so a write racing with fn is
 * recorded again. Stops early if fn returns non-zero (returned). */
typedef int (*dirty_run_fn)(void *opaque, uint64_t gfn, uint64_t nr);
int dirty_log_take(struct dirty_log *l, uint64_t gfn, uint64_t nr, dirty_run_fn fn, void *opaque);
/* Is any frame of the folio at [gfn, gfn+nr) dirty in the log? */
bool dirty_log_test(struct dirty_log *l, uint64_t gfn, uint64_t nr);
/* Mark frames dirty in this log only (e.g. a consumer re-queues frames it
 * could not send). */
void dirty_log_mark(struct dirty_log *l, uint64_t gfn, uint64_t nr);
#endif
