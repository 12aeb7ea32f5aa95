/* QMP server: QEMU's monitor wire protocol on a UNIX socket (see qmp.h and
 * docs/control.md).
 *
 * Everything here runs on the main loop thread, except qmp_emit_event() and
 * qmp_reply_*(), which may be called from any thread and hop to the loop
 * with loop_call().
 *
 * Each client owns an input buffer (a JSON stream: messages are found with
 * json_loadb(JSON_DISABLE_EOF_CHECK), which reports how many bytes the first
 * complete value used) and an output buffer drained with EPOLLOUT, so a
 * client that stops reading only ever costs memory, never blocks the loop.
 * Requests of one client are executed one at a time, in order, as QEMU's
 * monitor does: while a handler's reply is outstanding (a deferred reply),
 * the client's input is not read. A client is reference counted: its
 * in-flight request keeps it alive after a disconnect, and the reply is
 * then dropped.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "loop.h"
#include "qmp.h"
#include "util.h"

/* In loop.c, not (yet) in loop.h: change the event mask of a registered fd. */

#define QMP_MAX_INPUT    (1u << 20)   /* buffered bytes without a complete message */
#define QMP_MAX_OUTPUT   (16u << 20)  /* unread output before a client is dropped */
#define QMP_MAX_CLIENTS  64
#define QMP_READ_CHUNK   65536

#define QMP_VERSION_MAJOR 0
#define QMP_VERSION_MINOR 1
#define QMP_VERSION_MICRO 0
#define QMP_PACKAGE       "mdvm 0.1"

struct qmp_cmd {
	char *name;
	qmp_handler fn;
	void *opaque;
	struct qmp_cmd *next;
};

struct client {
	int fd;              /* -1 once closed */
	int refs;            /* the client list + in-flight request + callers on the stack */
	bool negotiated;
	bool busy;           /* a request is waiting for its reply */
	bool eof;            /* peer shut down its sending side */
	bool skip_line;      /* dropping a malformed message up to the next '\n' */
	bool closing;        /* close once the output is flushed */
	bool resume_queued;  /* a loop_call to resume input processing is pending */
	uint32_t events;     /* current epoll mask */
	char *in;
	size_t in_off, in_len, in_cap;   /* unparsed bytes are in[in_off, in_len) */
	char *out;
	size_t out_off, out_len, out_cap;
	struct client *next, **pprev;
};

struct qmp_req {
	struct client *c;
	json_t *id;          /* NULL when the request had no "id" */
};

static struct {
	int fd;
	char *path;
	dev_t dev;           /* identity of the socket file we created, so stop */
	ino_t ino;           /* never unlinks another instance's socket */
	bool started;
	bool main_known;     /* main_thread is valid (kept after stop) */
	pthread_t main_thread;
	struct client *clients;
	int nclients;
} srv = { .fd = -1 };

static struct qmp_cmd *cmds, **cmds_tail = &cmds;
static bool builtins_done;

static void register_builtins(void);
static void client_close(struct client *c);
static void client_update_events(struct client *c);
static void process_input(struct client *c);

static bool on_main_thread(void)
{
	return srv.main_known && pthread_equal(pthread_self(), srv.main_thread);
}

/* json_string() refuses invalid UTF-8 (e.g. a jansson error message quoting
 * bad input bytes); replace such bytes by '?' rather than lose the text. */
static json_t *json_string_lossy(const char *s)
{
	json_t *j = json_string(s);
	if (j)
		return j;
	char *copy = xstrdup(s);
	for (char *p = copy; *p; p++)
		if ((unsigned char)*p >= 0x80 || (unsigned char)*p < 0x20)
			*p = '?';
	j = json_string(copy);
	free(copy);
	return j ? j : json_string("?");
}

/* ---- clients: buffers and lifetime ---- */

static void client_ref(struct client *c)
{
	c->refs++;
}

static void client_unref(struct client *c)
{
	if (--c->refs > 0)
		return;
	free(c->in);
	free(c->out);
	free(c);
}

static bool out_pending(const struct client *c)
{
	return c->out_len > c->out_off;
}

/* Write as much queued output as the socket takes. Returns false if the
 * client was closed. */
