/* Live migration, pre-copy (migration.h, docs/migration.md).
 *
 * Source thread: open a dirty log, send every frame once (folios with data,
 * markers for zero/unbacked/ballooned/poisoned frames), then iterate over
 * what was dirtied until the rest fits the downtime limit at the measured
 * bandwidth (throttling the vCPUs when the guest dirties faster than the
 * link drains), stop the vCPUs, send the rest and all device and vCPU state,
 * and wait for the destination to acknowledge. Any failure before that
 * acknowledgement resumes the source guest; its memory was only read.
 *
 * Destination thread: receive, check every section, write RAM (the vCPU
 * threads do not exist yet), keep the state sections until END checks out,
 * load them, acknowledge, then start the vCPUs from the main loop. */
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <time.h>
#include <unistd.h>

#include "../devices/devices.h"
#include "../devices/virtio_balloon.h"
#include "../mm/dirty.h"
#include "../mm/mm.h"
#include "dirty_kvm.h"
#include "loop.h"
#include "mce.h"
#include "migration.h"
#include "migration_stream.h"
#include "qmp.h"
#include "util.h"
#include "vm.h"
#include "vmstate.h"

#define PAGE 4096ULL
#define SECTION_CAP (8u << 20)          /* RAM section payload we aim for */
#define ACK_TIMEOUT_MS 60000
#define MAX_ITERATIONS 100             /* default of x-max-iterations */
#define SYNC_TIMEOUT_MS 10000
#define THROTTLE_INITIAL 20
#define THROTTLE_STEP 10
#define THROTTLE_MAX 99

enum mig_status {
	MIG_NONE, MIG_SETUP, MIG_ACTIVE, MIG_DEVICE, MIG_COMPLETED, MIG_FAILED,
	MIG_CANCELLING, MIG_CANCELLED,
};
static const char *const status_names[] = {
	"none", "setup", "active", "device", "completed", "failed", "cancelling", "cancelled",
};

static struct {
	pthread_mutex_t lock;
	struct vm *vm;
	enum mig_status status;
	bool thread_live;
	pthread_t thread;
	int fd;
	atomic_bool cancel;
	char error[256];
	/* parameters */
	uint64_t max_bandwidth, downtime_limit, max_iterations;
	/* statistics (under lock when read by query-migrate) */
	uint64_t start_ns, setup_ns, end_ns, stop_ns, downtime_ns;
	uint64_t total, transferred, remaining, iterations, dirty_rate, expected_downtime;
	uint64_t normal_pages, zero_pages, bandwidth;
	unsigned throttle;
	bool cap_reached;       /* switched over at max_iterations, over the limit */
} mig = {
	.lock = PTHREAD_MUTEX_INITIALIZER,
	.fd = -1,
	/* QEMU's defaults are 128 MiB/s and 300 ms; a local VMM for test
	 * guests wants the link's speed, so the bandwidth default is unlimited. */
	.max_bandwidth = UINT64_MAX,
	.downtime_limit = 300,
	.max_iterations = MAX_ITERATIONS,
};

/* ---- events go out from the main loop */
static void emit_status_main(void *opaque)
{
	char *s = opaque;
	qmp_emit_event("MIGRATION", json_pack("{s:s}", "status", s));
	free(s);
}

static void emit_main(void *opaque)
{
	char *s = opaque;
	qmp_emit_event(s, NULL);
	free(s);
}

static void set_status(enum mig_status s)
{
	pthread_mutex_lock(&mig.lock);
	mig.status = s;
	pthread_mutex_unlock(&mig.lock);
	loop_call(emit_status_main, xstrdup(status_names[s]));
}

void migration_set_max_bandwidth(uint64_t v) { mig.max_bandwidth = v ? v : UINT64_MAX; }
void migration_set_downtime_limit(uint64_t v) { mig.downtime_limit = v; }
uint64_t migration_max_bandwidth(void) { return mig.max_bandwidth; }
uint64_t migration_downtime_limit(void) { return mig.downtime_limit; }
void migration_set_max_iterations(uint64_t v) { mig.max_iterations = v ? v : MAX_ITERATIONS; }
uint64_t migration_max_iterations(void) { return mig.max_iterations; }

bool migration_active(void)
{
	pthread_mutex_lock(&mig.lock);
	bool a = mig.status == MIG_SETUP || mig.status == MIG_ACTIVE || mig.status == MIG_DEVICE ||
		 mig.status == MIG_CANCELLING;
	pthread_mutex_unlock(&mig.lock);
	return a;
}

/* ---- URIs */
struct mig_addr {
	int family;
	struct sockaddr_storage sa;
	socklen_t len;
};

/* The PORT of tcp:HOST:PORT: decimal, 1..65535. */
static int uri_check_port(const char *uri, const char *port, char *err, size_t errlen)
{
	for (const char *p = port; *p; p++)
		if (*p < '0' || *p > '9') {
			snprintf(err, errlen, "bad migration URI '%s': port must be a number", uri);
			return -1;
		}
	if (atoi(port) <= 0 || atoi(port) > 65535) {
		snprintf(err, errlen, "bad migration URI '%s': port out of range", uri);
		return -1;
	}
	return 0;
}

static int uri_parse(const char *uri, struct mig_addr *a, bool listen_side, char *err, size_t errlen)
{
	memset(a, 0, sizeof(*a));
	if (!strncmp(uri, "unix:", 5)) {
		struct sockaddr_un *un = (struct sockaddr_un *)&a->sa;
		const char *path = uri + 5;
		if (!*path || strlen(path) >= sizeof(un->sun_path)) {
			snprintf(err, errlen, "bad migration URI '%s': unix: needs a path of 1..%zu bytes",
				 uri, sizeof(un->sun_path) - 1);
			return -1;
		}
		un->sun_family = AF_UNIX;
		strcpy(un->sun_path, path);
		a->family = AF_UNIX;
		a->len = sizeof(*un);
		return 0;
	}
	if (!strncmp(uri, "tcp:", 4)) {
		const char *hp = uri + 4, *colon = strrchr(hp, ':');
		char host[256];
		struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res;
		if (!colon || !colon[1] || (size_t)(colon - hp) >= sizeof(host)) {
			snprintf(err, errlen, "bad migration URI '%s': expected tcp:HOST:PORT", uri);
			return -1;
		}
		memcpy(host, hp, (size_t)(colon - hp));
		host[colon - hp] = 0;
		char *h = host;
		if (h[0] == '[' && h[strlen(h) - 1] == ']') {   /* [::1] */
			h[strlen(h) - 1] = 0;
			h++;
		}
		if (uri_check_port(uri, colon + 1, err, errlen) < 0)
			return -1;
		if (listen_side)
			hints.ai_flags = AI_PASSIVE;
		int rc = getaddrinfo(*h ? h : (listen_side ? NULL : "127.0.0.1"), colon + 1, &hints, &res);
		if (rc) {
			snprintf(err, errlen, "migration URI '%s': %s", uri, gai_strerror(rc));
			return -1;
		}
		memcpy(&a->sa, res->ai_addr, res->ai_addrlen);
		a->len = res->ai_addrlen;
		a->family = res->ai_family;
		freeaddrinfo(res);
		return 0;
	}
	snprintf(err, errlen, "bad migration URI '%s': expected tcp:HOST:PORT or unix:PATH", uri);
	return -1;
}

int migration_uri_check(const char *uri, char *err, size_t errlen)
{
	struct mig_addr a;
	/* Syntax only: do not resolve host names here. */
	if (!strncmp(uri, "tcp:", 4)) {
		const char *colon = strrchr(uri + 4, ':');
		if (!colon || !colon[1]) {
			snprintf(err, errlen, "bad migration URI '%s': expected tcp:HOST:PORT", uri);
			return -1;
		}
		if (uri_check_port(uri, colon + 1, err, errlen) < 0)
			return -1;
		return 0;
	}
	return uri_parse(uri, &a, true, err, errlen);
}

static void sock_tune(int fd, int family)
{
	int one = 1, big = 4 << 20;
	if (family != AF_UNIX)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
}

/* ---- source: page records */
struct sender {
	struct guest_mem *gm;
	uint8_t *base;
	struct mig_out *o;
	uint8_t *sec;           /* payload being filled */
	size_t len;
	size_t crc_len;         /* payload bytes covered by crc */
	uint32_t crc;
	uint64_t ram_pages, data_pages, zero_pages;
	uint64_t t0, bytes0;    /* rate limiting: start of the current window */
	bool limit;
	uint64_t pass1_frames;  /* frames of pass 1 (0 after it): query-migrate's remaining */
};

