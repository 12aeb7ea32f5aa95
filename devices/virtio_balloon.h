/* virtio-balloon (virtio 1.2 §5.5) over virtio-mmio: inflate/deflate,
 * statistics, deflate-on-OOM and free page reporting. Ballooned pages become
 * memdesc type BALLOONED and their host memory is released through mm/;
 * reported free pages become UNBACKED (zero on next touch). docs/virtio.md. */
#ifndef MDVM_VIRTIO_BALLOON_H
#define MDVM_VIRTIO_BALLOON_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define VIRTIO_ID_BALLOON 5

#define VIRTIO_BALLOON_F_MUST_TELL_HOST   0
#define VIRTIO_BALLOON_F_STATS_VQ         1
#define VIRTIO_BALLOON_F_DEFLATE_ON_OOM   2
#define VIRTIO_BALLOON_F_FREE_PAGE_HINT   3
#define VIRTIO_BALLOON_F_PAGE_POISON      4
#define VIRTIO_BALLOON_F_REPORTING        5

#define VIRTIO_BALLOON_S_NR 10   /* stat tags 0..9 (swap-in .. hugetlb-failures) */
/* Largest inflate/deflate/stats element the device reads (bytes); Linux sends 1 KiB. */
#define VIRTIO_BALLOON_ELEM_MAX (1u << 20)

struct vm;
struct virtio_balloon;

struct virtio_balloon_info {
	uint64_t ram_size;
	uint64_t target_pages;       /* config num_pages: what the host asks for */
	uint64_t actual_pages;       /* config actual: what the driver says it holds */
	uint64_t ballooned_pages;    /* pages the device made BALLOONED (live count) */
	uint64_t inflated_pages, deflated_pages;   /* totals since creation */
	uint64_t reported_bytes;     /* free page reporting: bytes reported */
	uint64_t released_bytes;     /* host memory given back (inflate + reporting) */
	uint64_t inflate_ns, report_ns;   /* host time handling the inflate / reporting queues */
	uint64_t features;           /* negotiated */
	bool driver_ok, needs_reset;
	bool have_stats;
	int64_t stats_time;          /* time(2) of the last stats buffer */
	uint64_t stats[VIRTIO_BALLOON_S_NR];
	uint32_t stats_valid;        /* bit per tag present */
};

/* deflate_on_oom, reporting: offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM /
 * VIRTIO_BALLOON_F_REPORTING (libvirt's autodeflate, freePageReporting). */
struct virtio_balloon *virtio_balloon_create(struct vm *vm, uint64_t gpa, int irq, bool deflate_on_oom,
					     bool reporting);
/* QMP `balloon`: the guest should end up with `bytes` of RAM (clamped to RAM size). */
void virtio_balloon_set_target(struct virtio_balloon *b, uint64_t bytes);
void virtio_balloon_get_info(struct virtio_balloon *b, struct virtio_balloon_info *out);
/* Hand the stats buffer back so the driver refreshes it. false: none held. */
bool virtio_balloon_request_stats(struct virtio_balloon *b);
/* Called on the main loop when the driver changes `actual` (BALLOON_CHANGE). */
typedef void (*virtio_balloon_change_fn)(void *opaque, uint64_t actual_bytes);
void virtio_balloon_on_change(struct virtio_balloon *b, virtio_balloon_change_fn fn, void *opaque);
/* System reset: the guest gets all its memory back (ballooned -> unbacked). */
void virtio_balloon_system_reset(struct virtio_balloon *b);
uint64_t virtio_balloon_gpa(struct virtio_balloon *b);
int virtio_balloon_irq(struct virtio_balloon *b);

/* Migration: transport + balloon config (num_pages, actual, counters). The
 * ballooned pages themselves travel as memdesc types with guest memory. */
#define VIRTIO_BALLOON_STATE_MAX 1024
size_t virtio_balloon_save_state(struct virtio_balloon *b, void *buf, size_t len);
int virtio_balloon_load_state(struct virtio_balloon *b, const void *buf, size_t len,
			      char *err, size_t errlen);
#endif
