/* `mdvm ctl`: a small QMP client for scripts and humans (docs/control.md).
 *
 *   mdvm ctl --socket PATH COMMAND [key=value ...] [--json] [--timeout SEC]
 *   mdvm ctl --socket PATH guest WORDS...     (guest-command "WORDS...")
 */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "ctl.h"
#include "util.h"

#define CTL_DEFAULT_TIMEOUT_S 30
#define CTL_MAX_MSG (16u << 20)

enum { EXIT_OK = 0, EXIT_CMD = 1, EXIT_USAGE = 2 };

static void ctl_usage(FILE *f)
{
	fprintf(f,
"usage: mdvm ctl [--socket PATH] [--json] [--timeout SEC] COMMAND [key=value ...]\n"
"       mdvm ctl [--socket PATH] guest WORDS...\n"
"\n"
"Send one QMP command to a running mdvm and print the reply.\n"
"\n"
"options:\n"
"  --socket PATH   control socket (default: $MDVM_SOCKET)\n"
"  --json          print the raw JSON reply instead of text\n"
"  --timeout SEC   give up waiting for the reply after SEC seconds (default %d)\n"
"  --help          this text\n"
"\n"
"arguments: key=value, where value 42, -1, 0x1000 and 4K/4M/2G/1T become\n"
"integers, true/false booleans, anything else a string; key:=JSON passes\n"
"raw JSON (e.g. filename:='\"4M\"').\n"
"\n"
"commands:\n"
"  query-status                      run state (status, running)\n"
"  stop | cont                       pause / resume the vCPUs\n"
"  system_reset                      reset the VM\n"
"  quit                              exit mdvm\n"
"  pmemsave val=GPA size=N filename=PATH\n"
"                                    write guest-physical memory to a file\n"
"  query-cpus-fast                   vCPUs and their host thread ids\n"
"  guest-command command=TEXT [timeout=MS]\n"
"                                    run a test-guest command (default 10000 ms)\n"
"  guest WORDS...                    shorthand: guest-command command=\"WORDS...\"\n"
"  query-guest                       test-guest counters (sweeps)\n"
"  inject-memory-error gpa=GPA [kind=action-optional|action-required] [count=N]\n"
"                                    poison guest pages, tell the guest by #MC\n"
"  query-mce                         machine-check back end, poisoned pages\n"
"  balloon SIZE                      virtio balloon: the guest should keep SIZE of RAM\n"
"                                    (256M, 1G; a bare number is MiB, as QEMU's HMP)\n"
"  query-balloon                     actual: guest RAM minus the balloon, in bytes\n"
"  query-memory                      guest RAM: backing, pages by type, folios, fragmentation\n"
"  compact [mode=reclaim|collapse] [budget=SIZE] [method=auto|uffd-wp|pause]\n"
"          [gpa=GPA size=SIZE]       move guest folios on the host: give sparse hugepages\n"
"                                    back (hugetlb: demote to 4 KiB) or rebuild 2 MiB folios\n"
"  migrate URI [detach=true]         live-migrate to tcp:HOST:PORT or unix:PATH;\n"
"                                    shows progress until done unless detach=true\n"
"  query-migrate | migrate_cancel    migration status / cancel it\n"
"  migrate-set-parameters max-bandwidth=BYTES/S downtime-limit=MS\n"
"  query-commands | query-version    what the server supports\n"
"\n"
"exit status: 0 ok, 1 the command failed, 2 usage or connection error\n",
		CTL_DEFAULT_TIMEOUT_S);
}

static int usage_error(const char *fmt, const char *arg)
{
	fprintf(stderr, "mdvm ctl: ");
	fprintf(stderr, fmt, arg);
	fprintf(stderr, "\n(see mdvm ctl --help)\n");
	return EXIT_USAGE;
}

/* ---- key=value conversion ---- */

static bool all_digits(const char *s, int (*is)(int))
{
	if (!*s)
		return false;
	for (; *s; s++)
		if (!is((unsigned char)*s))
			return false;
	return true;
}

