/* Split virtqueues, device side (virtio 1.2 §2.7). Layout in guest memory:
 *   desc  [num] { le64 addr; le32 len; le16 flags; le16 next; }   align 16
 *   avail { le16 flags; le16 idx; le16 ring[num]; le16 used_event; } align 2
 *   used  { le16 flags; le16 idx; {le32 id; le32 len} ring[num]; le16 avail_event; } align 4
 * x86 is little-endian, so the le fields are read as they are. The driver
 * owns these rings and may scribble over them at any time: every index,
 * address and length is checked, and chains are bounded by the queue size. */
#include <stdio.h>
#include <string.h>
#include "virtqueue.h"

struct vq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
} __attribute__((packed));

#define VERR(...) ({ snprintf(err, errlen, __VA_ARGS__); -1; })

void vq_init(struct virtqueue *vq, const struct vq_mem *mem)
{
	memset(vq, 0, sizeof(*vq));
	vq->mem = mem;
}

static int rd(struct virtqueue *vq, uint64_t gpa, void *buf, size_t len)
{
	return vq->mem->read(vq->mem->opaque, gpa, buf, len);
}

int vq_check(const struct virtqueue *vq, char *err, size_t errlen)
{
	const struct vq_mem *m = vq->mem;
	uint64_t n = vq->num;

	if (n == 0 || n > VQ_NUM_MAX || (n & (n - 1)))
		return VERR("queue size %u is not a power of 2 in 1..%d", vq->num, VQ_NUM_MAX);
	if (vq->desc & 15 || vq->avail & 1 || vq->used & 3)
		return VERR("misaligned rings (desc 0x%llx, driver 0x%llx, device 0x%llx)",
			    (unsigned long long)vq->desc, (unsigned long long)vq->avail,
			    (unsigned long long)vq->used);
	if (!m->is_ram(m->opaque, vq->desc, 16 * n))
		return VERR("descriptor table 0x%llx+%llu is not guest RAM",
			    (unsigned long long)vq->desc, (unsigned long long)(16 * n));
	if (!m->is_ram(m->opaque, vq->avail, 6 + 2 * n))
		return VERR("driver ring 0x%llx+%llu is not guest RAM",
			    (unsigned long long)vq->avail, (unsigned long long)(6 + 2 * n));
	if (!m->is_ram(m->opaque, vq->used, 6 + 8 * n))
		return VERR("device ring 0x%llx+%llu is not guest RAM",
			    (unsigned long long)vq->used, (unsigned long long)(6 + 8 * n));
	return 0;
}

static int avail_idx(struct virtqueue *vq, uint16_t *idx)
{
	if (rd(vq, vq->avail + 2, idx, 2) < 0)
		return -1;
	/* Ring entries and descriptors are read after the index (the driver
	 * wrote them before it, with a barrier). */
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	return 0;
}

int vq_pending(struct virtqueue *vq)
{
	uint16_t idx;

	if (!vq->ready || avail_idx(vq, &idx) < 0)
		return -1;
	uint16_t n = (uint16_t)(idx - vq->last_avail);
	return n > vq->num ? -1 : n;
}

int vq_pop(struct virtqueue *vq, struct vq_elem *e, char *err, size_t errlen)
{
	const struct vq_mem *m = vq->mem;
	uint16_t idx, head, i;
	unsigned n = 0;

	if (!vq->ready)
		return 0;
	if (avail_idx(vq, &idx) < 0)
		return VERR("cannot read the driver ring index");
	if (idx == vq->last_avail)
		return 0;
	if ((uint16_t)(idx - vq->last_avail) > vq->num)
		return VERR("driver ring index %u is more than %u ahead of %u", idx, vq->num,
			    vq->last_avail);
	if (rd(vq, vq->avail + 4 + 2 * (uint64_t)(vq->last_avail % vq->num), &head, 2) < 0)
		return VERR("cannot read the driver ring");
	if (head >= vq->num)
		return VERR("chain head %u is out of range (queue size %u)", head, vq->num);
	e->head = head;
	e->n_out = e->n_in = 0;
	for (i = head;; ) {
		struct vq_desc d;

		/* More descriptors than the table holds: the chain loops. */
		if (n == vq->num)
			return VERR("descriptor chain from %u is longer than the queue (%u): a loop", head,
				    vq->num);
		if (rd(vq, vq->desc + 16 * (uint64_t)i, &d, sizeof(d)) < 0)
			return VERR("cannot read descriptor %u", i);
		if (d.flags & VIRTQ_DESC_F_INDIRECT)
			return VERR("descriptor %u is indirect, which was not negotiated", i);
		if (d.flags & ~(VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE))
			return VERR("descriptor %u has unknown flags 0x%x", i, d.flags);
		if (d.addr + d.len < d.addr || !m->is_ram(m->opaque, d.addr, d.len ? d.len : 1))
			return VERR("descriptor %u buffer 0x%llx+%u is not guest RAM", i,
				    (unsigned long long)d.addr, d.len);
		if (d.flags & VIRTQ_DESC_F_WRITE) {
			e->n_in++;
		} else {
			if (e->n_in)
				return VERR("descriptor %u is device-readable after a device-writable one", i);
			e->n_out++;
		}
		e->buf[n++] = (struct vq_buf){ d.addr, d.len, (d.flags & VIRTQ_DESC_F_WRITE) != 0 };
		if (!(d.flags & VIRTQ_DESC_F_NEXT))
			break;
		if (d.next >= vq->num)
			return VERR("descriptor %u links to %u, out of range (queue size %u)", i, d.next,
				    vq->num);
		i = d.next;
	}
	vq->last_avail++;
	return 1;
}

void vq_unpop(struct virtqueue *vq)
{
	vq->last_avail--;
}

int vq_push(struct virtqueue *vq, uint16_t head, uint32_t len)
{
	const struct vq_mem *m = vq->mem;
	uint32_t el[2] = { head, len };
	uint16_t idx;

	if (m->write(m->opaque, vq->used + 4 + 8 * (uint64_t)(vq->used_idx % vq->num), el, sizeof(el)) < 0)
		return -1;
	/* The element must be visible before the index that publishes it. */
	__atomic_thread_fence(__ATOMIC_RELEASE);
	idx = ++vq->used_idx;
	return m->write(m->opaque, vq->used + 2, &idx, 2);
}

bool vq_want_interrupt(struct virtqueue *vq)
{
	uint16_t flags = 0;

	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (rd(vq, vq->avail, &flags, 2) < 0)
		return true;
	return !(flags & VIRTQ_AVAIL_F_NO_INTERRUPT);
}
