/* The test device: an MMIO mailbox through which the host hands commands to
 * the test guest and collects its responses (devices/testdev_regs.h).
 * One command is in flight at a time; completion is delivered on the main
 * loop. A guest that never answers is timed out, not waited for. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "devices.h"
#include "testdev_regs.h"
#include "../vmm/bus.h"
#include "../vmm/loop.h"
#include "../vmm/util.h"

#define TESTDEV_RESP_MAX  4096
#define TESTDEV_WAIT_MS   50

struct testdev {
	pthread_mutex_t lock;
	pthread_cond_t cmd_cond;
	char cmd[TESTDEV_CMD_MAX];
	uint32_t cmd_seq, ack_seq;
	uint32_t status, sweeps;
	struct testdev_mce mce;        /* the guest's last machine-check report */
	char resp[TESTDEV_RESP_MAX];
	size_t resp_len;
	/* The command in flight (main-loop side). */
	bool pending;
	bool kick;             /* wake a guest waiting in TESTDEV_WAIT (vCPU pause) */
	uint64_t gen;          /* identifies the in-flight command across threads */
	testdev_done_fn done;
	void *done_opaque;
	int timer;
};

struct testdev_completion {
	struct testdev *t;
	uint64_t gen;
	int status;
	char *resp;
};

/* Main loop: finish command `gen` unless it already finished (timeout/ack race). */
static void testdev_finish(struct testdev *t, uint64_t gen, int status, const char *resp)
{
	testdev_done_fn done;
	void *opaque;

	pthread_mutex_lock(&t->lock);
	if (!t->pending || t->gen != gen) {
		pthread_mutex_unlock(&t->lock);
		return;
	}
	t->pending = false;
	done = t->done;
	opaque = t->done_opaque;
	if (t->timer > 0)
		loop_cancel_timer(t->timer);
	t->timer = 0;
	pthread_mutex_unlock(&t->lock);
	done(opaque, status, resp);
}

static void testdev_completed(void *opaque)
{
	struct testdev_completion *c = opaque;

	testdev_finish(c->t, c->gen, c->status, c->resp);
	free(c->resp);
	free(c);
}

static void testdev_timeout(void *opaque)
{
	struct testdev *t = opaque;
	uint64_t gen;

	pthread_mutex_lock(&t->lock);
	t->timer = 0;
	gen = t->gen;
	pthread_mutex_unlock(&t->lock);
	testdev_finish(t, gen, -1, NULL);
}

int testdev_post(struct testdev *t, const char *cmd, unsigned timeout_ms,
		 testdev_done_fn done, void *opaque)
{
	if (strlen(cmd) >= TESTDEV_CMD_MAX) {
		errno = E2BIG;
		return -1;
	}
	pthread_mutex_lock(&t->lock);
	if (t->pending) {
		pthread_mutex_unlock(&t->lock);
		errno = EBUSY;
		return -1;
	}
	memset(t->cmd, 0, sizeof(t->cmd));
	strcpy(t->cmd, cmd);
	t->cmd_seq++;
	t->pending = true;
	t->gen++;
	t->done = done;
	t->done_opaque = opaque;
	t->timer = loop_add_timer(timeout_ms, testdev_timeout, t);
	pthread_cond_broadcast(&t->cmd_cond);
	pthread_mutex_unlock(&t->lock);
	return 0;
}

void testdev_kick(struct testdev *t)
{
	pthread_mutex_lock(&t->lock);
	t->kick = true;
	pthread_cond_broadcast(&t->cmd_cond);
	pthread_mutex_unlock(&t->lock);
}

uint32_t testdev_sweeps(struct testdev *t)
{
	uint32_t v;

	pthread_mutex_lock(&t->lock);
	v = t->sweeps;
	pthread_mutex_unlock(&t->lock);
	return v;
}

void testdev_mce_info(struct testdev *t, struct testdev_mce *out)
{
	pthread_mutex_lock(&t->lock);
	*out = t->mce;
	pthread_mutex_unlock(&t->lock);
}

static void set_half(uint64_t *r, uint64_t off, uint64_t v)
{
	unsigned sh = (off & 4) ? 32 : 0;
	*r = (*r & ~(0xffffffffULL << sh)) | ((v & 0xffffffffULL) << sh);
}

/* Guest acked `seq`: hand the response to the main loop. */
static void testdev_ack(struct testdev *t, uint32_t seq)
{
	struct testdev_completion *c;

	t->ack_seq = seq;
	if (!t->pending || seq != t->cmd_seq)
		return;
	c = xcalloc(1, sizeof(*c));
	c->t = t;
	c->gen = t->gen;
	c->status = (int)t->status;
	c->resp = xmalloc(t->resp_len + 1);
	memcpy(c->resp, t->resp, t->resp_len);
	c->resp[t->resp_len] = 0;
	loop_call(testdev_completed, c);
}

static uint32_t testdev_wait(struct testdev *t)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_nsec += TESTDEV_WAIT_MS * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	while (t->cmd_seq == t->ack_seq && !t->kick)
		if (pthread_cond_timedwait(&t->cmd_cond, &t->lock, &ts) == ETIMEDOUT)
			break;
	t->kick = false;
	return t->cmd_seq;
}

