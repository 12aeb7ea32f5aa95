/* virtio-balloon (virtio 1.2 §5.5). Queues: 0 inflateq, 1 deflateq, then
 * statsq if VIRTIO_BALLOON_F_STATS_VQ and reporting_vq if
 * VIRTIO_BALLOON_F_REPORTING were negotiated, numbered in that order over the
 * queues that exist (what Linux does; QEMU agrees when all are accepted).
 *
 * Inflated pages become memdesc BALLOONED and lose their host memory
 * (mm_release_range: punch hole / MADV_REMOVE / MADV_DONTNEED by backing;
 * on hugetlb mm/ keeps the freed 4 KiB pieces per hugepage for compaction).
 * Deflated pages become UNBACKED: zero on the first touch (hugetlb: a page
 * whose 2 MiB page is still mapped gets its zeroed piece back as RAM).
 * Reported free pages become UNBACKED at once (the guest keeps them); on
 * hugetlb a page whose 2 MiB page stays mapped is left as it is. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "virtio_balloon.h"
#include "virtio_mmio.h"
#include "../mm/mm.h"
#include "../vmm/loop.h"
#include "../vmm/util.h"
#include "../vmm/vm.h"

enum bq { BQ_INFLATE, BQ_DEFLATE, BQ_STATS, BQ_REPORT, BQ_NONE };

struct balloon_config {      /* struct virtio_balloon_config */
	uint32_t num_pages;
	uint32_t actual;
	uint32_t free_page_hint_cmd_id;
	uint32_t poison_val;
} __attribute__((packed));

struct virtio_balloon {
	struct vm *vm;
	struct guest_mem *gm;
	struct virtio_mmio *t;
	struct balloon_config cfg;
	enum bq role[VIRTIO_MMIO_MAX_QUEUES];
	int stats_q;                   /* queue index of statsq, or -1 */
	bool stats_held;               /* driver's stats buffer, kept until we want new stats */
	uint16_t stats_head;
	uint64_t ballooned, inflated, deflated, reported_bytes, released_bytes;
	uint64_t inflate_ns, report_ns;   /* host time spent handling those queues */
	bool busy;                     /* a release met a folio someone holds (-EBUSY) */
	unsigned retries;              /* of the chain at the head of retry_q */
	int retry_q, retry_timer;
	bool have_stats;
	int64_t stats_time;
	uint64_t stats[VIRTIO_BALLOON_S_NR];
	uint32_t stats_valid;
	virtio_balloon_change_fn change_fn;
	void *change_opaque;
	struct virtio_dev_ops ops;     /* balloon_ops with this device's features */
	struct vq_elem elem;           /* popped chain (4 KiB: not on a stack) */
	uint32_t pfns[1024];
};

/* A folio held by someone (the migration sender copying it) cannot be
 * split or freed: the chain is processed again after a short wait, up to
 * about 2 s, then completed with the pages left as they are. */
#define BALLOON_RETRY_MS  5
#define BALLOON_RETRY_MAX 400

static const uint64_t balloon_features =
	(1ULL << VIRTIO_BALLOON_F_STATS_VQ) | (1ULL << VIRTIO_BALLOON_F_DEFLATE_ON_OOM) |
	(1ULL << VIRTIO_BALLOON_F_REPORTING);

/* ---- host memory */
static bool gfn_is_ram(struct virtio_balloon *b, uint64_t gfn)
{
	enum memdesc_type t = memdesc_type(memdesc_lookup(b->gm, gfn));
	return t != MEMDESC_MMIO;
}

static uint64_t count_type(struct virtio_balloon *b, uint64_t gfn, uint64_t nr, enum memdesc_type type)
{
	uint64_t n = 0;

	for (uint64_t i = 0; i < nr; i++)
		n += memdesc_type(memdesc_lookup(b->gm, gfn + i)) == type;
	return n;
}

/* Release [gfn, gfn+nr) to `type`; released_bytes counts the host memory
 * that really went back (on hugetlb only whole 2 MiB pages). 0 or -errno:
 * the part mm/ could do is done either way. -EOPNOTSUPP is not logged: a
 * hugetlb page whose 2 MiB page stays mapped cannot become unbacked (a
 * reported page stays RAM, reporting is a hint). */
