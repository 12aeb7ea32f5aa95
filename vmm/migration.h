/* Live migration between mdvm processes (docs/migration.md). The source
 * side runs in its own thread so the main loop (QMP) stays responsive; so
 * does the destination's receiver. */
#ifndef MDVM_MIGRATION_H
#define MDVM_MIGRATION_H
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct vm;

/* "tcp:HOST:PORT" or "unix:PATH": 0, or -1 with err. */
int  migration_uri_check(const char *uri, char *err, size_t errlen);

/* Source. */
int  migration_start(struct vm *vm, const char *uri, char *err, size_t errlen);
int  migration_cancel(struct vm *vm);             /* 0, or -1 if none active */
json_t *migration_query(struct vm *vm);           /* query-migrate result */
bool migration_active(void);
void migration_set_max_bandwidth(uint64_t bytes_per_s);
void migration_set_downtime_limit(uint64_t ms);
uint64_t migration_max_bandwidth(void);
uint64_t migration_downtime_limit(void);
/* Iterations before switching over even if the downtime limit is not met
 * (x-max-iterations; 0 restores the default, 100). */
void migration_set_max_iterations(uint64_t n);
uint64_t migration_max_iterations(void);

/* Destination: listen now (so the socket exists before the control
 * socket does), receive in a thread, start the vCPUs once everything
 * arrived and checked out; on any error mdvm exits with status 1. */
int  migration_incoming_listen(struct vm *vm, const char *uri, char *err, size_t errlen);
int  migration_incoming_start(struct vm *vm);

/* mdvm is exiting: cancel an outgoing migration, end an incoming one, and
 * wait for their threads (they use the VM). false if one did not end in
 * time: the caller must then not free the VM. */
bool migration_shutdown(struct vm *vm);
#endif
