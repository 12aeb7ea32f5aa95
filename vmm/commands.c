/* QEMU-named QMP commands acting on the VM (see docs/control.md). They use
 * only the vm.h and mm.h interfaces and run on the main loop thread. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../devices/devices.h"
#include "../devices/testdev_regs.h"
#include "../mm/mm.h"
#include "commands.h"
#include "qmp.h"
#include "util.h"
#include "vm.h"

#define GUEST_CMD_DEFAULT_TIMEOUT_MS 10000
#define PMEMSAVE_CHUNK (1u << 20)

/* ---- argument checking, with QEMU's wording ---- */


static const char *arg_type_name(enum arg_type t)
{
	switch (t) {
	case ARG_INT:
	case ARG_UINT: return "integer";
	case ARG_STR:  return "string";
	case ARG_BOOL: return "boolean";
	}
	return "?";
}

/* Check args against spec in spec order, then reject unknown members, as
 * QEMU's input visitor does. On failure the request is answered and false
 * is returned: the handler must just return. */
bool args_check(struct qmp_req *req, json_t *args, const struct arg_spec *spec)
{
	const struct arg_spec *s;
	const char *key;
	json_t *v;

	for (s = spec; s->name; s++) {
		bool ok;

		v = json_object_get(args, s->name);
		if (!v) {
			if (s->optional)
				continue;
			qmp_reply_error(req, "GenericError", "Parameter '%s' is missing", s->name);
			return false;
		}
		switch (s->type) {
		case ARG_INT:
		case ARG_UINT: ok = json_is_integer(v); break;
		case ARG_STR:  ok = json_is_string(v); break;
		case ARG_BOOL: ok = json_is_boolean(v); break;
		default:       ok = false;
		}
		if (!ok) {
			qmp_reply_error(req, "GenericError",
					"Invalid parameter type for '%s', expected: %s",
					s->name, arg_type_name(s->type));
			return false;
		}
		if (s->type == ARG_UINT && json_integer_value(v) < 0) {
			qmp_reply_error(req, "GenericError",
					"Parameter '%s' expects a non-negative integer", s->name);
			return false;
		}
	}
	json_object_foreach(args, key, v) {
		for (s = spec; s->name; s++)
			if (!strcmp(s->name, key))
				break;
		if (!s->name) {
			qmp_reply_error(req, "GenericError", "Parameter '%s' is unexpected", key);
			return false;
		}
	}
	return true;
}

static const struct arg_spec no_args[] = { { NULL } };

uint64_t arg_uint(json_t *args, const char *name, uint64_t dflt)
{
	json_t *v = json_object_get(args, name);
	return v ? (uint64_t)json_integer_value(v) : dflt;
}

const char *arg_str(json_t *args, const char *name)
{
	return json_string_value(json_object_get(args, name));
}

/* ---- run state ---- */

static void cmd_query_status(struct qmp_req *req, json_t *args, void *opaque)
{
	struct vm *vm = opaque;
	enum vm_state st;

	if (!args_check(req, args, no_args))
		return;
	st = vm_get_state(vm);
	qmp_reply_ok(req, json_pack("{s:s,s:b,s:b}", "status", vm_state_name(st),
				    "running", st == VM_STATE_RUNNING, "singlestep", 0));
}

static void cmd_stop(struct qmp_req *req, json_t *args, void *opaque)
{
	struct vm *vm = opaque;

	if (!args_check(req, args, no_args))
		return;
	/* As QEMU: stopping a VM that is not running succeeds without STOP. */
	if (vm_get_state(vm) == VM_STATE_RUNNING) {
		if (vm_pause(vm) < 0) {
			qmp_reply_error(req, "GenericError", "Cannot stop the VM: %s",
					strerror(errno));
			return;
		}
		qmp_emit_event("STOP", NULL);
	}
	qmp_reply_ok(req, NULL);
}

static void cmd_cont(struct qmp_req *req, json_t *args, void *opaque)
{
	struct vm *vm = opaque;
	int r;

	if (!args_check(req, args, no_args))
		return;
	switch (vm_get_state(vm)) {
	case VM_STATE_RUNNING:
		qmp_reply_ok(req, NULL);     /* no-op, no RESUME, as QEMU */
		return;
	case VM_STATE_SHUTDOWN:
	case VM_STATE_INTERNAL_ERROR:
		qmp_reply_error(req, "GenericError",
				"Resetting the Virtual Machine is required");
		return;
	case VM_STATE_PRELAUNCH:
		r = vm_start(vm);            /* vCPU threads do not exist yet */
		break;
	case VM_STATE_PAUSED:
	default:
		r = vm_resume(vm);
		break;
	}
	if (r < 0) {
		qmp_reply_error(req, "GenericError", "Cannot resume the VM: %s", strerror(errno));
		return;
	}
	qmp_emit_event("RESUME", NULL);
	qmp_reply_ok(req, NULL);
}