static int release_run(struct virtio_balloon *b, uint64_t gfn, uint64_t nr, enum memdesc_type type)
{
	uint64_t freed = 0;
	int r;

	if (!nr)
		return 0;
	r = mm_release_range_freed(b->gm, gfn, nr, type, &freed);
	b->released_bytes += freed;
	if (r == -EBUSY && b->retries < BALLOON_RETRY_MAX)
		b->busy = true;   /* tried again later */
	else if (r < 0 && r != -EOPNOTSUPP)
		pr_warn("virtio-balloon: releasing guest pages 0x%" PRIx64 "+%" PRIu64 " failed: %s",
			gfn, nr, strerror(-r));
	return r;
}

/* Account a run moved into (inflate) or out of (deflate) the balloon: the
 * pages that are ballooned after the call and were not before, or the
 * reverse. A page the driver took back is never left ballooned by mm/
 * (hugetlb: it becomes a 4 KiB folio); if mm/ failed, the count says so. */
static void balloon_run(struct virtio_balloon *b, uint64_t gfn, uint64_t nr, bool inflate)
{
	uint64_t before, after;

	if (!nr)
		return;
	before = count_type(b, gfn, nr, MEMDESC_BALLOONED);
	release_run(b, gfn, nr, inflate ? MEMDESC_BALLOONED : MEMDESC_UNBACKED);
	after = count_type(b, gfn, nr, MEMDESC_BALLOONED);
	if (inflate && after > before) {
		b->inflated += after - before;
		b->ballooned += after - before;
	} else if (!inflate && before > after) {
		uint64_t n = before - after;

		b->deflated += n;
		b->ballooned -= n < b->ballooned ? n : b->ballooned;
	}
}

/* Inflate (to BALLOONED) or deflate (BALLOONED to UNBACKED) the page frames
 * of one chain. Runs of consecutive frames go to mm/ in one call. 1: a page
 * was busy, process the chain again later (pages already done are skipped
 * then). */
static int balloon_pfns(struct virtio_balloon *b, struct vq_elem *e, bool inflate)
{
	struct virtio_mmio *t = b->t;
	uint64_t run_start = 0, run_len = 0, total = 0;
	char why[160];

	if (e->n_in) {
		virtio_mmio_needs_reset(t, inflate ? "inflate buffer is device-writable"
					   : "deflate buffer is device-writable");
		return -1;
	}
	for (unsigned i = 0; i < e->n_out; i++)
		total += e->buf[i].len;
	if (total > VIRTIO_BALLOON_ELEM_MAX || total % 4) {
		snprintf(why, sizeof(why), "%s buffer of %" PRIu64 " bytes (a multiple of 4 up to %u expected)",
			 inflate ? "inflate" : "deflate", total, VIRTIO_BALLOON_ELEM_MAX);
		virtio_mmio_needs_reset(t, why);
		return -1;
	}
	for (unsigned i = 0; i < e->n_out; i++) {
		uint64_t gpa = e->buf[i].gpa, left = e->buf[i].len;

		if (left % 4) {
			virtio_mmio_needs_reset(t, "page frame number split across descriptors");
			return -1;
		}
		while (left) {
			size_t n = left / 4 < ARRAY_SIZE(b->pfns) ? left / 4 : ARRAY_SIZE(b->pfns);

			if (mm_read(b->gm, gpa, b->pfns, n * 4) < 0) {
				virtio_mmio_needs_reset(t, "cannot read a page frame number array");
				return -1;
			}
			for (size_t k = 0; k < n; k++) {
				uint64_t gfn = b->pfns[k];
				enum memdesc_type ty;

				if (!gfn_is_ram(b, gfn)) {
					snprintf(why, sizeof(why), "%s page frame 0x%" PRIx64 " is not guest RAM",
						 inflate ? "inflate" : "deflate", gfn);
					balloon_run(b, run_start, run_len, inflate);
					virtio_mmio_needs_reset(t, why);
					return -1;
				}
				ty = memdesc_type(memdesc_lookup(b->gm, gfn));
				/* Already in the wanted state (or poisoned): nothing to do. */
				if (inflate ? (ty == MEMDESC_BALLOONED || ty == MEMDESC_POISONED)
					    : ty != MEMDESC_BALLOONED)
					continue;
				if (run_len && gfn == run_start + run_len) {
					run_len++;
					continue;
				}
				balloon_run(b, run_start, run_len, inflate);
				run_start = gfn;
				run_len = 1;
			}
			gpa += n * 4;
			left -= n * 4;
		}
	}
	balloon_run(b, run_start, run_len, inflate);
	return b->busy ? 1 : 0;
}