static int sec_flush(struct sender *s)
{
	int rc = 0;
	if (s->sec)
		rc = mig_out_commit_crc(s->o, MIG_SEC_RAM, s->len,
					crc32c(s->crc, s->sec + s->crc_len, s->len - s->crc_len));
	s->sec = NULL;
	s->len = 0;
	if (rc)
		return rc;
	pthread_mutex_lock(&mig.lock);
	mig.transferred = mig_out_bytes(s->o);
	if (s->pass1_frames)
		mig.remaining = (s->pass1_frames - (s->ram_pages < s->pass1_frames ? s->ram_pages
						    : s->pass1_frames)) * PAGE;
	pthread_mutex_unlock(&mig.lock);
	if (s->limit && mig.max_bandwidth != UINT64_MAX) {
		uint64_t sent = mig_out_queued(s->o) - s->bytes0;
		uint64_t want_ns = sent * 1000000000ULL / mig.max_bandwidth, el = monotonic_ns() - s->t0;
		/* Sleep in short steps: migrate_cancel must not wait for it. */
		while (want_ns > el && !atomic_load(&mig.cancel)) {
			uint64_t ns = want_ns - el > 20000000ULL ? 20000000ULL : want_ns - el;
			struct timespec ts = { .tv_sec = 0, .tv_nsec = (long)ns };
			nanosleep(&ts, NULL);
			el = monotonic_ns() - s->t0;
		}
	}
	return atomic_load(&mig.cancel) ? -ECANCELED : 0;
}

static void *rec_space(struct sender *s, size_t need, int *rc)
{
	if (s->sec && s->len + need > SECTION_CAP && s->len) {
		if ((*rc = sec_flush(s)))
			return NULL;
	}
	if (!s->sec) {
		s->sec = mig_out_begin(s->o, need > SECTION_CAP ? need : SECTION_CAP);
		if (!s->sec) {
			*rc = mig_out_error(s->o) ? mig_out_error(s->o) : -EIO;
			return NULL;
		}
		s->len = 0;
		s->crc_len = 0;
		s->crc = 0;
	}
	void *p = s->sec + s->len;
	s->len += need;
	return p;
}

static int put_marker(struct sender *s, uint64_t gfn, uint64_t n, uint8_t kind)
{
	int rc = 0;
	while (n) {
		uint32_t k = n > (1u << 30) ? (1u << 30) : (uint32_t)n;
		struct mig_ram_rec *r = rec_space(s, sizeof(*r), &rc);
		if (!r)
			return rc;
		*r = (struct mig_ram_rec){ .gfn = gfn, .npages = k, .kind = kind };
		s->ram_pages += k;
		gfn += k;
		n -= k;
	}
	return 0;
}

static bool page_is_zero(const uint8_t *p)
{
	const uint64_t *w = (const uint64_t *)p;
	/* Random data fails on the first word; zero pages need the full scan. */
	if (w[0] | w[511])
		return false;
	uint64_t acc = 0;
	for (int i = 0; i < 512; i += 8)
		acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
	return acc == 0;
}

/* [gfn, gfn+n) inside folio f (held): one record. */
static int put_folio_pages(struct sender *s, struct folio *f, uint64_t gfn, uint64_t n)
{
	uint64_t bm[MM_REGION_PAGES / 64] = { 0 };
	unsigned present = 0, words = (unsigned)((n + 63) / 64);
	const uint8_t *src = s->base + gfn * PAGE;
	uint8_t flag = f->owner == MEMDESC_RESERVED ? RAM_RESERVED : 0;
	int rc = 0;

	for (uint64_t i = 0; i < n; i++)
		if (!page_is_zero(src + i * PAGE)) {
			bm[i / 64] |= 1ULL << (i % 64);
			present++;
		}
	s->ram_pages += n;
	if (!present) {
		struct mig_ram_rec *r = rec_space(s, sizeof(*r), &rc);
		if (!r)
			return rc;
		*r = (struct mig_ram_rec){ .gfn = gfn, .npages = (uint32_t)n, .kind = RAM_ZERO | flag,
					   .order = folio_order(f) };
		s->zero_pages += n;
		return 0;
	}
	uint8_t *p = rec_space(s, sizeof(struct mig_ram_rec) + words * 8 + present * PAGE, &rc);
	if (!p)
		return rc;
	*(struct mig_ram_rec *)p = (struct mig_ram_rec){ .gfn = gfn, .npages = (uint32_t)n,
							 .kind = RAM_DATA | flag, .order = folio_order(f) };
	p += sizeof(struct mig_ram_rec);
	memcpy(p, bm, words * 8);
	p += words * 8;
	/* Copy (the guest keeps writing; the checksum must match what is sent),
	 * checksumming each page while it is in cache. */
	s->crc = crc32c(s->crc, s->sec + s->crc_len, (size_t)(p - (s->sec + s->crc_len)));
	for (uint64_t i = 0; i < n; i++)
		if (bm[i / 64] >> (i % 64) & 1) {
			memcpy(p, src + i * PAGE, PAGE);
			s->crc = crc32c(s->crc, p, PAGE);
			p += PAGE;
		}
	s->crc_len = s->len;
	s->data_pages += present;
	s->zero_pages += n - present;
	return 0;
}

static uint8_t marker_kind(enum memdesc_type t)
{
	switch (t) {
	case MEMDESC_BALLOONED: return RAM_BALLOONED;
	case MEMDESC_POISONED:  return RAM_POISONED;
	case MEMDESC_UNBACKED:  return RAM_UNBACKED;
	default:                return 0;
	}
}

/* Send frames [gfn, gfn+n) as they are now: folios with data, markers for
 * the rest (runs of one kind merged). */
static int send_range(struct sender *s, uint64_t gfn, uint64_t n)
{
	uint64_t end = gfn + n, mstart = 0, mlen = 0;
	uint8_t mkind = 0;
	int rc;

	while (gfn < end) {
		memdesc_t md = memdesc_lookup(s->gm, gfn);
		uint64_t step = 1;      /* frames of one marker kind from gfn */
		if (!(gfn & (MM_REGION_PAGES - 1)) && end - gfn >= MM_REGION_PAGES &&
		    memdesc_region_uniform(s->gm, gfn, &md) && !memdesc_folio(md))
			step = MM_REGION_PAGES;
		enum memdesc_type t = memdesc_type(md);
		struct folio *f = (t == MEMDESC_FOLIO || t == MEMDESC_RESERVED) ? folio_get_gfn(s->gm, gfn) : NULL;

		if (f) {
			if (mlen && (rc = put_marker(s, mstart, mlen, mkind))) {
				folio_put(f);
				return rc;
			}
			mlen = 0;
			uint64_t fend = folio_gfn(f) + folio_nr_pages(f);
			uint64_t k = (fend < end ? fend : end) - gfn;
			rc = put_folio_pages(s, f, gfn, k);
			folio_put(f);
			if (rc)
				return rc;
			gfn += k;
			continue;
		}
		uint8_t kind = marker_kind(t);
		if (!kind) {            /* MMIO, or a folio that just went away: */
			if (t == MEMDESC_MMIO) {
				gfn += step;
				continue;
			}
			kind = RAM_UNBACKED;
		}
		if (mlen && (kind != mkind || mstart + mlen != gfn)) {
			if ((rc = put_marker(s, mstart, mlen, mkind)))
				return rc;
			mlen = 0;
		}
		if (!mlen) {
			mstart = gfn;
			mkind = kind;
		}
		mlen += step;
		gfn += step;
	}
	if (mlen)
		return put_marker(s, mstart, mlen, mkind);
	return 0;
}

struct mig_config {
	uint64_t ram_size;
	uint32_t ncpus, nranges;
	struct mm_range ranges[8];
};

/* PREFAULT hint: the backed folios pass 1 will send, as runs of one order,
 * so the destination can fault its memory in on a second thread while this
 * one streams (first touch of host memory is its largest cost). A hint only:
 * the guest may change it before pass 1 gets there. */