static bool client_flush(struct client *c)
{
	while (c->fd >= 0 && out_pending(c)) {
		ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off,
				 MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				break;
			/* EPIPE/ECONNRESET: the peer is gone; replies are dropped. */
			client_close(c);
			return false;
		}
		c->out_off += (size_t)n;
	}
	if (c->fd < 0)
		return false;
	if (!out_pending(c)) {
		c->out_off = c->out_len = 0;
		if (c->closing) {
			/* Discard what the client already sent: closing a UNIX socket
			 * with unread input makes the peer's recv fail with ECONNRESET
			 * instead of reading our error and then EOF. */
			char sink[4096];
			shutdown(c->fd, SHUT_WR);
			for (int i = 0; i < 1024 && recv(c->fd, sink, sizeof(sink), MSG_DONTWAIT) > 0; i++)
				;
			client_close(c);
			return false;
		}
	}
	return true;
}

/* Queue one message (not stolen) followed by "\r\n" as QEMU does. */
static void client_send(struct client *c, json_t *msg)
{
	char *s;
	size_t len;

	if (c->fd < 0)
		return;      /* disconnected: the message is dropped */
	s = json_dumps(msg, 0);
	if (!s)
		return;
	len = strlen(s);
	if (c->out_len - c->out_off + len + 2 > QMP_MAX_OUTPUT) {
		pr_warn("QMP client not reading its output; disconnecting it");
		free(s);
		client_close(c);
		return;
	}
	if (c->out_off > 0 && c->out_off == c->out_len)
		c->out_off = c->out_len = 0;
	if (c->out_len + len + 2 > c->out_cap) {
		/* Reclaim the already-sent prefix before growing. */
		if (c->out_off) {
			memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
			c->out_len -= c->out_off;
			c->out_off = 0;
		}
		if (c->out_len + len + 2 > c->out_cap) {
			size_t cap = c->out_cap ? c->out_cap : 4096;
			while (cap < c->out_len + len + 2)
				cap *= 2;
			c->out = xrealloc(c->out, cap);
			c->out_cap = cap;
		}
	}
	memcpy(c->out + c->out_len, s, len);
	c->out_len += len;
	c->out[c->out_len++] = '\r';
	c->out[c->out_len++] = '\n';
	free(s);
	if (client_flush(c))
		client_update_events(c);
}

static void client_update_events(struct client *c)
{
	uint32_t ev = 0;

	if (c->fd < 0)
		return;
	/* Stop reading while a request is in flight (keeps replies in order and
	 * bounds buffering) and after EOF (a level-triggered EPOLLIN would spin).
	 * EPOLLHUP/EPOLLERR are always reported, so disconnects are still seen. */
	if (!c->busy && !c->eof && !c->closing)
		ev |= EPOLLIN;
	if (out_pending(c))
		ev |= EPOLLOUT;
	if (ev != c->events) {
		if (loop_mod_fd(c->fd, ev) == 0)
			c->events = ev;
	}
}

static void client_close(struct client *c)
{
	if (c->fd < 0)
		return;
	loop_del_fd(c->fd);
	close(c->fd);
	c->fd = -1;
	c->out_off = c->out_len = 0;
	*c->pprev = c->next;
	if (c->next)
		c->next->pprev = c->pprev;
	srv.nclients--;
	client_unref(c);   /* the list's reference */
}

static void send_error(struct client *c, json_t *id, const char *cls, const char *desc)
{
	json_t *msg = json_pack("{s:{s:s,s:o}}", "error", "class", cls,
				"desc", json_string_lossy(desc));
	if (id)
		json_object_set(msg, "id", id);
	client_send(c, msg);
	json_decref(msg);
}

/* ---- requests and replies ---- */

static void resume_client(void *opaque)
{
	struct client *c = opaque;

	c->resume_queued = false;
	if (c->fd >= 0) {
		process_input(c);
		client_update_events(c);
	}
	client_unref(c);
}

static void finish_req(struct qmp_req *req, json_t *msg)
{
	struct client *c = req->c;

	if (req->id)
		json_object_set(msg, "id", req->id);
	client_send(c, msg);
	json_decref(msg);
	json_decref(req->id);
	free(req);
	c->busy = false;
	/* Messages that arrived behind this request are parsed from the loop,
	 * not from here: the reply may come from inside a handler. */
	if (c->fd >= 0 && !c->resume_queued) {
		c->resume_queued = true;
		client_ref(c);
		loop_call(resume_client, c);
	}
	client_unref(c);   /* the request's reference */
}

struct cross_thread_reply {
	struct qmp_req *req;
	json_t *msg;
};

