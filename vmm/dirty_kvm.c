/* KVM dirty harvest (dirty_kvm.h, docs/dirty-tracking.md).
 *
 * Ring mode (KVM_CAP_DIRTY_LOG_RING): each vCPU pushes the GFNs it dirties
 * into its own mmap'ed ring; harvesting reads entries with the DIRTY flag in
 * order, marks them RESET, then KVM_RESET_DIRTY_RINGS re-protects them. Cost
 * is proportional to what was dirtied, not to guest RAM size.
 * Bitmap mode: KVM_GET_DIRTY_LOG per slot, with MANUAL_DIRTY_LOG_PROTECT2 so
 * that only the 64-page chunks that were dirty get re-protected
 * (KVM_CLEAR_DIRTY_LOG), not the whole slot.
 * Either way a harvest must come before the consumer reads the data: a
 * write after the reset is logged again. */
#include <errno.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../mm/dirty.h"
#include "dirty_kvm.h"
#include "util.h"

_Static_assert(sizeof(struct dirty_ring_entry) == sizeof(struct kvm_dirty_gfn) &&
	       DIRTY_RING_F_DIRTY == KVM_DIRTY_GFN_F_DIRTY && DIRTY_RING_F_RESET == KVM_DIRTY_GFN_F_RESET,
	       "mm's dirty ring entry is KVM's struct kvm_dirty_gfn");

#define MAX_SLOTS   512
#define MAX_VCPUS   256
#define RING_ENTRIES 65536          /* 1 MiB per vCPU */
#define CLEAR_CHUNK (1u << 18)      /* pages per KVM_CLEAR_DIRTY_LOG */

enum mode { MODE_NONE, MODE_RING, MODE_BITMAP };

struct slot {
	bool used;
	uint64_t gpa, size;
	void *hva;
	bool log_req;                   /* mm asked for logging itself */
};

struct ring {
	struct kvm_dirty_gfn *gfns;
	uint32_t fetch;
};

static struct {
	int vm_fd;
	enum mode mode;
	uint32_t ring_entries;
	bool logging;
	pthread_mutex_t lock;           /* slots, logging, rings, bitmaps */
	struct slot slots[MAX_SLOTS];
	struct ring rings[MAX_VCPUS];
	int nrings;
	uint64_t *bitmap;               /* scratch for bitmap mode */
	size_t bitmap_bytes;
	struct dirty_tracker *tracker;
} dk = { .vm_fd = -1, .lock = PTHREAD_MUTEX_INITIALIZER };

const char *dirty_kvm_mode(void)
{
	return dk.mode == MODE_RING ? "ring" : dk.mode == MODE_BITMAP ? "bitmap" : "none";
}

void dirty_kvm_init(int kvm_fd, int vm_fd)
{
	const char *force = getenv("MDVM_DIRTY");
	int ring_max = ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING);
	int manual = ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);

	(void)kvm_fd;
	dk.vm_fd = vm_fd;
	dk.mode = MODE_NONE;
	if (ring_max > 0 && !(force && !strcmp(force, "bitmap"))) {
		uint32_t bytes = RING_ENTRIES * sizeof(struct kvm_dirty_gfn);
		if ((uint32_t)ring_max < bytes)
			bytes = (uint32_t)ring_max;
		struct kvm_enable_cap cap = { .cap = KVM_CAP_DIRTY_LOG_RING, .args = { bytes } };
		if (ioctl(vm_fd, KVM_ENABLE_CAP, &cap) == 0) {
			dk.mode = MODE_RING;
			dk.ring_entries = bytes / sizeof(struct kvm_dirty_gfn);
			return;
		}
		pr_warn("dirty ring unavailable (%s); using the dirty bitmap", strerror(errno));
	}
	if (manual > 0) {
		struct kvm_enable_cap cap = { .cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
					      .args = { KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE } };
		if (ioctl(vm_fd, KVM_ENABLE_CAP, &cap) == 0)
			dk.mode = MODE_BITMAP;
	}
	/* Without manual protection KVM_GET_DIRTY_LOG clears and re-protects
	 * the whole slot itself: correct, only slower. */
	if (dk.mode == MODE_NONE)
		dk.mode = MODE_BITMAP;
}

