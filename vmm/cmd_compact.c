/* QMP `compact` (mdvm ctl compact [mode=reclaim|collapse] [budget=SIZE]
 * [method=auto|uffd-wp|pause] [gpa= size=]), the background compactor of
 * `--compaction auto`, the fragmentation figures of query-memory, and the
 * test hook `x-mdvm-release-range`. Mechanism and policy live in mm/
 * (mm/migrate.c, mm/compact.c); this file only stops vCPUs for them
 * (struct mm_pause_ops) and reports. docs/compaction.md. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include "../mm/migrate.h"
#include "commands.h"
#include "cmd_compact.h"
#include "loop.h"
#include "qmp.h"
#include "util.h"
#include "vm.h"

#define AUTO_PERIOD_MS   1000
#define AUTO_BUDGET      (32ULL << 20)   /* bytes copied per period: the rate limit */
#define AUTO_MIN_SPARE   2               /* hugepages beyond the needed ones before it acts */
#define AUTO_COLLAPSE_EVERY 5            /* collapse scan every 5th period */

struct pause_ctx {
	struct vm *vm;
	bool paused;
};

/* Stop the vCPUs only if they run: a paused or migrating VM is left alone. */
static int vcpus_pause(void *opaque)
{
	struct pause_ctx *p = opaque;
	p->paused = vm_get_state(p->vm) == VM_STATE_RUNNING && vm_pause(p->vm) == 0;
	return 0;
}

static void vcpus_resume(void *opaque)
{
	struct pause_ctx *p = opaque;
	if (p->paused)
		vm_resume(p->vm);
	p->paused = false;
}

json_t *compact_fragmentation_json(struct guest_mem *gm)
{
	struct mm_stats st;
	mm_query_stats(gm, &st);
	uint64_t needed = (st.populated_bytes + (2ULL << 20) - 1) >> 21;
	int64_t host = mm_host_bytes(gm);
	/* Share of in-use hugepages that a perfect packing would not need. */
	double frag = st.hugepages_in_use > needed ? 100.0 * (double)(st.hugepages_in_use - needed) /
						     (double)st.hugepages_in_use : 0.0;
	if (frag < 0)
		frag = 0;
	return json_pack("{s:I,s:I,s:f,s:I,s:I}",
			 "hugepages-in-use", (json_int_t)st.hugepages_in_use,
			 "hugepages-needed", (json_int_t)needed,
			 "percent", frag,
			 "host-bytes", (json_int_t)host,
			 "regions-demoted", (json_int_t)mm_regions_demoted(gm));
}

static json_t *result_json(const struct mm_compact_req *req, const struct mm_compact_result *r,
			   json_t *before, json_t *after)
{
	const struct mm_migrate_stats *m = &r->mig;
	uint64_t longest = r->method == MM_MIGRATE_WP ? m->wp_ns_max : m->pause_ns_max;
	json_t *o = json_pack("{s:s,s:s,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,"
			      "s:{s:I,s:I,s:I,s:I,s:I},s:o,s:o}",
			      "mode", req->mode == MM_COMPACT_COLLAPSE ? "collapse" : "reclaim",
			      "method", mm_migrate_method_name(r->method),
			      "folios-moved", (json_int_t)m->folios_moved,
			      "bytes-moved", (json_int_t)m->bytes_moved,
			      "hugepages-freed", (json_int_t)r->hugepages_freed,
			      "bytes-returned", (json_int_t)r->bytes_returned,
			      "regions-collapsed", (json_int_t)r->regions_collapsed,
			      "longest-vcpu-pause-ns", (json_int_t)longest,
			      "pauses", (json_int_t)m->pauses,
			      "longest-stop-ns", (json_int_t)m->pause_ns_max,
			      "longest-write-protect-ns", (json_int_t)m->wp_ns_max,
			      "time-ns", (json_int_t)r->ns,
			      "refused",
			      "poisoned", (json_int_t)m->refused_poisoned,
			      "locked", (json_int_t)m->refused_locked,
			      "pinned", (json_int_t)m->refused_pinned,
			      "migrating", (json_int_t)m->refused_migrating,
			      "busy", (json_int_t)m->refused_busy,
			      "fragmentation-before", before,
			      "fragmentation-after", after);
	json_object_set_new(o, "regions-demoted", json_integer((json_int_t)r->regions_demoted));
	json_object_set_new(o, "regions-promoted", json_integer((json_int_t)r->regions_promoted));
	if (r->note)
		json_object_set_new(o, "note", json_string(r->note));
	return o;
}

