/* virtio-mmio transport, version 2 (OASIS virtio 1.2 §4.2.2, §2.1 status,
 * §2.2 features, §2.7 split virtqueues). One 4 KiB register window per
 * device; QueueNotify writes are caught by an ioeventfd per queue and the
 * interrupt goes out through an irqfd on the device's IOAPIC pin.
 *
 * A driver that breaks the rules (bad ring addresses, loops, impossible
 * lengths, DRIVER_OK without FEATURES_OK) gets DEVICE_NEEDS_RESET and a
 * configuration-change interrupt; mdvm logs one line and carries on. */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include "virtio_mmio.h"
#include "../mm/mm.h"
#include "../vmm/bus.h"
#include "../vmm/loop.h"
#include "../vmm/util.h"
#include "../vmm/vm.h"

#define VIRTIO_MMIO_SIZE 0x1000

struct virtio_mmio;

struct vq_notifier {
	struct virtio_mmio *t;
	unsigned q;
	int fd;                    /* ioeventfd (or a plain eventfd if KVM refused) */
};

struct virtio_mmio {
	pthread_mutex_t lock;
	struct vm *vm;
	struct guest_mem *gm;
	const struct virtio_dev_ops *ops;
	void *dev;
	uint64_t gpa;
	int irq, irqfd;

	uint32_t status;
	uint32_t dev_features_sel, drv_features_sel, queue_sel;
	uint64_t driver_features;  /* as written so far */
	uint64_t features;         /* accepted at FEATURES_OK */
	unsigned nq;               /* queues that exist (after FEATURES_OK) */
	uint32_t int_status;
	uint32_t config_gen;
	bool broken;               /* NEEDS_RESET: no queue processing until reset */
	struct virtqueue vq[VIRTIO_MMIO_MAX_QUEUES];
	struct vq_notifier notify[VIRTIO_MMIO_MAX_QUEUES];
	struct vq_mem mem;
	struct mm_range ram[4];
	size_t nram;
};

/* ---- guest memory through mm/ */
static int vmem_read(void *o, uint64_t gpa, void *buf, size_t len)
{
	struct virtio_mmio *t = o;
	return mm_read(t->gm, gpa, buf, len);
}

static int vmem_write(void *o, uint64_t gpa, const void *buf, size_t len)
{
	struct virtio_mmio *t = o;
	return mm_write(t->gm, gpa, buf, len);
}

static bool vmem_is_ram(void *o, uint64_t gpa, uint64_t len)
{
	struct virtio_mmio *t = o;

	for (size_t i = 0; i < t->nram; i++) {
		const struct mm_range *r = &t->ram[i];
		if (gpa >= r->gpa && gpa - r->gpa < r->size && len <= r->size - (gpa - r->gpa))
			return true;
	}
	return false;
}

void virtio_mmio_lock(struct virtio_mmio *t) { pthread_mutex_lock(&t->lock); }
void virtio_mmio_unlock(struct virtio_mmio *t) { pthread_mutex_unlock(&t->lock); }
uint64_t virtio_mmio_gpa(struct virtio_mmio *t) { return t->gpa; }
int virtio_mmio_irq(struct virtio_mmio *t) { return t->irq; }
bool virtio_mmio_broken(struct virtio_mmio *t) { return t->broken; }
uint64_t virtio_mmio_features(struct virtio_mmio *t) { return t->features; }

bool virtio_mmio_driver_ok(struct virtio_mmio *t)
{
	return (t->status & VIRTIO_STATUS_DRIVER_OK) && !t->broken;
}

struct virtqueue *virtio_mmio_queue(struct virtio_mmio *t, unsigned q)
{
	if (q >= t->nq || !t->vq[q].ready || t->broken)
		return NULL;
	return &t->vq[q];
}