int dirty_kvm_vcpu_init(int index, int vcpu_fd)
{
	long psz = sysconf(_SC_PAGESIZE);
	void *p;

	if (dk.mode != MODE_RING)
		return 0;
	if (index >= MAX_VCPUS) {
		errno = E2BIG;
		return -1;
	}
	p = mmap(NULL, dk.ring_entries * sizeof(struct kvm_dirty_gfn), PROT_READ | PROT_WRITE,
		 MAP_SHARED, vcpu_fd, KVM_DIRTY_LOG_PAGE_OFFSET * psz);
	if (p == MAP_FAILED)
		return -1;
	pthread_mutex_lock(&dk.lock);
	dk.rings[index].gfns = p;
	dk.rings[index].fetch = 0;
	if (index + 1 > dk.nrings)
		dk.nrings = index + 1;
	pthread_mutex_unlock(&dk.lock);
	return 0;
}

static int slot_register(uint32_t id, const struct slot *s)
{
	struct kvm_userspace_memory_region r = {
		.slot = id,
		.flags = (dk.logging || s->log_req) ? KVM_MEM_LOG_DIRTY_PAGES : 0,
		.guest_phys_addr = s->gpa,
		.memory_size = s->size,
		.userspace_addr = (uint64_t)(uintptr_t)s->hva,
	};
	return ioctl(dk.vm_fd, KVM_SET_USER_MEMORY_REGION, &r);
}

int dirty_kvm_set_region(uint32_t slot, uint64_t gpa, uint64_t size, void *hva, bool log_dirty)
{
	struct slot s = { .used = size > 0, .gpa = gpa, .size = size, .hva = hva,
			  .log_req = log_dirty };
	int rc;

	if (slot >= MAX_SLOTS) {
		errno = ENOSPC;
		return -1;
	}
	pthread_mutex_lock(&dk.lock);
	rc = slot_register(slot, &s);
	if (rc >= 0)
		dk.slots[slot] = s;
	pthread_mutex_unlock(&dk.lock);
	return rc;
}

/* ---- harvest (dk.lock held)
 *
 * KVM pushes entries in order and is meant to exit (DIRTY_RING_FULL) before
 * a ring fills. The kvm_pvm module of our hosts emulates guest instructions
 * in batches and overruns it ("kvm_dirty_ring_push" warning, oldest entries
 * overwritten). So: the whole ring is scanned (positions may have moved), a
 * ring found completely dirty counts as overflowed and reports every frame
 * dirty (correct, costly), and vCPUs harvest early at their exits
 * (dirty_kvm_vcpu_exit) to make that rare. */
static void record_all(struct dirty_tracker *t)
{
	for (uint32_t id = 0; id < MAX_SLOTS; id++)
		if (dk.slots[id].used)
			dirty_tracker_record(t, dk.slots[id].gpa >> 12, dk.slots[id].size >> 12);
}

static long ring_harvest_locked(struct dirty_tracker *t)
{
	uint64_t slot_gfn[MAX_SLOTS];
	long n = 0;
	bool overflow = false;

	for (uint32_t id = 0; id < MAX_SLOTS; id++)
		slot_gfn[id] = dk.slots[id].used ? dk.slots[id].gpa >> 12 : UINT64_MAX;
	for (int i = 0; i < dk.nrings; i++) {
		struct ring *r = &dk.rings[i];
		bool of = false;
		if (!r->gfns)
			continue;
		n += dirty_ring_harvest(t, (struct dirty_ring_entry *)r->gfns, dk.ring_entries,
					&r->fetch, slot_gfn, MAX_SLOTS, &of);
		overflow |= of;
	}
	if (overflow && t) {
		static bool warned;
		if (!warned) {
			warned = true;
			pr_warn("KVM dirty ring overflowed (this host's KVM fills it past its limit); "
				"treating all guest memory as dirty once");
		}
		record_all(t);
	}
	/* Reset even when nothing new was found: a vCPU that exited with a
	 * full ring waits for entries harvested earlier to be recycled. */
	if (ioctl(dk.vm_fd, KVM_RESET_DIRTY_RINGS, 0) < 0)
		return -errno;
	return n;
}