static void finish_req_on_loop(void *opaque)
{
	struct cross_thread_reply *r = opaque;
	finish_req(r->req, r->msg);
	free(r);
}

static void deliver_reply(struct qmp_req *req, json_t *msg)
{
	if (!srv.main_known || on_main_thread()) {
		finish_req(req, msg);
	} else {
		struct cross_thread_reply *r = xmalloc(sizeof(*r));
		r->req = req;
		r->msg = msg;
		loop_call(finish_req_on_loop, r);
	}
}

void qmp_reply_ok(struct qmp_req *req, json_t *ret)
{
	json_t *msg = json_object();

	json_object_set_new(msg, "return", ret ? ret : json_object());
	deliver_reply(req, msg);
}

void qmp_reply_error(struct qmp_req *req, const char *cls, const char *fmt, ...)
{
	char buf[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	deliver_reply(req, json_pack("{s:{s:s,s:o}}", "error", "class",
				     cls ? cls : "GenericError", "desc", json_string_lossy(buf)));
}

static struct qmp_cmd *find_cmd(const char *name)
{
	for (struct qmp_cmd *cmd = cmds; cmd; cmd = cmd->next)
		if (!strcmp(cmd->name, name))
			return cmd;
	return NULL;
}

void qmp_register(const char *name, qmp_handler fn, void *opaque)
{
	struct qmp_cmd *cmd;

	register_builtins();
	cmd = find_cmd(name);
	if (cmd) {            /* re-registering replaces the handler */
		cmd->fn = fn;
		cmd->opaque = opaque;
		return;
	}
	cmd = xcalloc(1, sizeof(*cmd));
	cmd->name = xstrdup(name);
	cmd->fn = fn;
	cmd->opaque = opaque;
	*cmds_tail = cmd;
	cmds_tail = &cmd->next;
}

/* One complete JSON value from the client. */
static void handle_message(struct client *c, json_t *m)
{
	json_t *id, *exec, *args, *v;
	const char *key, *name;
	struct qmp_cmd *cmd;
	struct qmp_req *req;
	char desc[256];

	if (!json_is_object(m)) {
		send_error(c, NULL, "GenericError", "QMP input must be a JSON object");
		return;
	}
	id = json_object_get(m, "id");
	json_object_foreach(m, key, v) {
		if (strcmp(key, "execute") && strcmp(key, "arguments") && strcmp(key, "id")) {
			snprintf(desc, sizeof(desc), "QMP input member '%s' is unexpected", key);
			send_error(c, id, "GenericError", desc);
			return;
		}
	}
	exec = json_object_get(m, "execute");
	if (!exec) {
		send_error(c, id, "GenericError", "QMP input lacks member 'execute'");
		return;
	}
	if (!json_is_string(exec)) {
		send_error(c, id, "GenericError", "QMP input member 'execute' must be a string");
		return;
	}
	args = json_object_get(m, "arguments");
	if (args && !json_is_object(args)) {
		send_error(c, id, "GenericError", "QMP input member 'arguments' must be an object");
		return;
	}
	name = json_string_value(exec);
	if (!c->negotiated && strcmp(name, "qmp_capabilities")) {
		send_error(c, id, "CommandNotFound",
			   "Expecting capabilities negotiation with 'qmp_capabilities'");
		return;
	}
	if (c->negotiated && !strcmp(name, "qmp_capabilities")) {
		send_error(c, id, "CommandNotFound",
			   "Capabilities negotiation is already complete, command ignored");
		return;
	}
	cmd = find_cmd(name);
	if (!cmd) {
		snprintf(desc, sizeof(desc), "The command %.200s has not been found", name);
		send_error(c, id, "CommandNotFound", desc);
		return;
	}

	req = xcalloc(1, sizeof(*req));
	req->c = c;
	req->id = id ? json_incref(id) : NULL;
	client_ref(c);       /* dropped when the request is replied */
	c->busy = true;
	if (args) {
		json_incref(args);
	} else {
		args = json_object();
	}
	cmd->fn(req, args, cmd->opaque);
	json_decref(args);
}

static bool is_space(char ch)
{
	return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n';
}

/* Parse and execute buffered messages until the input is exhausted or a
 * request is waiting for its reply. */
static void process_input(struct client *c)
{
	client_ref(c);
	while (c->fd >= 0 && !c->busy && !c->closing) {
		json_error_t err;
		json_t *m;
		size_t avail;

		if (c->skip_line) {
			char *nl = memchr(c->in + c->in_off, '\n', c->in_len - c->in_off);
			if (!nl) {
				c->in_off = c->in_len;
				break;
			}
			c->in_off = (size_t)(nl - c->in) + 1;
			c->skip_line = false;
		}
		while (c->in_off < c->in_len && is_space(c->in[c->in_off]))
			c->in_off++;
		avail = c->in_len - c->in_off;
		if (!avail)
			break;

		m = json_loadb(c->in + c->in_off, avail, JSON_DISABLE_EOF_CHECK, &err);
		if (m) {
			c->in_off += (size_t)err.position;
			handle_message(c, m);
			json_decref(m);
			continue;
		}
		if (json_error_code(&err) == json_error_premature_end_of_input) {
			if (avail >= QMP_MAX_INPUT) {
				send_error(c, NULL, "GenericError",
					   "JSON parse error, message exceeds 1 MiB");
				c->closing = true;
				c->in_off = c->in_len;
				client_flush(c);
			}
			break;   /* wait for the rest of the message */
		}
		/* Malformed: report it and resynchronise at the next line, which is
		 * where an interactive user or a line-based client starts anew. */
		{
			char desc[300];
			size_t pos = err.position > 0 ? (size_t)err.position - 1 : 0;
			char *nl;

			snprintf(desc, sizeof(desc), "JSON parse error, %s", err.text);
			send_error(c, NULL, "GenericError", desc);
			if (pos > avail)
				pos = avail;
			nl = memchr(c->in + c->in_off + pos, '\n', avail - pos);
			if (nl) {
				c->in_off = (size_t)(nl - c->in) + 1;
			} else {
				c->in_off = c->in_len;
				c->skip_line = true;
			}
		}
	}
	if (c->fd >= 0) {
		if (c->in_off == c->in_len) {
			c->in_off = c->in_len = 0;
		}
		/* Peer finished sending and everything it sent is answered. */
		if (c->eof && !c->busy && !c->closing) {
			c->closing = true;
			client_flush(c);
		}
	}
	client_unref(c);
}

/* Read what is available. Returns bytes read, 0 on EOF, -1 on EAGAIN or
 * after closing the client on an error. */
static ssize_t client_read(struct client *c)
{
	ssize_t n;

	if (c->in_off > 0) {      /* compact */
		memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
		c->in_len -= c->in_off;
		c->in_off = 0;
	}
	if (c->in_cap - c->in_len < QMP_READ_CHUNK) {
		c->in_cap = c->in_len + QMP_READ_CHUNK;
		c->in = xrealloc(c->in, c->in_cap);
	}
	do {
		n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, MSG_DONTWAIT);
	} while (n < 0 && errno == EINTR);
	if (n > 0) {
		c->in_len += (size_t)n;
		return n;
	}
	if (n == 0) {
		c->eof = true;
		return 0;
	}
	if (errno != EAGAIN && errno != EWOULDBLOCK)
		client_close(c);
	return -1;
}