/* struct virtio_balloon_stat { le16 tag; le64 val; } packed, 10 bytes each. */
static int balloon_stats(struct virtio_balloon *b, struct vq_elem *e)
{
	uint8_t rec[10];
	uint64_t total = 0;

	if (e->n_in) {
		virtio_mmio_needs_reset(b->t, "stats buffer is device-writable");
		return -1;
	}
	for (unsigned i = 0; i < e->n_out; i++)
		total += e->buf[i].len;
	if (total > 64 * 10 || total % 10) {
		virtio_mmio_needs_reset(b->t, "stats buffer length is not a multiple of 10 bytes up to 640");
		return -1;
	}
	b->stats_valid = 0;
	for (unsigned i = 0; i < e->n_out; i++) {
		for (uint64_t off = 0; off + 10 <= e->buf[i].len; off += 10) {
			uint16_t tag;
			uint64_t val;

			if (mm_read(b->gm, e->buf[i].gpa + off, rec, sizeof(rec)) < 0) {
				virtio_mmio_needs_reset(b->t, "cannot read the stats buffer");
				return -1;
			}
			memcpy(&tag, rec, 2);
			memcpy(&val, rec + 2, 8);
			if (tag < VIRTIO_BALLOON_S_NR) {   /* unknown tags are ignored (§5.5.6.3) */
				b->stats[tag] = val;
				b->stats_valid |= 1u << tag;
			}
		}
	}
	b->have_stats = true;
	b->stats_time = (int64_t)time(NULL);
	return 0;
}

static int balloon_report(struct virtio_balloon *b, struct vq_elem *e)
{
	char why[160];

	for (unsigned i = 0; i < e->n_out + e->n_in; i++) {
		struct vq_buf *v = &e->buf[i];

		if ((v->gpa | v->len) & (MM_PAGE_SIZE - 1) || !v->len) {
			snprintf(why, sizeof(why), "reported range 0x%" PRIx64 "+0x%x is not whole pages",
				 v->gpa, v->len);
			virtio_mmio_needs_reset(b->t, why);
			return -1;
		}
		/* vq_pop checked the range is guest RAM. Reporting is a hint:
		 * what mm/ cannot release stays as it is, and the buffer always
		 * goes back. A ballooned page is the balloon's, not free memory:
		 * it stays ballooned (and counted). */
		uint64_t g = v->gpa >> MM_PAGE_SHIFT, end = g + (v->len >> MM_PAGE_SHIFT);
		while (g < end) {
			uint64_t s = g;
			while (g < end && memdesc_type(memdesc_lookup(b->gm, g)) != MEMDESC_BALLOONED)
				g++;
			release_run(b, s, g - s, MEMDESC_UNBACKED);
			while (g < end && memdesc_type(memdesc_lookup(b->gm, g)) == MEMDESC_BALLOONED)
				g++;
		}
		b->reported_bytes += v->len;
	}
	return 0;
}

static void balloon_queue_notify(void *dev, struct virtio_mmio *t, unsigned q);

static void retry_on_main(void *opaque)
{
	struct virtio_balloon *b = opaque;
	enum vm_state st = vm_get_state(b->vm);

	virtio_mmio_lock(b->t);
	b->retry_timer = 0;
	if (st == VM_STATE_FINISH_MIGRATE || st == VM_STATE_POSTMIGRATE) {
		/* No guest memory changes now; a completed migration leaves
		 * the chain to the destination (it was not consumed), and a
		 * source resumed by `cont` after it picks it up here. */
		b->retry_timer = loop_add_timer(20, retry_on_main, b);
	} else if (b->retry_q >= 0 && !virtio_mmio_broken(b->t)) {
		balloon_queue_notify(b, b->t, (unsigned)b->retry_q);
	}
	virtio_mmio_unlock(b->t);
}

