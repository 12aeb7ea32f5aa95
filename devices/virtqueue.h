/* Split virtqueues (OASIS virtio 1.2 §2.7), device side. Every access to the
 * rings goes through struct vq_mem (mm/ in mdvm, a fake memory in unit
 * tests), and everything the driver wrote is validated before use: a bad
 * ring yields an error string, never a wild access. */
#ifndef MDVM_VIRTQUEUE_H
#define MDVM_VIRTQUEUE_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define VIRTQ_DESC_F_NEXT      1
#define VIRTQ_DESC_F_WRITE     2
#define VIRTQ_DESC_F_INDIRECT  4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1

#define VQ_NUM_MAX 256   /* largest queue size mdvm offers (QueueNumMax) */

/* Guest memory as the virtqueue code sees it. read/write return 0 or -1;
 * is_ram says whether [gpa, gpa+len) is guest RAM (without touching it). */
struct vq_mem {
	int  (*read)(void *opaque, uint64_t gpa, void *buf, size_t len);
	int  (*write)(void *opaque, uint64_t gpa, const void *buf, size_t len);
	bool (*is_ram)(void *opaque, uint64_t gpa, uint64_t len);
	void *opaque;
};

struct virtqueue {
	const struct vq_mem *mem;
	uint16_t num;            /* size the driver chose (power of 2, <= VQ_NUM_MAX) */
	bool ready;
	uint64_t desc, avail, used;   /* ring GPAs */
	uint16_t last_avail;     /* next avail ring entry the device consumes */
	uint16_t used_idx;       /* next used ring entry the device writes */
};

/* One buffer of a descriptor chain. */
struct vq_buf {
	uint64_t gpa;
	uint32_t len;
	bool write;              /* device-writable */
};

/* A popped descriptor chain: device-readable buffers first (n_out), then
 * device-writable ones (n_in), as the spec requires of drivers. */
struct vq_elem {
	uint16_t head;
	unsigned n_out, n_in;
	struct vq_buf buf[VQ_NUM_MAX];
};

void vq_init(struct virtqueue *vq, const struct vq_mem *mem);   /* not ready, addresses 0 */
/* Check the layout before the queue goes live: size, alignment, rings in
 * RAM. 0, or -1 with the reason in err. */
int  vq_check(const struct virtqueue *vq, char *err, size_t errlen);
/* Take the next available chain: 1 popped, 0 ring empty, -1 malformed
 * (err says how; the queue must not be used again until reset). */
int  vq_pop(struct virtqueue *vq, struct vq_elem *e, char *err, size_t errlen);
/* Give back the chain the last vq_pop took, unconsumed: the next pop
 * (here, or on a migration destination) returns it again. */
void vq_unpop(struct virtqueue *vq);
/* Return chain `head` with `len` bytes written by the device. 0 or -1. */
int  vq_push(struct virtqueue *vq, uint16_t head, uint32_t len);
/* Does the driver want an interrupt for used buffers (no NO_INTERRUPT flag)? */
bool vq_want_interrupt(struct virtqueue *vq);
/* Chains the driver made available and the device has not taken yet. */
int  vq_pending(struct virtqueue *vq);   /* -1: the index is bogus */
#endif