static void cmd_system_reset(struct qmp_req *req, json_t *args, void *opaque)
{
	struct vm *vm = opaque;

	if (!args_check(req, args, no_args))
		return;
	if (vm_reset(vm) < 0) {
		qmp_reply_error(req, "GenericError", "Cannot reset the VM: %s", strerror(errno));
		return;
	}
	qmp_emit_event("RESET", json_pack("{s:b,s:s}", "guest", 0,
					  "reason", "host-qmp-system-reset"));
	qmp_reply_ok(req, NULL);
}

static void cmd_quit(struct qmp_req *req, json_t *args, void *opaque)
{
	struct vm *vm = opaque;

	if (!args_check(req, args, no_args))
		return;
	/* Reply first: the reply is queued (normally already written) before
	 * the loop gets to the exit request, and qmp_server_stop() flushes.
	 * vm_request_exit() emits SHUTDOWN {"reason": "host-qmp-quit"}. */
	qmp_reply_ok(req, NULL);
	vm_request_exit(vm, 0, "quit");
}

/* ---- memory ---- */

/* True when every byte of [gpa, gpa+size) is guest RAM. Ranges are sorted
 * and may in principle abut, so walk them instead of looking for one. */
static bool range_is_ram(struct guest_mem *gm, uint64_t gpa, uint64_t size)
{
	struct mm_range r[64];
	size_t n = mm_ram_ranges(gm, r, ARRAY_SIZE(r));
	uint64_t cur = gpa, end = gpa + size;

	if (n > ARRAY_SIZE(r))
		n = ARRAY_SIZE(r);
	while (cur < end) {
		size_t i;
		for (i = 0; i < n; i++)
			if (cur >= r[i].gpa && cur - r[i].gpa < r[i].size)
				break;
		if (i == n)
			return false;
		cur = r[i].gpa + r[i].size;   /* end of that range (may be > end) */
	}
	return true;
}

static void cmd_pmemsave(struct qmp_req *req, json_t *args, void *opaque)
{
	static const struct arg_spec spec[] = {
		{ "val", ARG_UINT, false },
		{ "size", ARG_UINT, false },
		{ "filename", ARG_STR, false },
		{ NULL },
	};
	struct vm *vm = opaque;
	struct guest_mem *gm = vm_mem(vm);
	uint64_t gpa, size, done = 0;
	const char *path;
	char *buf;
	int fd;

	if (!args_check(req, args, spec))
		return;
	gpa = arg_uint(args, "val", 0);
	size = arg_uint(args, "size", 0);
	path = arg_str(args, "filename");
	/* Validate before creating the file, so a bad range leaves no file. */
	if (gpa + size < gpa || !range_is_ram(gm, gpa, size)) {
		qmp_reply_error(req, "GenericError",
				"Invalid addr 0x%016" PRIx64 "/size %" PRIu64 " specified",
				gpa, size);
		return;
	}
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		qmp_reply_error(req, "GenericError", "Could not open '%s': %s", path,
				strerror(errno));
		return;
	}
	buf = xmalloc(PMEMSAVE_CHUNK);
	while (done < size) {
		size_t len = size - done > PMEMSAVE_CHUNK ? PMEMSAVE_CHUNK : (size_t)(size - done);
		size_t off = 0;

		if (mm_read(gm, gpa + done, buf, len) < 0) {
			qmp_reply_error(req, "GenericError",
					"Invalid addr 0x%016" PRIx64 "/size %" PRIu64 " specified",
					gpa, size);
			goto out;
		}
		while (off < len) {
			ssize_t w = write(fd, buf + off, len - off);
			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0) {
				qmp_reply_error(req, "GenericError", "Could not write '%s': %s",
						path, w < 0 ? strerror(errno) : "short write");
				goto out;
			}
			off += (size_t)w;
		}
		done += len;
	}
	free(buf);
	buf = NULL;
	/* close() can report deferred write errors (NFS, quota). */
	if (close(fd) < 0) {
		qmp_reply_error(req, "GenericError", "Could not write '%s': %s", path,
				strerror(errno));
		return;
	}
	qmp_reply_ok(req, NULL);
	return;
out:
	free(buf);
	close(fd);
}

/* ---- vCPUs ---- */

static void cmd_query_cpus_fast(struct qmp_req *req, json_t *args, void *opaque)
{
	struct vm *vm = opaque;
	json_t *list;

	if (!args_check(req, args, no_args))
		return;
	list = json_array();
	for (int i = 0; i < vm_ncpus(vm); i++) {
		struct vcpu_info info = { 0 };
		char qom[64];

		vm_vcpu_info(vm, i, &info);
		snprintf(qom, sizeof(qom), "/machine/unattached/device[%d]", i);
		json_array_append_new(list, json_pack(
			"{s:i,s:I,s:s,s:s,s:{s:i,s:i,s:i}}",
			"cpu-index", info.cpu_index,
			"thread-id", (json_int_t)info.thread_id,
			"qom-path", qom,
			"target", "x86_64",
			"props", "core-id", i, "thread-id", 0, "socket-id", 0));
	}
	qmp_reply_ok(req, list);
}