static void balloon_queue_notify(void *dev, struct virtio_mmio *t, unsigned q)
{
	struct virtio_balloon *b = dev;
	struct virtqueue *vq;
	char err[160], why[200];
	bool used = false;
	int r;

	while ((vq = virtio_mmio_queue(t, q)) != NULL) {
		r = vq_pop(vq, &b->elem, err, sizeof(err));
		if (r < 0) {
			snprintf(why, sizeof(why), "queue %u: %s", q, err);
			virtio_mmio_needs_reset(t, why);
			break;
		}
		if (r == 0)
			break;
		uint64_t t0 = monotonic_ns();
		b->busy = false;
		switch (b->role[q]) {
		case BQ_INFLATE:
			r = balloon_pfns(b, &b->elem, true);
			b->inflate_ns += monotonic_ns() - t0;
			break;
		case BQ_DEFLATE: r = balloon_pfns(b, &b->elem, false); break;
		case BQ_REPORT:
			r = balloon_report(b, &b->elem);
			b->report_ns += monotonic_ns() - t0;
			break;
		case BQ_STATS:
			r = balloon_stats(b, &b->elem);
			if (r == 0) {
				/* Kept until the host wants fresh numbers. */
				if (b->stats_held) {
					virtio_mmio_needs_reset(t, "a second stats buffer while one is held");
					return;
				}
				b->stats_held = true;
				b->stats_head = b->elem.head;
				continue;
			}
			break;
		default:         r = -1; break;
		}
		if (r < 0)
			break;
		if (r == 1) {
			/* Not consumed: the next look (or a destination) takes it. */
			vq_unpop(vq);
			b->retries++;
			b->retry_q = (int)q;
			if (!b->retry_timer)
				b->retry_timer = loop_add_timer(BALLOON_RETRY_MS, retry_on_main, b);
			break;
		}
		b->retries = 0;
		if (vq_push(vq, b->elem.head, 0) < 0) {
			virtio_mmio_needs_reset(t, "cannot write the device ring");
			break;
		}
		used = true;
	}
	if (used)
		virtio_mmio_notify_queue(t, q);
}

/* ---- configuration space */
static void balloon_config_read(void *dev, uint32_t off, void *buf, uint32_t len)
{
	struct virtio_balloon *b = dev;
	memcpy(buf, (uint8_t *)&b->cfg + off, len);
}

struct change_call {
	struct virtio_balloon *b;
	uint64_t actual_bytes;
};

static void change_on_main(void *opaque)
{
	struct change_call *c = opaque;

	if (c->b->change_fn)
		c->b->change_fn(c->b->change_opaque, c->actual_bytes);
	free(c);
}

static void balloon_config_write(void *dev, uint32_t off, const void *buf, uint32_t len)
{
	struct virtio_balloon *b = dev;
	uint32_t old = b->cfg.actual;
	struct balloon_config c = b->cfg;

	memcpy((uint8_t *)&c + off, buf, len);
	/* Only `actual` is the driver's to write. */
	b->cfg.actual = c.actual;
	if (b->cfg.actual != old) {
		struct change_call *cc = xmalloc(sizeof(*cc));
		uint64_t ram = mm_ram_size(b->gm), held = (uint64_t)b->cfg.actual << MM_PAGE_SHIFT;

		cc->b = b;
		cc->actual_bytes = held < ram ? ram - held : 0;
		loop_call(change_on_main, cc);
	}
}

static unsigned balloon_features_ok(void *dev, uint64_t features)
{
	struct virtio_balloon *b = dev;
	unsigned n = 0;

	for (unsigned i = 0; i < VIRTIO_MMIO_MAX_QUEUES; i++)
		b->role[i] = BQ_NONE;
	b->role[n++] = BQ_INFLATE;
	b->role[n++] = BQ_DEFLATE;
	b->stats_q = -1;
	if (features & (1ULL << VIRTIO_BALLOON_F_STATS_VQ)) {
		b->stats_q = (int)n;
		b->role[n++] = BQ_STATS;
	}
	if (features & (1ULL << VIRTIO_BALLOON_F_REPORTING))
		b->role[n++] = BQ_REPORT;
	return n;
}