static int run_compact(struct vm *vm, const struct mm_compact_req *req, struct mm_compact_result *res,
		       json_t **before, json_t **after)
{
	struct guest_mem *gm = vm_mem(vm);
	struct pause_ctx pc = { vm, false };
	struct mm_pause_ops po = { vcpus_pause, vcpus_resume, &pc };
	if (before)
		*before = compact_fragmentation_json(gm);
	int rc = mm_compact(gm, req, &po, res);
	if (after)
		*after = compact_fragmentation_json(gm);
	return rc;
}

static void cmd_compact(struct qmp_req *req, json_t *args, void *opaque)
{
	static const struct arg_spec spec[] = {
		{ "mode", ARG_STR, true }, { "budget", ARG_UINT, true }, { "method", ARG_STR, true },
		{ "gpa", ARG_UINT, true }, { "size", ARG_UINT, true }, { NULL } };
	struct vm *vm = opaque;
	struct mm_compact_req cr = { 0 };
	struct mm_compact_result res;
	const char *mode, *method;
	json_t *before, *after;

	if (!args_check(req, args, spec))
		return;
	mode = arg_str(args, "mode");
	method = arg_str(args, "method");
	if (mode && strcmp(mode, "reclaim") && strcmp(mode, "collapse")) {
		qmp_reply_error(req, "GenericError", "mode must be reclaim or collapse, not '%s'", mode);
		return;
	}
	cr.mode = mode && !strcmp(mode, "collapse") ? MM_COMPACT_COLLAPSE : MM_COMPACT_RECLAIM;
	if (!method || !strcmp(method, "auto"))
		cr.method = MM_MIGRATE_AUTO;
	else if (!strcmp(method, "uffd-wp"))
		cr.method = MM_MIGRATE_WP;
	else if (!strcmp(method, "pause"))
		cr.method = MM_MIGRATE_PAUSE;
	else {
		qmp_reply_error(req, "GenericError", "method must be auto, uffd-wp or pause, not '%s'",
				method);
		return;
	}
	cr.budget_bytes = arg_uint(args, "budget", 0);
	cr.gpa = arg_uint(args, "gpa", 0);
	cr.size = arg_uint(args, "size", 0);
	if ((json_object_get(args, "gpa") || json_object_get(args, "size")) &&
	    cr.mode != MM_COMPACT_COLLAPSE) {
		qmp_reply_error(req, "GenericError", "gpa and size apply to mode=collapse only");
		return;
	}
	if (json_object_get(args, "gpa") && !cr.size) {
		qmp_reply_error(req, "GenericError", "gpa needs a size");
		return;
	}
	int rc = run_compact(vm, &cr, &res, &before, &after);
	if (rc) {
		json_decref(before);
		json_decref(after);
		qmp_reply_error(req, "GenericError", "compaction failed: %s",
				rc == -EOPNOTSUPP ? "userfaultfd write-protect is not available here"
						  : strerror(-rc));
		return;
	}
	qmp_reply_ok(req, result_json(&cr, &res, before, after));
}

/* Test hook: free guest pages behind the guest's back, as a balloon would
 * (type ballooned, the default) or as never touched (unbacked): `chunk`
 * bytes every `stride` bytes of [gpa, gpa+size). */