static int send_prefault_hint(struct sender *s, const struct mig_config *cfg)
{
	size_t cap = SECTION_CAP / sizeof(struct mig_ram_rec), n = 0;
	struct mig_ram_rec *v = mig_out_begin(s->o, SECTION_CAP);
	if (!v)
		return mig_out_error(s->o) ? mig_out_error(s->o) : -EIO;
	for (uint32_t i = 0; i < cfg->nranges; i++) {
		uint64_t gfn = cfg->ranges[i].gpa / PAGE, end = gfn + cfg->ranges[i].size / PAGE;
		while (gfn < end && n < cap) {
			memdesc_t md;
			if (!(gfn & (MM_REGION_PAGES - 1)) && end - gfn >= MM_REGION_PAGES &&
			    memdesc_region_uniform(s->gm, gfn, &md) && !memdesc_folio(md)) {
				gfn += MM_REGION_PAGES;   /* untouched 2 MiB */
				continue;
			}
			struct folio *f = folio_get_gfn(s->gm, gfn);
			if (!f) {
				gfn++;
				continue;
			}
			uint64_t fend = folio_gfn(f) + folio_nr_pages(f), k = (fend < end ? fend : end) - gfn;
			uint8_t order = (uint8_t)folio_order(f);
			folio_put(f);
			if (n && v[n - 1].order == order && v[n - 1].gfn + v[n - 1].npages == gfn &&
			    v[n - 1].npages + k <= (1u << 30))
				v[n - 1].npages += (uint32_t)k;
			else
				v[n++] = (struct mig_ram_rec){ .gfn = gfn, .npages = (uint32_t)k,
							       .kind = RAM_DATA, .order = order };
			gfn += k;
		}
	}
	return mig_out_commit(s->o, MIG_SEC_PREFAULT, n * sizeof(*v));
}

static int send_run_cb(void *opaque, uint64_t gfn, uint64_t nr)
{
	return send_range(opaque, gfn, nr);
}

static int noop_cb(void *opaque, uint64_t gfn, uint64_t nr) { return 0; }

/* Send every dirty frame of the log. */
static int send_dirty(struct sender *s, struct dirty_log *log)
{
	struct mm_range r[8];
	size_t n = mm_ram_ranges(s->gm, r, 8);
	int rc;

	for (size_t i = 0; i < n && i < 8; i++)
		if ((rc = dirty_log_take(log, r[i].gpa / PAGE, r[i].size / PAGE, send_run_cb, s)))
			return rc;
	return sec_flush(s);
}

static int send_blob_section(struct mig_out *o, uint32_t type, const void *hdr, size_t hlen,
			     const void *p, size_t len)
{
	uint8_t *b = mig_out_begin(o, hlen + len);
	if (!b)
		return mig_out_error(o) ? mig_out_error(o) : -EMSGSIZE;
	if (hlen)
		memcpy(b, hdr, hlen);
	if (len)
		memcpy(b + hlen, p, len);
	return mig_out_commit(o, type, hlen + len);
}

static void stats_update(struct sender *s, struct dirty_log *log)
{
	pthread_mutex_lock(&mig.lock);
	mig.transferred = mig_out_bytes(s->o);
	mig.remaining = log ? dirty_log_count(log) * PAGE : 0;
	mig.normal_pages = s->data_pages;
	mig.zero_pages = s->zero_pages;
	pthread_mutex_unlock(&mig.lock);
}

static int wait_ack(int fd, char *err, size_t errlen)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	uint32_t ack;
	int rc;

	do
		rc = poll(&pfd, 1, ACK_TIMEOUT_MS);
	while (rc < 0 && errno == EINTR);
	if (rc == 0) {
		snprintf(err, errlen, "destination did not acknowledge within %d s", ACK_TIMEOUT_MS / 1000);
		return -1;
	}
	if (mig_read_full(fd, &ack, sizeof(ack)) < 0) {
		snprintf(err, errlen, "destination closed the connection before acknowledging");
		return -1;
	}
	if (ack != MIG_ACK_OK) {
		snprintf(err, errlen, "destination rejected the stream (see its log)");
		return -1;
	}
	return 0;
}

/* Send a SYNC section and wait until the destination has applied
 * everything before it: what it still has to load must not count as
 * downtime, nor hold up the switch-over. 0, or -1 with err. */
static int sync_destination(struct sender *s, int fd, uint64_t seq, char *err, size_t errlen)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	uint32_t ack;
	int rc;

	if ((rc = send_blob_section(s->o, MIG_SEC_SYNC, &seq, sizeof(seq), NULL, 0)) ||
	    (rc = mig_out_flush(s->o))) {
		snprintf(err, errlen, "sending the migration stream failed: %s", strerror(-rc));
		return -1;
	}
	do
		rc = poll(&pfd, 1, SYNC_TIMEOUT_MS);
	while (rc < 0 && errno == EINTR);
	if (atomic_load(&mig.cancel)) {
		snprintf(err, errlen, "migration cancelled");
		return -1;
	}
	if (rc == 0) {
		snprintf(err, errlen, "destination did not catch up within %d s", SYNC_TIMEOUT_MS / 1000);
		return -1;
	}
	if (mig_read_full(fd, &ack, sizeof(ack)) < 0 || ack != MIG_ACK_SYNC) {
		snprintf(err, errlen, ack == MIG_ACK_FAIL ? "destination rejected the stream (see its log)"
			 : "destination closed the connection");
		return -1;
	}
	return 0;
}

static void emit_stop_now(void)
{
	/* From this thread: the event's timestamp is the moment the vCPUs
	 * are told to stop (downtime as a client measures it starts here). */
	qmp_emit_event("STOP", NULL);
}

