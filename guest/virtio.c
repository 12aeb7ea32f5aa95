/* Test guest: virtio-mmio version 2 driver core (OASIS virtio 1.2 §4.2.2,
 * §3.1.1 initialisation, §2.7 split virtqueues), polling, interrupts off;
 * InterruptStatus is checked and acknowledged where an interrupt handler
 * would, and the device's pin can be routed as NMI to count deliveries.
 * Devices come from `virtio_mmio.device=` words of the command line (what
 * mdvm and QEMU's microvm pass) or the fixed mdvm address. */
#include "guest.h"
#include "virtio.h"
#include "vmm/layout.h"

#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEV_FEATURES 0x010
#define R_DEV_FEATURES_SEL 0x014
#define R_DRV_FEATURES 0x020
#define R_DRV_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INT_STATUS 0x060
#define R_INT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC 0x080
#define R_QUEUE_DRIVER 0x090
#define R_QUEUE_DEVICE 0x0a0
#define R_CONFIG_GEN 0x0fc
#define R_CONFIG 0x100

#define S_ACK 1u
#define S_DRIVER 2u
#define S_DRIVER_OK 4u
#define S_FEATURES_OK 8u
#define S_NEEDS_RESET 0x40u
#define S_FAILED 0x80u
#define F_VERSION_1 32

/* Ring memory: one 4 KiB page per queue holds desc (1 KiB), avail and used. */
struct ring_page {
	struct vdesc desc[GVQ_NUM];
	struct vavail avail;
	uint8_t pad[2048 - sizeof(struct vdesc) * GVQ_NUM - sizeof(struct vavail)];
	struct vused used;
} __attribute__((aligned(4096)));
_Static_assert(sizeof(struct vdesc) * GVQ_NUM + sizeof(struct vavail) <= 2048, "rings");
static struct ring_page rings[GVQ_MAX];

#define MAX_CMDLINE_DEVS 8
static struct { uint64_t base; int irq; } cmdline_devs[MAX_CMDLINE_DEVS];
static unsigned n_cmdline_devs;

static inline void mb(void) { asm volatile("lock; addl $0, (%%rsp)" : : : "memory", "cc"); }
static uint32_t rd(struct gvdev *d, unsigned off) { return mmio_read32(d->base + off); }
static void wr(struct gvdev *d, unsigned off, uint32_t v) { mmio_write32(d->base + off, v); }

