/* QMP commands of the virtio balloon (docs/virtio.md): QEMU's `balloon` and
 * `query-balloon` with QEMU's meaning of `actual` (guest RAM minus what the
 * driver says it holds), the BALLOON_CHANGE event, and mdvm's
 * `query-balloon-stats` (the guest's statistics and the host-side counts). */
#include <stdio.h>
#include <string.h>
#include "../devices/virtio_balloon.h"
#include "commands.h"
#include "qmp.h"
#include "vm.h"

static void balloon_changed(void *opaque, uint64_t actual_bytes)
{
	qmp_emit_event("BALLOON_CHANGE", json_pack("{s:I}", "actual", (json_int_t)actual_bytes));
}

static struct virtio_balloon *get_balloon(struct qmp_req *req, struct vm *vm)
{
	struct virtio_balloon *b = vm_balloon(vm);

	if (!b)
		qmp_reply_error(req, "DeviceNotActive", "No balloon device has been activated");
	return b;
}

static void cmd_balloon(struct qmp_req *req, json_t *args, void *opaque)
{
	static const struct arg_spec spec[] = { { "value", ARG_INT, false }, { NULL } };
	struct virtio_balloon *b;
	json_int_t v;

	if (!args_check(req, args, spec) || !(b = get_balloon(req, opaque)))
		return;
	v = json_integer_value(json_object_get(args, "value"));
	if (v <= 0) {
		/* QEMU's words, naming its C parameter. */
		qmp_reply_error(req, "GenericError", "Parameter 'target' expects a size");
		return;
	}
	virtio_balloon_set_target(b, (uint64_t)v);
	qmp_reply_ok(req, NULL);
}

static void cmd_query_balloon(struct qmp_req *req, json_t *args, void *opaque)
{
	static const struct arg_spec no_args[] = { { NULL } };
	struct virtio_balloon_info in;
	struct virtio_balloon *b;
	uint64_t held;

	if (!args_check(req, args, no_args) || !(b = get_balloon(req, opaque)))
		return;
	virtio_balloon_get_info(b, &in);
	held = in.actual_pages << 12;
	qmp_reply_ok(req, json_pack("{s:I}", "actual",
				    (json_int_t)(held < in.ram_size ? in.ram_size - held : 0)));
}

static void cmd_query_balloon_stats(struct qmp_req *req, json_t *args, void *opaque)
{
	static const struct arg_spec spec[] = { { "refresh", ARG_BOOL, true }, { NULL } };
	static const char *const names[VIRTIO_BALLOON_S_NR] = {
		"stat-swap-in", "stat-swap-out", "stat-major-faults", "stat-minor-faults",
		"stat-free-memory", "stat-total-memory", "stat-available-memory", "stat-disk-caches",
		"stat-htlb-pgalloc", "stat-htlb-pgfail",
	};
	struct virtio_balloon_info in;
	struct virtio_balloon *b;
	json_t *stats, *ret;
	bool refreshed = false;

	if (!args_check(req, args, spec) || !(b = get_balloon(req, opaque)))
		return;
	virtio_balloon_get_info(b, &in);
	/* As QEMU's guest-stats: absent values are -1. */
	stats = json_object();
	for (unsigned i = 0; i < VIRTIO_BALLOON_S_NR; i++)
		json_object_set_new(stats, names[i], json_integer((in.stats_valid >> i) & 1 ?
								  (json_int_t)in.stats[i] : -1));
	if (json_is_true(json_object_get(args, "refresh")))
		refreshed = virtio_balloon_request_stats(b);
	ret = json_pack("{s:o, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:b, s:b, s:b}",
			"stats", stats,
			"last-update", (json_int_t)(in.have_stats ? in.stats_time : 0),
			"target", (json_int_t)(in.ram_size - (in.target_pages << 12)),
			"actual-pages", (json_int_t)in.actual_pages,
			"ballooned-pages", (json_int_t)in.ballooned_pages,
			"inflated-pages", (json_int_t)in.inflated_pages,
			"deflated-pages", (json_int_t)in.deflated_pages,
			"reported-bytes", (json_int_t)in.reported_bytes,
			"released-bytes", (json_int_t)in.released_bytes,
			"inflate-ns", (json_int_t)in.inflate_ns,
			"report-ns", (json_int_t)in.report_ns,
			"features", (json_int_t)in.features,
			"driver-ok", in.driver_ok, "needs-reset", in.needs_reset, "refresh-requested", refreshed);
	qmp_reply_ok(req, ret);
}

void commands_register_balloon(struct vm *vm)
{
	if (vm_balloon(vm))
		virtio_balloon_on_change(vm_balloon(vm), balloon_changed, NULL);
	qmp_register("balloon", cmd_balloon, vm);
	qmp_register("query-balloon", cmd_query_balloon, vm);
	qmp_register("query-balloon-stats", cmd_query_balloon_stats, vm);
}