static int source_run(struct vm *vm, int fd, char *err, size_t errlen)
{
	struct guest_mem *gm = vm_mem(vm);
	struct dirty_tracker *t = dirty_tracker_of(gm);
	struct sender s = { .gm = gm, .base = mm_guest_base(gm) };
	struct dirty_log *log = NULL;
	struct mig_stream_hdr h = { .magic = MIG_MAGIC, .version = MIG_VERSION };
	struct mig_config cfg = { .ram_size = mm_ram_size(gm), .ncpus = (uint32_t)vm_ncpus(vm) };
	bool stopped = false;
	int rc = 0;

	if (!t) {
		snprintf(err, errlen, "no dirty tracker for guest memory");
		return -1;
	}
	s.o = mig_out_create(fd, err, errlen);
	if (!s.o)
		return -1;
	size_t nr = mm_ram_ranges(gm, cfg.ranges, 8);
	cfg.nranges = (uint32_t)(nr > 8 ? 8 : nr);
	pthread_mutex_lock(&mig.lock);
	mig.total = mig.remaining = cfg.ram_size;
	pthread_mutex_unlock(&mig.lock);

	h.crc = crc32c(0, &h, 12);
	if ((rc = mig_out_raw(s.o, &h, sizeof(h))) ||
	    (rc = send_blob_section(s.o, MIG_SEC_CONFIG, &cfg, sizeof(cfg), NULL, 0)))
		goto io_fail;

	if (vmstate_prepare(vm, err, errlen) < 0) {
		rc = -1;
		goto out;
	}
	log = dirty_log_open(t, err, errlen);
	if (!log) {
		rc = -1;
		goto out;
	}
	/* Writes before now are covered by the full pass below. */
	if (dirty_log_sync(log) < 0) {
		snprintf(err, errlen, "dirty log sync failed");
		rc = -1;
		goto out;
	}
	for (uint32_t i = 0; i < cfg.nranges; i++)
		dirty_log_take(log, cfg.ranges[i].gpa / PAGE, cfg.ranges[i].size / PAGE, noop_cb, NULL);

	pthread_mutex_lock(&mig.lock);
	mig.setup_ns = monotonic_ns() - mig.start_ns;
	pthread_mutex_unlock(&mig.lock);
	set_status(MIG_ACTIVE);

	/* Pass 1: everything. */
	uint64_t it_t0 = monotonic_ns(), it_b0 = mig_out_bytes(s.o);
	s.t0 = it_t0;
	s.bytes0 = mig_out_queued(s.o);
	s.limit = true;
	for (uint32_t i = 0; i < cfg.nranges; i++)
		s.pass1_frames += cfg.ranges[i].size / PAGE;
	if ((rc = send_prefault_hint(&s, &cfg)))
		goto io_fail;
	for (uint32_t i = 0; i < cfg.nranges; i++)
		if ((rc = send_range(&s, cfg.ranges[i].gpa / PAGE, cfg.ranges[i].size / PAGE)))
			goto io_fail;
	if ((rc = sec_flush(&s)))
		goto io_fail;
	s.pass1_frames = 0;

	/* Iterate. */
	unsigned iterations = 1, throttle = 0;
	for (;;) {
		/* What the link did in the last pass; queued bytes count once sent. */
		if ((rc = mig_out_flush(s.o)))
			goto io_fail;
		uint64_t now = monotonic_ns(), sent = mig_out_bytes(s.o) - it_b0;
		uint64_t el = now - it_t0 ? now - it_t0 : 1;
		uint64_t bw = sent * 1000000000ULL / el;             /* bytes/s */
		if (bw < (1u << 20))
			bw = 1u << 20;
		long newly = dirty_log_sync(log);
		if (newly < 0) {
			snprintf(err, errlen, "dirty log sync failed: %s", strerror((int)-newly));
			rc = -1;
			goto out;
		}
		uint64_t remaining = dirty_log_count(log) * PAGE;
		uint64_t expected_ms = remaining * 1000 / bw;
		pthread_mutex_lock(&mig.lock);
		mig.iterations = iterations;
		mig.bandwidth = bw;
		mig.dirty_rate = dirty_log_count(log) * 1000000000ULL / el;
		mig.expected_downtime = expected_ms;
		pthread_mutex_unlock(&mig.lock);
		stats_update(&s, log);
		if (remaining * 1000 <= mig.downtime_limit * bw)
			break;
		if (iterations >= mig.max_iterations) {
			/* Not silently: the downtime will exceed the limit. */
			pr_warn("migration: %u iterations without meeting the downtime limit (%llu MiB "
				"left, expected %llu ms > %llu ms, throttle %u%%): switching over anyway",
				iterations, (unsigned long long)(remaining >> 20),
				(unsigned long long)expected_ms, (unsigned long long)mig.downtime_limit,
				throttle);
			pthread_mutex_lock(&mig.lock);
			mig.cap_reached = true;
			pthread_mutex_unlock(&mig.lock);
			break;
		}
		/* Auto-converge (as QEMU's): while the pass that just ended sent
		 * `sent` bytes, the guest dirtied more than half as much -> slow
		 * its vCPUs down more. Both figures cover the same period. */
		if (iterations >= 2 && remaining > sent / 2) {
			throttle = throttle ? throttle + THROTTLE_STEP : THROTTLE_INITIAL;
			if (throttle > THROTTLE_MAX)
				throttle = THROTTLE_MAX;
			vm_throttle(vm, throttle);
			pthread_mutex_lock(&mig.lock);
			mig.throttle = throttle;
			pthread_mutex_unlock(&mig.lock);
		}
		it_t0 = monotonic_ns();
		it_b0 = mig_out_bytes(s.o);
		s.t0 = it_t0;
		s.bytes0 = mig_out_queued(s.o);
		if ((rc = send_dirty(&s, log)))
			goto io_fail;
		iterations++;
	}

	/* Before the pause: one more pass over what was dirtied meanwhile,
	 * then wait until the destination has applied everything (its
	 * socket buffers and the records it is still writing), so the pause
	 * covers only the last few pages and the device state. */
	if (dirty_log_sync(log) < 0) {
		snprintf(err, errlen, "dirty log sync failed");
		rc = -1;
		goto out;
	}
	if ((rc = send_dirty(&s, log)))
		goto io_fail;
	if (sync_destination(&s, fd, 1, err, errlen) < 0) {
		rc = -1;
		goto out;
	}
	if (dirty_log_sync(log) < 0) {
		snprintf(err, errlen, "dirty log sync failed");
		rc = -1;
		goto out;
	}
	if ((rc = send_dirty(&s, log)))
		goto io_fail;

	/* Stop and copy. */
	uint64_t stop_t0 = monotonic_ns();
	bool was_paused = vm_get_state(vm) == VM_STATE_PAUSED;
	if (!was_paused)
		emit_stop_now();
	if (vm_stop_for_migration(vm) < 0) {
		snprintf(err, errlen, "the VM stopped running during migration (status %s)",
			 vm_state_name(vm_get_state(vm)));
		rc = -1;
		goto out;
	}
	stopped = true;
	uint64_t t_stopped = monotonic_ns();
	vm_throttle(vm, 0);
	set_status(MIG_DEVICE);
	s.limit = false;
	if (dirty_log_sync(log) < 0) {
		snprintf(err, errlen, "dirty log sync failed");
		rc = -1;
		goto out;
	}
	uint64_t t_synced = monotonic_ns();
	if ((rc = send_dirty(&s, log)))
		goto io_fail;
	uint64_t t_rest = monotonic_ns();
	{
		struct blob b = { 0 };
		uint32_t idx;
		if (vmstate_save_vm(vm, &b, err, errlen) < 0) {
			free(b.p);
			rc = -1;
			goto out;
		}
		rc = send_blob_section(s.o, MIG_SEC_VM, NULL, 0, b.p, b.len);
		for (int i = 0; i < vm_ncpus(vm) && !rc; i++) {
			b.len = 0;
			if (vmstate_save_vcpu(vm, i, &b, err, errlen) < 0) {
				free(b.p);
				rc = -1;
				goto out;
			}
			idx = (uint32_t)i;
			rc = send_blob_section(s.o, MIG_SEC_VCPU, &idx, 4, b.p, b.len);
		}
		free(b.p);
		size_t ml = 0;
		void *mb = mce_state_save(vm_mce(vm), &ml, err, errlen);
		if (!mb) {
			rc = -1;
			goto out;
		}
		if (!rc)
			rc = send_blob_section(s.o, MIG_SEC_MCE, NULL, 0, mb, ml);
		free(mb);
		uint8_t dev[DEVICE_STATE_MAX];
		char name[16] = "serial";
		size_t dl = serial_save(vm_serial(vm), dev, sizeof(dev));
		if (!rc)
			rc = send_blob_section(s.o, MIG_SEC_DEVICE, name, 16, dev, dl);
		memset(name, 0, sizeof(name));
		strcpy(name, "testdev");
		dl = testdev_save(vm_testdev(vm), dev, sizeof(dev));
		if (!rc)
			rc = send_blob_section(s.o, MIG_SEC_DEVICE, name, 16, dev, dl);
		memset(name, 0, sizeof(name));
		strcpy(name, "rtc");
		dl = rtc_save(vm_rtc(vm), dev, sizeof(dev));
		if (!rc)
			rc = send_blob_section(s.o, MIG_SEC_DEVICE, name, 16, dev, dl);
		if (vm_balloon(vm)) {
			memset(name, 0, sizeof(name));
			strcpy(name, "virtio-balloon");
			dl = virtio_balloon_save_state(vm_balloon(vm), dev, sizeof(dev));
			if (!rc)
				rc = send_blob_section(s.o, MIG_SEC_DEVICE, name, 16, dev, dl);
		}
		if (rc)
			goto io_fail;
	}
	uint64_t t_sent_state = monotonic_ns();
	struct mig_end end = { .sections = mig_out_sections(s.o), .ram_pages = s.ram_pages,
			       .data_pages = s.data_pages, .ncpus = (uint32_t)vm_ncpus(vm),
			       .flags = (was_paused ? MIG_END_PAUSED : 0) | MIG_END_CONFIRM };
	if ((rc = send_blob_section(s.o, MIG_SEC_END, &end, sizeof(end), NULL, 0)) ||
	    (rc = mig_out_flush(s.o)))
		goto io_fail;
	stats_update(&s, NULL);
	uint64_t t_flushed = monotonic_ns();
	if (wait_ack(fd, err, errlen) < 0) {
		rc = -1;
		goto out;
	}
	/* The destination has loaded everything and starts only on GO: until
	 * this write succeeds the guest is ours to resume. If GO is lost on the
	 * way, neither side runs it (docs/migration.md, "Switch-over"). */
	{
		uint32_t go = MIG_ACK_GO;
		if (atomic_load(&mig.cancel)) {
			snprintf(err, errlen, "migration cancelled");
			rc = -1;
			goto out;
		}
		if (mig_write_full(fd, &go, sizeof(go)) < 0) {
			snprintf(err, errlen, "cannot confirm the switch-over to the destination: %s",
				 strerror(errno));
			rc = -1;
			goto out;
		}
	}
	if (getenv("MDVM_MIG_DEBUG"))
		pr_info("downtime: stop %.2f, sync %.2f, rest %.2f, state %.2f, end+flush %.2f, ack %.2f ms",
			(t_stopped - stop_t0) / 1e6, (t_synced - t_stopped) / 1e6, (t_rest - t_synced) / 1e6,
			(t_sent_state - t_rest) / 1e6, (t_flushed - t_sent_state) / 1e6,
			(monotonic_ns() - t_flushed) / 1e6);
	pthread_mutex_lock(&mig.lock);
	mig.downtime_ns = monotonic_ns() - stop_t0;
	mig.iterations = iterations;
	pthread_mutex_unlock(&mig.lock);
	dirty_log_close(log);
	mig_out_destroy(s.o);
	vm_migration_finish(vm, true);
	return 0;

io_fail:
	if (rc == -ECANCELED || atomic_load(&mig.cancel))
		snprintf(err, errlen, "migration cancelled");
	else
		snprintf(err, errlen, "sending the migration stream failed: %s",
			 strerror(rc < 0 ? -rc : EIO));
	rc = -1;
out:
	vm_throttle(vm, 0);
	if (log)
		dirty_log_close(log);
	mig_out_destroy(s.o);
	if (stopped) {
		vm_migration_finish(vm, false);
		if (vm_get_state(vm) == VM_STATE_RUNNING)
			loop_call(emit_main, xstrdup("RESUME"));
	}
	return rc;
}

