/* Unit tests for vmm/loop.c and vmm/qmp.c: a real QMP server runs its loop
 * in a thread (as main.c runs it on the main thread) on a UNIX socket in a
 * fresh temporary directory; the test thread is the client.
 *
 * loop.c and qmp.c are not in the Makefile's UNIT_LIB_SRCS, so they are
 * compiled into this file. If they are ever added there, drop these two
 * includes (and include loop.h/qmp.h instead). */
#include "../../vmm/loop.c"
#include "../../vmm/qmp.c"

#include <check.h>
#include <fcntl.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

/* ---------------------------------------------------------------- loop */

static int order[8], norder;
static pthread_mutex_t order_lock = PTHREAD_MUTEX_INITIALIZER;

static void record(void *opaque)
{
	pthread_mutex_lock(&order_lock);
	if (norder < 8)
		order[norder++] = (int)(intptr_t)opaque;
	pthread_mutex_unlock(&order_lock);
}

static void record_and_quit(void *opaque)
{
	record(opaque);
	loop_quit(7);
}

static void *call_from_thread(void *arg)
{
	usleep(20000);
	loop_call(record_and_quit, (void *)(intptr_t)42);
	return NULL;
}

START_TEST(loop_call_from_other_thread)
{
	pthread_t t;

	ck_assert_int_eq(loop_init(), 0);
	norder = 0;
	pthread_create(&t, NULL, call_from_thread, NULL);
	ck_assert_int_eq(loop_run(), 7);
	pthread_join(t, NULL);
	ck_assert_int_eq(norder, 1);
	ck_assert_int_eq(order[0], 42);
}
END_TEST

START_TEST(loop_timers_fire_in_order_and_cancel)
{
	int id;
	uint64_t t0;

	ck_assert_int_eq(loop_init(), 0);
	norder = 0;
	t0 = monotonic_ns();
	loop_add_timer(30, record, (void *)(intptr_t)3);
	loop_add_timer(10, record, (void *)(intptr_t)1);
	id = loop_add_timer(20, record, (void *)(intptr_t)99);
	loop_add_timer(20, record, (void *)(intptr_t)2);
	loop_add_timer(40, record_and_quit, (void *)(intptr_t)4);
	ck_assert_int_gt(id, 0);
	loop_cancel_timer(id);
	ck_assert_int_eq(loop_run(), 7);
	ck_assert_uint_ge(monotonic_ns() - t0, 40000000ULL);
	ck_assert_int_eq(norder, 4);
	for (int i = 0; i < 4; i++)
		ck_assert_int_eq(order[i], i + 1);
}
END_TEST

START_TEST(loop_quit_before_run_returns_at_once)
{
	ck_assert_int_eq(loop_init(), 0);
	loop_quit(3);
	loop_quit(5);     /* first code wins */
	ck_assert_int_eq(loop_run(), 3);
}
END_TEST

static int pipe_reads;
static int pipefd[2];

static void on_pipe(void *opaque, uint32_t ev)
{
	char c;
	ck_assert(read(pipefd[0], &c, 1) == 1);
	pipe_reads++;
	loop_del_fd(pipefd[0]);   /* deleting inside its own callback is fine */
	loop_quit(0);
}

START_TEST(loop_fd_handler)
{
	ck_assert_int_eq(loop_init(), 0);
	ck_assert_int_eq(pipe(pipefd), 0);
	ck_assert_int_eq(loop_add_fd(pipefd[0], EPOLLIN, on_pipe, NULL), 0);
	ck_assert(write(pipefd[1], "x", 1) == 1);
	pipe_reads = 0;
	ck_assert_int_eq(loop_run(), 0);
	ck_assert_int_eq(pipe_reads, 1);
	close(pipefd[0]);
	close(pipefd[1]);
}
END_TEST

Suite *loop_suite(void)
{
	Suite *s = suite_create("loop");
	TCase *tc = tcase_create("core");

	tcase_add_test(tc, loop_call_from_other_thread);
	tcase_add_test(tc, loop_timers_fire_in_order_and_cancel);
	tcase_add_test(tc, loop_quit_before_run_returns_at_once);
	tcase_add_test(tc, loop_fd_handler);
	suite_add_tcase(s, tc);
	return s;
}

