/* QMP commands for memory errors (docs/memory-errors.md):
 *   inject-memory-error {"gpa": N, "kind"?: "action-optional"|"action-required",
 *                        "count"?: N, "cpu-index"?: N}
 *   query-mce
 *   x-debug-raise-sigbus {"kind": ..., "gpa"?: N | "host-address"?: N, "cpu-index"?: N}
 *     (test hook: the host SIGBUS path, which this project's hosts cannot produce) */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "../mm/mm.h"
#include "commands.h"
#include "mce.h"
#include "qmp.h"
#include "vm.h"

static int parse_kind(struct qmp_req *req, json_t *args, enum mce_kind *kind, bool required)
{
	const char *k = arg_str(args, "kind");

	if (!k) {
		if (required) {
			qmp_reply_error(req, "GenericError", "Parameter 'kind' is missing");
			return -1;
		}
		*kind = MCE_AO;
		return 0;
	}
	if (!strcmp(k, "action-optional"))
		*kind = MCE_AO;
	else if (!strcmp(k, "action-required"))
		*kind = MCE_AR;
	else {
		qmp_reply_error(req, "GenericError",
				"Parameter 'kind' does not accept value '%s' "
				"(expected action-optional or action-required)", k);
		return -1;
	}
	return 0;
}

static void cmd_inject_memory_error(struct qmp_req *req, json_t *args, void *opaque)
{
	static const struct arg_spec spec[] = {
		{ "gpa", ARG_UINT, false },
		{ "kind", ARG_STR, true },
		{ "count", ARG_UINT, true },
		{ "cpu-index", ARG_UINT, true },
		{ NULL },
	};
	struct vm *vm = opaque;
	enum mce_kind kind;
	char err[256];
	uint64_t cpu;

	if (!args_check(req, args, spec) || parse_kind(req, args, &kind, false) < 0)
		return;
	cpu = arg_uint(args, "cpu-index", 0);
	if (mce_inject_memory_error(vm_mce(vm), arg_uint(args, "gpa", 0), arg_uint(args, "count", 1),
				    kind, cpu > (uint64_t)INT32_MAX ? -1 : (int)cpu, err, sizeof(err)) < 0) {
		qmp_reply_error(req, "GenericError", "%s", err);
		return;
	}
	qmp_reply_ok(req, NULL);
}

static void cmd_query_mce(struct qmp_req *req, json_t *args, void *opaque)
{
	static const struct arg_spec no_args[] = { { NULL } };
	struct vm *vm = opaque;

	if (!args_check(req, args, no_args))
		return;
	qmp_reply_ok(req, mce_query(vm_mce(vm)));
}

static void cmd_raise_sigbus(struct qmp_req *req, json_t *args, void *opaque)
{
	static const struct arg_spec spec[] = {
		{ "kind", ARG_STR, false },
		{ "gpa", ARG_UINT, true },
		{ "host-address", ARG_UINT, true },
		{ "cpu-index", ARG_UINT, true },
		{ NULL },
	};
	struct vm *vm = opaque;
	struct guest_mem *gm = vm_mem(vm);
	enum mce_kind kind;
	uint64_t hva, cpu;
	char err[256];

	if (!args_check(req, args, spec) || parse_kind(req, args, &kind, true) < 0)
		return;
	if (!!json_object_get(args, "gpa") == !!json_object_get(args, "host-address")) {
		qmp_reply_error(req, "GenericError", "Give exactly one of 'gpa' and 'host-address'");
		return;
	}
	if (json_object_get(args, "gpa")) {
		uint64_t gpa = arg_uint(args, "gpa", 0);
		/* No population: the signal says the host page is bad, whatever it holds. */
		if (memdesc_type(memdesc_lookup(gm, gpa >> MM_PAGE_SHIFT)) == MEMDESC_MMIO) {
			qmp_reply_error(req, "GenericError", "GPA 0x%" PRIx64 " is not guest RAM", gpa);
			return;
		}
		hva = (uint64_t)(uintptr_t)mm_guest_base(gm) + gpa;
	} else {
		hva = arg_uint(args, "host-address", 0);
	}
	cpu = arg_uint(args, "cpu-index", UINT64_MAX);
	if (mce_raise_sigbus(vm_mce(vm), kind, hva, cpu == UINT64_MAX ? -1 :
			     cpu > (uint64_t)INT32_MAX ? INT32_MAX : (int)cpu, err, sizeof(err)) < 0) {
		qmp_reply_error(req, "GenericError", "%s", err);
		return;
	}
	qmp_reply_ok(req, NULL);
}

void commands_register_mce(struct vm *vm)
{
	qmp_register("inject-memory-error", cmd_inject_memory_error, vm);
	qmp_register("query-mce", cmd_query_mce, vm);
	qmp_register("x-debug-raise-sigbus", cmd_raise_sigbus, vm);
}