static void *source_thread(void *arg)
{
	struct vm *vm = arg;
	char err[256] = "";
	pthread_setname_np(pthread_self(), "mig-send");
	int rc = source_run(vm, mig.fd, err, sizeof(err));

	pthread_mutex_lock(&mig.lock);
	int fd = mig.fd;
	mig.fd = -1;
	mig.end_ns = monotonic_ns();
	if (rc == 0)
		mig.status = MIG_COMPLETED;
	else if (atomic_load(&mig.cancel))
		mig.status = MIG_CANCELLED;
	else {
		mig.status = MIG_FAILED;
		snprintf(mig.error, sizeof(mig.error), "%s", err);
	}
	enum mig_status st = mig.status;
	pthread_mutex_unlock(&mig.lock);
	close(fd);
	if (st == MIG_FAILED)
		pr_err("migration failed: %s", err);
	loop_call(emit_status_main, xstrdup(status_names[st]));
	return NULL;
}

int migration_start(struct vm *vm, const char *uri, char *err, size_t errlen)
{
	struct mig_addr a;
	int fd;

	if (migration_active()) {
		snprintf(err, errlen, "There's a migration process in progress");
		return -1;
	}
	/* As QEMU: a paused guest migrates too and stays paused on the
	 * destination. */
	if (vm_get_state(vm) != VM_STATE_RUNNING && vm_get_state(vm) != VM_STATE_PAUSED) {
		snprintf(err, errlen, "The VM is not running or paused (status: %s)",
			 vm_state_name(vm_get_state(vm)));
		return -1;
	}
	if (uri_parse(uri, &a, false, err, errlen) < 0)
		return -1;
	fd = socket(a.family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&a.sa, a.len) < 0) {
		snprintf(err, errlen, "Failed to connect to '%s': %s", uri, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	sock_tune(fd, a.family);
	if (mig.thread_live) {
		pthread_join(mig.thread, NULL);
		mig.thread_live = false;
	}
	pthread_mutex_lock(&mig.lock);
	mig.vm = vm;
	mig.fd = fd;
	atomic_store(&mig.cancel, false);
	mig.error[0] = 0;
	mig.start_ns = monotonic_ns();
	mig.setup_ns = mig.end_ns = mig.downtime_ns = 0;
	mig.transferred = mig.iterations = mig.dirty_rate = 0;
	mig.total = mig.remaining = mm_ram_size(vm_mem(vm));   /* nothing accounted for yet */
	mig.expected_downtime = mig.normal_pages = mig.zero_pages = mig.bandwidth = 0;
	mig.throttle = 0;
	mig.cap_reached = false;
	mig.status = MIG_SETUP;
	pthread_mutex_unlock(&mig.lock);
	qmp_emit_event("MIGRATION", json_pack("{s:s}", "status", "setup"));
	if (pthread_create(&mig.thread, NULL, source_thread, vm)) {
		close(fd);
		mig.fd = -1;
		mig.status = MIG_FAILED;
		snprintf(err, errlen, "cannot create the migration thread");
		return -1;
	}
	mig.thread_live = true;
	return 0;
}

int migration_cancel(struct vm *vm)
{
	(void)vm;
	pthread_mutex_lock(&mig.lock);
	bool active = mig.status == MIG_SETUP || mig.status == MIG_ACTIVE || mig.status == MIG_DEVICE;
	if (active) {
		atomic_store(&mig.cancel, true);
		mig.status = MIG_CANCELLING;
		/* Wake a send or the wait for the acknowledgement. */
		if (mig.fd >= 0)
			shutdown(mig.fd, SHUT_RDWR);
	}
	pthread_mutex_unlock(&mig.lock);
	if (active)
		qmp_emit_event("MIGRATION", json_pack("{s:s}", "status", "cancelling"));
	return 0;
}

json_t *migration_query(struct vm *vm)
{
	json_t *r = json_object();

	(void)vm;
	pthread_mutex_lock(&mig.lock);
	if (mig.status == MIG_NONE) {
		pthread_mutex_unlock(&mig.lock);
		return r;
	}
	uint64_t now = mig.end_ns ? mig.end_ns : monotonic_ns();
	json_object_set_new(r, "status", json_string(status_names[mig.status]));
	json_object_set_new(r, "total-time", json_integer((json_int_t)((now - mig.start_ns) / 1000000)));
	json_object_set_new(r, "setup-time", json_integer((json_int_t)(mig.setup_ns / 1000000)));
	if (mig.status == MIG_COMPLETED)
		json_object_set_new(r, "downtime", json_integer((json_int_t)(mig.downtime_ns / 1000000)));
	else
		json_object_set_new(r, "expected-downtime", json_integer((json_int_t)mig.expected_downtime));
	double secs = (double)(now - mig.start_ns) / 1e9;
	json_t *ram = json_pack("{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:f,s:I}",
		"transferred", (json_int_t)mig.transferred,
		"remaining", (json_int_t)mig.remaining,
		"total", (json_int_t)mig.total,
		"duplicate", (json_int_t)mig.zero_pages,
		"normal", (json_int_t)mig.normal_pages,
		"normal-bytes", (json_int_t)(mig.normal_pages * PAGE),
		"dirty-sync-count", (json_int_t)mig.iterations,
		"dirty-pages-rate", (json_int_t)mig.dirty_rate,
		"mbps", secs > 0 ? (double)mig.transferred * 8 / 1e6 / secs : 0.0,
		"page-size", (json_int_t)PAGE);
	json_object_set_new(r, "ram", ram);
	if (mig.throttle)
		json_object_set_new(r, "cpu-throttle-percentage", json_integer(mig.throttle));
	if (mig.cap_reached)
		json_object_set_new(r, "x-iteration-limit-reached", json_true());
	json_object_set_new(r, "x-dirty-tracking", json_string(dirty_kvm_mode()));
	if (mig.status == MIG_FAILED && mig.error[0])
		json_object_set_new(r, "error-desc", json_string(mig.error));
	pthread_mutex_unlock(&mig.lock);
	return r;
}

/* ---- destination */
struct pending_state {
	uint8_t *vm_blob;
	size_t vm_len;
	uint8_t **vcpu;
	size_t *vcpu_len;
	uint8_t *serial, *testdev, *rtc, *balloon, *mce;
	size_t serial_len, testdev_len, rtc_len, balloon_len, mce_len;
};

static struct {
	struct vm *vm;
	int lfd;
	int fd;                 /* the source's connection, under lock */
	char path[108];
	pthread_t thread;
	bool thread_live;
	bool paused;            /* the source's guest was paused */
	bool confirm;           /* the source will send MIG_ACK_GO after our MIG_ACK_OK */
	pthread_mutex_t lock;
} inc = { .lfd = -1, .fd = -1, .lock = PTHREAD_MUTEX_INITIALIZER };

/* Destination: fault in the folios of the PREFAULT hint from its end
 * backwards while the receiver fills from the front; they meet in the
 * middle. The receiver publishes how far pass 1 got (applied) under the lock;
 * the prefaulter never populates what is behind it (a marker may have
 * released that on purpose). */
static bool gfn_range_ok(const struct mm_range *r, size_t nr, uint64_t gfn, uint64_t n);

struct prefault {
	struct guest_mem *gm;
	struct mig_ram_rec *v;
	size_t n;
	pthread_t thread;
	pthread_mutex_t lock;
	uint64_t applied;       /* gfns below this were handled by the receiver */
	atomic_bool stop;
	bool running;
};

static void *prefault_thread(void *arg)
{
	struct prefault *pf = arg;
	uint8_t *base = mm_guest_base(pf->gm);
	pthread_setname_np(pthread_self(), "mig-prefault");
	for (size_t i = pf->n; i-- > 0 && !atomic_load(&pf->stop);) {
		const struct mig_ram_rec *r = &pf->v[i];
		uint64_t lo = r->gfn, hi = r->gfn + r->npages;
		while (hi > lo && !atomic_load(&pf->stop)) {
			/* One 2 MiB region (or what is left of the run) at a time. */
			uint64_t start = (hi - 1) & ~(uint64_t)(MM_REGION_PAGES - 1);
			if (start < lo)
				start = lo;
			pthread_mutex_lock(&pf->lock);
			if (pf->applied > start) {
				pthread_mutex_unlock(&pf->lock);
				return NULL;
			}
			if (mm_populate(pf->gm, start, hi - start, r->order) == 0)
				madvise(base + start * PAGE, (hi - start) * PAGE, MADV_POPULATE_WRITE);
			pthread_mutex_unlock(&pf->lock);
			hi = start;
		}
	}
	return NULL;
}

static int prefault_start(struct prefault *pf, struct guest_mem *gm, const void *p, uint32_t len,
			  char *err, size_t errlen)
{
	if (pf->v || len % sizeof(struct mig_ram_rec)) {
		snprintf(err, errlen, "bad prefault section");
		return -1;
	}
	pf->gm = gm;
	pf->n = len / sizeof(struct mig_ram_rec);
	pf->v = xmalloc(len + 1);
	memcpy(pf->v, p, len);
	struct mm_range r[8];
	size_t nr = mm_ram_ranges(gm, r, 8);
	for (size_t i = 0; i < pf->n; i++) {
		const struct mig_ram_rec *e = &pf->v[i];
		if (!e->npages || e->kind != RAM_DATA || e->order > MM_MAX_ORDER ||
		    !gfn_range_ok(r, nr > 8 ? 8 : nr, e->gfn, e->npages)) {
			snprintf(err, errlen, "prefault section: bad run (gfn 0x%llx, %u pages)",
				 (unsigned long long)e->gfn, e->npages);
			return -1;
		}
	}
	/* Not on hugetlb: its pool is the host's fixed set of hugepages, and
	 * claiming them for folios the source gives back meanwhile (balloon)
	 * can starve the pass that needs them. */
	if (mm_backing(gm) == MM_BACKING_HUGETLB)
		return 0;
	pthread_mutex_init(&pf->lock, NULL);
	pf->running = pthread_create(&pf->thread, NULL, prefault_thread, pf) == 0;
	return 0;
}

/* The receiver is about to handle [gfn, gfn+n). */
static void prefault_advance(struct prefault *pf, uint64_t end)
{
	if (!pf || !pf->running || pf->applied >= end)
		return;
	pthread_mutex_lock(&pf->lock);
	if (end > pf->applied)
		pf->applied = end;
	pthread_mutex_unlock(&pf->lock);
}

static void prefault_stop(struct prefault *pf)
{
	if (pf->running) {
		atomic_store(&pf->stop, true);
		pthread_join(pf->thread, NULL);
		pthread_mutex_destroy(&pf->lock);
		pf->running = false;
	}
	free(pf->v);
	pf->v = NULL;
}

static bool gfn_range_ok(const struct mm_range *r, size_t nr, uint64_t gfn, uint64_t n)
{
	for (size_t i = 0; i < nr; i++) {
		uint64_t lo = r[i].gpa / PAGE, hi = (r[i].gpa + r[i].size) / PAGE;
		if (gfn >= lo && gfn < hi && n <= hi - gfn)
			return true;
	}
	return false;
}

static bool frame_backed(struct guest_mem *gm, uint64_t gfn)
{
	enum memdesc_type t = memdesc_type(memdesc_lookup(gm, gfn));
	return t == MEMDESC_FOLIO || t == MEMDESC_RESERVED;
}

/* One RAM section, read record by record: page data goes from the socket
 * straight into guest memory (no bounce copy). The section's checksum is
 * checked at its end; a mismatch fails the migration before the guest ever
 * runs here. */
static int apply_ram(struct guest_mem *gm, struct mig_in *in, uint64_t *pages,
		     uint64_t *data_pages, struct prefault *pf, char *err, size_t errlen)
{
	struct mm_range r[8];
	size_t nr = mm_ram_ranges(gm, r, 8);
	uint8_t *base = mm_guest_base(gm);
	const void *q;

	if (nr > 8)
		nr = 8;
	while (mig_in_left(in)) {
		struct mig_ram_rec rec;
		if (mig_in_left(in) < sizeof(rec) || !(q = mig_in_take(in, sizeof(rec), err, errlen)))
			return snprintf(err, errlen, "RAM section: truncated record"), -1;
		memcpy(&rec, q, sizeof(rec));
		uint8_t kind = rec.kind & ~RAM_RESERVED;
		bool reserved = rec.kind & RAM_RESERVED;
		if (!rec.npages || kind == 0 || kind >= RAM_KIND_NR || rec.order > MM_MAX_ORDER ||
		    !gfn_range_ok(r, nr, rec.gfn, rec.npages))
			return snprintf(err, errlen, "RAM section: bad record (gfn 0x%llx, %u pages, kind %u)",
					(unsigned long long)rec.gfn, rec.npages, rec.kind), -1;
		uint64_t gpa = rec.gfn * PAGE, n = rec.npages;
		*pages += n;
		prefault_advance(pf, rec.gfn + n);
		switch (kind) {
		case RAM_DATA: {
			if (n > MM_REGION_PAGES)
				return snprintf(err, errlen, "RAM section: data record of %llu pages",
						(unsigned long long)n), -1;
			unsigned words = (unsigned)((n + 63) / 64), present = 0;
			uint64_t bm[MM_REGION_PAGES / 64], was[MM_REGION_PAGES / 64] = { 0 };
			if (mig_in_left(in) < words * 8 || !(q = mig_in_take(in, words * 8, err, errlen)))
				return snprintf(err, errlen, "RAM section: truncated bitmap"), -1;
			memcpy(bm, q, words * 8);
			for (unsigned w = 0; w < words; w++)
				present += (unsigned)__builtin_popcountll(bm[w]);
			if ((uint64_t)mig_in_left(in) < (uint64_t)present * PAGE)
				return snprintf(err, errlen, "RAM section: truncated page data"), -1;
			for (uint64_t i = 0; i < n; i++)
				if (frame_backed(gm, rec.gfn + i))
					was[i / 64] |= 1ULL << (i % 64);
			if (reserved && mm_mark_reserved(gm, gpa, n * PAGE) < 0)
				return snprintf(err, errlen, "cannot type 0x%llx as reserved",
						(unsigned long long)gpa), -1;
			int rc = mm_populate(gm, rec.gfn, n, rec.order);
			if (rc < 0)
				return snprintf(err, errlen, "cannot back guest RAM at 0x%llx: %s",
						(unsigned long long)gpa, strerror(-rc)), -1;
			for (uint64_t i = 0; i < n;) {
				uint8_t *dst = base + gpa + i * PAGE;
				if (bm[i / 64] >> (i % 64) & 1) {
					uint64_t k = 1;   /* a run of present pages: one read */
					while (i + k < n && (bm[(i + k) / 64] >> ((i + k) % 64) & 1))
						k++;
					if (mig_in_read(in, dst, (uint32_t)(k * PAGE), err, errlen) < 0)
						return -1;
					i += k;
					continue;
				}
				if (was[i / 64] >> (i % 64) & 1)
					memset(dst, 0, PAGE);
				i++;
			}
			*data_pages += present;
			break;
		}
		case RAM_ZERO:
			if (reserved)
				mm_mark_reserved(gm, gpa, n * PAGE);
			for (uint64_t i = 0; i < n; i++)
				if (frame_backed(gm, rec.gfn + i))
					memset(base + gpa + i * PAGE, 0, PAGE);
			break;
		case RAM_UNBACKED:
		case RAM_BALLOONED: {
			bool any = kind == RAM_BALLOONED;
			for (uint64_t i = 0; i < n && !any; i++)
				any = memdesc_type(memdesc_lookup(gm, rec.gfn + i)) != MEMDESC_UNBACKED;
			if (any) {
				int rc = mm_release_range(gm, rec.gfn, n, kind == RAM_BALLOONED ?
							  MEMDESC_BALLOONED : MEMDESC_UNBACKED);
				if (rc == -EOPNOTSUPP && kind == RAM_UNBACKED) {
					/* The backing cannot give back part of this 2 MiB page
					 * (hugetlb region holding boot data): zeros read the same. */
					for (uint64_t i = 0; i < n; i++)
						if (frame_backed(gm, rec.gfn + i))
							memset(base + gpa + i * PAGE, 0, PAGE);
					rc = 0;
				}
				if (rc < 0)
					return snprintf(err, errlen, "cannot release 0x%llx+%llu pages: %s",
							(unsigned long long)gpa, (unsigned long long)n,
							strerror(-rc)), -1;
			}
			break;
		}
		case RAM_POISONED:
			for (uint64_t i = 0; i < n; i++) {
				if (memdesc_type(memdesc_lookup(gm, rec.gfn + i)) == MEMDESC_POISONED)
					continue;
				int rc = mm_poison_page(gm, rec.gfn + i, NULL);
				if (rc < 0)
					return snprintf(err, errlen, "cannot mark 0x%llx poisoned: %s",
							(unsigned long long)(gpa + i * PAGE), strerror(-rc)), -1;
			}
			break;
		}
	}
	return mig_in_section_end(in, err, errlen);
}

static void incoming_fail_main(void *opaque)
{
	struct vm *vm = opaque;
	qmp_emit_event("MIGRATION", json_pack("{s:s}", "status", "failed"));
	vm_request_exit(vm, 1, "incoming migration failed");
}

static void incoming_done_main(void *opaque)
{
	struct vm *vm = opaque;
	if ((inc.paused ? vm_start_paused(vm) : vm_start(vm)) < 0) {
		vm_request_exit(vm, 1, "cannot start the vCPUs after migration");
		return;
	}
	qmp_emit_event("MIGRATION", json_pack("{s:s}", "status", "completed"));
	if (!inc.paused)
		qmp_emit_event("RESUME", NULL);
}

static int incoming_receive(struct vm *vm, int fd, char *err, size_t errlen)
{
	struct guest_mem *gm = vm_mem(vm);
	struct mig_in *in = mig_in_create(fd, err, errlen);
	struct pending_state ps = { 0 };
	struct prefault pf = { 0 };
	uint64_t sections = 0, pages = 0, data_pages = 0;
	int ncpus = vm_ncpus(vm), rc = -1;
	bool have_config = false, done = false;
	uint32_t type, len;
	void *p;

	if (!in)
		return -1;
	ps.vcpu = xcalloc((size_t)ncpus, sizeof(*ps.vcpu));
	ps.vcpu_len = xcalloc((size_t)ncpus, sizeof(*ps.vcpu_len));
	if (mig_in_header(in, err, errlen) < 0)
		goto out;
	while (!done) {
		if (mig_in_section_begin(in, &type, &len, err, errlen) < 0)
			goto out;
		if (type == MIG_SEC_RAM && have_config) {
			if (apply_ram(gm, in, &pages, &data_pages, &pf, err, errlen) < 0)
				goto out;
			sections++;
			continue;
		}
		if (mig_in_section_payload(in, &p, err, errlen) < 0)
			goto out;
		if (!have_config && type != MIG_SEC_CONFIG) {
			snprintf(err, errlen, "stream does not start with the configuration section");
			goto out;
		}
		switch (type) {
		case MIG_SEC_CONFIG: {
			struct mig_config c, mine = { .ram_size = mm_ram_size(gm), .ncpus = (uint32_t)ncpus };
			size_t nr = mm_ram_ranges(gm, mine.ranges, 8);
			mine.nranges = (uint32_t)(nr > 8 ? 8 : nr);
			if (have_config || len != sizeof(c)) {
				snprintf(err, errlen, "bad configuration section");
				goto out;
			}
			memcpy(&c, p, sizeof(c));
			if (c.ram_size != mine.ram_size || c.ncpus != mine.ncpus || c.nranges != mine.nranges ||
			    memcmp(c.ranges, mine.ranges, sizeof(c.ranges[0]) * mine.nranges)) {
				snprintf(err, errlen, "configuration mismatch: source has %llu MiB RAM and %u "
					 "vCPUs, this VM %llu MiB and %u (start the destination with the "
					 "source's configuration)",
					 (unsigned long long)(c.ram_size >> 20), c.ncpus,
					 (unsigned long long)(mine.ram_size >> 20), mine.ncpus);
				goto out;
			}
			have_config = true;
			break;
		}
		case MIG_SEC_RAM:   /* applied above */
			break;
		case MIG_SEC_SYNC: {
			/* Everything before it is applied: tell the source. */
			uint32_t ack = MIG_ACK_SYNC;
			if (len != 8) {
				snprintf(err, errlen, "bad sync section");
				goto out;
			}
			if (mig_write_full(fd, &ack, sizeof(ack)) < 0) {
				snprintf(err, errlen, "cannot answer the source: %s", strerror(errno));
				goto out;
			}
			break;
		}
		case MIG_SEC_PREFAULT:
			if (prefault_start(&pf, gm, p, len, err, errlen) < 0)
				goto out;
			break;
		case MIG_SEC_MCE:
			free(ps.mce);
			ps.mce = xmalloc(len + 1);
			memcpy(ps.mce, p, len);
			ps.mce_len = len;
			break;
		case MIG_SEC_VM:
			free(ps.vm_blob);
			ps.vm_blob = xmalloc(len + 1);
			memcpy(ps.vm_blob, p, len);
			ps.vm_len = len;
			break;
		case MIG_SEC_VCPU: {
			uint32_t idx;
			if (len < 4) {
				snprintf(err, errlen, "bad vCPU section");
				goto out;
			}
			memcpy(&idx, p, 4);
			if (idx >= (uint32_t)ncpus) {
				snprintf(err, errlen, "vCPU section for vcpu %u, this VM has %d", idx, ncpus);
				goto out;
			}
			free(ps.vcpu[idx]);
			ps.vcpu[idx] = xmalloc(len);
			memcpy(ps.vcpu[idx], (uint8_t *)p + 4, len - 4);
			ps.vcpu_len[idx] = len - 4;
			break;
		}
		case MIG_SEC_DEVICE: {
			char name[17] = { 0 };
			if (len < 16) {
				snprintf(err, errlen, "bad device section");
				goto out;
			}
			memcpy(name, p, 16);
			if (!strcmp(name, "virtio-balloon")) {
				free(ps.balloon);
				ps.balloon = xmalloc(len - 16 + 1);
				memcpy(ps.balloon, (uint8_t *)p + 16, len - 16);
				ps.balloon_len = len - 16;
				break;
			}
			uint8_t **dst = !strcmp(name, "serial") ? &ps.serial :
					!strcmp(name, "testdev") ? &ps.testdev :
					!strcmp(name, "rtc") ? &ps.rtc : NULL;
			if (!dst) {
				snprintf(err, errlen, "state for unknown device '%s'", name);
				goto out;
			}
			free(*dst);
			*dst = xmalloc(len - 16 + 1);
			memcpy(*dst, (uint8_t *)p + 16, len - 16);
			*(dst == &ps.serial ? &ps.serial_len : dst == &ps.testdev ? &ps.testdev_len :
			  &ps.rtc_len) = len - 16;
			break;
		}
		case MIG_SEC_END: {
			struct mig_end e;
			if (len != sizeof(e)) {
				snprintf(err, errlen, "bad end section");
				goto out;
			}
			memcpy(&e, p, sizeof(e));
			if (e.sections != sections || e.ram_pages != pages || e.data_pages != data_pages ||
			    e.ncpus != (uint32_t)ncpus) {
				snprintf(err, errlen, "stream totals do not match: %llu sections, %llu pages, "
					 "%llu data pages sent; %llu, %llu, %llu received",
					 (unsigned long long)e.sections, (unsigned long long)e.ram_pages,
					 (unsigned long long)e.data_pages, (unsigned long long)sections,
					 (unsigned long long)pages, (unsigned long long)data_pages);
				goto out;
			}
			if (e.flags & ~(MIG_END_PAUSED | MIG_END_CONFIRM)) {
				snprintf(err, errlen, "end section: unknown flags 0x%x", e.flags);
				goto out;
			}
			inc.paused = e.flags & MIG_END_PAUSED;
			inc.confirm = e.flags & MIG_END_CONFIRM;
			done = true;
			break;
		}
		}
		sections++;
	}
	prefault_stop(&pf);
	/* Everything arrived and checked out: load the state. */
	if (!ps.vm_blob || !ps.serial || !ps.testdev || !ps.mce) {
		snprintf(err, errlen, "stream lacks %s state", !ps.vm_blob ? "VM" :
			 !ps.mce ? "machine-check" : "device");
		goto out;
	}
	for (int i = 0; i < ncpus; i++)
		if (!ps.vcpu[i]) {
			snprintf(err, errlen, "stream lacks the state of vcpu %d", i);
			goto out;
		}
	if (vmstate_load_vm(vm, ps.vm_blob, ps.vm_len, err, errlen) < 0)
		goto out;
	for (int i = 0; i < ncpus; i++)
		if (vmstate_load_vcpu(vm, i, ps.vcpu[i], ps.vcpu_len[i], err, errlen) < 0)
			goto out;
	/* After the vCPUs' MSRs: the native back end's registers are MSRs too. */
	if (mce_state_load(vm_mce(vm), ps.mce, ps.mce_len, err, errlen) < 0)
		goto out;
	if (serial_load(vm_serial(vm), ps.serial, ps.serial_len) < 0 ||
	    testdev_load(vm_testdev(vm), ps.testdev, ps.testdev_len) < 0 ||
	    !ps.rtc || rtc_load(vm_rtc(vm), ps.rtc, ps.rtc_len) < 0) {
		snprintf(err, errlen, "device state not accepted (version mismatch?)");
		goto out;
	}
	if (!vm_balloon(vm) != !ps.balloon) {
		snprintf(err, errlen, "virtio balloon on the %s only (--balloon must match)",
			 ps.balloon ? "source" : "destination");
		goto out;
	}
	if (ps.balloon && virtio_balloon_load_state(vm_balloon(vm), ps.balloon, ps.balloon_len,
						    err, errlen) < 0)
		goto out;
	pr_info("incoming migration: %llu MiB received, %llu pages with data",
		(unsigned long long)(mig_in_bytes(in) >> 20), (unsigned long long)data_pages);
	rc = 0;
out:
	prefault_stop(&pf);
	free(ps.vm_blob);
	free(ps.serial);
	free(ps.testdev);
	free(ps.rtc);
	free(ps.balloon);
	free(ps.mce);
	for (int i = 0; i < ncpus; i++)
		free(ps.vcpu[i]);
	free(ps.vcpu);
	free(ps.vcpu_len);
	mig_in_destroy(in);
	return rc;
}

/* Our MIG_ACK_OK may not have reached the source (a cut connection): it
 * then resumes its guest. Run ours only once it says it will not. */
static int wait_go(int fd, char *err, size_t errlen)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	uint32_t go = 0;
	int rc;

	do
		rc = poll(&pfd, 1, ACK_TIMEOUT_MS);
	while (rc < 0 && errno == EINTR);
	if (rc == 0) {
		snprintf(err, errlen, "the source did not confirm the switch-over within %d s",
			 ACK_TIMEOUT_MS / 1000);
		return -1;
	}
	if (mig_read_full(fd, &go, sizeof(go)) < 0 || go != MIG_ACK_GO) {
		snprintf(err, errlen, "the source did not confirm the switch-over (%s): not "
			 "running the guest here", go ? "bad answer" : "connection closed");
		return -1;
	}
	return 0;
}

