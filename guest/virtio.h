/* Test guest: a polling virtio-mmio (version 2) driver core. Interrupts stay
 * off; the driver watches the used rings and checks InterruptStatus as an
 * interrupt handler would. One request per queue in flight. */
#ifndef MDVM_GUEST_VIRTIO_H
#define MDVM_GUEST_VIRTIO_H
#include <stdbool.h>
#include <stdint.h>

#define GVQ_NUM 64          /* queue size the driver uses (<= QueueNumMax) */
#define GVQ_MAX 4
#define VIRTIO_INT_USED 1u      /* InterruptStatus bits */
#define VIRTIO_INT_CONFIG 2u

struct vdesc { uint64_t addr; uint32_t len; uint16_t flags, next; } __attribute__((packed));
struct vavail { uint16_t flags, idx, ring[GVQ_NUM], used_event; } __attribute__((packed));
struct vused_elem { uint32_t id, len; } __attribute__((packed));
struct vused { uint16_t flags, idx; struct vused_elem ring[GVQ_NUM]; uint16_t avail_event; } __attribute__((packed));

struct gvq {
	unsigned index;          /* queue number on the device */
	bool live;
	uint16_t avail_idx;      /* next avail idx we publish */
	uint16_t used_seen;      /* used idx consumed */
	struct vdesc *desc;
	struct vavail *avail;
	struct vused *used;
};

struct gvdev {
	uint64_t base;           /* MMIO window */
	int irq;                 /* from virtio_mmio.device=, -1 if probed */
	uint32_t device_id;
	uint64_t features;       /* negotiated */
	bool ready;
	/* InterruptStatus bits the driver acknowledged, and events (a used
	 * buffer, a new config value) it saw without their bit: kept across resets. */
	uint32_t int_used, int_config, int_missed;
	struct gvq vq[GVQ_MAX];
};

/* Remove every `virtio_mmio.device=SIZE@BASE:IRQ[:ID]` word from the
 * command line (the test guest runs the rest as commands) and remember the
 * devices. Call once at boot. */
void virtio_take_cmdline(char *cmdline);
/* Find a version-2 device of `device_id`: the command line ones first, then
 * the fixed mdvm address. Returns false (and prints why) if there is none. */
bool virtio_find(uint32_t device_id, struct gvdev *d);
/* §3.1.1 init up to FEATURES_OK with `wanted` & offered (+VERSION_1);
 * then virtio_setup_queue() each queue and virtio_driver_ok(). */
bool virtio_init(struct gvdev *d, uint64_t wanted, char *err, unsigned errlen);
bool virtio_setup_queue(struct gvdev *d, unsigned index, char *err, unsigned errlen);
void virtio_driver_ok(struct gvdev *d);
void virtio_reset(struct gvdev *d);
uint32_t virtio_status(struct gvdev *d);
/* Post a chain of n buffers (flags per buffer: VIRTQ_DESC_F_WRITE) and
 * notify. Returns false if the previous request on q is still pending. */
bool virtio_post(struct gvdev *d, unsigned q, const uint64_t *addr, const uint32_t *len,
		 const uint16_t *flags, unsigned n);
bool virtio_done(struct gvdev *d, unsigned q);   /* the device used it */
/* virtio_post + wait for the used entry; false on timeout or NEEDS_RESET. */
bool virtio_request(struct gvdev *d, unsigned q, const uint64_t *addr, const uint32_t *len,
		    const uint16_t *flags, unsigned n);
void virtio_notify(struct gvdev *d, unsigned q);
/* Read InterruptStatus and acknowledge the bits of it in mask (counted in d). */
uint32_t virtio_int_take(struct gvdev *d, uint32_t mask);
uint32_t virtio_int_status(struct gvdev *d);
/* Route the device's IOAPIC pin to this CPU as an NMI (guest/trap.c counts
 * them in nmi_count) or mask it. False if the pin is not on the first IOAPIC. */
bool virtio_irq_nmi(struct gvdev *d, bool on);
/* A driver that breaks §3.1.1: reset, ACK|DRIVER, accept (offered | add) &
 * ~drop, write ACK|DRIVER|status. Returns the status read back; *isr the
 * InterruptStatus bits then (acknowledged), *qmax QueueNumMax of queue 0.
 * Sets FAILED and resets the device before returning. */
uint32_t virtio_bad_init(struct gvdev *d, uint64_t add, uint64_t drop, uint32_t status,
			 uint32_t *isr, uint32_t *qmax);
uint32_t virtio_config_read32(struct gvdev *d, unsigned off);   /* generation-consistent */
void virtio_config_write32(struct gvdev *d, unsigned off, uint32_t v);
uint64_t guest_rdtsc(void);
#endif
