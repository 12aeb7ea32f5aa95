/* Test guest: virtio-balloon driver (virtio 1.2 §5.5) and its commands.
 *
 * The guest has no page allocator, so the balloon takes RAM pages from the
 * top of guest memory down: the ballooned pages are the RAM pages in
 * [bal_low, ram_top) (with stride=N every Nth of them, counted down from
 * the top, so host hugepages end up partly ballooned). The guest never
 * touches [bal_low, ram_top) while it holds pages: walk stops below bal_low,
 * fill/verify refuse ranges that overlap it. Deflated pages come back
 * zeroed (the host released them). docs/test-guest.md lists the commands. */
#include "guest.h"
#include "virtio.h"

#define OK 0
#define FAIL 1
#define ERR 2
#define PAGE 4096ULL
#define BATCH 256                 /* PFNs per inflate/deflate request, as Linux */

#define VIRTIO_ID_BALLOON 5
#define F_STATS_VQ 1
#define F_DEFLATE_ON_OOM 2
#define F_REPORTING 5
#define CFG_NUM_PAGES 0
#define CFG_ACTUAL 4
#define DESC_F_WRITE 2

static struct gvdev dev;
static bool have_dev;
static int q_stats = -1, q_report = -1;
static bool auto_mode;
static unsigned stride = 1;       /* balloon every stride-th page from the top */
static bool inflight;             /* auto mode: an inflate request the device has not used yet */
static uint32_t cfg_seen;         /* num_pages when the driver last looked */

static const struct hvm_memmap_entry *map;
static unsigned map_n;
static uint64_t ram_top, floor_addr, ram_pages;
static uint64_t bal_low;          /* lowest ballooned page (ram_top when empty) */
static uint64_t held;             /* pages in the balloon */

static uint32_t pfns[BATCH];
static struct { uint16_t tag; uint64_t val; } __attribute__((packed)) stats[6];

void balloon_boot(const struct hvm_memmap_entry *m, unsigned n)
{
	uint64_t img_hi = ((uintptr_t)__image_end + PAGE - 1) & ~(PAGE - 1);

	map = m;
	map_n = n;
	for (unsigned i = 0; i < n; i++) {
		if (m[i].type != E820_RAM)
			continue;
		ram_pages += m[i].size / PAGE;
		if (m[i].addr + m[i].size > ram_top)
			ram_top = (m[i].addr + m[i].size) & ~(PAGE - 1);
	}
	floor_addr = img_hi > (1ULL << 20) ? img_hi : (1ULL << 20);
	bal_low = ram_top;
}

/* The highest RAM page below a (and >= floor), or 0. */
static uint64_t ram_page_below(uint64_t a)
{
	uint64_t best = 0;

	for (unsigned i = 0; i < map_n; i++) {
		uint64_t s = (map[i].addr + PAGE - 1) & ~(PAGE - 1), e = (map[i].addr + map[i].size) & ~(PAGE - 1);
		if (map[i].type != E820_RAM || s >= e || s >= a)
			continue;
		uint64_t top = (e < a ? e : a) - PAGE;
		if (top >= floor_addr && top > best)
			best = top;
	}
	return best;
}

/* The lowest RAM page at or above a, or ram_top. */
static uint64_t ram_page_from(uint64_t a)
{
	uint64_t best = ram_top;

	for (unsigned i = 0; i < map_n; i++) {
		uint64_t s = (map[i].addr + PAGE - 1) & ~(PAGE - 1), e = (map[i].addr + map[i].size) & ~(PAGE - 1);
		if (map[i].type != E820_RAM || e <= a || s >= e)
			continue;
		uint64_t p = s > a ? s : a;
		if (p < best)
			best = p;
	}
	return best;
}

/* stride > 1: the pages the balloon may take are ram_top - PAGE - j * stride * PAGE.
 * k = cand_skip(p): p lies k pages below a candidate; the next candidate
 * below p is stride - k pages down (k = 0: p is one). */
static uint64_t cand_skip(uint64_t p)
{
	return ((ram_top - PAGE - p) / PAGE) % stride;
}

