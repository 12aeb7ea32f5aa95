/* Migration stream framing and io_uring I/O (migration_stream.h).
 *
 * Sender: sections are built in place in one of a few buffers; one send is
 * in flight at a time (a byte stream must stay in order, and a short send
 * must be finished before the next one starts), while the caller fills the
 * next buffer. Receiver: header, then payload, each with MSG_WAITALL. */
#include <errno.h>
#include <liburing.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "migration_stream.h"
#include "util.h"

/* ---- CRC32C (Castagnoli): SSE4.2 when the CPU has it, else a table. */
static uint32_t crc_table[8][256];

static void crc_table_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? (c >> 1) ^ 0x82f63b78u : c >> 1;
		crc_table[0][i] = c;
	}
	for (uint32_t i = 0; i < 256; i++)
		for (int t = 1; t < 8; t++)
			crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
}

static uint32_t crc32c_sw(uint32_t crc, const uint8_t *p, size_t len)
{
	while (len >= 8) {
		uint64_t v;
		memcpy(&v, p, 8);
		v ^= crc;
		crc = crc_table[7][v & 0xff] ^ crc_table[6][(v >> 8) & 0xff] ^
		      crc_table[5][(v >> 16) & 0xff] ^ crc_table[4][(v >> 24) & 0xff] ^
		      crc_table[3][(v >> 32) & 0xff] ^ crc_table[2][(v >> 40) & 0xff] ^
		      crc_table[1][(v >> 48) & 0xff] ^ crc_table[0][v >> 56];
		p += 8;
		len -= 8;
	}
	while (len--)
		crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
	return crc;
}

/* crc32q has a 3-cycle latency and a throughput of one a cycle: three
 * streams over consecutive CRC_BLK-byte blocks run 3x as fast. The CRC of
 * the later blocks is shifted in by a linear map (the CRC of zeros), kept as
 * byte tables built once from its 32 basis vectors. */
#define CRC_BLK 4096
static uint32_t crc_shift_tab[2][4][256];   /* shift by CRC_BLK, 2 * CRC_BLK bytes */
static pthread_once_t crc_shift_once = PTHREAD_ONCE_INIT;

__attribute__((target("sse4.2")))
static uint32_t crc_zeros_hw(uint32_t crc, size_t len)
{
	uint64_t c = crc;
	for (size_t i = 0; i < len; i += 8)
		c = __builtin_ia32_crc32di(c, 0);
	return (uint32_t)c;
}

static void crc_shift_init(void)
{
	for (int s = 0; s < 2; s++) {
		uint32_t basis[32];
		for (int bit = 0; bit < 32; bit++)
			basis[bit] = crc_zeros_hw(1u << bit, (size_t)(s + 1) * CRC_BLK);
		for (int j = 0; j < 4; j++)
			for (uint32_t b = 0; b < 256; b++) {
				uint32_t v = 0;
				for (int bit = 0; bit < 8; bit++)
					if (b >> bit & 1)
						v ^= basis[8 * j + bit];
				crc_shift_tab[s][j][b] = v;
			}
	}
}

static inline uint32_t crc_shift(int s, uint32_t c)
{
	return crc_shift_tab[s][0][c & 0xff] ^ crc_shift_tab[s][1][(c >> 8) & 0xff] ^
	       crc_shift_tab[s][2][(c >> 16) & 0xff] ^ crc_shift_tab[s][3][c >> 24];
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p, size_t len)
{
	uint64_t c = crc;

	if (len >= 3 * CRC_BLK) {
		pthread_once(&crc_shift_once, crc_shift_init);
		do {
			uint64_t a = c, b = 0, d = 0;
			for (size_t i = 0; i < CRC_BLK; i += 8) {
				uint64_t va, vb, vd;
				memcpy(&va, p + i, 8);
				memcpy(&vb, p + CRC_BLK + i, 8);
				memcpy(&vd, p + 2 * CRC_BLK + i, 8);
				a = __builtin_ia32_crc32di(a, va);
				b = __builtin_ia32_crc32di(b, vb);
				d = __builtin_ia32_crc32di(d, vd);
			}
			c = crc_shift(1, (uint32_t)a) ^ crc_shift(0, (uint32_t)b) ^ (uint32_t)d;
			p += 3 * CRC_BLK;
			len -= 3 * CRC_BLK;
		} while (len >= 3 * CRC_BLK);
	}
	while (len >= 8) {
		uint64_t v;
		memcpy(&v, p, 8);
		c = __builtin_ia32_crc32di(c, v);
		p += 8;
		len -= 8;
	}
	while (len--)
		c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
	return (uint32_t)c;
}