/* "42", "-7", "0x1f", "4K", "16M", "2G", "1T" (optionally "MiB"/"MB").
 * Returns 1 if s is an integer (stored in *out), 0 if it is not one, -1 if
 * it looks like one but does not fit in a JSON (int64) integer. */
static int parse_int(const char *s, json_int_t *out)
{
	char digits[32];
	const char *p = s;
	unsigned long long v;
	int shift = 0;
	bool neg = false;
	size_t n;

	if (!strncmp(s, "0x", 2) || !strncmp(s, "0X", 2)) {
		if (!all_digits(s + 2, isxdigit))
			return 0;
		if (strlen(s + 2) > 16)
			return -1;
		v = strtoull(s + 2, NULL, 16);
		if (v > INT64_MAX)
			return -1;
		*out = (json_int_t)v;
		return 1;
	}
	if (*p == '-') {
		neg = true;
		p++;
	}
	n = strspn(p, "0123456789");
	if (n == 0 || n >= sizeof(digits))
		return n >= sizeof(digits) ? -1 : 0;
	memcpy(digits, p, n);
	digits[n] = 0;
	p += n;
	if (*p) {
		if (neg)
			return 0;
		switch (toupper((unsigned char)*p)) {
		case 'K': shift = 10; break;
		case 'M': shift = 20; break;
		case 'G': shift = 30; break;
		case 'T': shift = 40; break;
		default: return 0;
		}
		p++;
		if (strcmp(p, "") && strcmp(p, "B") && strcmp(p, "iB"))
			return 0;
	}
	errno = 0;
	v = strtoull(digits, NULL, 10);
	if (errno || v > (unsigned long long)INT64_MAX >> shift)
		return -1;
	v <<= shift;
	*out = neg ? -(json_int_t)v : (json_int_t)v;
	return 1;
}

static json_t *convert_value(const char *s)
{
	json_int_t i;

	if (!strcmp(s, "true"))
		return json_true();
	if (!strcmp(s, "false"))
		return json_false();
	switch (parse_int(s, &i)) {
	case 1:  return json_integer(i);
	case -1: return NULL;
	default: return json_string(s);
	}
}

/* Adds "key=value" or "key:=JSON" to args. Returns 0 or a usage error. */
static int add_arg(json_t *args, const char *kv)
{
	const char *eq = strchr(kv, '=');
	bool raw;
	size_t klen;
	char *key;
	json_t *val;

	if (!eq || eq == kv)
		return usage_error("expected key=value, got '%s'", kv);
	raw = eq[-1] == ':';
	klen = (size_t)(eq - kv) - (raw ? 1 : 0);
	if (klen == 0)
		return usage_error("expected key=value, got '%s'", kv);
	key = strndup(kv, klen);
	if (!key)
		abort();
	if (raw) {
		json_error_t err;
		val = json_loads(eq + 1, JSON_DECODE_ANY, &err);
		if (!val) {
			fprintf(stderr, "mdvm ctl: bad JSON for '%s': %s\n", key, err.text);
			free(key);
			return EXIT_USAGE;
		}
	} else {
		val = convert_value(eq + 1);
		if (!val) {
			fprintf(stderr, "mdvm ctl: value of '%s' is not valid UTF-8 or out of range\n",
				key);
			free(key);
			return EXIT_USAGE;
		}
	}
	if (json_object_get(args, key)) {
		fprintf(stderr, "mdvm ctl: argument '%s' given twice\n", key);
		json_decref(val);
		free(key);
		return EXIT_USAGE;
	}
	json_object_set_new(args, key, val);
	free(key);
	return 0;
}

/* ---- the connection ---- */
struct conn;
static int migrate_progress(struct conn *c, bool json);

struct conn {
	int fd;
	char *buf;
	size_t len, cap;
	int64_t deadline_ns;
	const char *path;
};

static int64_t ms_left(const struct conn *c)
{
	int64_t left = c->deadline_ns - (int64_t)monotonic_ns();
	return left <= 0 ? 0 : left / 1000000 + 1;
}