/* The highest candidate RAM page below a, or 0. */
static uint64_t cand_below(uint64_t a)
{
	uint64_t p = a, k;

	while ((p = ram_page_below(p)) != 0) {
		if (!(k = cand_skip(p)))
			return p;
		if (p < (stride - k) * PAGE)
			return 0;
		p = p - (stride - k) * PAGE + PAGE;   /* ram_page_below then tries that page */
	}
	return 0;
}

/* The lowest candidate RAM page at or above a, or ram_top. */
static uint64_t cand_from(uint64_t a)
{
	uint64_t p = a, k;

	while ((p = ram_page_from(p)) < ram_top) {
		k = cand_skip(p);
		if (!k)
			return p;
		p += k * PAGE;
	}
	return ram_top;
}

uint64_t balloon_clip(uint64_t base, uint64_t end)
{
	if (end > bal_low)
		end = bal_low > base ? bal_low : base;
	return end;
}

bool balloon_overlaps(uint64_t base, uint64_t end)
{
	return held && end > bal_low && base < ram_top;
}

static void fill_stats(void)
{
	uint64_t free = (ram_pages - held) * PAGE;

	stats[0].tag = 2; stats[0].val = 0;              /* major faults */
	stats[1].tag = 3; stats[1].val = 0;              /* minor faults */
	stats[2].tag = 4; stats[2].val = free;           /* free memory */
	stats[3].tag = 5; stats[3].val = ram_pages * PAGE;   /* total memory */
	stats[4].tag = 6; stats[4].val = free;           /* available */
	stats[5].tag = 7; stats[5].val = 0;              /* disk caches */
}

static void post_stats(void)
{
	uint64_t a = (uintptr_t)stats;
	uint32_t l = sizeof(stats);
	uint16_t f = 0;

	fill_stats();
	virtio_post(&dev, (unsigned)q_stats, &a, &l, &f, 1);
}

/* The device returned the stats buffer: it wants fresh numbers. */
static void service_stats(void)
{
	if (q_stats >= 0 && virtio_done(&dev, (unsigned)q_stats)) {
		if (!virtio_int_take(&dev, VIRTIO_INT_USED))
			dev.int_missed++;
		post_stats();
	}
}

/* The device's target. A polling driver notices a new one by reading it;
 * the device must also have set InterruptStatus bit 1 (config change). */
static uint32_t read_target(void)
{
	uint32_t t = virtio_config_read32(&dev, CFG_NUM_PAGES);

	if (t != cfg_seen) {
		cfg_seen = t;
		if (!virtio_int_take(&dev, VIRTIO_INT_CONFIG))
			dev.int_missed++;
	}
	return t;
}

static bool ensure_ready(char *err, unsigned errlen)
{
	unsigned n = 2;

	if (have_dev && dev.ready && !(virtio_status(&dev) & 0x40))
		return true;
	if (!have_dev && !virtio_find(VIRTIO_ID_BALLOON, &dev)) {
		ksnprintf(err, errlen, "no virtio-balloon device");
		return false;
	}
	have_dev = true;
	inflight = false;
	if (!virtio_init(&dev, (1ULL << F_STATS_VQ) | (1ULL << F_DEFLATE_ON_OOM) | (1ULL << F_REPORTING),
			 err, errlen))
		return false;
	q_stats = q_report = -1;
	if (!virtio_setup_queue(&dev, 0, err, errlen) || !virtio_setup_queue(&dev, 1, err, errlen))
		return false;
	if (dev.features & (1ULL << F_STATS_VQ)) {
		q_stats = (int)n;
		if (!virtio_setup_queue(&dev, n++, err, errlen))
			return false;
	}
	if (dev.features & (1ULL << F_REPORTING)) {
		q_report = (int)n;
		if (!virtio_setup_queue(&dev, n++, err, errlen))
			return false;
	}
	virtio_driver_ok(&dev);
	cfg_seen = virtio_config_read32(&dev, CFG_NUM_PAGES);
	if (q_stats >= 0)
		post_stats();
	/* After a device reset the host still holds what we gave it. */
	virtio_config_write32(&dev, CFG_ACTUAL, (uint32_t)held);
	kprintf("balloon: device at 0x%lx features=0x%lx queues=%u\n", dev.base, dev.features, n);
	return true;
}