static void raise_irq(struct virtio_mmio *t)
{
	uint64_t one = 1;

	if (t->irqfd >= 0 && write(t->irqfd, &one, sizeof(one)) == sizeof(one))
		return;
	vm_irq_line(t->vm, t->irq, 1);   /* edge, as the irqfd delivers it */
	vm_irq_line(t->vm, t->irq, 0);
}

void virtio_mmio_notify_queue(struct virtio_mmio *t, unsigned q)
{
	t->int_status |= VIRTIO_MMIO_INT_VRING;
	if (q < t->nq && vq_want_interrupt(&t->vq[q]))
		raise_irq(t);
}

void virtio_mmio_config_changed(struct virtio_mmio *t)
{
	t->config_gen++;
	t->int_status |= VIRTIO_MMIO_INT_CONFIG;
	if (t->status & VIRTIO_STATUS_DRIVER_OK)
		raise_irq(t);
}

void virtio_mmio_needs_reset(struct virtio_mmio *t, const char *why)
{
	if (t->broken)
		return;
	pr_warn("%s@0x%" PRIx64 ": guest driver error: %s; device needs reset",
		t->ops->name, t->gpa, why);
	t->broken = true;
	t->status |= VIRTIO_STATUS_NEEDS_RESET;
	t->config_gen++;
	t->int_status |= VIRTIO_MMIO_INT_CONFIG;
	raise_irq(t);
}

static void device_reset(struct virtio_mmio *t)
{
	t->status = 0;
	t->dev_features_sel = t->drv_features_sel = t->queue_sel = 0;
	t->driver_features = t->features = 0;
	t->nq = 0;
	t->int_status = 0;
	t->broken = false;
	for (unsigned i = 0; i < VIRTIO_MMIO_MAX_QUEUES; i++)
		vq_init(&t->vq[i], &t->mem);
	t->ops->reset(t->dev);
}

void virtio_mmio_reset(struct virtio_mmio *t)
{
	pthread_mutex_lock(&t->lock);
	device_reset(t);
	pthread_mutex_unlock(&t->lock);
}

/* Kick queue q's handler on the main loop (what the ioeventfd does). */
static void kick(struct virtio_mmio *t, unsigned q)
{
	uint64_t one = 1;

	if (q < VIRTIO_MMIO_MAX_QUEUES && t->notify[q].fd >= 0 &&
	    write(t->notify[q].fd, &one, sizeof(one)) < 0)
		pr_warn("%s: queue %u notification lost: %s", t->ops->name, q, strerror(errno));
}

static void rekick(void *opaque)
{
	struct vq_notifier *n = opaque;
	kick(n->t, n->q);
}