uint32_t crc32c(uint32_t crc, const void *buf, size_t len)
{
	static int hw = -1;

	if (hw < 0) {
		__builtin_cpu_init();
		hw = __builtin_cpu_supports("sse4.2") && !getenv("MDVM_CRC_SW");
		if (!hw)
			crc_table_init();
	}
	crc = ~crc;
	crc = hw ? crc32c_hw(crc, buf, len) : crc32c_sw(crc, buf, len);
	return ~crc;
}

static void section_hdr_fill(struct mig_section_hdr *h, uint32_t type, uint32_t len, uint32_t crc)
{
	h->type = type;
	h->len = len;
	h->crc = crc;
	h->hcrc = crc32c(0, h, 12);
}

/* ---- sender */
#define OUT_BUFS    3
#define OUT_BUFSIZE (8u << 20)

struct out_buf {
	uint8_t *p;
	size_t cap, len, sent;
	int state;          /* 0 free, 1 filling, 2 queued, 3 in flight */
	int next;           /* FIFO of queued buffers */
};

struct mig_out {
	int fd;
	struct io_uring ring;
	struct out_buf b[OUT_BUFS];
	int filling, q_head, q_tail, inflight;
	uint64_t bytes, sections, queued;
	int error;
};

struct mig_out *mig_out_create(int fd, char *err, size_t errlen)
{
	struct mig_out *o = xcalloc(1, sizeof(*o));
	int rc = io_uring_queue_init(8, &o->ring, 0);

	if (rc < 0) {
		snprintf(err, errlen, "io_uring_queue_init: %s", strerror(-rc));
		free(o);
		return NULL;
	}
	o->fd = fd;
	o->filling = o->q_head = o->q_tail = o->inflight = -1;
	return o;
}

void mig_out_destroy(struct mig_out *o)
{
	if (!o)
		return;
	/* Anything still in flight refers to our buffers: cancel and reap. */
	if (o->inflight >= 0) {
		struct io_uring_sqe *sqe = io_uring_get_sqe(&o->ring);
		struct io_uring_cqe *cqe;
		if (sqe) {
			io_uring_prep_cancel64(sqe, (uint64_t)o->inflight, 0);
			io_uring_sqe_set_data64(sqe, 1000);
			io_uring_submit(&o->ring);
		}
		while (o->inflight >= 0 && io_uring_wait_cqe(&o->ring, &cqe) == 0) {
			if (io_uring_cqe_get_data64(cqe) == (uint64_t)o->inflight)
				o->inflight = -1;
			io_uring_cqe_seen(&o->ring, cqe);
		}
	}
	io_uring_queue_exit(&o->ring);
	for (int i = 0; i < OUT_BUFS; i++)
		free(o->b[i].p);
	free(o);
}

static void out_submit(struct mig_out *o, int i)
{
	struct out_buf *b = &o->b[i];
	struct io_uring_sqe *sqe = io_uring_get_sqe(&o->ring);

	io_uring_prep_send(sqe, o->fd, b->p + b->sent, b->len - b->sent, MSG_NOSIGNAL);
	io_uring_sqe_set_data64(sqe, (uint64_t)i);
	io_uring_submit(&o->ring);
	b->state = 3;
	o->inflight = i;
}

static void out_kick(struct mig_out *o)
{
	if (o->inflight >= 0 || o->q_head < 0)
		return;
	int i = o->q_head;
	o->q_head = o->b[i].next;
	if (o->q_head < 0)
		o->q_tail = -1;
	out_submit(o, i);
}