static void cmd_release_range(struct qmp_req *req, json_t *args, void *opaque)
{
	static const struct arg_spec spec[] = {
		{ "gpa", ARG_UINT, false }, { "size", ARG_UINT, false }, { "chunk", ARG_UINT, true },
		{ "stride", ARG_UINT, true }, { "type", ARG_STR, true }, { NULL } };
	struct vm *vm = opaque;
	uint64_t gpa, size, chunk, stride, done = 0, failed = 0;
	const char *type;
	enum memdesc_type t = MEMDESC_BALLOONED;
	int last = 0;

	if (!args_check(req, args, spec))
		return;
	gpa = arg_uint(args, "gpa", 0);
	size = arg_uint(args, "size", 0);
	chunk = arg_uint(args, "chunk", size);
	stride = arg_uint(args, "stride", chunk);
	type = arg_str(args, "type");
	if (type && !strcmp(type, "unbacked"))
		t = MEMDESC_UNBACKED;
	else if (type && strcmp(type, "ballooned")) {
		qmp_reply_error(req, "GenericError", "type must be ballooned or unbacked, not '%s'", type);
		return;
	}
	if ((gpa | size | chunk | stride) & 4095 || !chunk || stride < chunk || gpa + size < gpa) {
		qmp_reply_error(req, "GenericError",
				"gpa, size, chunk and stride must be multiples of 4 KiB, chunk <= stride");
		return;
	}
	uint64_t ram = mm_ram_size(vm_mem(vm));
	struct mm_range rr[2];
	size_t nr = mm_ram_ranges(vm_mem(vm), rr, 2);
	bool inside = false;
	for (size_t i = 0; i < nr && i < 2; i++)
		inside |= gpa >= rr[i].gpa && gpa + size <= rr[i].gpa + rr[i].size;
	if (!inside || !ram) {
		qmp_reply_error(req, "GenericError", "[0x%llx, +0x%llx) is not guest RAM",
				(unsigned long long)gpa, (unsigned long long)size);
		return;
	}
	for (uint64_t o = 0; o < size; o += stride) {
		uint64_t n = chunk < size - o ? chunk : size - o;
		int rc = mm_release_range(vm_mem(vm), (gpa + o) >> 12, n >> 12, t);
		if (rc) {
			failed += n;
			last = rc;
		} else {
			done += n;
		}
	}
	json_t *o = json_pack("{s:I,s:I}", "released-bytes", (json_int_t)done, "failed-bytes",
			      (json_int_t)failed);
	if (last)
		json_object_set_new(o, "error", json_string(strerror(-last)));
	qmp_reply_ok(req, o);
}

/* Test hook: migrate every folio of [gpa, gpa+size) to another host
 * location (page migration on its own, without a compaction policy). */
static void cmd_migrate_range(struct qmp_req *req, json_t *args, void *opaque)
{
	static const struct arg_spec spec[] = {
		{ "gpa", ARG_UINT, false }, { "size", ARG_UINT, false }, { "method", ARG_STR, true },
		{ NULL } };
	struct vm *vm = opaque;
	struct guest_mem *gm = vm_mem(vm);
	struct pause_ctx pc = { vm, false };
	struct mm_pause_ops po = { vcpus_pause, vcpus_resume, &pc };
	struct mm_migrate_ctx c;
	const char *method;
	enum mm_migrate_method m = MM_MIGRATE_AUTO;
	uint64_t gpa, size, refused = 0;
	int last = 0;

	if (!args_check(req, args, spec))
		return;
	gpa = arg_uint(args, "gpa", 0);
	size = arg_uint(args, "size", 0);
	method = arg_str(args, "method");
	if (method && !strcmp(method, "uffd-wp"))
		m = MM_MIGRATE_WP;
	else if (method && !strcmp(method, "pause"))
		m = MM_MIGRATE_PAUSE;
	else if (method && strcmp(method, "auto")) {
		qmp_reply_error(req, "GenericError", "method must be auto, uffd-wp or pause, not '%s'",
				method);
		return;
	}
	if (mm_migrate_begin(gm, &c, m, &po)) {
		qmp_reply_error(req, "GenericError", "userfaultfd write-protect is not available here");
		return;
	}
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (uint64_t g = gpa >> 12; g < (gpa + size + 4095) >> 12;) {
		struct folio *f = folio_get_gfn(gm, g);
		uint64_t next = f ? folio_gfn(f) + folio_nr_pages(f) : g + 1;
		if (f)
			folio_put(f);
		memdesc_t md = memdesc_lookup(gm, g);
		if (f || memdesc_type(md) == MEMDESC_POISONED) {
			int rc = mm_migrate_folio(gm, &c, g, MM_HPAGE_ANY);
			if (rc) {
				refused++;
				last = rc;
			}
		}
		g = next;
	}
	mm_migrate_end(gm, &c);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	json_t *o = json_pack("{s:s,s:I,s:I,s:I,s:I,s:I,s:I}", "method", mm_migrate_method_name(c.method),
			      "time-ns", (json_int_t)((t1.tv_sec - t0.tv_sec) * 1000000000LL +
						      (t1.tv_nsec - t0.tv_nsec)),
			      "folios-moved", (json_int_t)c.st.folios_moved,
			      "bytes-moved", (json_int_t)c.st.bytes_moved, "not-moved", (json_int_t)refused,
			      "longest-stop-ns", (json_int_t)c.st.pause_ns_max,
			      "longest-write-protect-ns", (json_int_t)c.st.wp_ns_max);
	if (last)
		json_object_set_new(o, "reason", json_string(mm_migrate_strerror(last)));
	qmp_reply_ok(req, o);
}