static long bitmap_harvest_locked(struct dirty_tracker *t)
{
	long n = 0;

	for (uint32_t id = 0; id < MAX_SLOTS; id++) {
		struct slot *s = &dk.slots[id];
		if (!s->used)
			continue;
		uint64_t pages = s->size >> 12, words = (pages + 63) / 64;
		if (words * 8 > dk.bitmap_bytes) {
			free(dk.bitmap);
			dk.bitmap_bytes = words * 8;
			dk.bitmap = xmalloc(dk.bitmap_bytes);
		}
		memset(dk.bitmap, 0, words * 8);
		struct kvm_dirty_log log = { .slot = id, .dirty_bitmap = dk.bitmap };
		if (ioctl(dk.vm_fd, KVM_GET_DIRTY_LOG, &log) < 0)
			return -errno;
		uint64_t w = 0;
		while (w < words) {
			if (!dk.bitmap[w]) {
				w++;
				continue;
			}
			uint64_t first = w;
			while (w < words && dk.bitmap[w] && (w - first) * 64 < CLEAR_CHUNK)
				w++;
			for (uint64_t k = first; k < w; k++)
				n += __builtin_popcountll(dk.bitmap[k]);
			if (t)
				dirty_tracker_record_bitmap(t, (s->gpa >> 12) + first * 64, dk.bitmap + first,
							    (w - first) * 64 > pages - first * 64 ?
							    pages - first * 64 : (w - first) * 64);
			uint64_t np = (w - first) * 64;
			if (first * 64 + np > pages)
				np = pages - first * 64;
			struct kvm_clear_dirty_log c = { .slot = id, .num_pages = (uint32_t)np,
							 .first_page = first * 64,
							 .dirty_bitmap = dk.bitmap + first };
			/* Without manual protection GET already re-protected. */
			if (ioctl(dk.vm_fd, KVM_CLEAR_DIRTY_LOG, &c) < 0 && errno != EINVAL &&
			    errno != ENOTTY)
				return -errno;
		}
	}
	return n;
}

static long harvest_locked(struct dirty_tracker *t)
{
	if (dk.mode == MODE_RING)
		return ring_harvest_locked(t);
	if (dk.logging)
		return bitmap_harvest_locked(t);
	return 0;
}

void dirty_kvm_ring_full(int index)
{
	(void)index;
	/* Harvest every ring: the others are probably close to full too. */
	pthread_mutex_lock(&dk.lock);
	harvest_locked(dk.logging ? dk.tracker : NULL);
	pthread_mutex_unlock(&dk.lock);
}

void dirty_kvm_vcpu_exit(int index)
{
	struct ring *r;

	if (dk.mode != MODE_RING || !dk.logging || index >= dk.nrings)
		return;
	r = &dk.rings[index];
	/* Entries are pushed from fetch on: the one a quarter of the ring
	 * further being dirty means the ring is at least that full. */
	if (!r->gfns || !(__atomic_load_n(&r->gfns[(r->fetch + dk.ring_entries / 4) %
						  dk.ring_entries].flags, __ATOMIC_ACQUIRE) &
			  KVM_DIRTY_GFN_F_DIRTY))
		return;
	pthread_mutex_lock(&dk.lock);
	harvest_locked(dk.logging ? dk.tracker : NULL);
	pthread_mutex_unlock(&dk.lock);
}

static int set_logging(bool on)
{
	int rc = 0;

	pthread_mutex_lock(&dk.lock);
	if (!on)
		harvest_locked(NULL);   /* drain: entries of the old session are stale */
	dk.logging = on;
	for (uint32_t id = 0; id < MAX_SLOTS; id++)
		if (dk.slots[id].used && slot_register(id, &dk.slots[id]) < 0 && rc == 0)
			rc = -errno;
	if (!on)
		harvest_locked(NULL);
	pthread_mutex_unlock(&dk.lock);
	return rc;
}

static int src_start(void *opaque) { (void)opaque; return set_logging(true); }
static void src_stop(void *opaque) { (void)opaque; set_logging(false); }

static long src_harvest(void *opaque, struct dirty_tracker *t)
{
	long n;

	(void)opaque;
	pthread_mutex_lock(&dk.lock);
	n = harvest_locked(t);
	pthread_mutex_unlock(&dk.lock);
	return n;
}

void dirty_kvm_attach(struct guest_mem *gm)
{
	static const struct dirty_source src = {
		.start = src_start, .stop = src_stop, .harvest = src_harvest,
	};
	dk.tracker = dirty_tracker_create(gm, &src);
}