static void on_client(void *opaque, uint32_t events)
{
	struct client *c = opaque;

	client_ref(c);
	if (events & EPOLLERR) {
		client_close(c);
		goto out;
	}
	if (events & EPOLLOUT)
		client_flush(c);
	if (events & (EPOLLIN | EPOLLHUP)) {
		/* On EPOLLHUP, still run what the peer sent before it went away
		 * (e.g. `echo '...' | socat`); the replies are then dropped. */
		int rounds = (events & EPOLLHUP) ? 1 << 30 : 16;
		while (rounds-- > 0 && c->fd >= 0 && !c->busy && !c->eof && !c->closing) {
			ssize_t n = client_read(c);
			if (c->fd < 0)
				break;
			process_input(c);
			if (n <= 0)
				break;
		}
	}
	if ((events & EPOLLHUP) && c->fd >= 0)
		client_close(c);  /* a pending request's reply will be dropped */
	client_update_events(c);
out:
	client_unref(c);
}

static void send_greeting(struct client *c)
{
	json_t *msg = json_pack("{s:{s:{s:{s:i,s:i,s:i},s:s},s:[]}}",
				"QMP", "version", "qemu",
				"micro", QMP_VERSION_MICRO, "minor", QMP_VERSION_MINOR,
				"major", QMP_VERSION_MAJOR, "package", QMP_PACKAGE,
				"capabilities");
	client_send(c, msg);
	json_decref(msg);
}