static int conn_send(struct conn *c, json_t *msg)
{
	char *s = json_dumps(msg, 0);
	size_t len, off = 0;

	if (!s)
		return -1;
	len = strlen(s);
	s = xrealloc(s, len + 2);
	s[len++] = '\n';
	while (off < len) {
		ssize_t n = send(c->fd, s + off, len - off, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			fprintf(stderr, "mdvm ctl: write to %s failed: %s\n", c->path,
				strerror(errno));
			free(s);
			return -1;
		}
		off += (size_t)n;
	}
	free(s);
	return 0;
}

/* Next JSON message from the server, or NULL after printing why. */
static json_t *conn_recv(struct conn *c)
{
	for (;;) {
		size_t skip = 0;
		json_error_t err;
		json_t *m;
		struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
		ssize_t n;
		int r;

		while (skip < c->len && isspace((unsigned char)c->buf[skip]))
			skip++;
		if (skip < c->len) {
			m = json_loadb(c->buf + skip, c->len - skip, JSON_DISABLE_EOF_CHECK, &err);
			if (m) {
				skip += (size_t)err.position;
				memmove(c->buf, c->buf + skip, c->len - skip);
				c->len -= skip;
				return m;
			}
			if (json_error_code(&err) != json_error_premature_end_of_input) {
				fprintf(stderr, "mdvm ctl: bad JSON from %s: %s\n", c->path, err.text);
				return NULL;
			}
		}
		if (c->len >= CTL_MAX_MSG) {
			fprintf(stderr, "mdvm ctl: reply from %s is too long\n", c->path);
			return NULL;
		}
		r = poll(&pfd, 1, (int)ms_left(c));
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			fprintf(stderr, "mdvm ctl: poll: %s\n", strerror(errno));
			return NULL;
		}
		if (r == 0 || ms_left(c) == 0) {
			fprintf(stderr, "mdvm ctl: timed out waiting for %s\n", c->path);
			return NULL;
		}
		if (c->cap - c->len < 65536) {
			c->cap = c->len + 65536;
			c->buf = xrealloc(c->buf, c->cap);
		}
		n = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			fprintf(stderr, "mdvm ctl: read from %s failed: %s\n", c->path,
				strerror(errno));
			return NULL;
		}
		if (n == 0) {
			fprintf(stderr, "mdvm ctl: %s closed the connection\n", c->path);
			return NULL;
		}
		c->len += (size_t)n;
	}
}

/* Send a command and return its reply (events are skipped). */
static json_t *conn_call(struct conn *c, const char *cmd, json_t *args, int id)
{
	json_t *msg = json_pack("{s:s}", "execute", cmd);

	if (args && json_object_size(args))
		json_object_set(msg, "arguments", args);
	json_object_set_new(msg, "id", json_integer(id));
	if (conn_send(c, msg) < 0) {
		json_decref(msg);
		return NULL;
	}
	json_decref(msg);
	for (;;) {
		json_t *m = conn_recv(c), *mid;

		if (!m)
			return NULL;
		mid = json_object_get(m, "id");
		if ((json_object_get(m, "return") || json_object_get(m, "error")) &&
		    (!mid || (json_is_integer(mid) && json_integer_value(mid) == id)))
			return m;
		json_decref(m);   /* an event, or a stray reply */
	}
}

static int conn_open(struct conn *c, const char *path)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };

	c->path = path;
	if (strlen(path) >= sizeof(addr.sun_path)) {
		fprintf(stderr, "mdvm ctl: cannot connect to %s: %s\n", path,
			strerror(ENAMETOOLONG));
		return -1;
	}
	strcpy(addr.sun_path, path);
	c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		fprintf(stderr, "mdvm ctl: cannot connect to %s: %s\n", path, strerror(errno));
		return -1;
	}
	return 0;
}

/* ---- printing ---- */

static void print_scalar(FILE *f, json_t *v)
{
	char *s;

	switch (json_typeof(v)) {
	case JSON_STRING:  fputs(json_string_value(v), f); break;
	case JSON_INTEGER: fprintf(f, "%" JSON_INTEGER_FORMAT, json_integer_value(v)); break;
	case JSON_REAL:    fprintf(f, "%g", json_real_value(v)); break;
	case JSON_TRUE:    fputs("true", f); break;
	case JSON_FALSE:   fputs("false", f); break;
	case JSON_NULL:    fputs("null", f); break;
	default:           /* nested object/array: compact JSON */
		s = json_dumps(v, JSON_ENCODE_ANY);
		fputs(s ? s : "?", f);
		free(s);
	}
}