/* ---- --compaction auto: at most AUTO_BUDGET copied per AUTO_PERIOD_MS */
static struct vm *auto_vm;

static void auto_tick(void *opaque)
{
	static unsigned ticks;
	struct vm *vm = opaque;
	if ((vm_get_state(vm) == VM_STATE_RUNNING || vm_get_state(vm) == VM_STATE_PAUSED) &&
	    ++ticks % AUTO_COLLAPSE_EVERY == 0) {
		/* Collapse 2 MiB regions the guest filled again with small
		 * folios (never fills holes: that would undo reclaim). */
		struct mm_compact_req cr = { .mode = MM_COMPACT_COLLAPSE, .method = MM_MIGRATE_AUTO,
					     .budget_bytes = AUTO_BUDGET,
					     .collapse_min_pages = MM_REGION_PAGES };
		struct mm_compact_result res;
		if (run_compact(vm, &cr, &res, NULL, NULL) == 0 && res.regions_collapsed)
			qmp_emit_event("COMPACTION", json_pack("{s:s,s:I,s:I,s:I}", "mode", "collapse",
				"regions-collapsed", (json_int_t)res.regions_collapsed,
				"regions-promoted", (json_int_t)res.regions_promoted,
				"folios-moved", (json_int_t)res.mig.folios_moved));
	} else if (vm_get_state(vm) == VM_STATE_RUNNING || vm_get_state(vm) == VM_STATE_PAUSED) {
		struct mm_stats st;
		mm_query_stats(vm_mem(vm), &st);
		uint64_t needed = (st.populated_bytes + (2ULL << 20) - 1) >> 21;
		if (st.hugepages_in_use >= needed + AUTO_MIN_SPARE) {
			struct mm_compact_req cr = { .mode = MM_COMPACT_RECLAIM, .method = MM_MIGRATE_AUTO,
						     .budget_bytes = AUTO_BUDGET };
			struct mm_compact_result res;
			if (run_compact(vm, &cr, &res, NULL, NULL) == 0 && res.mig.folios_moved)
				qmp_emit_event("COMPACTION", json_pack("{s:s,s:I,s:I,s:I,s:I}", "mode", "reclaim",
					"regions-demoted", (json_int_t)res.regions_demoted,
					"folios-moved", (json_int_t)res.mig.folios_moved,
					"hugepages-freed", (json_int_t)res.hugepages_freed,
					"bytes-returned", (json_int_t)res.bytes_returned));
		}
	}
	loop_add_timer(AUTO_PERIOD_MS, auto_tick, vm);
}

void commands_register_compact(struct vm *vm)
{
	qmp_register("compact", cmd_compact, vm);
	qmp_register("x-mdvm-release-range", cmd_release_range, vm);
	qmp_register("x-mdvm-migrate-range", cmd_migrate_range, vm);
	if (vm_config(vm)->compaction && !auto_vm) {
		auto_vm = vm;
		loop_add_timer(AUTO_PERIOD_MS, auto_tick, vm);
	}
}