static void on_accept(void *opaque, uint32_t events)
{
	for (;;) {
		int fd = accept4(srv.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		struct client *c;

		if (fd < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				pr_warn("QMP accept: %s", strerror(errno));
			return;
		}
		if (srv.nclients >= QMP_MAX_CLIENTS) {
			pr_warn("QMP: too many clients, refusing one");
			close(fd);
			continue;
		}
		c = xcalloc(1, sizeof(*c));
		c->fd = fd;
		c->refs = 1;          /* the list's reference */
		c->events = EPOLLIN;
		if (loop_add_fd(fd, EPOLLIN, on_client, c) < 0) {
			pr_warn("QMP: cannot watch client: %s", strerror(errno));
			close(fd);
			free(c);
			continue;
		}
		c->next = srv.clients;
		c->pprev = &srv.clients;
		if (srv.clients)
			srv.clients->pprev = &c->next;
		srv.clients = c;
		srv.nclients++;
		send_greeting(c);
	}
}

/* ---- events ---- */

static void broadcast(void *opaque)
{
	json_t *msg = opaque;

	for (struct client *c = srv.clients, *next; c; c = next) {
		next = c->next;   /* client_send may close (and unlink) c */
		if (c->negotiated && !c->closing)
			client_send(c, msg);
	}
	json_decref(msg);
}

void qmp_emit_event(const char *name, json_t *data)
{
	struct timeval tv;
	json_t *msg;

	if (!srv.started) {
		json_decref(data);
		return;
	}
	gettimeofday(&tv, NULL);   /* QEMU's timestamps are wall-clock */
	msg = json_object();
	json_object_set_new(msg, "event", json_string_lossy(name));
	if (data)                  /* QEMU omits "data" for events without any */
		json_object_set_new(msg, "data", data);
	json_object_set_new(msg, "timestamp",
			    json_pack("{s:I,s:I}", "seconds", (json_int_t)tv.tv_sec,
				      "microseconds", (json_int_t)tv.tv_usec));
	if (on_main_thread())
		broadcast(msg);
	else
		loop_call(broadcast, msg);
}

/* ---- built-in commands ---- */

/* The built-ins take no arguments (qmp_capabilities: only "enable"). */
static bool no_unexpected_args(struct qmp_req *req, json_t *args, const char *allowed)
{
	const char *key;
	json_t *v;

	json_object_foreach(args, key, v) {
		if (!allowed || strcmp(key, allowed)) {
			qmp_reply_error(req, "GenericError", "Parameter '%s' is unexpected", key);
			return false;
		}
	}
	return true;
}

static void cmd_qmp_capabilities(struct qmp_req *req, json_t *args, void *opaque)
{
	json_t *enable = json_object_get(args, "enable");
	struct client *c = req->c;

	if (!no_unexpected_args(req, args, "enable"))
		return;
	if (enable && !json_is_array(enable)) {
		qmp_reply_error(req, "GenericError",
				"Invalid parameter type for 'enable', expected: array");
		return;
	}
	if (enable && json_array_size(enable) > 0) {
		json_t *cap = json_array_get(enable, 0);
		qmp_reply_error(req, "GenericError", "Capability '%s' not available",
				json_is_string(cap) ? json_string_value(cap) : "?");
		return;
	}
	c->negotiated = true;
	qmp_reply_ok(req, NULL);
}

static void cmd_query_commands(struct qmp_req *req, json_t *args, void *opaque)
{
	json_t *list;

	if (!no_unexpected_args(req, args, NULL))
		return;
	list = json_array();
	for (struct qmp_cmd *cmd = cmds; cmd; cmd = cmd->next)
		json_array_append_new(list, json_pack("{s:s}", "name", cmd->name));
	qmp_reply_ok(req, list);
}

static void cmd_query_version(struct qmp_req *req, json_t *args, void *opaque)
{
	if (!no_unexpected_args(req, args, NULL))
		return;
	qmp_reply_ok(req, json_pack("{s:{s:i,s:i,s:i},s:s}", "qemu",
				    "micro", QMP_VERSION_MICRO, "minor", QMP_VERSION_MINOR,
				    "major", QMP_VERSION_MAJOR, "package", QMP_PACKAGE));
}

static void register_builtins(void)
{
	if (builtins_done)
		return;
	builtins_done = true;
	qmp_register("qmp_capabilities", cmd_qmp_capabilities, NULL);
	qmp_register("query-commands", cmd_query_commands, NULL);
	qmp_register("query-version", cmd_query_version, NULL);
}

/* ---- server ---- */

int qmp_server_start(const char *path, char *err, size_t errlen)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	struct stat st;
	int fd = -1, probe;

	register_builtins();
	if (srv.started) {
		snprintf(err, errlen, "control socket already started");
		return -1;
	}
	if (strlen(path) >= sizeof(addr.sun_path)) {
		snprintf(err, errlen, "control socket path too long (max %zu bytes): %s",
			 sizeof(addr.sun_path) - 1, path);
		return -1;
	}
	strcpy(addr.sun_path, path);
	if (loop_init() < 0) {
		snprintf(err, errlen, "event loop: %s", strerror(errno));
		return -1;
	}

	/* A socket file left by a crashed instance is removed; one that still
	 * accepts connections belongs to a live process and is left alone. */
	if (lstat(path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode)) {
			snprintf(err, errlen, "%s exists and is not a socket", path);
			return -1;
		}
		probe = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (probe < 0) {
			snprintf(err, errlen, "socket: %s", strerror(errno));
			return -1;
		}
		/* Non-blocking: a live listener with a full backlog says EAGAIN. */
		if (connect(probe, (struct sockaddr *)&addr, sizeof(addr)) == 0 ||
		    errno == EAGAIN) {
			close(probe);
			snprintf(err, errlen, "%s is in use by another process", path);
			return -1;
		}
		if (errno != ECONNREFUSED) {
			snprintf(err, errlen, "cannot probe %s: %s", path, strerror(errno));
			close(probe);
			return -1;
		}
		close(probe);
		if (unlink(path) < 0 && errno != ENOENT) {
			snprintf(err, errlen, "cannot remove stale socket %s: %s", path,
				 strerror(errno));
			return -1;
		}
	}

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		snprintf(err, errlen, "socket: %s", strerror(errno));
		return -1;
	}
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		snprintf(err, errlen, "cannot bind %s: %s", path, strerror(errno));
		goto fail;
	}
	/* Nobody can connect before listen(), so tightening the mode here leaves
	 * no window; unlike umask() it does not race with other threads. */
	if (chmod(path, 0600) < 0 || stat(path, &st) < 0) {
		snprintf(err, errlen, "cannot chmod %s: %s", path, strerror(errno));
		goto fail_unlink;
	}
	if (listen(fd, 16) < 0) {
		snprintf(err, errlen, "cannot listen on %s: %s", path, strerror(errno));
		goto fail_unlink;
	}
	if (loop_add_fd(fd, EPOLLIN, on_accept, NULL) < 0) {
		snprintf(err, errlen, "event loop: %s", strerror(errno));
		goto fail_unlink;
	}
	srv.fd = fd;
	srv.path = xstrdup(path);
	srv.dev = st.st_dev;
	srv.ino = st.st_ino;
	srv.main_thread = pthread_self();
	srv.main_known = true;
	srv.started = true;
	return 0;

