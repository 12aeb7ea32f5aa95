/* The main event loop (see loop.h).
 *
 * One epoll instance serves the main thread. Other threads never touch fd
 * registrations; they hand work over with loop_call(), which appends to a
 * mutex-protected queue and kicks an eventfd that sits in the epoll set.
 * Timers are a sorted list whose head bounds the epoll_wait timeout, which is
 * plenty for the handful of one-shot timers a VMM control plane needs.
 *
 * Threading rules:
 *  - loop_add_fd/loop_del_fd: main thread (or before loop_run starts).
 *  - loop_call, loop_add_timer, loop_cancel_timer, loop_quit: any thread;
 *    loop_quit is also async-signal-safe.
 *    loop_cancel_timer on the main thread guarantees the callback will not
 *    run afterwards; from another thread it may race with a firing timer.
 */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "loop.h"
#include "util.h"

struct fd_handler {
	int fd;
	bool deleted;            /* deleted during the current dispatch batch */
	loop_fd_fn fn;
	void *opaque;
	struct fd_handler *next; /* registered list, or the graveyard */
};

struct call {
	loop_call_fn fn;
	void *opaque;
	struct call *next;
};

struct timer {
	int id;
	uint64_t deadline_ns;
	loop_call_fn fn;
	void *opaque;
	struct timer *next;      /* sorted by deadline, FIFO among equals */
};

static int epfd = -1;
static int wakefd = -1;
/* epoll data.ptr for the eventfd; distinct from any fd_handler. */
static char wake_tag;

static struct fd_handler *handlers;   /* main thread only */
static struct fd_handler *graveyard;  /* freed after each dispatch batch */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
/* Protected by lock: */
static struct call *calls_head, **calls_tail = &calls_head;
static struct timer *timers;
static int next_timer_id = 1;
/* Not under lock (loop_quit must be async-signal-safe): 0 none, 1 being
 * set, 2 quit_code valid. */
static int quit_state;
static int quit_code;

static void wake(void)
{
	uint64_t one = 1;
	if (wakefd < 0)
		return;
	/* EAGAIN means the counter is saturated: the loop is awake anyway. */
	while (write(wakefd, &one, sizeof(one)) < 0 && errno == EINTR)
		;
}

int loop_init(void)
{
	struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &wake_tag };

	if (epfd >= 0)
		return 0;    /* idempotent: tests and main may both call it */
	epfd = epoll_create1(EPOLL_CLOEXEC);
	if (epfd < 0)
		return -1;
	wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (wakefd < 0)
		goto fail;
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, wakefd, &ev) < 0)
		goto fail;
	/* A loop_call()/loop_quit() that raced with initialisation must not be
	 * lost: make the first epoll_wait return at once. */
	wake();
	return 0;
fail:
	{
		int e = errno;
		if (wakefd >= 0)
			close(wakefd);
		close(epfd);
		wakefd = epfd = -1;
		errno = e;
	}
	return -1;
}

int loop_add_fd(int fd, uint32_t epoll_events, loop_fd_fn fn, void *opaque)
{
	struct fd_handler *h;
	struct epoll_event ev = { .events = epoll_events };

	if (epfd < 0) {
		errno = EINVAL;
		return -1;
	}
	h = xcalloc(1, sizeof(*h));
	h->fd = fd;
	h->fn = fn;
	h->opaque = opaque;
	ev.data.ptr = h;
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
		int e = errno;
		free(h);
		errno = e;
		return -1;
	}
	h->next = handlers;
	handlers = h;
	return 0;
}

/* Change the events of a registered fd (e.g. add EPOLLOUT while output is
 * queued). Not in loop.h on purpose: callers that need it declare it. */
int loop_mod_fd(int fd, uint32_t epoll_events)
{
	struct fd_handler *h;

	for (h = handlers; h; h = h->next) {
		if (h->fd == fd) {
			struct epoll_event ev = { .events = epoll_events, .data.ptr = h };
			return epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev);
		}
	}
	errno = ENOENT;
	return -1;
}

void loop_del_fd(int fd)
{
	struct fd_handler **pp, *h;

	for (pp = &handlers; (h = *pp); pp = &h->next) {
		if (h->fd == fd)
			break;
	}
	if (!h)
		return;
	*pp = h->next;
	epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
	/* The current epoll_wait batch may still hold a pointer to h: keep it
	 * (flagged) until the batch is done. */
	h->deleted = true;
	h->next = graveyard;
	graveyard = h;
}

void loop_call(loop_call_fn fn, void *opaque)
{
	struct call *c = xmalloc(sizeof(*c));

	c->fn = fn;
	c->opaque = opaque;
	c->next = NULL;
	pthread_mutex_lock(&lock);
	*calls_tail = c;
	calls_tail = &c->next;
	pthread_mutex_unlock(&lock);
	wake();
}