static void on_notify(void *opaque, uint32_t events)
{
	struct vq_notifier *n = opaque;
	struct virtio_mmio *t = n->t;
	uint64_t v;

	if (read(n->fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
		return;
	/* vCPUs stopped for the last pass of a migration: the device must not
	 * write guest memory any more; look again later (a failed migration
	 * resumes here, a completed one leaves the work to the destination,
	 * which re-examines every queue after loading the state). */
	enum vm_state st = vm_get_state(t->vm);
	if (st == VM_STATE_FINISH_MIGRATE || st == VM_STATE_POSTMIGRATE) {
		loop_add_timer(20, rekick, n);
		return;
	}
	pthread_mutex_lock(&t->lock);
	/* §2.1.2: no buffer is used before DRIVER_OK. A driver may notify
	 * earlier (Linux's balloon primes its stats queue); setting DRIVER_OK
	 * kicks every queue. */
	if (virtio_mmio_driver_ok(t) && virtio_mmio_queue(t, n->q))
		t->ops->queue_notify(t->dev, t, n->q);
	pthread_mutex_unlock(&t->lock);
}

/* ---- registers */
static uint32_t reg_read(struct virtio_mmio *t, uint64_t off)
{
	uint64_t f = t->ops->features | (1ULL << VIRTIO_F_VERSION_1);
	struct virtqueue *vq = t->queue_sel < t->nq ? &t->vq[t->queue_sel] : NULL;

	switch (off) {
	case VIRTIO_MMIO_MAGIC_VALUE:   return VIRTIO_MMIO_MAGIC;
	case VIRTIO_MMIO_VERSION:       return 2;
	case VIRTIO_MMIO_DEVICE_ID:     return t->ops->device_id;
	case VIRTIO_MMIO_VENDOR_ID:     return VIRTIO_MMIO_VENDOR;
	case VIRTIO_MMIO_DEVICE_FEATURES:
		return t->dev_features_sel == 0 ? (uint32_t)f :
		       t->dev_features_sel == 1 ? (uint32_t)(f >> 32) : 0;
	case VIRTIO_MMIO_QUEUE_NUM_MAX: return vq ? VQ_NUM_MAX : 0;
	case VIRTIO_MMIO_QUEUE_READY:   return vq ? vq->ready : 0;
	case VIRTIO_MMIO_INTERRUPT_STATUS: return t->int_status;
	case VIRTIO_MMIO_STATUS:        return t->status;
	case VIRTIO_MMIO_SHM_LEN_LOW:
	case VIRTIO_MMIO_SHM_LEN_HIGH:
	case VIRTIO_MMIO_SHM_BASE_LOW:
	case VIRTIO_MMIO_SHM_BASE_HIGH: return 0xffffffffu;   /* no shared memory regions */
	case VIRTIO_MMIO_CONFIG_GENERATION: return t->config_gen;
	default:                        return 0;   /* write-only or reserved */
	}
}

static void set_status(struct virtio_mmio *t, uint32_t v)
{
	uint64_t offered = t->ops->features | (1ULL << VIRTIO_F_VERSION_1);

	if (v == 0) {
		device_reset(t);
		return;
	}
	if (t->broken) {   /* only a reset (0) clears NEEDS_RESET */
		t->status = v | VIRTIO_STATUS_NEEDS_RESET;
		return;
	}
	if ((v & VIRTIO_STATUS_FEATURES_OK) && !(t->status & VIRTIO_STATUS_FEATURES_OK)) {
		if (!(t->driver_features & (1ULL << VIRTIO_F_VERSION_1))) {
			pr_warn("%s@0x%" PRIx64 ": driver did not accept VIRTIO_F_VERSION_1 "
				"(legacy drivers are not supported); FEATURES_OK refused",
				t->ops->name, t->gpa);
			v &= ~VIRTIO_STATUS_FEATURES_OK;
		} else if (t->driver_features & ~offered) {
			pr_warn("%s@0x%" PRIx64 ": driver accepted features 0x%" PRIx64 " that were "
				"not offered; FEATURES_OK refused", t->ops->name, t->gpa,
				t->driver_features & ~offered);
			v &= ~VIRTIO_STATUS_FEATURES_OK;
		} else {
			t->features = t->driver_features;
			t->nq = t->ops->features_ok(t->dev, t->features);
			if (t->nq > VIRTIO_MMIO_MAX_QUEUES)
				t->nq = VIRTIO_MMIO_MAX_QUEUES;
		}
	}
	if ((v & VIRTIO_STATUS_DRIVER_OK) && !(v & VIRTIO_STATUS_FEATURES_OK)) {
		t->status = v;
		virtio_mmio_needs_reset(t, "DRIVER_OK set without FEATURES_OK");
		return;
	}
	if ((v & VIRTIO_STATUS_DRIVER_OK) && !(t->status & VIRTIO_STATUS_DRIVER_OK)) {
		t->status = v;
		/* Buffers made available before DRIVER_OK are looked at now. */
		for (unsigned q = 0; q < t->nq; q++)
			kick(t, q);
		return;
	}
	t->status = v;
}

static void queue_set_ready(struct virtio_mmio *t, struct virtqueue *vq, uint32_t v)
{
	char err[160];

	if (!v) {
		/* Disabling a queue resets its indices (§4.2.3.2). */
		uint16_t num = vq->num;
		uint64_t d = vq->desc, a = vq->avail, u = vq->used;
		vq_init(vq, &t->mem);
		vq->num = num;
		vq->desc = d;
		vq->avail = a;
		vq->used = u;
		return;
	}
	if (vq->ready)
		return;
	if (vq_check(vq, err, sizeof(err)) < 0) {
		char why[200];
		snprintf(why, sizeof(why), "queue %u: %s", (unsigned)(vq - t->vq), err);
		virtio_mmio_needs_reset(t, why);
		return;
	}
	vq->last_avail = vq->used_idx = 0;
	vq->ready = true;
}

static void set_half(uint64_t *v, bool high, uint32_t x)
{
	if (high)
		*v = (*v & 0xffffffffULL) | ((uint64_t)x << 32);
	else
		*v = (*v & ~0xffffffffULL) | x;
}

static void reg_write(struct virtio_mmio *t, uint64_t off, uint32_t v)
{
	struct virtqueue *vq = t->queue_sel < t->nq ? &t->vq[t->queue_sel] : NULL;

	switch (off) {
	case VIRTIO_MMIO_DEVICE_FEATURES_SEL: t->dev_features_sel = v; return;
	case VIRTIO_MMIO_DRIVER_FEATURES_SEL: t->drv_features_sel = v; return;
	case VIRTIO_MMIO_DRIVER_FEATURES:
		if (t->status & VIRTIO_STATUS_FEATURES_OK)
			return;   /* too late: features are fixed */
		if (t->drv_features_sel < 2)
			set_half(&t->driver_features, t->drv_features_sel == 1, v);
		return;
	case VIRTIO_MMIO_QUEUE_SEL: t->queue_sel = v; return;
	case VIRTIO_MMIO_QUEUE_NOTIFY:
		/* Only reaches us when the ioeventfd did not match (bad index). */
		if (v < t->nq)
			kick(t, v);
		return;
	case VIRTIO_MMIO_INTERRUPT_ACK: t->int_status &= ~v; return;
	case VIRTIO_MMIO_STATUS: set_status(t, v); return;
	}
	if (!vq)
		return;   /* queue registers of a queue that does not exist */
	if (off == VIRTIO_MMIO_QUEUE_READY) {
		queue_set_ready(t, vq, v);
		return;
	}
	if (vq->ready)
		return;   /* the driver must not change a live queue's layout */
	switch (off) {
	case VIRTIO_MMIO_QUEUE_NUM:         vq->num = (uint16_t)(v > 0xffff ? 0 : v); return;
	case VIRTIO_MMIO_QUEUE_DESC_LOW:    set_half(&vq->desc, false, v); return;
	case VIRTIO_MMIO_QUEUE_DESC_HIGH:   set_half(&vq->desc, true, v); return;
	case VIRTIO_MMIO_QUEUE_DRIVER_LOW:  set_half(&vq->avail, false, v); return;
	case VIRTIO_MMIO_QUEUE_DRIVER_HIGH: set_half(&vq->avail, true, v); return;
	case VIRTIO_MMIO_QUEUE_DEVICE_LOW:  set_half(&vq->used, false, v); return;
	case VIRTIO_MMIO_QUEUE_DEVICE_HIGH: set_half(&vq->used, true, v); return;
	}
}

static void virtio_mmio_io(void *opaque, struct vcpu *vcpu, uint64_t off, uint8_t *data,
			   uint32_t len, bool is_write)
{
	struct virtio_mmio *t = opaque;
	uint32_t v = 0;

	pthread_mutex_lock(&t->lock);
	if (off >= VIRTIO_MMIO_CONFIG) {
		uint32_t c = (uint32_t)(off - VIRTIO_MMIO_CONFIG);
		if (c < t->ops->config_size && len <= t->ops->config_size - c) {
			if (is_write)
				t->ops->config_write(t->dev, c, data, len);
			else
				t->ops->config_read(t->dev, c, data, len);
		} else if (!is_write) {
			memset(data, 0, len);
		}
	} else if (len != 4 || (off & 3)) {
		/* §4.2.2.2: registers are accessed as aligned 32-bit words only. */
		if (!is_write)
			memset(data, 0, len);
	} else if (is_write) {
		memcpy(&v, data, 4);
		reg_write(t, off, v);
	} else {
		v = reg_read(t, off);
		memcpy(data, &v, 4);
	}
	pthread_mutex_unlock(&t->lock);
}

struct virtio_mmio *virtio_mmio_create(struct vm *vm, uint64_t gpa, int irq,
				       const struct virtio_dev_ops *ops, void *dev)
{
	struct virtio_mmio *t = xcalloc(1, sizeof(*t));

	pthread_mutex_init(&t->lock, NULL);
	t->vm = vm;
	t->gm = vm_mem(vm);
	t->ops = ops;
	t->dev = dev;
	t->gpa = gpa;
	t->irq = irq;
	t->mem = (struct vq_mem){ vmem_read, vmem_write, vmem_is_ram, t };
	t->nram = mm_ram_ranges(t->gm, t->ram, ARRAY_SIZE(t->ram));
	if (t->nram > ARRAY_SIZE(t->ram))
		t->nram = ARRAY_SIZE(t->ram);
	for (unsigned i = 0; i < VIRTIO_MMIO_MAX_QUEUES; i++) {
		vq_init(&t->vq[i], &t->mem);
		t->notify[i] = (struct vq_notifier){ t, i, -1 };
	}
	t->irqfd = vm_add_irqfd(vm, irq);
	if (t->irqfd < 0)
		pr_warn("%s: KVM_IRQFD on GSI %d failed (%s); interrupts go through KVM_IRQ_LINE",
			ops->name, irq, strerror(errno));
	for (unsigned i = 0; i < VIRTIO_MMIO_MAX_QUEUES; i++) {
		struct vq_notifier *n = &t->notify[i];
		n->fd = vm_add_ioeventfd(vm, gpa + VIRTIO_MMIO_QUEUE_NOTIFY, 4, i);
		if (n->fd < 0) {
			/* Still correct without it: the MMIO exit kicks the eventfd. */
			n->fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
			if (i == 0)
				pr_warn("%s: KVM_IOEVENTFD failed (%s); queue notifications exit to mdvm",
					ops->name, strerror(errno));
		}
		if (n->fd < 0 || loop_add_fd(n->fd, EPOLLIN, on_notify, n) < 0)
			goto fail;
	}
	if (bus_register_mmio(gpa, VIRTIO_MMIO_SIZE, virtio_mmio_io, t) < 0)
		goto fail;
	device_reset(t);
	return t;
fail:
	pr_err("%s: cannot set up virtio-mmio at 0x%" PRIx64 ": %s", ops->name, gpa, strerror(errno));
	for (unsigned i = 0; i < VIRTIO_MMIO_MAX_QUEUES; i++)
		if (t->notify[i].fd >= 0) {
			loop_del_fd(t->notify[i].fd);
			close(t->notify[i].fd);
		}
	free(t);
	return NULL;
}

/* ---- migration record */
#define STATE_MAGIC 0x4f494d56u   /* "VMIO" */
#define STATE_VERSION 1

struct vq_state {
	uint64_t desc, avail, used;
	uint16_t num, last_avail, used_idx;
	uint8_t ready, pad;
} __attribute__((packed));

struct mmio_state {
	uint32_t magic, version;
	uint32_t status, dev_features_sel, drv_features_sel, queue_sel;
	uint64_t driver_features, features;
	uint32_t nq, int_status, config_gen;
	uint8_t broken, pad[3];
	struct vq_state vq[VIRTIO_MMIO_MAX_QUEUES];
} __attribute__((packed));

_Static_assert(sizeof(struct mmio_state) <= VIRTIO_MMIO_STATE_MAX, "state record too big");

size_t virtio_mmio_save_state(struct virtio_mmio *t, void *buf, size_t len)
{
	struct mmio_state s = { .magic = STATE_MAGIC, .version = STATE_VERSION };

	if (len < sizeof(s))
		return 0;
	pthread_mutex_lock(&t->lock);
	s.status = t->status;
	s.dev_features_sel = t->dev_features_sel;
	s.drv_features_sel = t->drv_features_sel;
	s.queue_sel = t->queue_sel;
	s.driver_features = t->driver_features;
	s.features = t->features;
	s.nq = t->nq;
	s.int_status = t->int_status;
	s.config_gen = t->config_gen;
	s.broken = t->broken;
	for (unsigned i = 0; i < VIRTIO_MMIO_MAX_QUEUES; i++) {
		struct virtqueue *vq = &t->vq[i];
		s.vq[i] = (struct vq_state){ vq->desc, vq->avail, vq->used, vq->num, vq->last_avail,
					     vq->used_idx, vq->ready, 0 };
	}
	pthread_mutex_unlock(&t->lock);
	memcpy(buf, &s, sizeof(s));
	return sizeof(s);
}

int virtio_mmio_load_state(struct virtio_mmio *t, const void *buf, size_t len, char *err,
			   size_t errlen)
{
	struct mmio_state s;
	char why[160];

	if (len != sizeof(s)) {
		snprintf(err, errlen, "%s state: %zu bytes, expected %zu", t->ops->name, len, sizeof(s));
		return -1;
	}
	memcpy(&s, buf, sizeof(s));
	if (s.magic != STATE_MAGIC || s.version != STATE_VERSION) {
		snprintf(err, errlen, "%s state: bad magic/version", t->ops->name);
		return -1;
	}
	if (s.nq > VIRTIO_MMIO_MAX_QUEUES || (s.features & ~(t->ops->features | (1ULL << VIRTIO_F_VERSION_1)))) {
		snprintf(err, errlen, "%s state: %u queues / features 0x%" PRIx64 " not supported here",
			 t->ops->name, s.nq, s.features);
		return -1;
	}
	pthread_mutex_lock(&t->lock);
	device_reset(t);
	for (unsigned i = 0; i < VIRTIO_MMIO_MAX_QUEUES; i++) {
		struct virtqueue *vq = &t->vq[i];
		vq->desc = s.vq[i].desc;
		vq->avail = s.vq[i].avail;
		vq->used = s.vq[i].used;
		vq->num = s.vq[i].num;
		vq->last_avail = s.vq[i].last_avail;
		vq->used_idx = s.vq[i].used_idx;
		if (s.vq[i].ready && i < s.nq) {
			if (vq_check(vq, why, sizeof(why)) < 0) {
				pthread_mutex_unlock(&t->lock);
				snprintf(err, errlen, "%s state: queue %u: %s", t->ops->name, i, why);
				return -1;
			}
			vq->ready = true;
		}
	}
	t->status = s.status;
	t->dev_features_sel = s.dev_features_sel;
	t->drv_features_sel = s.drv_features_sel;
	t->queue_sel = s.queue_sel;
	t->driver_features = s.driver_features;
	t->features = s.features;
	if (s.status & VIRTIO_STATUS_FEATURES_OK)
		t->ops->features_ok(t->dev, s.features);
	t->nq = s.nq;
	t->int_status = s.int_status;
	t->config_gen = s.config_gen;
	t->broken = s.broken;
	/* Anything the driver queued while the state was in flight. */
	if (s.status & VIRTIO_STATUS_DRIVER_OK)
		for (unsigned q = 0; q < t->nq; q++)
			kick(t, q);
	pthread_mutex_unlock(&t->lock);
	return 0;
}