static void testdev_io(void *opaque, struct vcpu *vcpu, uint64_t off, uint8_t *data,
		       uint32_t len, bool is_write)
{
	struct testdev *t = opaque;
	uint64_t v = 0;

	memcpy(&v, data, len);
	pthread_mutex_lock(&t->lock);
	if (is_write) {
		switch (off) {
		case TESTDEV_ACK_SEQ:    testdev_ack(t, (uint32_t)v); break;
		case TESTDEV_STATUS:     t->status = (uint32_t)v; break;
		case TESTDEV_RESP_CHAR:
			if (t->resp_len < TESTDEV_RESP_MAX - 1)
				t->resp[t->resp_len++] = (char)v;
			break;
		case TESTDEV_RESP_RESET: t->resp_len = 0; break;
		case TESTDEV_SWEEPS:     t->sweeps = (uint32_t)v; break;
		case TESTDEV_MCE_STATUS: case TESTDEV_MCE_STATUS + 4:
			set_half(&t->mce.status, off, v);
			break;
		case TESTDEV_MCE_ADDR: case TESTDEV_MCE_ADDR + 4:
			set_half(&t->mce.addr, off, v);
			break;
		case TESTDEV_MCE_BAD:    t->mce.bad = (uint32_t)v; break;
		case TESTDEV_MCE_ERRORS: t->mce.errors = (uint32_t)v; break;
		default: break;
		}
	} else {
		v = 0;
		if (off >= TESTDEV_CMD_BUF && off + len <= TESTDEV_CMD_BUF + TESTDEV_CMD_MAX) {
			memcpy(&v, t->cmd + (off - TESTDEV_CMD_BUF), len);
		} else {
			switch (off) {
			case TESTDEV_MAGIC:   v = TESTDEV_MAGIC_VALUE; break;
			case TESTDEV_VERSION: v = TESTDEV_VERSION_VALUE; break;
			case TESTDEV_CMD_SEQ: v = t->cmd_seq; break;
			case TESTDEV_WAIT:    v = testdev_wait(t); break;
			case TESTDEV_SWEEPS:  v = t->sweeps; break;
			default: break;
			}
		}
		memcpy(data, &v, len);
	}
	pthread_mutex_unlock(&t->lock);
}

void testdev_reset(struct testdev *t)
{
	uint64_t gen = 0;
	bool fail;

	pthread_mutex_lock(&t->lock);
	/* A rebooted guest starts counting from 0 again. */
	t->cmd_seq = t->ack_seq = 0;
	t->status = t->sweeps = 0;
	memset(&t->mce, 0, sizeof(t->mce));
	t->resp_len = 0;
	memset(t->cmd, 0, sizeof(t->cmd));
	fail = t->pending;
	gen = t->gen;
	pthread_mutex_unlock(&t->lock);
	if (fail)
		testdev_finish(t, gen, -1, NULL);
}

struct testdev *testdev_create(struct vm *vm, uint64_t gpa)
{
	struct testdev *t = xcalloc(1, sizeof(*t));

	pthread_mutex_init(&t->lock, NULL);
	pthread_cond_init(&t->cmd_cond, NULL);
	if (bus_register_mmio(gpa, 0x1000, testdev_io, t) < 0) {
		free(t);
		return NULL;
	}
	return t;
}

/* ---- migration. A command in flight on the source is not carried: its
 * QMP request belongs to the source's client and fails there. */
struct testdev_state {
	uint32_t version;
	uint32_t cmd_seq, ack_seq, status, sweeps;
	uint32_t resp_len;
	char cmd[TESTDEV_CMD_MAX];
	char resp[TESTDEV_RESP_MAX];
	struct testdev_mce mce;        /* v2 */
};
#define TESTDEV_STATE_VERSION 2

size_t testdev_save(struct testdev *t, void *buf, size_t cap)
{
	struct testdev_state *st = buf;

	if (cap < sizeof(*st))
		return 0;
	memset(st, 0, sizeof(*st));
	st->version = TESTDEV_STATE_VERSION;
	pthread_mutex_lock(&t->lock);
	st->cmd_seq = t->cmd_seq;
	st->ack_seq = t->ack_seq;
	st->status = t->status;
	st->sweeps = t->sweeps;
	st->resp_len = (uint32_t)t->resp_len;
	st->mce = t->mce;
	memcpy(st->cmd, t->cmd, sizeof(st->cmd));
	memcpy(st->resp, t->resp, sizeof(st->resp));
	pthread_mutex_unlock(&t->lock);
	return sizeof(*st);
}

int testdev_load(struct testdev *t, const void *buf, size_t len)
{
	const struct testdev_state *st = buf;

	if (len != sizeof(*st) || st->version != TESTDEV_STATE_VERSION ||
	    st->resp_len >= TESTDEV_RESP_MAX)
		return -1;
	pthread_mutex_lock(&t->lock);
	t->cmd_seq = st->cmd_seq;
	t->ack_seq = st->ack_seq;
	t->status = st->status;
	t->sweeps = st->sweeps;
	t->resp_len = st->resp_len;
	t->mce = st->mce;
	memcpy(t->cmd, st->cmd, sizeof(t->cmd));
	t->cmd[TESTDEV_CMD_MAX - 1] = 0;
	memcpy(t->resp, st->resp, sizeof(t->resp));
	pthread_mutex_unlock(&t->lock);
	return 0;
}