uint64_t guest_rdtsc(void)
{
	uint32_t lo, hi;
	asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

/* "4K", "512", "0x1000": returns the end of the number or NULL. */
static const char *num(const char *s, uint64_t *out)
{
	uint64_t v = 0, base = 10;
	int digits = 0;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	for (;; s++, digits++) {
		unsigned dg;
		if (*s >= '0' && *s <= '9') dg = *s - '0';
		else if (base == 16 && *s >= 'a' && *s <= 'f') dg = *s - 'a' + 10;
		else if (base == 16 && *s >= 'A' && *s <= 'F') dg = *s - 'A' + 10;
		else break;
		v = v * base + dg;
	}
	if (!digits)
		return NULL;
	if (*s == 'K' || *s == 'k') { v <<= 10; s++; }
	else if (*s == 'M' || *s == 'm') { v <<= 20; s++; }
	*out = v;
	return s;
}

static bool blank(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

void virtio_take_cmdline(char *cmdline)
{
	static const char key[] = "virtio_mmio.device=";
	char *r = cmdline, *w = cmdline;

	while (*r) {
		char *tok = r;
		while (*r && !blank(*r))
			r++;
		if ((size_t)(r - tok) > sizeof(key) - 1 && !strncmp(tok, key, sizeof(key) - 1)) {
			uint64_t size, base, irq;
			const char *p = num(tok + sizeof(key) - 1, &size);
			if (p && *p == '@' && (p = num(p + 1, &base)) && *p == ':' && (p = num(p + 1, &irq)) &&
			    n_cmdline_devs < MAX_CMDLINE_DEVS) {
				cmdline_devs[n_cmdline_devs].base = base;
				cmdline_devs[n_cmdline_devs].irq = (int)irq;
				n_cmdline_devs++;
			} else {
				kprintf("virtio: ignoring a malformed virtio_mmio.device= word\n");
			}
			while (w > cmdline && blank(w[-1]))   /* drop the blank before it too */
				w--;
			continue;
		}
		while (tok < r)
			*w++ = *tok++;
		while (*r && blank(*r))
			*w++ = *r++;
	}
	while (w > cmdline && blank(w[-1]))
		w--;
	*w = '\0';
}

static bool probe(uint64_t base, int irq, uint32_t id, struct gvdev *d, bool quiet)
{
	uint32_t magic = mmio_read32(base + R_MAGIC), ver, dev;

	if (magic != 0x74726976u)
		return false;
	ver = mmio_read32(base + R_VERSION);
	dev = mmio_read32(base + R_DEVICE_ID);
	if (dev != id)
		return false;
	if (ver != 2) {
		if (!quiet)
			kprintf("virtio: device %u at 0x%lx is legacy (version %u); need version 2\n", id, base, ver);
		return false;
	}
	memset(d, 0, sizeof(*d));
	d->base = base;
	d->irq = irq;
	d->device_id = id;
	return true;
}

bool virtio_find(uint32_t id, struct gvdev *d)
{
	for (unsigned i = 0; i < n_cmdline_devs; i++)
		if (probe(cmdline_devs[i].base, cmdline_devs[i].irq, id, d, false))
			return true;
	return probe(MDVM_VIRTIO_MMIO_GPA, -1, id, d, true);
}

uint32_t virtio_status(struct gvdev *d) { return rd(d, R_STATUS); }

void virtio_reset(struct gvdev *d)
{
	wr(d, R_STATUS, 0);
	/* §4.2.3.1: reset is done when status reads back 0. */
	for (int i = 0; i < 1000 && rd(d, R_STATUS); i++)
		;
	d->ready = false;
	for (unsigned q = 0; q < GVQ_MAX; q++)
		d->vq[q].live = false;
}

/* §3.1.1 steps 1-3: reset, ACKNOWLEDGE, DRIVER; the device's features. */
static uint64_t init_start(struct gvdev *d)
{
	uint64_t offered;

	virtio_reset(d);
	wr(d, R_STATUS, S_ACK);
	wr(d, R_STATUS, S_ACK | S_DRIVER);
	wr(d, R_DEV_FEATURES_SEL, 0);
	offered = rd(d, R_DEV_FEATURES);
	wr(d, R_DEV_FEATURES_SEL, 1);
	return offered | (uint64_t)rd(d, R_DEV_FEATURES) << 32;
}

static void write_features(struct gvdev *d, uint64_t f)
{
	wr(d, R_DRV_FEATURES_SEL, 0);
	wr(d, R_DRV_FEATURES, (uint32_t)f);
	wr(d, R_DRV_FEATURES_SEL, 1);
	wr(d, R_DRV_FEATURES, (uint32_t)(f >> 32));
}

bool virtio_init(struct gvdev *d, uint64_t wanted, char *err, unsigned errlen)
{
	uint64_t offered = init_start(d);

	if (!(offered & (1ULL << F_VERSION_1))) {
		ksnprintf(err, errlen, "device does not offer VIRTIO_F_VERSION_1");
		wr(d, R_STATUS, S_FAILED);
		return false;
	}
	d->features = offered & (wanted | (1ULL << F_VERSION_1));
	write_features(d, d->features);
	wr(d, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	if (!(rd(d, R_STATUS) & S_FEATURES_OK)) {
		ksnprintf(err, errlen, "device refused features 0x%lx", d->features);
		wr(d, R_STATUS, S_FAILED);
		return false;
	}
	return true;
}

bool virtio_setup_queue(struct gvdev *d, unsigned index, char *err, unsigned errlen)
{
	struct ring_page *rp = &rings[index];
	struct gvq *q = &d->vq[index];
	uint32_t max;

	if (index >= GVQ_MAX) {
		ksnprintf(err, errlen, "queue %u: driver supports %u queues", index, GVQ_MAX);
		return false;
	}
	wr(d, R_QUEUE_SEL, index);
	if (rd(d, R_QUEUE_READY)) {
		ksnprintf(err, errlen, "queue %u already live", index);
		return false;
	}
	max = rd(d, R_QUEUE_NUM_MAX);
	if (max < GVQ_NUM) {
		ksnprintf(err, errlen, "queue %u: size max %u < %u", index, max, GVQ_NUM);
		return false;
	}
	memset(rp, 0, sizeof(*rp));
	q->index = index;
	q->desc = rp->desc;
	q->avail = &rp->avail;
	q->used = &rp->used;
	q->avail_idx = q->used_seen = 0;
	wr(d, R_QUEUE_NUM, GVQ_NUM);
	wr(d, R_QUEUE_DESC, (uint32_t)(uintptr_t)q->desc);
	wr(d, R_QUEUE_DESC + 4, (uint32_t)((uintptr_t)q->desc >> 32));
	wr(d, R_QUEUE_DRIVER, (uint32_t)(uintptr_t)q->avail);
	wr(d, R_QUEUE_DRIVER + 4, (uint32_t)((uintptr_t)q->avail >> 32));
	wr(d, R_QUEUE_DEVICE, (uint32_t)(uintptr_t)q->used);
	wr(d, R_QUEUE_DEVICE + 4, (uint32_t)((uintptr_t)q->used >> 32));
	wr(d, R_QUEUE_READY, 1);
	q->live = true;
	return true;
}

void virtio_driver_ok(struct gvdev *d)
{
	wr(d, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	d->ready = true;
}

void virtio_notify(struct gvdev *d, unsigned q)
{
	mb();
	wr(d, R_QUEUE_NOTIFY, q);
}

bool virtio_done(struct gvdev *d, unsigned qi)
{
	struct gvq *q = &d->vq[qi];
	uint16_t u = *(volatile uint16_t *)&q->used->idx;

	if (u == q->used_seen)
		return false;
	mb();
	q->used_seen = u;
	return true;
}

bool virtio_post(struct gvdev *d, unsigned qi, const uint64_t *addr, const uint32_t *len,
		 const uint16_t *flags, unsigned n)
{
	struct gvq *q = &d->vq[qi];

	if (!q->live || n == 0 || n > GVQ_NUM || q->avail_idx != q->used_seen)
		return false;
	for (unsigned i = 0; i < n; i++) {
		q->desc[i].addr = addr[i];
		q->desc[i].len = len[i];
		q->desc[i].flags = flags[i] | (i + 1 < n ? 1 : 0);   /* NEXT */
		q->desc[i].next = (uint16_t)(i + 1 < n ? i + 1 : 0);
	}
	q->avail->ring[q->avail_idx % GVQ_NUM] = 0;
	mb();
	q->avail_idx++;
	*(volatile uint16_t *)&q->avail->idx = q->avail_idx;
	virtio_notify(d, q->index);
	return true;
}

bool virtio_request(struct gvdev *d, unsigned qi, const uint64_t *addr, const uint32_t *len,
		    const uint16_t *flags, unsigned n)
{
	uint64_t t0 = guest_rdtsc();

	if (!virtio_post(d, qi, addr, len, flags, n))
		return false;
	/* A few seconds at any plausible TSC rate; the device answers in microseconds. */
	/* Spin on the used index in guest memory; the status register (an
	 * exit to the VMM) only now and then. */
	for (unsigned i = 1; !virtio_done(d, qi); i++) {
		if (!(i & 1023) && ((rd(d, R_STATUS) & S_NEEDS_RESET) || guest_rdtsc() - t0 > (1ULL << 34)))
			return false;
		asm volatile("pause");
	}
	/* The device sets bit 0 when it makes the used entry visible. */
	if (!virtio_int_take(d, VIRTIO_INT_USED))
		d->int_missed++;
	return true;
}

uint32_t virtio_int_status(struct gvdev *d) { return rd(d, R_INT_STATUS); }

uint32_t virtio_int_take(struct gvdev *d, uint32_t mask)
{
	uint32_t s = rd(d, R_INT_STATUS) & mask;

	if (s)
		wr(d, R_INT_ACK, s);
	if (s & VIRTIO_INT_USED)
		d->int_used++;
	if (s & VIRTIO_INT_CONFIG)
		d->int_config++;
	return s;
}

volatile uint32_t nmi_count;
bool nmi_counting;

bool virtio_irq_nmi(struct gvdev *d, bool on)
{
	unsigned pin = d->irq >= 0 ? (unsigned)d->irq : MDVM_VIRTIO_IRQ;
	uint32_t apic_id = mmio_read32(MDVM_LAPIC_GPA + 0x20) >> 24;

	if (pin >= MDVM_IOAPIC_PINS)
		return false;
	/* Once on, NMIs are counted for good: one may still be in flight when
	 * the pin is masked again. */
	if (on) {
		nmi_counting = true;
		/* KVM (here) delivers no NMI to a software-disabled local APIC. */
		mmio_write32(MDVM_LAPIC_GPA + 0xf0, 0x1ff);   /* SVR: enabled, spurious vector 0xff */
	}
	mmio_write32(MDVM_IOAPIC_GPA, 0x11 + 2 * pin);          /* IOREGSEL: entry high */
	mmio_write32(MDVM_IOAPIC_GPA + 0x10, apic_id << 24);
	mmio_write32(MDVM_IOAPIC_GPA, 0x10 + 2 * pin);
	/* NMI delivery (IF stays 0, no vector), physical, edge, active high; or masked. */
	mmio_write32(MDVM_IOAPIC_GPA + 0x10, on ? 0x400u : 0x10000u);
	return true;
}

uint32_t virtio_bad_init(struct gvdev *d, uint64_t add, uint64_t drop, uint32_t status,
			 uint32_t *isr, uint32_t *qmax)
{
	uint32_t st;

	write_features(d, (init_start(d) | add) & ~drop);
	wr(d, R_STATUS, S_ACK | S_DRIVER | status);
	st = rd(d, R_STATUS);
	*isr = virtio_int_take(d, VIRTIO_INT_USED | VIRTIO_INT_CONFIG);
	wr(d, R_QUEUE_SEL, 0);
	*qmax = rd(d, R_QUEUE_NUM_MAX);
	wr(d, R_STATUS, st | S_FAILED);   /* §3.1.1: give up, then reset */
	virtio_reset(d);
	return st;
}

uint32_t virtio_config_read32(struct gvdev *d, unsigned off)
{
	uint32_t g, v;

	do {
		g = rd(d, R_CONFIG_GEN);
		v = rd(d, R_CONFIG + off);
	} while (g != rd(d, R_CONFIG_GEN));
	return v;
}

void virtio_config_write32(struct gvdev *d, unsigned off, uint32_t v)
{
	wr(d, R_CONFIG + off, v);
}