static bool send_pfns(unsigned q, unsigned n, bool async)
{
	uint64_t a = (uintptr_t)pfns;
	uint32_t l = n * 4;
	uint16_t f = 0;

	if (async) {
		inflight = virtio_post(&dev, q, &a, &l, &f, 1);
		return inflight;
	}
	return virtio_request(&dev, q, &a, &l, &f, 1);
}

/* An inflate posted in auto mode: 1 the device used it (or none was
 * pending; `actual` is updated), 0 still pending (wait=false), -1 device
 * error. */
static int reap(bool wait)
{
	uint64_t t0 = guest_rdtsc();

	if (!inflight)
		return 1;
	for (unsigned i = 1; !virtio_done(&dev, 0); i++) {
		if (!wait)
			return virtio_status(&dev) & 0x40 ? -1 : 0;
		if (!(i & 1023) && ((virtio_status(&dev) & 0x40) || guest_rdtsc() - t0 > (1ULL << 34)))
			return -1;
		asm volatile("pause");
	}
	inflight = false;
	if (!virtio_int_take(&dev, VIRTIO_INT_USED))
		dev.int_missed++;
	virtio_config_write32(&dev, CFG_ACTUAL, (uint32_t)held);
	return 1;
}

/* A command's view of the device: ready, and no inflate of auto mode in flight. */
static bool ready_idle(char *err, unsigned errlen)
{
	if (!ensure_ready(err, errlen))
		return false;
	if (reap(true) < 0) {
		ksnprintf(err, errlen, "device failed the request (status 0x%x)", virtio_status(&dev));
		return false;
	}
	return true;
}

/* Give up to n more pages (from bal_low down). Returns pages given, -1 on
 * error. async: post the request and return (reap() completes it). */
static int inflate(unsigned n, bool async)
{
	uint64_t p = bal_low;
	unsigned k = 0;

	while (stride > 1 && k < n && (p = cand_below(p)) != 0)
		pfns[n - 1 - k++] = (uint32_t)(p >> 12);
	while (stride == 1 && k < n && (p = ram_page_below(p)) != 0) {
		/* The rest of this RAM entry without another map search. */
		uint64_t lo = p;
		for (unsigned i = 0; i < map_n; i++)
			if (map[i].type == E820_RAM && p >= map[i].addr && p < map[i].addr + map[i].size)
				lo = map[i].addr > floor_addr ? map[i].addr : floor_addr;
		pfns[n - 1 - k++] = (uint32_t)(p >> 12);
		while (k < n && p - PAGE >= lo && p >= PAGE) {
			p -= PAGE;
			pfns[n - 1 - k++] = (uint32_t)(p >> 12);
		}
	}
	if (!k)
		return 0;
	if (k < n)   /* keep the array ascending from its start */
		memmove(pfns, pfns + (n - k), k * 4);
	/* Host first: the pages are not ours once the request is posted. */
	if (!send_pfns(0, k, async))
		return -1;
	bal_low = (uint64_t)pfns[0] << 12;
	held += k;
	return (int)k;
}

/* Take up to n pages back (the lowest ballooned ones). */
static int deflate(unsigned n)
{
	uint64_t p = bal_low;
	unsigned k = 0;

	while (k < n && k < held && (p = stride > 1 ? cand_from(p) : ram_page_from(p)) < ram_top) {
		pfns[k++] = (uint32_t)(p >> 12);
		p += PAGE;
	}
	if (!k)
		return 0;
	if (!send_pfns(1, k, false))
		return -1;
	/* Without MUST_TELL_HOST we could have used them first; we wait anyway. */
	bal_low = stride > 1 ? cand_from(p) : ram_page_from(p);
	held -= k;
	return (int)k;
}

/* Follow the device's target for at most max_req requests. 1: at target,
 * 0: not there yet / cannot go further, -1: device error. async (auto
 * mode): an inflate request is posted and left to the device, so the walk
 * goes on while mdvm releases the pages; the next call completes it. */