static void print_return(const char *cmd, json_t *ret)
{
	const char *key;
	json_t *v;
	size_t i;

	if (!strcmp(cmd, "query-version") && json_is_object(ret)) {
		json_t *q = json_object_get(ret, "qemu");
		printf("package: %s\n", json_string_value(json_object_get(ret, "package")) ?: "?");
		printf("version: %" JSON_INTEGER_FORMAT ".%" JSON_INTEGER_FORMAT ".%" JSON_INTEGER_FORMAT "\n",
		       json_integer_value(json_object_get(q, "major")),
		       json_integer_value(json_object_get(q, "minor")),
		       json_integer_value(json_object_get(q, "micro")));
		return;
	}
	if (json_is_object(ret)) {
		json_object_foreach(ret, key, v) {
			printf("%s: ", key);
			print_scalar(stdout, v);
			putchar('\n');
		}
		return;
	}
	if (json_is_array(ret)) {
		/* One line per element; {"name": x} lists print just x. */
		json_array_foreach(ret, i, v) {
			if (json_is_object(v) && json_object_size(v) == 1) {
				json_object_foreach(v, key, v)
					print_scalar(stdout, v);
			} else if (json_is_object(v)) {
				bool first = true;
				json_t *e;
				json_object_foreach(v, key, e) {
					printf("%s%s=", first ? "" : " ", key);
					print_scalar(stdout, e);
					first = false;
				}
			} else {
				print_scalar(stdout, v);
			}
			putchar('\n');
		}
		return;
	}
	print_scalar(stdout, ret);
	putchar('\n');
}

/* Returns the exit status for a reply. */
static int handle_reply(const char *cmd, json_t *reply, bool json)
{
	json_t *error = json_object_get(reply, "error");
	json_t *ret = json_object_get(reply, "return");

	if (json) {
		json_t *copy = json_copy(reply);
		char *s;
		json_object_del(copy, "id");   /* ours, not the user's */
		s = json_dumps(copy, 0);
		puts(s ? s : "?");
		free(s);
		json_decref(copy);
	}
	if (error) {
		const char *desc = json_string_value(json_object_get(error, "desc"));
		fprintf(stderr, "mdvm ctl: error: %s\n", desc ? desc : "(no description)");
		return EXIT_CMD;
	}
	if (!strcmp(cmd, "guest-command")) {
		json_int_t status = json_integer_value(json_object_get(ret, "status"));
		const char *text = json_string_value(json_object_get(ret, "response"));

		if (!json && text && *text)
			printf("%s%s", text, text[strlen(text) - 1] == '\n' ? "" : "\n");
		if (status != 0) {
			fprintf(stderr, "mdvm ctl: guest command failed with status %"
				JSON_INTEGER_FORMAT "\n", status);
			return EXIT_CMD;
		}
		return EXIT_OK;
	}
	if (!json && ret)
		print_return(cmd, ret);
	return EXIT_OK;
}

/* ---- main ---- */