/* ----------------------------------------------------------------- qmp */

static char tmpdir[64];
static char sock_path[128];
static pthread_t server_thread;
static sem_t server_started;
static int server_rc;
static char server_err[256];
static int deferred_done;    /* replies sent by the deferred test command */

/* test-echo: returns its arguments. */
static void cmd_test_echo(struct qmp_req *req, json_t *args, void *opaque)
{
	qmp_reply_ok(req, json_incref(args));
}

/* test-defer {"ms": N}: replies {"deferred": true} from a timer. */
static void defer_fire(void *opaque)
{
	qmp_reply_ok(opaque, json_pack("{s:b}", "deferred", 1));
	__atomic_add_fetch(&deferred_done, 1, __ATOMIC_SEQ_CST);
}

static void cmd_test_defer(struct qmp_req *req, json_t *args, void *opaque)
{
	loop_add_timer((uint64_t)json_integer_value(json_object_get(args, "ms")), defer_fire, req);
}

static void *server_main(void *arg)
{
	server_rc = qmp_server_start(sock_path, server_err, sizeof(server_err));
	sem_post(&server_started);
	if (server_rc == 0)
		loop_run();
	qmp_server_stop();
	return NULL;
}

static void qmp_setup(void)
{
	strcpy(tmpdir, "/tmp/mdvm-qmp-XXXXXX");
	ck_assert(mkdtemp(tmpdir) != NULL);
	snprintf(sock_path, sizeof(sock_path), "%s/qmp.sock", tmpdir);
	ck_assert_int_eq(loop_init(), 0);
	qmp_register("test-echo", cmd_test_echo, NULL);
	qmp_register("test-defer", cmd_test_defer, NULL);
	deferred_done = 0;
	sem_init(&server_started, 0, 0);
	pthread_create(&server_thread, NULL, server_main, NULL);
	sem_wait(&server_started);
	ck_assert_msg(server_rc == 0, "qmp_server_start: %s", server_err);
}

static void qmp_teardown(void)
{
	loop_quit(0);
	pthread_join(server_thread, NULL);
	unlink(sock_path);
	rmdir(tmpdir);
}

/* A test client: line-oriented reads with a timeout. */
struct tc {
	int fd;
	char buf[1 << 16];
	size_t len;
};

static struct tc *tc_connect(void)
{
	struct tc *c = calloc(1, sizeof(*c));
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	struct timeval tv = { .tv_sec = 3 };

	strcpy(a.sun_path, sock_path);
	c->fd = socket(AF_UNIX, SOCK_STREAM, 0);
	ck_assert_int_ge(c->fd, 0);
	ck_assert_int_eq(connect(c->fd, (struct sockaddr *)&a, sizeof(a)), 0);
	setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	return c;
}

static void tc_close(struct tc *c)
{
	if (c->fd >= 0)
		close(c->fd);
	free(c);
}

static void tc_send(struct tc *c, const char *text)
{
	ck_assert(send(c->fd, text, strlen(text), MSG_NOSIGNAL) == (ssize_t)strlen(text));
}

/* Next line from the server without its "\r\n"; NULL on EOF. */
static char *tc_line(struct tc *c)
{
	static char line[1 << 16];

	for (;;) {
		char *nl = memchr(c->buf, '\n', c->len);
		ssize_t n;

		if (nl) {
			size_t l = (size_t)(nl - c->buf);
			ck_assert_msg(l > 0 && c->buf[l - 1] == '\r', "line not ended by CRLF");
			memcpy(line, c->buf, l - 1);
			line[l - 1] = 0;
			memmove(c->buf, nl + 1, c->len - l - 1);
			c->len -= l + 1;
			return line;
		}
		n = recv(c->fd, c->buf + c->len, sizeof(c->buf) - c->len, 0);
		ck_assert_msg(n >= 0, "recv: %s", strerror(errno));
		if (n == 0)
			return NULL;
		c->len += (size_t)n;
	}
}

static void tc_expect(struct tc *c, const char *want)
{
	char *got = tc_line(c);

	ck_assert_msg(got != NULL, "EOF, expected %s", want);
	ck_assert_str_eq(got, want);
}