static int sync_target(unsigned max_req, bool *limited, bool async)
{
	for (unsigned i = 0; i < max_req; i++) {
		uint32_t target = read_target();
		int r;

		service_stats();
		if (held == target)
			return 1;
		if (held < target) {
			uint64_t want = target - held;
			r = inflate(want < BATCH ? (unsigned)want : BATCH, async);
			if (r == 0) {
				if (limited)
					*limited = true;
				return 0;
			}
			if (r > 0 && async)
				return 0;   /* actual is written when the device used it */
		} else {
			uint64_t want = held - target;
			r = deflate(want < BATCH ? (unsigned)want : BATCH);
		}
		if (r < 0)
			return -1;
		virtio_config_write32(&dev, CFG_ACTUAL, (uint32_t)held);
	}
	return 0;
}

void balloon_poll(void)
{
	char err[96];

	int r;

	if (!auto_mode || !ensure_ready(err, sizeof(err)))
		return;
	if ((r = reap(false)) == 0)
		return;   /* the device is still at it: walk on */
	if (r < 0 || sync_target(16, NULL, true) < 0) {
		kprintf("balloon: device error (status 0x%x); auto mode off\n", virtio_status(&dev));
		auto_mode = false;
	}
}

static void cmd_balloon(const char *name, char *rest)
{
	struct arg a[] = { { "auto", 2 }, { "stride", 0 } };
	char err[96];
	bool limited = false;
	int r;

	if (!parse_args(name, rest, a, 2))
		return;
	if (a[1].val > 64 || (a[0].val != 0 && a[0].val != 1 && a[0].val != 2)) {
		reply(ERR, "balloon: error: auto=0|1, stride=1..64");
		return;
	}
	if (!ready_idle(err, sizeof(err))) {
		reply(ERR, "balloon: error: %s", err);
		return;
	}
	if (a[1].val && a[1].val != stride) {
		if (held) {
			reply(ERR, "balloon: error: stride can change only while the balloon is empty");
			return;
		}
		stride = (unsigned)a[1].val;
	}
	if (a[0].val != 2)
		auto_mode = a[0].val != 0;
	do
		r = sync_target(1u << 20, &limited, false);
	while (r == 0 && !limited);
	if (r < 0) {
		reply(FAIL, "balloon: error: device failed the request (status 0x%x)", virtio_status(&dev));
		return;
	}
	reply(OK, "balloon: %s target=%u actual=%lu low=0x%lx auto=%u stride=%u",
	      limited ? "limit" : "ok", virtio_config_read32(&dev, CFG_NUM_PAGES), held, bal_low,
	      auto_mode ? 1 : 0, stride);
}

static void cmd_balloon_wait(const char *name, char *rest)
{
	struct arg a[] = { { "timeout", 60 } };
	char err[96];
	uint64_t t0 = guest_rdtsc();

	if (!parse_args(name, rest, a, 1))
		return;
	if (!ready_idle(err, sizeof(err))) {
		reply(ERR, "balloon-wait: error: %s", err);
		return;
	}
	/* ~1 s per 2^31 TSC cycles: close enough for a timeout. */
	while (read_target() == held) {
		service_stats();
		if (guest_rdtsc() - t0 > (a[0].val << 31)) {
			reply(FAIL, "balloon-wait: timeout target=%lu", held);
			return;
		}
		for (int i = 0; i < 1000; i++)
			asm volatile("pause");
	}
	reply(OK, "balloon-wait: target=%u actual=%lu", virtio_config_read32(&dev, CFG_NUM_PAGES), held);
}