static void *incoming_thread(void *arg)
{
	struct vm *vm = arg;
	char err[512] = "";
	int fd;

	pthread_setname_np(pthread_self(), "mig-recv");
	do
		fd = accept4(inc.lfd, NULL, NULL, SOCK_CLOEXEC);
	while (fd < 0 && errno == EINTR);
	pthread_mutex_lock(&inc.lock);
	close(inc.lfd);
	inc.lfd = -1;
	inc.fd = fd;
	pthread_mutex_unlock(&inc.lock);
	if (inc.path[0])
		unlink(inc.path);
	if (fd < 0) {
		pr_err("incoming migration: accept: %s", strerror(errno));
		loop_call(incoming_fail_main, vm);
		return NULL;
	}
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	sock_tune(fd, getsockname(fd, (struct sockaddr *)&ss, &sl) == 0 ? ss.ss_family : AF_UNIX);
	loop_call(emit_status_main, xstrdup("active"));
	int rc = incoming_receive(vm, fd, err, sizeof(err));
	uint32_t ack = rc == 0 ? MIG_ACK_OK : MIG_ACK_FAIL;
	if (mig_write_full(fd, &ack, sizeof(ack)) < 0 && rc == 0) {
		/* The source cannot know we have it: it will resume its guest.
		 * Running ours too would make two copies. */
		snprintf(err, sizeof(err), "cannot acknowledge to the source: %s", strerror(errno));
		rc = -1;
	}
	if (rc == 0 && inc.confirm && wait_go(fd, err, sizeof(err)) < 0)
		rc = -1;
	pthread_mutex_lock(&inc.lock);
	inc.fd = -1;
	pthread_mutex_unlock(&inc.lock);
	close(fd);
	if (rc < 0) {
		pr_err("incoming migration failed: %s", err);
		loop_call(incoming_fail_main, vm);
	} else {
		loop_call(incoming_done_main, vm);
	}
	return NULL;
}