static json_t *tc_json(struct tc *c)
{
	char *got = tc_line(c);
	json_t *j;

	ck_assert_msg(got != NULL, "unexpected EOF");
	j = json_loads(got, 0, NULL);
	ck_assert_msg(j != NULL, "bad JSON from server: %s", got);
	return j;
}

static struct tc *tc_negotiated(void)
{
	struct tc *c = tc_connect();

	tc_line(c);
	tc_send(c, "{\"execute\": \"qmp_capabilities\"}");
	tc_expect(c, "{\"return\": {}}");
	return c;
}

START_TEST(qmp_greeting_and_negotiation)
{
	struct tc *c = tc_connect();
	struct stat st;

	ck_assert_int_eq(stat(sock_path, &st), 0);
	ck_assert_int_eq(st.st_mode & 0777, 0600);
	tc_expect(c, "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 1, \"major\": 0}, "
		     "\"package\": \"mdvm 0.1\"}, \"capabilities\": []}}");
	tc_send(c, "{\"execute\": \"query-version\", \"id\": 1}");
	tc_expect(c, "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Expecting capabilities "
		     "negotiation with 'qmp_capabilities'\"}, \"id\": 1}");
	tc_send(c, "{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"oob\"]}}");
	tc_expect(c, "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Capability 'oob' not available\"}}");
	tc_send(c, "{\"execute\": \"qmp_capabilities\", \"id\": \"x\"}");
	tc_expect(c, "{\"return\": {}, \"id\": \"x\"}");
	tc_send(c, "{\"execute\": \"qmp_capabilities\"}");
	tc_expect(c, "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Capabilities negotiation "
		     "is already complete, command ignored\"}}");
	tc_send(c, "{\"execute\": \"query-version\", \"id\": [1, {\"a\": null}]}\n");
	tc_expect(c, "{\"return\": {\"qemu\": {\"micro\": 0, \"minor\": 1, \"major\": 0}, "
		     "\"package\": \"mdvm 0.1\"}, \"id\": [1, {\"a\": null}]}");
	tc_send(c, "{\"execute\": \"query-version\", \"arguments\": {\"x\": 1}}");
	tc_expect(c, "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Parameter 'x' is unexpected\"}}");
	tc_close(c);
}
END_TEST

START_TEST(qmp_query_commands_lists_registered)
{
	struct tc *c = tc_negotiated();
	json_t *r, *ret, *e;
	bool seen_echo = false, seen_caps = false;
	size_t i;

	tc_send(c, "{\"execute\": \"query-commands\"}");
	r = tc_json(c);
	ret = json_object_get(r, "return");
	ck_assert(json_is_array(ret));
	json_array_foreach(ret, i, e) {
		const char *n = json_string_value(json_object_get(e, "name"));
		seen_echo |= n && !strcmp(n, "test-echo");
		seen_caps |= n && !strcmp(n, "qmp_capabilities");
	}
	ck_assert(seen_echo && seen_caps);
	json_decref(r);
	tc_close(c);
}
END_TEST

START_TEST(qmp_malformed_input_keeps_connection)
{
	struct tc *c = tc_negotiated();
	char *l;

	tc_send(c, "{\"execute\": oops}\n");
	l = tc_line(c);
	ck_assert_ptr_nonnull(l);
	ck_assert_msg(!strncmp(l, "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, ", 62),
		      "got %s", l);
	/* The rest of a bad line is dropped, a message on the next line runs. */
	tc_send(c, "{\"bad\n{\"execute\": \"test-echo\", \"arguments\": {\"a\": 1}}");
	l = tc_line(c);
	ck_assert_msg(strstr(l, "JSON parse error") != NULL, "got %s", l);
	tc_expect(c, "{\"return\": {\"a\": 1}}");
	tc_send(c, "[1, 2]");
	tc_expect(c, "{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input must be a JSON object\"}}");
	tc_send(c, "{\"id\": 5}");
	tc_expect(c, "{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input lacks member 'execute'\"}, \"id\": 5}");
	tc_send(c, "{\"execute\": 1}");
	tc_expect(c, "{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'execute' must be a string\"}}");
	tc_send(c, "{\"execute\": \"test-echo\", \"arguments\": []}");
	tc_expect(c, "{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'arguments' must be an object\"}}");
	tc_send(c, "{\"execute\": \"test-echo\", \"extra\": 1}");
	tc_expect(c, "{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'extra' is unexpected\"}}");
	tc_send(c, "{\"execute\": \"nope\", \"id\": 9}");
	tc_expect(c, "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}, \"id\": 9}");
	/* Two messages in one write, one split over two writes. */
	tc_send(c, "{\"execute\": \"test-echo\", \"id\": 1}{\"execute\": \"test-echo\", \"id\": 2}{\"execute\":");
	tc_expect(c, "{\"return\": {}, \"id\": 1}");
	tc_expect(c, "{\"return\": {}, \"id\": 2}");
	tc_send(c, " \"test-echo\", \"id\": 3}");
	tc_expect(c, "{\"return\": {}, \"id\": 3}");
	tc_close(c);
}
END_TEST