int ctl_main(int argc, char **argv)
{
	const char *path = getenv("MDVM_SOCKET"), *cmd = NULL;
	bool json = false, guest_words = false, opts_done = false;
	long timeout_s = CTL_DEFAULT_TIMEOUT_S;
	json_t *args = json_object(), *reply = NULL, *greeting;
	char *guest_text = NULL;
	size_t guest_len = 0;
	struct conn c = { .fd = -1 };
	int ret = EXIT_USAGE;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *val = NULL;

		if (!opts_done && !strcmp(a, "--")) {
			opts_done = true;
			continue;
		}
		if (!opts_done && (!strcmp(a, "--help") || !strcmp(a, "-h"))) {
			ctl_usage(stdout);
			ret = EXIT_OK;
			goto out;
		}
		if (!opts_done && !strcmp(a, "--json")) {
			json = true;
			continue;
		}
		if (!opts_done && (!strcmp(a, "--socket") || !strcmp(a, "--timeout"))) {
			if (i + 1 >= argc) {
				ret = usage_error("%s needs a value", a);
				goto out;
			}
			val = argv[++i];
		} else if (!opts_done && (!strncmp(a, "--socket=", 9) || !strncmp(a, "--timeout=", 10))) {
			val = strchr(a, '=') + 1;
		}
		if (val) {
			if (!strncmp(a, "--socket", 8)) {
				path = val;
			} else {
				char *end;
				errno = 0;
				timeout_s = strtol(val, &end, 10);
				if (errno || *end || end == val || timeout_s <= 0 || timeout_s > 86400) {
					ret = usage_error("bad --timeout '%s' (seconds, 1..86400)", val);
					goto out;
				}
			}
			continue;
		}
		if (!opts_done && !strncmp(a, "--", 2) && !guest_words) {
			ret = usage_error("unknown option '%s'", a);
			goto out;
		}
		if (!cmd) {
			cmd = a;
			if (!strcmp(cmd, "guest")) {
				guest_words = true;
				cmd = "guest-command";
			}
			continue;
		}
		if (guest_words) {
			/* `guest walk size=4M`: the words are the guest's, verbatim. */
			size_t l = strlen(a);
			guest_text = xrealloc(guest_text, guest_len + l + 2);
			if (guest_len)
				guest_text[guest_len++] = ' ';
			memcpy(guest_text + guest_len, a, l + 1);
			guest_len += l;
			continue;
		}
		/* `migrate URI`: the URI is the one positional argument. */
		if (!strcmp(cmd, "migrate") && !strchr(a, '=') && !json_object_get(args, "uri")) {
			json_object_set_new(args, "uri", json_string(a));
			continue;
		}
		if (!strcmp(cmd, "balloon") && !strchr(a, '=')) {
			/* `balloon 256M`; a bare number is MiB, as in QEMU's HMP. */
			char kv[64];
			snprintf(kv, sizeof(kv), "value=%s%s", a, a[strspn(a, "0123456789")] ? "" : "M");
			a = kv;
			if ((ret = add_arg(args, a)) != 0)
				goto out;
			ret = EXIT_USAGE;
			continue;
		}
		if ((ret = add_arg(args, a)) != 0)
			goto out;
		ret = EXIT_USAGE;
	}
	if (!cmd) {
		ret = usage_error("%s", "no command given");
		goto out;
	}
	if (guest_words) {
		if (!guest_text) {
			ret = usage_error("%s", "guest: no command words given");
			goto out;
		}
		if (json_object_set_new(args, "command", json_string(guest_text)) != 0) {
			ret = usage_error("%s", "guest: command is not valid UTF-8");
			goto out;
		}
	}
	if (!path || !*path) {
		ret = usage_error("%s", "no control socket: use --socket PATH or set MDVM_SOCKET");
		goto out;
	}
	/* A guest-command may legitimately take longer than the default wait. */
	if (!strcmp(cmd, "guest-command")) {
		json_t *t = json_object_get(args, "timeout");
		if (json_is_integer(t) && json_integer_value(t) / 1000 + 5 > timeout_s)
			timeout_s = (long)(json_integer_value(t) / 1000 + 5);
	}

	if (conn_open(&c, path) < 0)
		goto out;
	c.deadline_ns = (int64_t)monotonic_ns() + (int64_t)timeout_s * 1000000000LL;
	greeting = conn_recv(&c);
	if (!greeting)
		goto out;
	if (!json_object_get(greeting, "QMP")) {
		json_decref(greeting);
		fprintf(stderr, "mdvm ctl: %s did not send a QMP greeting\n", path);
		goto out;
	}
	json_decref(greeting);

	reply = conn_call(&c, "qmp_capabilities", NULL, 1);
	if (!reply)
		goto out;
	if (json_object_get(reply, "error")) {
		ret = handle_reply("qmp_capabilities", reply, json);
		goto out;
	}
	json_decref(reply);
	reply = conn_call(&c, cmd, args, 2);
	if (!reply)
		goto out;
	fflush(stdout);
	ret = handle_reply(cmd, reply, json);
	if (ret == EXIT_OK && !strcmp(cmd, "migrate") &&
	    !json_is_true(json_object_get(args, "detach")))
		ret = migrate_progress(&c, json);
