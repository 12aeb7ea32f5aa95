/* Opt-in startup trace. With MDVM_TRACE_STARTUP=1 in the environment mdvm
 * prints one line per startup step on stderr:
 *
 *     mdvm-trace: EVENT NS [DETAIL]
 *
 * NS is CLOCK_MONOTONIC in nanoseconds, the clock a parent process reads too,
 * so a launcher can place each step on its own timeline (bench/ does). Each
 * EVENT is printed once, the first time it happens. Off, a call costs one
 * predicted branch, so it may sit on hot paths (the vCPU exit loop). */
#ifndef MDVM_TRACE_H
#define MDVM_TRACE_H

struct guest_mem;

extern int trace_startup_on;   /* -1: not looked at yet, 0: off, 1: on */

void trace_startup_event(const char *event, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
/* The "memory" event, with the host range of the guest RAM window as detail. */
void trace_startup_mem(struct guest_mem *gm);

#define trace_startup(event) do {						\
	if (__builtin_expect(trace_startup_on != 0, 0))				\
		trace_startup_event(event, "%s", "");				\
} while (0)

#endif