START_TEST(qmp_oversized_message_closes)
{
	struct tc *c = tc_negotiated();
	size_t n = (1u << 20) + 4096, off = 0;
	char *big = malloc(n);
	char *l;

	memset(big, 'a', n);
	memcpy(big, "{\"execute\": \"", 13);
	while (off < n) {
		ssize_t w = send(c->fd, big + off, n - off, MSG_NOSIGNAL);
		if (w <= 0)
			break;   /* the server may close before we are done */
		off += (size_t)w;
	}
	l = tc_line(c);
	ck_assert_ptr_nonnull(l);
	ck_assert_msg(strstr(l, "exceeds 1 MiB") != NULL, "got %s", l);
	/* Then the server closes: EOF, or a reset if our last bytes arrived
	 * after it stopped reading. Either way nothing more is said. */
	{
		char b[64];
		ssize_t r = recv(c->fd, b, sizeof(b), 0);
		ck_assert_msg(c->len == 0 && (r == 0 || (r < 0 && errno == ECONNRESET)),
			      "expected the connection closed, got %zd (%s)", r, r < 0 ? strerror(errno) : "data");
	}
	free(big);
	tc_close(c);
}
END_TEST

START_TEST(qmp_deferred_reply_keeps_order)
{
	struct tc *c = tc_negotiated();

	tc_send(c, "{\"execute\": \"test-defer\", \"arguments\": {\"ms\": 50}, \"id\": 1}"
		   "{\"execute\": \"test-echo\", \"id\": 2}");
	tc_expect(c, "{\"return\": {\"deferred\": true}, \"id\": 1}");
	tc_expect(c, "{\"return\": {}, \"id\": 2}");
	tc_close(c);
}
END_TEST

START_TEST(qmp_events_reach_negotiated_clients)
{
	struct tc *a = tc_negotiated(), *b = tc_connect();
	json_t *ev;

	tc_line(b);   /* greeting only: b is not negotiated */
	/* From this (non-loop) thread: qmp_emit_event hops to the loop. */
	qmp_emit_event("TEST_EVENT", json_pack("{s:i}", "x", 1));
	qmp_emit_event("BARE", NULL);
	ev = tc_json(a);
	ck_assert_str_eq(json_string_value(json_object_get(ev, "event")), "TEST_EVENT");
	ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(ev, "data"), "x")), 1);
	ck_assert(json_is_integer(json_object_get(json_object_get(ev, "timestamp"), "seconds")));
	ck_assert(json_is_integer(json_object_get(json_object_get(ev, "timestamp"), "microseconds")));
	json_decref(ev);
	ev = tc_json(a);
	ck_assert_str_eq(json_string_value(json_object_get(ev, "event")), "BARE");
	ck_assert_ptr_null(json_object_get(ev, "data"));
	json_decref(ev);
	/* b gets no event: its next line is the negotiation reply. */
	tc_send(b, "{\"execute\": \"qmp_capabilities\"}");
	tc_expect(b, "{\"return\": {}}");
	tc_close(a);
	tc_close(b);
}
END_TEST