/* Wait for the send in flight to finish (or fail). */
static int out_reap(struct mig_out *o)
{
	struct io_uring_cqe *cqe;
	int rc;

	if (o->inflight < 0)
		return 0;
	do
		rc = io_uring_wait_cqe(&o->ring, &cqe);
	while (rc == -EINTR);
	if (rc < 0)
		return rc;
	int i = (int)io_uring_cqe_get_data64(cqe), res = cqe->res;
	io_uring_cqe_seen(&o->ring, cqe);
	if (i < 0 || i >= OUT_BUFS)
		return 0;
	struct out_buf *b = &o->b[i];
	o->inflight = -1;
	if (res < 0 || (res == 0 && b->len > b->sent)) {
		if (!o->error)
			o->error = res < 0 ? res : -EPIPE;
		b->state = 0;
		return o->error;
	}
	b->sent += (size_t)res;
	o->bytes += (uint64_t)res;
	if (b->sent < b->len) {
		out_submit(o, i);   /* short send: finish this one first */
		return 0;
	}
	b->state = 0;
	out_kick(o);
	return 0;
}

int mig_out_raw(struct mig_out *o, const void *buf, size_t len)
{
	void *p = mig_out_begin(o, len);
	if (!p)
		return o->error ? o->error : -ENOMEM;
	memcpy(p, buf, len);
	/* Raw: no section header; commit with type 0 means "as is". */
	return mig_out_commit(o, 0, len);
}

void *mig_out_begin(struct mig_out *o, size_t cap)
{
	if (cap > MIG_SECTION_MAX || o->error)
		return NULL;
	for (;;) {
		for (int i = 0; i < OUT_BUFS; i++) {
			struct out_buf *b = &o->b[i];
			if (b->state)
				continue;
			size_t need = cap + sizeof(struct mig_section_hdr);
			if (b->cap < need) {
				size_t ncap = need > OUT_BUFSIZE ? need : OUT_BUFSIZE;
				free(b->p);
				b->p = xmalloc(ncap);
				b->cap = ncap;
			}
			b->state = 1;
			o->filling = i;
			return b->p + sizeof(struct mig_section_hdr);
		}
		if (out_reap(o) < 0)
			return NULL;
	}
}

static int out_commit(struct mig_out *o, uint32_t type, size_t len, bool have_crc, uint32_t crc);

int mig_out_commit(struct mig_out *o, uint32_t type, size_t len)
{
	return out_commit(o, type, len, false, 0);
}

int mig_out_commit_crc(struct mig_out *o, uint32_t type, size_t len, uint32_t crc)
{
	return out_commit(o, type, len, true, crc);
}

static int out_commit(struct mig_out *o, uint32_t type, size_t len, bool have_crc, uint32_t crc)
{
	int i = o->filling;
	struct out_buf *b;

	if (i < 0)
		return -EINVAL;
	b = &o->b[i];
	o->filling = -1;
	if (o->error) {
		b->state = 0;
		return o->error;
	}
	if (type == 0) {   /* raw bytes */
		memmove(b->p, b->p + sizeof(struct mig_section_hdr), len);
		b->len = len;
	} else {
		section_hdr_fill((struct mig_section_hdr *)b->p, type, (uint32_t)len,
				 have_crc ? crc : crc32c(0, b->p + sizeof(struct mig_section_hdr), len));
		b->len = len + sizeof(struct mig_section_hdr);
		o->sections++;
	}
	b->sent = 0;
	o->queued += b->len;
	b->state = 2;
	b->next = -1;
	if (o->q_tail >= 0)
		o->b[o->q_tail].next = i;
	else
		o->q_head = i;
	o->q_tail = i;
	out_kick(o);
	return 0;
}

int mig_out_flush(struct mig_out *o)
{
	while (!o->error && (o->inflight >= 0 || o->q_head >= 0)) {
		out_kick(o);
		if (out_reap(o) < 0)
			break;
	}
	return o->error;
}

uint64_t mig_out_bytes(const struct mig_out *o) { return o->bytes; }
uint64_t mig_out_sections(const struct mig_out *o) { return o->sections; }
uint64_t mig_out_queued(const struct mig_out *o) { return o->queued; }
int mig_out_error(const struct mig_out *o) { return o->error; }

/* ---- receiver */
#define IN_CHUNK (256u << 10)

#define IN_SMALL (64u << 10)    /* bounce for record headers and small pages */