static void cmd_balloon_oom(const char *name, char *rest)
{
	struct arg a[] = { { "pages", BATCH } };
	char err[96];
	uint64_t done = 0;

	if (!parse_args(name, rest, a, 1))
		return;
	if (!ready_idle(err, sizeof(err))) {
		reply(ERR, "balloon-oom: error: %s", err);
		return;
	}
	if (!(dev.features & (1ULL << F_DEFLATE_ON_OOM))) {
		reply(ERR, "balloon-oom: error: VIRTIO_BALLOON_F_DEFLATE_ON_OOM not negotiated");
		return;
	}
	auto_mode = false;   /* or the next poll would inflate again */
	while (done < a[0].val && held) {
		uint64_t want = a[0].val - done;
		int r = deflate(want < BATCH ? (unsigned)want : BATCH);
		if (r <= 0)
			break;
		done += (unsigned)r;
		virtio_config_write32(&dev, CFG_ACTUAL, (uint32_t)held);
	}
	reply(OK, "balloon-oom: deflated=%lu actual=%lu", done, held);
}

static void cmd_balloon_info(const char *name, char *rest)
{
	char err[96];

	if (!ready_idle(err, sizeof(err))) {
		reply(ERR, "balloon-info: error: %s", err);
		return;
	}
	reply(OK, "balloon-info: base=0x%lx irq=%d features=0x%lx target=%u actual=%lu low=0x%lx "
	      "status=0x%x stats=%d report=%d", dev.base, dev.irq, dev.features,
	      virtio_config_read32(&dev, CFG_NUM_PAGES), held, bal_low, virtio_status(&dev), q_stats,
	      q_report);
}

static void cmd_report_free(const char *name, char *rest)
{
	struct arg a[] = { { "base", 8ULL << 20 }, { "size", 2ULL << 20 }, { "any", 0 } };
	char err[96];
	uint64_t addr, h = held;
	uint32_t len;
	uint16_t f = DESC_F_WRITE;   /* as Linux: device-writable buffers */
	bool ok;

	if (!parse_args(name, rest, a, 3))
		return;
	/* any=1: a buggy driver that reports pages it gave to the balloon. */
	if (a[2].val)
		held = 0;
	ok = check_range(name, a[0].val, a[1].val);
	held = h;
	if (!ok)
		return;
	if (a[1].val > 0x80000000ULL) {
		reply(ERR, "report-free: error: size at most 2G per report");
		return;
	}
	if (!ensure_ready(err, sizeof(err))) {
		reply(ERR, "report-free: error: %s", err);
		return;
	}
	if (q_report < 0) {
		reply(ERR, "report-free: error: VIRTIO_BALLOON_F_REPORTING not negotiated");
		return;
	}
	addr = a[0].val;
	len = (uint32_t)a[1].val;
	if (!virtio_request(&dev, (unsigned)q_report, &addr, &len, &f, 1)) {
		reply(FAIL, "report-free: error: device failed the request (status 0x%x)", virtio_status(&dev));
		return;
	}
	reply(OK, "report-free: ok pages=%lu", (uint64_t)(a[1].val / PAGE));
}

/* A deliberately broken driver: garbage in the inflate queue. The device
 * must answer with NEEDS_RESET and leave everything else alone. */