START_TEST(qmp_disconnect_during_deferred_request)
{
	struct tc *c = tc_negotiated();

	tc_send(c, "{\"execute\": \"test-defer\", \"arguments\": {\"ms\": 100}}");
	usleep(20000);
	tc_close(c);
	for (int i = 0; i < 100 && !__atomic_load_n(&deferred_done, __ATOMIC_SEQ_CST); i++)
		usleep(10000);
	ck_assert_int_eq(deferred_done, 1);    /* replied into the void */
	c = tc_negotiated();                     /* and the server is fine */
	tc_send(c, "{\"execute\": \"test-echo\", \"id\": 1}");
	tc_expect(c, "{\"return\": {}, \"id\": 1}");
	tc_close(c);
}
END_TEST

START_TEST(qmp_half_close_gets_replies)
{
	struct tc *c = tc_connect();

	tc_send(c, "{\"execute\": \"qmp_capabilities\"}\n"
		   "{\"execute\": \"test-defer\", \"arguments\": {\"ms\": 30}, \"id\": 1}\n"
		   "{\"execute\": \"test-echo\", \"id\": 2}\n");
	shutdown(c->fd, SHUT_WR);
	tc_line(c);
	tc_expect(c, "{\"return\": {}}");
	tc_expect(c, "{\"return\": {\"deferred\": true}, \"id\": 1}");
	tc_expect(c, "{\"return\": {}, \"id\": 2}");
	ck_assert_ptr_null(tc_line(c));          /* then the server closes */
	tc_close(c);
}
END_TEST

START_TEST(qmp_socket_in_use_is_refused_stale_is_replaced)
{
	char path[128], err[256];
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	int fd;
	struct stat st;

	/* A live listener at another path: refused, file left alone. */
	snprintf(path, sizeof(path), "%s/live.sock", tmpdir);
	strcpy(a.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM, 0);
	ck_assert_int_eq(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
	ck_assert_int_eq(listen(fd, 1), 0);
	/* (the server of the fixture is running: stop it to start another) */
	loop_quit(0);
	pthread_join(server_thread, NULL);
	ck_assert_int_eq(qmp_server_start(path, err, sizeof(err)), -1);
	ck_assert_msg(strstr(err, "in use") != NULL, "err: %s", err);
	ck_assert_int_eq(stat(path, &st), 0);
	/* The listener goes away: now the file is stale and gets replaced. */
	close(fd);
	ck_assert_int_eq(qmp_server_start(path, err, sizeof(err)), 0);
	ck_assert_int_eq(stat(path, &st), 0);
	ck_assert_int_eq(st.st_mode & 0777, 0600);
	qmp_server_stop();
	ck_assert_int_eq(stat(path, &st), -1);   /* removed on stop */
	/* A regular file is never removed. */
	close(open(path, O_CREAT | O_WRONLY, 0644));
	ck_assert_int_eq(qmp_server_start(path, err, sizeof(err)), -1);
	ck_assert_msg(strstr(err, "not a socket") != NULL, "err: %s", err);
	unlink(path);
	/* let the teardown find a server to stop */
	pthread_create(&server_thread, NULL, server_main, NULL);
	sem_wait(&server_started);
	ck_assert_int_eq(server_rc, 0);
}
END_TEST

Suite *qmp_suite(void)
{
	Suite *s = suite_create("qmp");
	TCase *tc = tcase_create("server");

	tcase_add_checked_fixture(tc, qmp_setup, qmp_teardown);
	tcase_add_test(tc, qmp_greeting_and_negotiation);
	tcase_add_test(tc, qmp_query_commands_lists_registered);
	tcase_add_test(tc, qmp_malformed_input_keeps_connection);
	tcase_add_test(tc, qmp_oversized_message_closes);
	tcase_add_test(tc, qmp_deferred_reply_keeps_order);
	tcase_add_test(tc, qmp_events_reach_negotiated_clients);
	tcase_add_test(tc, qmp_disconnect_during_deferred_request);
	tcase_add_test(tc, qmp_half_close_gets_replies);
	tcase_add_test(tc, qmp_socket_in_use_is_refused_stale_is_replaced);
	tcase_set_timeout(tc, 10);
	suite_add_tcase(s, tc);
	return s;
}
