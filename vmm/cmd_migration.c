/* QMP commands for live migration (QEMU names, docs/migration.md), and a
 * test-only command that fills guest RAM with random data from the host
 * (the emulated test guest writes ~7 MB/s; benchmarks need 512 MiB). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "../mm/mm.h"
#include "commands.h"
#include "migration.h"
#include "qmp.h"
#include "util.h"
#include "vm.h"

static void cmd_migrate(struct qmp_req *req, json_t *args, void *opaque)
{
	static const struct arg_spec spec[] = {
		{ "uri", ARG_STR, false },
		{ "blk", ARG_BOOL, true },
		{ "inc", ARG_BOOL, true },
		{ "detach", ARG_BOOL, true },
		{ "resume", ARG_BOOL, true },
		{ NULL },
	};
	char err[256];

	if (!args_check(req, args, spec))
		return;
	if (json_is_true(json_object_get(args, "blk")) || json_is_true(json_object_get(args, "inc")) ||
	    json_is_true(json_object_get(args, "resume"))) {
		qmp_reply_error(req, "GenericError", "blk, inc and resume are not supported");
		return;
	}
	if (migration_start(opaque, arg_str(args, "uri"), err, sizeof(err)) < 0) {
		qmp_reply_error(req, "GenericError", "%s", err);
		return;
	}
	qmp_reply_ok(req, NULL);
}

static const struct arg_spec no_args[] = { { NULL } };

static void cmd_migrate_cancel(struct qmp_req *req, json_t *args, void *opaque)
{
	if (!args_check(req, args, no_args))
		return;
	migration_cancel(opaque);
	qmp_reply_ok(req, NULL);
}

static void cmd_query_migrate(struct qmp_req *req, json_t *args, void *opaque)
{
	if (!args_check(req, args, no_args))
		return;
	qmp_reply_ok(req, migration_query(opaque));
}

static void cmd_migrate_set_parameters(struct qmp_req *req, json_t *args, void *opaque)
{
	static const struct arg_spec spec[] = {
		{ "max-bandwidth", ARG_UINT, true },
		{ "downtime-limit", ARG_UINT, true },
		{ "x-max-iterations", ARG_UINT, true },
		{ NULL },
	};

	if (!args_check(req, args, spec))
		return;
	/* Same bounds as QEMU: downtime-limit up to 2000 s in ms. */
	if (json_object_get(args, "downtime-limit") && arg_uint(args, "downtime-limit", 0) > 2000000) {
		qmp_reply_error(req, "GenericError",
				"Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 milliseconds");
		return;
	}
	if (json_object_get(args, "max-bandwidth"))
		migration_set_max_bandwidth(arg_uint(args, "max-bandwidth", 0));
	if (json_object_get(args, "downtime-limit"))
		migration_set_downtime_limit(arg_uint(args, "downtime-limit", 300));
	if (json_object_get(args, "x-max-iterations"))
		migration_set_max_iterations(arg_uint(args, "x-max-iterations", 0));
	qmp_reply_ok(req, NULL);
}

static void cmd_query_migrate_parameters(struct qmp_req *req, json_t *args, void *opaque)
{
	if (!args_check(req, args, no_args))
		return;
	uint64_t bw = migration_max_bandwidth();
	qmp_reply_ok(req, json_pack("{s:I,s:I,s:I}",
		"max-bandwidth", (json_int_t)(bw > INT64_MAX ? INT64_MAX : bw),
		"downtime-limit", (json_int_t)migration_downtime_limit(),
		"x-max-iterations", (json_int_t)migration_max_iterations()));
}

/* x-mdvm-fill-random {gpa, size, seed}: xorshift64* data, written through
 * the memdesc owner path (mm_write), so dirty tracking sees it. */
static void cmd_fill_random(struct qmp_req *req, json_t *args, void *opaque)
{
	static const struct arg_spec spec[] = {
		{ "gpa", ARG_UINT, false },
		{ "size", ARG_UINT, false },
		{ "seed", ARG_UINT, true },
		{ NULL },
	};
	struct guest_mem *gm = vm_mem(opaque);
	uint64_t gpa, size, x;
	static uint64_t buf[1 << 17];   /* 1 MiB */

	if (!args_check(req, args, spec))
		return;
	gpa = arg_uint(args, "gpa", 0);
	size = arg_uint(args, "size", 0);
	x = arg_uint(args, "seed", 1) | 1;
	if (gpa % 4096 || size % 4096 || gpa + size < gpa) {
		qmp_reply_error(req, "GenericError", "gpa and size must be multiples of 4096");
		return;
	}
	for (uint64_t done = 0; done < size;) {
		size_t n = size - done > sizeof(buf) ? sizeof(buf) : (size_t)(size - done);
		for (size_t i = 0; i < n / 8; i++) {
			x ^= x >> 12;
			x ^= x << 25;
			x ^= x >> 27;
			buf[i] = x * 0x2545F4914F6CDD1DULL;
		}
		if (mm_write(gm, gpa + done, buf, n) < 0) {
			qmp_reply_error(req, "GenericError",
					"Invalid addr 0x%016" PRIx64 "/size %" PRIu64 " specified", gpa, size);
			return;
		}
		done += n;
	}
	qmp_reply_ok(req, NULL);
}

void commands_register_migration(struct vm *vm)
{
	qmp_register("migrate", cmd_migrate, vm);
	qmp_register("migrate_cancel", cmd_migrate_cancel, vm);
	qmp_register("query-migrate", cmd_query_migrate, vm);
	qmp_register("migrate-set-parameters", cmd_migrate_set_parameters, vm);
	qmp_register("query-migrate-parameters", cmd_query_migrate_parameters, vm);
	qmp_register("x-mdvm-fill-random", cmd_fill_random, vm);
}