static void cmd_balloon_hostile(const char *name, char *rest)
{
	static const char *const kinds[] = { "loop", "addr", "len", "head", "idx", "pfn", "ring", "wrflag" };
	struct arg a[] = { { "kind", 0 } };
	char err[96];
	struct gvq *q;
	uint64_t t0;
	uint32_t st;

	if (!parse_args(name, rest, a, 1))
		return;
	if (a[0].val >= sizeof(kinds) / sizeof(kinds[0])) {
		reply(ERR, "balloon-hostile: error: kind=0..7 (loop addr len head idx pfn ring wrflag)");
		return;
	}
	if (!ready_idle(err, sizeof(err))) {
		reply(ERR, "balloon-hostile: error: %s", err);
		return;
	}
	auto_mode = false;
	q = &dev.vq[0];
	pfns[0] = (uint32_t)(bal_low >> 12);   /* harmless if it were used: already ballooned or top */
	switch (a[0].val) {
	case 0:   /* a descriptor loop */
		q->desc[0] = (struct vdesc){ (uintptr_t)pfns, 4, 1, 1 };
		q->desc[1] = (struct vdesc){ (uintptr_t)pfns, 4, 1, 0 };
		break;
	case 1:   /* buffer outside guest RAM */
		q->desc[0] = (struct vdesc){ 0xfff00000000ULL, 4, 0, 0 };
		break;
	case 2:   /* a 2 MiB "PFN array" */
		q->desc[0] = (struct vdesc){ 4ULL << 20, 2u << 20, 0, 0 };
		break;
	case 3:   /* chain head out of range */
		q->desc[0] = (struct vdesc){ (uintptr_t)pfns, 4, 0, 0 };
		break;
	case 4:   /* avail index far ahead */
		q->desc[0] = (struct vdesc){ (uintptr_t)pfns, 4, 0, 0 };
		break;
	case 5:   /* a page frame that is not RAM */
		pfns[0] = 0xfffffff0u;
		q->desc[0] = (struct vdesc){ (uintptr_t)pfns, 4, 0, 0 };
		break;
	case 6:   /* ring in the MMIO hole */
		virtio_reset(&dev);
		if (!virtio_init(&dev, 1ULL << F_STATS_VQ, err, sizeof(err))) {
			reply(ERR, "balloon-hostile: error: %s", err);
			return;
		}
		mmio_write32(dev.base + 0x030, 0);
		mmio_write32(dev.base + 0x038, GVQ_NUM);
		mmio_write32(dev.base + 0x080, 0xF0000000u);
		mmio_write32(dev.base + 0x084, 0);
		mmio_write32(dev.base + 0x044, 1);
		break;
	case 7:   /* inflate buffer marked device-writable */
		q->desc[0] = (struct vdesc){ (uintptr_t)pfns, 4, DESC_F_WRITE, 0 };
		break;
	}
	if (a[0].val != 6) {
		q->avail->ring[q->avail_idx % GVQ_NUM] = a[0].val == 3 ? 200 : 0;
		q->avail_idx += a[0].val == 4 ? 100 : 1;
		asm volatile("" : : : "memory");
		*(volatile uint16_t *)&q->avail->idx = q->avail_idx;
		virtio_notify(&dev, 0);
	}
	t0 = guest_rdtsc();
	while (!((st = virtio_status(&dev)) & 0x40) && guest_rdtsc() - t0 < (1ULL << 34))
		asm volatile("pause");
	/* Start over next time: reset, then a fresh init. */
	virtio_reset(&dev);
	reply(st & 0x40 ? OK : FAIL, "balloon-hostile: kind=%s needs_reset=%u status=0x%x", kinds[a[0].val],
	      (st & 0x40) ? 1 : 0, st);
}

/* Interrupt bookkeeping: InterruptStatus now (then acknowledged), the
 * driver's counts, and with nmi=1 the device's pin routed as NMI. */
static void cmd_virtio_irq(const char *name, char *rest)
{
	struct arg a[] = { { "nmi", 2 } };
	char err[96];
	uint32_t s;

	if (!parse_args(name, rest, a, 1))
		return;
	if (a[0].val > 2) {
		reply(ERR, "virtio-irq: error: nmi=0|1");
		return;
	}
	if (!ready_idle(err, sizeof(err))) {
		reply(ERR, "virtio-irq: error: %s", err);
		return;
	}
	if (a[0].val != 2 && !virtio_irq_nmi(&dev, a[0].val == 1)) {
		reply(ERR, "virtio-irq: error: IRQ %d is not on the first IOAPIC", dev.irq);
		return;
	}
	s = virtio_int_status(&dev);
	read_target();   /* a new target takes bit 1 */
	virtio_int_take(&dev, VIRTIO_INT_USED | VIRTIO_INT_CONFIG);
	if (nmi_counting)
		reply(OK, "virtio-irq: status=0x%x used=%u config=%u missed=%u nmi=%u", s, dev.int_used,
		      dev.int_config, dev.int_missed, nmi_count);
	else
		reply(OK, "virtio-irq: status=0x%x used=%u config=%u missed=%u nmi=off", s, dev.int_used,
		      dev.int_config, dev.int_missed);
}