fail_unlink:
	unlink(path);
fail:
	close(fd);
	return -1;
}

/* Give queued output (e.g. the reply to "quit") a short chance to reach
 * the clients before their sockets are closed. */
static void flush_all(int budget_ms)
{
	uint64_t deadline = monotonic_ns() + (uint64_t)budget_ms * 1000000ULL;

	for (;;) {
		struct pollfd pfds[QMP_MAX_CLIENTS];
		int n = 0;
		uint64_t now;

		for (struct client *c = srv.clients, *next; c; c = next) {
			next = c->next;
			if (out_pending(c) && client_flush(c) && out_pending(c) && n < QMP_MAX_CLIENTS)
				pfds[n++] = (struct pollfd){ .fd = c->fd, .events = POLLOUT };
		}
		now = monotonic_ns();
		if (!n || now >= deadline)
			return;
		poll(pfds, (nfds_t)n, (int)((deadline - now) / 1000000ULL) + 1);
	}
}

void qmp_server_stop(void)
{
	struct stat st;

	if (!srv.started)
		return;
	flush_all(200);
	while (srv.clients)
		client_close(srv.clients);  /* pending requests keep their client */
	loop_del_fd(srv.fd);
	close(srv.fd);
	srv.fd = -1;
	if (lstat(srv.path, &st) == 0 && st.st_dev == srv.dev && st.st_ino == srv.ino)
		unlink(srv.path);
	free(srv.path);
	srv.path = NULL;
	srv.started = false;
}