int migration_incoming_listen(struct vm *vm, const char *uri, char *err, size_t errlen)
{
	struct mig_addr a;
	int one = 1;

	if (uri_parse(uri, &a, true, err, errlen) < 0)
		return -1;
	inc.vm = vm;
	inc.lfd = socket(a.family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (inc.lfd < 0) {
		snprintf(err, errlen, "--incoming: socket: %s", strerror(errno));
		return -1;
	}
	setsockopt(inc.lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (a.family == AF_UNIX) {
		struct sockaddr_un *un = (struct sockaddr_un *)&a.sa;
		unlink(un->sun_path);
		snprintf(inc.path, sizeof(inc.path), "%s", un->sun_path);
	}
	if (bind(inc.lfd, (struct sockaddr *)&a.sa, a.len) < 0 || listen(inc.lfd, 1) < 0) {
		snprintf(err, errlen, "--incoming %s: %s", uri, strerror(errno));
		close(inc.lfd);
		inc.lfd = -1;
		return -1;
	}
	vm_set_incoming(vm);
	return 0;
}

int migration_incoming_start(struct vm *vm)
{
	if (pthread_create(&inc.thread, NULL, incoming_thread, vm)) {
		pr_err("cannot create the incoming migration thread");
		return -1;
	}
	inc.thread_live = true;
	return 0;
}

/* Wait for a thread, at most `ms`. */
static bool join_within(pthread_t t, unsigned ms)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += ms / 1000;
	ts.tv_nsec += (long)(ms % 1000) * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	return pthread_timedjoin_np(t, NULL, &ts) == 0;
}

bool migration_shutdown(struct vm *vm)
{
	bool ok = true;
	migration_cancel(vm);
	if (mig.thread_live) {
		ok = join_within(mig.thread, 10000);
		mig.thread_live = !ok;
	}
	if (inc.thread_live) {
		/* Wake the accept or the receive; the thread then fails the
		 * migration (a no-op now that the main loop has ended). */
		pthread_mutex_lock(&inc.lock);
		if (inc.lfd >= 0)
			shutdown(inc.lfd, SHUT_RDWR);
		if (inc.fd >= 0)
			shutdown(inc.fd, SHUT_RDWR);
		pthread_mutex_unlock(&inc.lock);
		bool joined = join_within(inc.thread, 10000);
		inc.thread_live = !joined;
		ok = ok && joined;
	}
	return ok;
}