/* A driver that makes an inflate buffer available and notifies before
 * DRIVER_OK (§3.1.1 forbids it): the device must not use it before DRIVER_OK
 * (§2.1.2), and must look at it then. The PFN is one already ballooned. */
static void negotiate_early(void)
{
	uint64_t a = (uintptr_t)pfns, t0;
	uint32_t l = 4;
	uint16_t f = 0;
	char err[96];
	bool before, after;

	if (!held) {
		reply(ERR, "virtio-negotiate: error: kind=early needs a page in the balloon");
		return;
	}
	if (!virtio_init(&dev, dev.features, err, sizeof(err)) || !virtio_setup_queue(&dev, 0, err, sizeof(err))) {
		reply(ERR, "virtio-negotiate: error: %s", err);
		return;
	}
	pfns[0] = (uint32_t)(bal_low >> 12);
	virtio_post(&dev, 0, &a, &l, &f, 1);
	/* Give mdvm's main loop time for the notification: register reads exit to it. */
	for (int i = 0; i < 2000; i++)
		virtio_status(&dev);
	before = virtio_done(&dev, 0);
	virtio_driver_ok(&dev);
	t0 = guest_rdtsc();
	while (!(after = before || virtio_done(&dev, 0)) && guest_rdtsc() - t0 < (1ULL << 34))
		asm volatile("pause");
	virtio_reset(&dev);
	reply(!before && after ? OK : FAIL, "virtio-negotiate: kind=early used_before_driver_ok=%u used_after=%u",
	      before ? 1 : 0, after ? 1 : 0);
}

/* A driver that breaks the initialisation rules (§3.1.1, §2.2.1); the
 * device must not go live. The next command initialises it properly. */
static void cmd_virtio_negotiate(const char *name, char *rest)
{
	static const char *const kinds[] = { "noversion", "unoffered", "nofeatok", "early" };
	struct arg a[] = { { "kind", 0 } };
	char err[96];
	uint32_t st, isr, qmax;
	bool ok;

	if (!parse_args(name, rest, a, 1))
		return;
	if (a[0].val >= sizeof(kinds) / sizeof(kinds[0])) {
		reply(ERR, "virtio-negotiate: error: kind=0..3 (noversion unoffered nofeatok early)");
		return;
	}
	if (!ready_idle(err, sizeof(err))) {
		reply(ERR, "virtio-negotiate: error: %s", err);
		return;
	}
	auto_mode = false;
	if (a[0].val == 3) {
		negotiate_early();
		return;
	}
	switch (a[0].val) {
	case 0:   /* FEATURES_OK without VIRTIO_F_VERSION_1 */
		st = virtio_bad_init(&dev, 0, 1ULL << 32, 8, &isr, &qmax);
		ok = !(st & 8);
		break;
	case 1:   /* FEATURES_OK with VIRTIO_F_RING_PACKED, never offered */
		st = virtio_bad_init(&dev, 1ULL << 34, 0, 8, &isr, &qmax);
		ok = !(st & 8);
		break;
	default:  /* DRIVER_OK without FEATURES_OK */
		st = virtio_bad_init(&dev, 0, 0, 4, &isr, &qmax);
		ok = !(st & 4) || (st & 0x40);
		break;
	}
	reply(ok ? OK : FAIL, "virtio-negotiate: kind=%s status=0x%x int=0x%x qmax=%u", kinds[a[0].val], st,
	      isr, qmax);
}

bool balloon_command(const char *name, char *rest)
{
	static const struct { const char *name; void (*fn)(const char *, char *); } cmds[] = {
		{ "balloon", cmd_balloon },
		{ "balloon-wait", cmd_balloon_wait },
		{ "balloon-oom", cmd_balloon_oom },
		{ "balloon-info", cmd_balloon_info },
		{ "balloon-hostile", cmd_balloon_hostile },
		{ "report-free", cmd_report_free },
		{ "virtio-irq", cmd_virtio_irq },
		{ "virtio-negotiate", cmd_virtio_negotiate },
	};

	for (unsigned i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
		if (!strcmp(name, cmds[i].name)) {
			cmds[i].fn(name, rest);
			return true;
		}
	return false;
}