struct mig_in {
	int fd;
	struct io_uring ring;
	uint8_t *buf;
	uint64_t bytes;
	/* the section being read piecewise */
	uint64_t sec_at;        /* stream offset of its header */
	uint32_t sec_type, sec_left, crc, want_crc;
	uint8_t *small;
	uint32_t spos, slen;
};

struct mig_in *mig_in_create(int fd, char *err, size_t errlen)
{
	struct mig_in *in = xcalloc(1, sizeof(*in));
	int rc = io_uring_queue_init(4, &in->ring, 0);

	if (rc < 0) {
		snprintf(err, errlen, "io_uring_queue_init: %s", strerror(-rc));
		free(in);
		return NULL;
	}
	in->fd = fd;
	in->buf = xmalloc(MIG_SECTION_MAX);
	in->small = xmalloc(IN_SMALL);
	return in;
}

void mig_in_destroy(struct mig_in *in)
{
	if (!in)
		return;
	io_uring_queue_exit(&in->ring);
	free(in->buf);
	free(in->small);
	free(in);
}

/* Exactly len bytes: 0, 1 at a clean EOF before any byte, -errno. */
static int in_recv(struct mig_in *in, void *buf, size_t len)
{
	size_t got = 0;

	while (got < len) {
		struct io_uring_sqe *sqe = io_uring_get_sqe(&in->ring);
		struct io_uring_cqe *cqe;
		int rc;

		io_uring_prep_recv(sqe, in->fd, (uint8_t *)buf + got, len - got, MSG_WAITALL);
		io_uring_submit(&in->ring);
		do
			rc = io_uring_wait_cqe(&in->ring, &cqe);
		while (rc == -EINTR);
		if (rc < 0)
			return rc;
		rc = cqe->res;
		io_uring_cqe_seen(&in->ring, cqe);
		if (rc < 0 && rc != -EINTR && rc != -EAGAIN)
			return rc;
		if (rc == 0)
			return got ? -EPIPE : 1;
		if (rc > 0) {
			got += (size_t)rc;
			in->bytes += (uint64_t)rc;
		}
	}
	return 0;
}

int mig_in_header(struct mig_in *in, char *err, size_t errlen)
{
	struct mig_stream_hdr h;
	int rc = in_recv(in, &h, sizeof(h));

	if (rc) {
		snprintf(err, errlen, "reading the stream header: %s",
			 rc > 0 ? "connection closed before any data" : strerror(-rc));
		return -1;
	}
	if (memcmp(h.magic, MIG_MAGIC, 8)) {
		snprintf(err, errlen, "not an mdvm migration stream (bad magic)");
		return -1;
	}
	if (crc32c(0, &h, 12) != h.crc) {
		snprintf(err, errlen, "stream header checksum mismatch");
		return -1;
	}
	/* Only our own version: an older source's MCE and test-device state
	 * (version 1 of each) would be refused section by section anyway. */
	if (h.version != MIG_VERSION) {
		snprintf(err, errlen, "unsupported stream version %u (this mdvm reads version %u)",
			 h.version, MIG_VERSION);
		return -1;
	}
	return 0;
}

int mig_in_section_begin(struct mig_in *in, uint32_t *type, uint32_t *len, char *err, size_t errlen)
{
	struct mig_section_hdr h;
	uint64_t at = in->bytes;
	int rc = in_recv(in, &h, sizeof(h));

	if (rc) {
		snprintf(err, errlen, "stream truncated at byte %llu (%s)", (unsigned long long)at,
			 rc > 0 ? "connection closed before the end section" : strerror(-rc));
		return -1;
	}
	if (crc32c(0, &h, 12) != h.hcrc) {
		snprintf(err, errlen, "corrupted section header at byte %llu (checksum mismatch)",
			 (unsigned long long)at);
		return -1;
	}
	if (h.type == 0 || h.type >= MIG_SEC_NR || h.len > MIG_SECTION_MAX) {
		snprintf(err, errlen, "bad section at byte %llu (type %u, length %u)",
			 (unsigned long long)at, h.type, h.len);
		return -1;
	}
	in->sec_at = at;
	in->sec_type = h.type;
	in->sec_left = h.len;
	in->want_crc = h.crc;
	in->crc = 0;
	in->spos = in->slen = 0;
	*type = h.type;
	*len = h.len;
	return 0;
}