int loop_add_timer(uint64_t ms, loop_call_fn fn, void *opaque)
{
	struct timer *t = xmalloc(sizeof(*t)), **pp;
	int id;

	t->deadline_ns = monotonic_ns() + ms * 1000000ULL;
	t->fn = fn;
	t->opaque = opaque;
	pthread_mutex_lock(&lock);
	id = t->id = next_timer_id;
	next_timer_id = next_timer_id == 0x7fffffff ? 1 : next_timer_id + 1;
	for (pp = &timers; *pp && (*pp)->deadline_ns <= t->deadline_ns; pp = &(*pp)->next)
		;
	t->next = *pp;
	*pp = t;
	pthread_mutex_unlock(&lock);
	wake();   /* the new timer may be earlier than the current timeout */
	return id;
}

void loop_cancel_timer(int id)
{
	struct timer **pp, *t = NULL;

	if (id <= 0)
		return;
	pthread_mutex_lock(&lock);
	for (pp = &timers; *pp; pp = &(*pp)->next) {
		if ((*pp)->id == id) {
			t = *pp;
			*pp = t->next;
			break;
		}
	}
	pthread_mutex_unlock(&lock);
	free(t);
}

void loop_quit(int code)
{
	int expected = 0;

	/* Lock-free, so it is async-signal-safe (main.c calls it from SIGTERM).
	 * The first request wins: a later "quit" must not mask the exit code
	 * of, say, a guest poweroff that is already being handled. */
	if (__atomic_compare_exchange_n(&quit_state, &expected, 1, false,
					__ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
		__atomic_store_n(&quit_code, code, __ATOMIC_SEQ_CST);
		__atomic_store_n(&quit_state, 2, __ATOMIC_SEQ_CST);
	}
	wake();
}

static bool quitting(void)
{
	return __atomic_load_n(&quit_state, __ATOMIC_SEQ_CST) != 0;
}

/* epoll_wait timeout in ms from the earliest timer, rounded up so we never
 * wake just before a deadline and spin. */
static int next_timeout(void)
{
	int ms = -1;

	if (quitting())
		return 0;
	pthread_mutex_lock(&lock);
	if (calls_head) {
		ms = 0;
	} else if (timers) {
		uint64_t now = monotonic_ns();
		if (timers->deadline_ns <= now) {
			ms = 0;
		} else {
			uint64_t d = (timers->deadline_ns - now + 999999) / 1000000;
			ms = d > 0x7fffffff ? 0x7fffffff : (int)d;
		}
	}
	pthread_mutex_unlock(&lock);
	return ms;
}

static void run_calls(void)
{
	struct call *c, *next;

	/* Take the whole queue: calls queued by these callbacks run on the
	 * next iteration, so a callback re-queueing itself cannot starve fds. */
	pthread_mutex_lock(&lock);
	c = calls_head;
	calls_head = NULL;
	calls_tail = &calls_head;
	pthread_mutex_unlock(&lock);
	for (; c; c = next) {
		next = c->next;
		c->fn(c->opaque);
		free(c);
	}
}

static void run_timers(void)
{
	uint64_t now = monotonic_ns();

	/* One at a time, dropping the lock around the callback, so a callback
	 * may add or cancel timers (including ones that are also due). Only
	 * timers due at `now` run, so a 0 ms timer re-arming itself waits for
	 * the next iteration. */
	for (;;) {
		struct timer *t;

		pthread_mutex_lock(&lock);
		t = timers;
		if (t && t->deadline_ns <= now)
			timers = t->next;
		else
			t = NULL;
		pthread_mutex_unlock(&lock);
		if (!t)
			break;
		t->fn(t->opaque);
		free(t);
	}
}

static void bury(void)
{
	while (graveyard) {
		struct fd_handler *h = graveyard;
		graveyard = h->next;
		free(h);
	}
}

int loop_run(void)
{
	struct epoll_event evs[64];
	int code;

	if (epfd < 0 && loop_init() < 0)
		return -1;
	while (!quitting()) {
		int n = epoll_wait(epfd, evs, (int)ARRAY_SIZE(evs), next_timeout());

		if (n < 0) {
			if (errno == EINTR)
				continue;
			pr_err("epoll_wait: %s", strerror(errno));
			loop_quit(1);
			break;
		}
		for (int i = 0; i < n; i++) {
			struct fd_handler *h = evs[i].data.ptr;

			if (evs[i].data.ptr == &wake_tag) {
				uint64_t v;
				while (read(wakefd, &v, sizeof(v)) < 0 && errno == EINTR)
					;
				continue;
			}
			if (h->deleted)
				continue;
			h->fn(h->opaque, evs[i].events);
		}
		bury();
		run_calls();
		run_timers();
		bury();
	}
	/* Reset so the loop can be run again (unit tests do). */
	while (__atomic_load_n(&quit_state, __ATOMIC_SEQ_CST) == 1)
		;   /* a loop_quit() between its two stores */
	code = __atomic_load_n(&quit_code, __ATOMIC_SEQ_CST);
	__atomic_store_n(&quit_code, 0, __ATOMIC_SEQ_CST);
	__atomic_store_n(&quit_state, 0, __ATOMIC_SEQ_CST);
	return code;
}
