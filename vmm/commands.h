/* Argument checking for QMP command handlers (vmm/commands.c), shared by
 * the vmm/cmd_<feature>.c files. */
#ifndef MDVM_COMMANDS_H
#define MDVM_COMMANDS_H
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

struct qmp_req;

enum arg_type { ARG_INT, ARG_UINT, ARG_STR, ARG_BOOL };

struct arg_spec {
	const char *name;    /* NULL ends the list */
	enum arg_type type;
	bool optional;
};

/* Check args against spec (QEMU's wording); on failure the request is
 * answered and false returned: the handler must just return. */
bool args_check(struct qmp_req *req, json_t *args, const struct arg_spec *spec);
uint64_t arg_uint(json_t *args, const char *name, uint64_t dflt);
const char *arg_str(json_t *args, const char *name);
#endif