static void balloon_reset(void *dev)
{
	struct virtio_balloon *b = dev;

	/* Driver reset: the ballooned pages stay ballooned (the host still
	 * wants them); the next driver inflates from `actual` again. */
	b->stats_held = false;
	b->stats_q = -1;
	b->retries = 0;
	b->retry_q = -1;
	for (unsigned i = 0; i < VIRTIO_MMIO_MAX_QUEUES; i++)
		b->role[i] = BQ_NONE;
}

static const struct virtio_dev_ops balloon_ops = {
	.name = "virtio-balloon",
	.device_id = VIRTIO_ID_BALLOON,
	.features = balloon_features,
	.config_size = sizeof(struct balloon_config),
	.config_read = balloon_config_read,
	.config_write = balloon_config_write,
	.features_ok = balloon_features_ok,
	.queue_notify = balloon_queue_notify,
	.reset = balloon_reset,
};

struct virtio_balloon *virtio_balloon_create(struct vm *vm, uint64_t gpa, int irq, bool deflate_on_oom,
					     bool reporting)
{
	struct virtio_balloon *b = xcalloc(1, sizeof(*b));

	b->vm = vm;
	b->gm = vm_mem(vm);
	b->stats_q = -1;
	b->retry_q = -1;
	b->ops = balloon_ops;   /* per device: the features offered are configurable */
	if (!deflate_on_oom)
		b->ops.features &= ~(1ULL << VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
	if (!reporting)
		b->ops.features &= ~(1ULL << VIRTIO_BALLOON_F_REPORTING);
	b->t = virtio_mmio_create(vm, gpa, irq, &b->ops, b);
	if (!b->t) {
		free(b);
		return NULL;
	}
	return b;
}

uint64_t virtio_balloon_gpa(struct virtio_balloon *b) { return virtio_mmio_gpa(b->t); }
int virtio_balloon_irq(struct virtio_balloon *b) { return virtio_mmio_irq(b->t); }

void virtio_balloon_on_change(struct virtio_balloon *b, virtio_balloon_change_fn fn, void *opaque)
{
	virtio_mmio_lock(b->t);
	b->change_fn = fn;
	b->change_opaque = opaque;
	virtio_mmio_unlock(b->t);
}

void virtio_balloon_set_target(struct virtio_balloon *b, uint64_t bytes)
{
	uint64_t ram = mm_ram_size(b->gm);

	if (bytes > ram)
		bytes = ram;
	virtio_mmio_lock(b->t);
	b->cfg.num_pages = (uint32_t)((ram - bytes) >> MM_PAGE_SHIFT);
	virtio_mmio_config_changed(b->t);
	virtio_mmio_unlock(b->t);
}

bool virtio_balloon_request_stats(struct virtio_balloon *b)
{
	struct virtqueue *vq;
	bool ok = false;

	virtio_mmio_lock(b->t);
	if (b->stats_held && b->stats_q >= 0 && (vq = virtio_mmio_queue(b->t, b->stats_q))) {
		b->stats_held = false;
		if (vq_push(vq, b->stats_head, 0) == 0) {
			virtio_mmio_notify_queue(b->t, b->stats_q);
			ok = true;
		}
	}
	virtio_mmio_unlock(b->t);
	return ok;
}

void virtio_balloon_get_info(struct virtio_balloon *b, struct virtio_balloon_info *o)
{
	memset(o, 0, sizeof(*o));
	virtio_mmio_lock(b->t);
	o->ram_size = mm_ram_size(b->gm);
	o->target_pages = b->cfg.num_pages;
	o->actual_pages = b->cfg.actual;
	o->ballooned_pages = b->ballooned;
	o->inflated_pages = b->inflated;
	o->deflated_pages = b->deflated;
	o->reported_bytes = b->reported_bytes;
	o->released_bytes = b->released_bytes;
	o->inflate_ns = b->inflate_ns;
	o->report_ns = b->report_ns;
	o->features = virtio_mmio_features(b->t);
	o->driver_ok = virtio_mmio_driver_ok(b->t);
	o->needs_reset = virtio_mmio_broken(b->t);
	o->have_stats = b->have_stats;
	o->stats_time = b->stats_time;
	memcpy(o->stats, b->stats, sizeof(o->stats));
	o->stats_valid = b->stats_valid;
	virtio_mmio_unlock(b->t);
}

void virtio_balloon_system_reset(struct virtio_balloon *b)
{
	struct mm_range r[4];
	size_t n = mm_ram_ranges(b->gm, r, ARRAY_SIZE(r));

	virtio_mmio_reset(b->t);
	virtio_mmio_lock(b->t);
	/* The rebooted guest owns all its RAM again. */
	for (size_t i = 0; i < n && i < ARRAY_SIZE(r); i++) {
		uint64_t g = r[i].gpa >> MM_PAGE_SHIFT, end = (r[i].gpa + r[i].size) >> MM_PAGE_SHIFT;
		uint64_t start = 0, len = 0;
		for (; g < end; g++) {
			if (memdesc_type(memdesc_lookup(b->gm, g)) != MEMDESC_BALLOONED)
				continue;
			if (len && g == start + len) {
				len++;
				continue;
			}
			release_run(b, start, len, MEMDESC_UNBACKED);
			start = g;
			len = 1;
		}
		release_run(b, start, len, MEMDESC_UNBACKED);
	}
	b->ballooned = 0;
	b->cfg.actual = 0;
	virtio_mmio_unlock(b->t);
}

/* ---- migration */
#define BSTATE_MAGIC 0x4e4c4c42u   /* "BLLN" */

struct balloon_state {
	uint32_t magic, version;
	struct balloon_config cfg;
	uint64_t ballooned, inflated, deflated, reported_bytes, released_bytes;
	uint8_t stats_held, pad;
	uint16_t stats_head;
	uint32_t mmio_len;
} __attribute__((packed));

size_t virtio_balloon_save_state(struct virtio_balloon *b, void *buf, size_t len)
{
	struct balloon_state s = { .magic = BSTATE_MAGIC, .version = 1 };
	size_t m;

	if (len < sizeof(s))
		return 0;
	m = virtio_mmio_save_state(b->t, (uint8_t *)buf + sizeof(s), len - sizeof(s));
	if (!m)
		return 0;
	virtio_mmio_lock(b->t);
	s.cfg = b->cfg;
	s.ballooned = b->ballooned;
	s.inflated = b->inflated;
	s.deflated = b->deflated;
	s.reported_bytes = b->reported_bytes;
	s.released_bytes = b->released_bytes;
	s.stats_held = b->stats_held;
	s.stats_head = b->stats_head;
	s.mmio_len = (uint32_t)m;
	virtio_mmio_unlock(b->t);
	memcpy(buf, &s, sizeof(s));
	return sizeof(s) + m;
}

int virtio_balloon_load_state(struct virtio_balloon *b, const void *buf, size_t len,
			      char *err, size_t errlen)
{
	struct balloon_state s;

	if (len < sizeof(s)) {
		snprintf(err, errlen, "virtio-balloon state: %zu bytes is too short", len);
		return -1;
	}
	memcpy(&s, buf, sizeof(s));
	if (s.magic != BSTATE_MAGIC || s.version != 1 || s.mmio_len != len - sizeof(s)) {
		snprintf(err, errlen, "virtio-balloon state: bad magic, version or length");
		return -1;
	}
	if (virtio_mmio_load_state(b->t, (const uint8_t *)buf + sizeof(s), s.mmio_len, err, errlen) < 0)
		return -1;
	virtio_mmio_lock(b->t);
	b->cfg = s.cfg;
	b->ballooned = s.ballooned;
	b->inflated = s.inflated;
	b->deflated = s.deflated;
	b->reported_bytes = s.reported_bytes;
	b->released_bytes = s.released_bytes;
	if (s.stats_held && b->stats_q >= 0 && s.stats_head < VQ_NUM_MAX) {
		b->stats_held = true;
		b->stats_head = s.stats_head;
	}
	virtio_mmio_unlock(b->t);
	return 0;
}
