/* QMP commands for live migration (QEMU names, docs/migration.md), and a
 * test-only command that fills guest RAM with random data from the host
 * (the emulated test guest writes ~7 MB/s; benchmarks need 512 MiB). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <time.h>

#include "../mm/dirty.h"
#include "../mm/mm.h"
#include "dirty_kvm.h"
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

/* x-debug-dirty-harvest {rounds, interval-ms}: open a dirty log, then
 * time `rounds` syncs (KVM harvest + folio fold) and takes, interval-ms
 * apart (the guest dirties pages meanwhile). For bench/areas/dirty.py.
 * Blocks the main loop for rounds x interval-ms. */
static int count_cb(void *opaque, uint64_t gfn, uint64_t nr)
{
	*(uint64_t *)opaque += nr;
	return 0;
}

static void cmd_dirty_harvest(struct qmp_req *req, json_t *args, void *opaque)
{
	static const struct arg_spec spec[] = {
		{ "rounds", ARG_UINT, true },
		{ "interval-ms", ARG_UINT, true },
		{ NULL },
	};
	struct guest_mem *gm = vm_mem(opaque);
	struct dirty_tracker *t = dirty_tracker_of(gm);
	struct dirty_log *log;
	struct mm_range r[8];
	char err[256];

	if (!args_check(req, args, spec))
		return;
	uint64_t rounds = arg_uint(args, "rounds", 5), ival = arg_uint(args, "interval-ms", 20);
	if (!rounds || rounds > 100 || ival > 1000) {
		qmp_reply_error(req, "GenericError", "rounds must be 1..100 and interval-ms 0..1000");
		return;
	}
	if (migration_active()) {
		qmp_reply_error(req, "GenericError", "a migration is in progress");
		return;
	}
	if (!t || !(log = dirty_log_open(t, err, sizeof(err)))) {
		qmp_reply_error(req, "GenericError", "%s", t ? err : "no dirty tracker");
		return;
	}
	size_t nr = mm_ram_ranges(gm, r, 8);
	if (nr > 8)
		nr = 8;
	json_t *arr = json_array();
	dirty_log_sync(log);
	for (size_t i = 0; i < nr; i++)
		dirty_log_take(log, r[i].gpa >> 12, r[i].size >> 12, count_cb, &(uint64_t){ 0 });
	for (uint64_t k = 0; k < rounds; k++) {
		struct timespec ts = { .tv_sec = (time_t)(ival / 1000), .tv_nsec = (long)(ival % 1000) * 1000000L };
		uint64_t frames = 0;
		nanosleep(&ts, NULL);
		uint64_t t0 = monotonic_ns();
		long got = dirty_log_sync(log);
		uint64_t t1 = monotonic_ns();
		for (size_t i = 0; i < nr; i++)
			dirty_log_take(log, r[i].gpa >> 12, r[i].size >> 12, count_cb, &frames);
		uint64_t t2 = monotonic_ns();
		json_array_append_new(arr, json_pack("{s:I,s:I,s:I}", "sync-ns", (json_int_t)(t1 - t0),
			"take-ns", (json_int_t)(t2 - t1), "frames", (json_int_t)(got < 0 ? 0 : frames)));
	}
	dirty_log_close(log);
	qmp_reply_ok(req, json_pack("{s:s,s:I,s:o}", "mode", dirty_kvm_mode(),
				    "ram-bytes", (json_int_t)mm_ram_size(gm), "rounds", arr));
}

void commands_register_migration(struct vm *vm)
{
	qmp_register("x-debug-dirty-harvest", cmd_dirty_harvest, vm);
	qmp_register("migrate", cmd_migrate, vm);
	qmp_register("migrate_cancel", cmd_migrate_cancel, vm);
	qmp_register("query-migrate", cmd_query_migrate, vm);
	qmp_register("migrate-set-parameters", cmd_migrate_set_parameters, vm);
	qmp_register("query-migrate-parameters", cmd_query_migrate_parameters, vm);
	qmp_register("x-mdvm-fill-random", cmd_fill_random, vm);
}