out:
	fflush(stdout);
	json_decref(reply);
	json_decref(args);
	free(guest_text);
	free(c.buf);
	if (c.fd >= 0)
		close(c.fd);
	return ret;
}

/* `mdvm ctl migrate`: poll query-migrate, draw a progress bar on stderr,
 * end with a summary; exit status 0 only if the migration completed. */
static int migrate_progress(struct conn *c, bool json)
{
	bool tty = isatty(STDERR_FILENO);
	uint64_t last_line = 0;

	for (int id = 3;; id++) {
		c->deadline_ns = (int64_t)monotonic_ns() + 30LL * 1000000000LL;
		json_t *r = conn_call(c, "query-migrate", NULL, id), *ret, *ram;
		if (!r)
			return EXIT_USAGE;
		ret = json_object_get(r, "return");
		if (!ret) {
			json_decref(r);
			fprintf(stderr, "mdvm ctl: query-migrate failed\n");
			return EXIT_CMD;
		}
		const char *st = json_string_value(json_object_get(ret, "status"));
		ram = json_object_get(ret, "ram");
		double total = (double)json_integer_value(json_object_get(ram, "total"));
		double sent = (double)json_integer_value(json_object_get(ram, "transferred"));
		double rem = (double)json_integer_value(json_object_get(ram, "remaining"));
		json_int_t iters = json_integer_value(json_object_get(ram, "dirty-sync-count"));
		json_int_t ms = json_integer_value(json_object_get(ret, "total-time"));
		bool done = !st || !strcmp(st, "completed") || !strcmp(st, "failed") ||
			    !strcmp(st, "cancelled");
		/* Progress: guest RAM accounted for, (total - remaining) / total.
		 * Not bytes sent: zero and untouched pages go as small markers.
		 * In the first pass `remaining` is what it has still to walk,
		 * later what the last sync found dirty, so the bar fills as pass
		 * 1 walks and then shows how close the iterations are to done;
		 * 100% only once completed. */
		bool completed = st && !strcmp(st, "completed");
		double frac = completed ? 1.0 : total > 0 ? (total - rem) / total : 0;
		if (frac < 0)
			frac = 0;
		if (!completed && frac > 0.99)
			frac = 0.99;
		uint64_t now = monotonic_ns();
		if (tty || done || now - last_line > 1000000000ULL) {
			char bar[41];
			int fill = (int)(frac * 40);
			for (int i = 0; i < 40; i++)
				bar[i] = i < fill ? '#' : '.';
			bar[40] = 0;
			fprintf(stderr, "%s[%s] %3d%% %s %.1f MiB sent, %.1f MiB left, iter %lld, %lld ms%s",
				tty ? "\r" : "", bar, (int)(frac * 100), st ? st : "?", sent / 1048576,
				rem / 1048576, (long long)iters, (long long)ms, tty ? "   " : "\n");
			last_line = now;
		}
		if (done) {
			if (tty)
				fputc('\n', stderr);
			if (json) {
				char *s = json_dumps(ret, JSON_SORT_KEYS);
				printf("%s\n", s);
				free(s);
			} else if (st && !strcmp(st, "completed")) {
				printf("migration completed: %lld ms total, %lld ms downtime, %.1f MiB sent\n",
				       (long long)ms, (long long)json_integer_value(json_object_get(ret, "downtime")),
				       sent / 1048576);
			} else {
				const char *e = json_string_value(json_object_get(ret, "error-desc"));
				printf("migration %s%s%s\n", st ? st : "ended", e ? ": " : "", e ? e : "");
			}
			int rc = st && !strcmp(st, "completed") ? EXIT_OK : EXIT_CMD;
			json_decref(r);
			return rc;
		}
		json_decref(r);
		usleep(100000);
	}
}