/* ---- test guest ---- */

struct guest_cmd_ctx {
	struct qmp_req *req;
	unsigned timeout_ms;
};

/* The guest writes arbitrary bytes; JSON strings must be UTF-8. */
static json_t *text_to_json(const char *s)
{
	json_t *j = json_string(s);
	char *copy;

	if (j)
		return j;
	copy = xstrdup(s);
	for (char *p = copy; *p; p++)
		if ((unsigned char)*p >= 0x80)
			*p = '?';
	j = json_string(copy);
	free(copy);
	return j ? j : json_string("");
}

static void guest_cmd_done(void *opaque, int status, const char *resp)
{
	struct guest_cmd_ctx *ctx = opaque;

	if (status == -1 && !resp)
		qmp_reply_error(ctx->req, "GenericError",
				"Guest did not complete the command within %u ms "
				"(or the VM was reset)", ctx->timeout_ms);
	else
		qmp_reply_ok(ctx->req, json_pack("{s:i,s:o}", "status", status,
						 "response", text_to_json(resp ? resp : "")));
	free(ctx);
}

static void cmd_guest_command(struct qmp_req *req, json_t *args, void *opaque)
{
	static const struct arg_spec spec[] = {
		{ "command", ARG_STR, false },
		{ "timeout", ARG_UINT, true },
		{ NULL },
	};
	struct vm *vm = opaque;
	struct guest_cmd_ctx *ctx;
	const char *text;
	uint64_t timeout;

	if (!args_check(req, args, spec))
		return;
	text = arg_str(args, "command");
	timeout = arg_uint(args, "timeout", GUEST_CMD_DEFAULT_TIMEOUT_MS);
	if (!*text) {
		qmp_reply_error(req, "GenericError", "Parameter 'command' must not be empty");
		return;
	}
	if (strlen(text) >= TESTDEV_CMD_MAX) {
		qmp_reply_error(req, "GenericError",
				"Parameter 'command' is too long (max %d bytes)", TESTDEV_CMD_MAX - 1);
		return;
	}
	if (timeout == 0 || timeout > UINT_MAX) {
		qmp_reply_error(req, "GenericError",
				"Parameter 'timeout' expects milliseconds in 1..%u", UINT_MAX);
		return;
	}
	/* A paused or stopped guest cannot answer: fail now, not on timeout. */
	if (!vm_is_running(vm)) {
		qmp_reply_error(req, "GenericError", "The guest is not running (status: %s)",
				vm_state_name(vm_get_state(vm)));
		return;
	}
	ctx = xmalloc(sizeof(*ctx));
	ctx->req = req;
	ctx->timeout_ms = (unsigned)timeout;
	/* The reply is deferred: req stays valid until guest_cmd_done answers
	 * it, even if the client disconnects meanwhile. */
	if (vm_guest_command(vm, text, ctx->timeout_ms, guest_cmd_done, ctx) < 0) {
		int e = errno;
		free(ctx);
		if (e == EBUSY)
			qmp_reply_error(req, "GenericError",
					"A guest command is already in progress");
		else
			qmp_reply_error(req, "GenericError", "Cannot send the guest command: %s",
					strerror(e));
	}
}

static void cmd_query_guest(struct qmp_req *req, json_t *args, void *opaque)
{
	struct vm *vm = opaque;

	if (!args_check(req, args, no_args))
		return;
	struct testdev_mce mc;

	testdev_mce_info(vm_testdev(vm), &mc);
	qmp_reply_ok(req, json_pack("{s:I, s:{s:I, s:I, s:I, s:I}}", "sweeps", (json_int_t)vm_guest_sweeps(vm),
				    "mce", "errors", (json_int_t)mc.errors, "bad-pages", (json_int_t)mc.bad,
				    "last-status", (json_int_t)mc.status, "last-addr", (json_int_t)mc.addr));
}

void commands_register(struct vm *vm)
{
	qmp_register("query-status", cmd_query_status, vm);
	qmp_register("stop", cmd_stop, vm);
	qmp_register("cont", cmd_cont, vm);
	qmp_register("system_reset", cmd_system_reset, vm);
	qmp_register("quit", cmd_quit, vm);
	qmp_register("pmemsave", cmd_pmemsave, vm);
	qmp_register("query-cpus-fast", cmd_query_cpus_fast, vm);
	qmp_register("guest-command", cmd_guest_command, vm);
	qmp_register("query-guest", cmd_query_guest, vm);
}
