/* virtio-mmio transport, version 2 (virtio 1.x; OASIS virtio 1.2 §4.2.2).
 * A device model (virtio_balloon.c) plugs in through struct virtio_dev_ops.
 * Register accesses arrive on vCPU threads; queue notifications (ioeventfd)
 * are handled on the main loop; the transport lock serialises both. */
#ifndef MDVM_VIRTIO_MMIO_H
#define MDVM_VIRTIO_MMIO_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "virtqueue.h"

/* Registers (§4.2.2) */
#define VIRTIO_MMIO_MAGIC_VALUE        0x000   /* "virt" */
#define VIRTIO_MMIO_VERSION            0x004
#define VIRTIO_MMIO_DEVICE_ID          0x008
#define VIRTIO_MMIO_VENDOR_ID          0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES    0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES    0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL          0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX      0x034
#define VIRTIO_MMIO_QUEUE_NUM          0x038
#define VIRTIO_MMIO_QUEUE_READY        0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY       0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS   0x060
#define VIRTIO_MMIO_INTERRUPT_ACK      0x064
#define VIRTIO_MMIO_STATUS             0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW     0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH    0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW   0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH  0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW   0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH  0x0a4
#define VIRTIO_MMIO_SHM_SEL            0x0ac
#define VIRTIO_MMIO_SHM_LEN_LOW        0x0b0
#define VIRTIO_MMIO_SHM_LEN_HIGH       0x0b4
#define VIRTIO_MMIO_SHM_BASE_LOW       0x0b8
#define VIRTIO_MMIO_SHM_BASE_HIGH      0x0bc
#define VIRTIO_MMIO_CONFIG_GENERATION  0x0fc
#define VIRTIO_MMIO_CONFIG             0x100

#define VIRTIO_MMIO_MAGIC    0x74726976u   /* "virt" */
#define VIRTIO_MMIO_VENDOR   0x5644446du   /* "mDDV": mdvm */

#define VIRTIO_MMIO_INT_VRING  1u
#define VIRTIO_MMIO_INT_CONFIG 2u

/* Device status (§2.1) */
#define VIRTIO_STATUS_ACKNOWLEDGE  1u
#define VIRTIO_STATUS_DRIVER       2u
#define VIRTIO_STATUS_DRIVER_OK    4u
#define VIRTIO_STATUS_FEATURES_OK  8u
#define VIRTIO_STATUS_NEEDS_RESET  0x40u
#define VIRTIO_STATUS_FAILED       0x80u

#define VIRTIO_F_VERSION_1 32

#define VIRTIO_MMIO_MAX_QUEUES 8

struct vm;
struct virtio_mmio;

struct virtio_dev_ops {
	const char *name;                   /* for log lines: "virtio-balloon" */
	uint32_t device_id;
	uint64_t features;                  /* offered (VIRTIO_F_VERSION_1 is added) */
	uint32_t config_size;
	/* Called with the transport lock held. */
	void (*config_read)(void *dev, uint32_t off, void *buf, uint32_t len);
	void (*config_write)(void *dev, uint32_t off, const void *buf, uint32_t len);
	/* The driver set FEATURES_OK with `features`; return how many queues
	 * that gives (queue sizes and roles follow from the features). */
	unsigned (*features_ok)(void *dev, uint64_t features);
	/* Queue q was notified (main loop). Pop and push through the transport. */
	void (*queue_notify)(void *dev, struct virtio_mmio *t, unsigned q);
	/* Device reset by the driver (status 0), NEEDS_RESET or system reset. */
	void (*reset)(void *dev);
};

struct virtio_mmio *virtio_mmio_create(struct vm *vm, uint64_t gpa, int irq,
				       const struct virtio_dev_ops *ops, void *dev);
/* The lock every caller of the functions below must hold (ops callbacks run
 * with it held already). */
void virtio_mmio_lock(struct virtio_mmio *t);
void virtio_mmio_unlock(struct virtio_mmio *t);
struct virtqueue *virtio_mmio_queue(struct virtio_mmio *t, unsigned q);  /* NULL if not live */
bool virtio_mmio_driver_ok(struct virtio_mmio *t);
uint64_t virtio_mmio_features(struct virtio_mmio *t);   /* negotiated */
/* Used buffers were pushed on q: interrupt the driver unless it asked not to. */
void virtio_mmio_notify_queue(struct virtio_mmio *t, unsigned q);
/* The device changed its configuration space: new generation, interrupt. */
void virtio_mmio_config_changed(struct virtio_mmio *t);
/* The driver broke the rules: log `why`, set NEEDS_RESET, stop every queue
 * and raise a configuration-change interrupt (§2.1.2). */
void virtio_mmio_needs_reset(struct virtio_mmio *t, const char *why);
bool virtio_mmio_broken(struct virtio_mmio *t);
/* System reset (vm_reset): back to the state after creation. */
void virtio_mmio_reset(struct virtio_mmio *t);
uint64_t virtio_mmio_gpa(struct virtio_mmio *t);
int virtio_mmio_irq(struct virtio_mmio *t);

/* Migration: the transport's state (status, features, queue addresses and
 * indices) as a fixed little-endian record. save returns its size (0 if
 * buf is too small for it); load returns 0 or -1 with err. */
#define VIRTIO_MMIO_STATE_MAX 512
size_t virtio_mmio_save_state(struct virtio_mmio *t, void *buf, size_t len);
int virtio_mmio_load_state(struct virtio_mmio *t, const void *buf, size_t len, char *err,
			   size_t errlen);
#endif
