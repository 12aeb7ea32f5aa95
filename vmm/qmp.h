/* QMP server on the control socket (JSON via jansson). Handlers run on the
 * main loop thread and may reply later (deferred replies). */
#ifndef MDVM_QMP_H
#define MDVM_QMP_H
#include <jansson.h>
#include <stddef.h>

struct qmp_req;   /* one in-flight request; valid until replied */
struct vm;

typedef void (*qmp_handler)(struct qmp_req *req, json_t *args, void *opaque);

void qmp_register(const char *name, qmp_handler fn, void *opaque);
/* Exactly one of these per request. `ret` is stolen (NULL means {}). */
void qmp_reply_ok(struct qmp_req *req, json_t *ret);
void qmp_reply_error(struct qmp_req *req, const char *cls, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));
/* Broadcast an asynchronous event to every negotiated client; `data` stolen. */
void qmp_emit_event(const char *name, json_t *data);
/* Create the listening socket (mode 0600) and add it to the main loop. */
int  qmp_server_start(const char *path, char *err, size_t errlen);
void qmp_server_stop(void);
/* Register QEMU-named commands that act on the VM (vmm/commands.c). */
void commands_register(struct vm *vm);
#endif