uint32_t mig_in_left(const struct mig_in *in)
{
	return in->sec_left + (in->slen - in->spos);
}

/* Receive n bytes of the section into dst, checksummed per piece while in
 * cache. */
static int in_section_recv(struct mig_in *in, uint8_t *dst, uint32_t n, char *err, size_t errlen)
{
	for (uint32_t got = 0; got < n;) {
		uint32_t k = n - got < IN_CHUNK ? n - got : IN_CHUNK;
		int rc = in_recv(in, dst + got, k);
		if (rc) {
			snprintf(err, errlen, "stream truncated inside a section at byte %llu (%s)",
				 (unsigned long long)in->bytes, rc > 0 ? "connection closed" : strerror(-rc));
			return -1;
		}
		in->crc = crc32c(in->crc, dst + got, k);
		in->sec_left -= k;
		got += k;
	}
	return 0;
}

const void *mig_in_take(struct mig_in *in, uint32_t n, char *err, size_t errlen)
{
	if (n > IN_SMALL || n > mig_in_left(in)) {
		snprintf(err, errlen, "section at byte %llu: %u bytes wanted, %u left",
			 (unsigned long long)in->sec_at, n, mig_in_left(in));
		return NULL;
	}
	if (in->slen - in->spos < n) {
		/* Refill: a little more than asked, so small records come in bulk
		 * while large page runs still go straight to their place. */
		uint32_t have = in->slen - in->spos;
		memmove(in->small, in->small + in->spos, have);
		in->spos = 0;
		in->slen = have;
		uint32_t k = IN_SMALL - have < in->sec_left ? IN_SMALL - have : in->sec_left;
		if (in_section_recv(in, in->small + have, k, err, errlen) < 0)
			return NULL;
		in->slen += k;
	}
	const void *p = in->small + in->spos;
	in->spos += n;
	return p;
}

int mig_in_read(struct mig_in *in, void *dst, uint32_t n, char *err, size_t errlen)
{
	if (n > mig_in_left(in)) {
		snprintf(err, errlen, "section at byte %llu: %u bytes wanted, %u left",
			 (unsigned long long)in->sec_at, n, mig_in_left(in));
		return -1;
	}
	uint32_t have = in->slen - in->spos, k = have < n ? have : n;
	memcpy(dst, in->small + in->spos, k);
	in->spos += k;
	return in_section_recv(in, (uint8_t *)dst + k, n - k, err, errlen);
}

int mig_in_section_end(struct mig_in *in, char *err, size_t errlen)
{
	if (mig_in_left(in)) {
		snprintf(err, errlen, "section at byte %llu (type %u): %u bytes not understood",
			 (unsigned long long)in->sec_at, in->sec_type, mig_in_left(in));
		return -1;
	}
	if (in->crc != in->want_crc) {
		snprintf(err, errlen, "corrupted section at byte %llu (type %u, payload checksum mismatch)",
			 (unsigned long long)in->sec_at, in->sec_type);
		return -1;
	}
	return 0;
}

int mig_in_section_payload(struct mig_in *in, void **payload, char *err, size_t errlen)
{
	uint32_t len = mig_in_left(in);
	if (mig_in_read(in, in->buf, len, err, errlen) < 0 || mig_in_section_end(in, err, errlen) < 0)
		return -1;
	*payload = in->buf;
	return 0;
}

int mig_in_section(struct mig_in *in, uint32_t *type, void **payload, uint32_t *len,
		   char *err, size_t errlen)
{
	if (mig_in_section_begin(in, type, len, err, errlen) < 0)
		return -1;
	return mig_in_section_payload(in, payload, err, errlen);
}

uint64_t mig_in_bytes(const struct mig_in *in) { return in->bytes; }

int mig_read_full(int fd, void *buf, size_t len)
{
	size_t got = 0;
	while (got < len) {
		ssize_t r = read(fd, (uint8_t *)buf + got, len - got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		got += (size_t)r;
	}
	return 0;
}

int mig_write_full(int fd, const void *buf, size_t len)
{
	size_t put = 0;
	while (put < len) {
		ssize_t r = send(fd, (const uint8_t *)buf + put, len - put, MSG_NOSIGNAL);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		put += (size_t)r;
	}
	return 0;
}
