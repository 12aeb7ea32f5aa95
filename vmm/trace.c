/* Opt-in startup trace (see trace.h). */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "../mm/mm.h"
#include "trace.h"
#include "util.h"

int trace_startup_on = -1;

#define TRACE_MAX_EVENTS 32

static pthread_mutex_t trace_lock = PTHREAD_MUTEX_INITIALIZER;
static const char *seen[TRACE_MAX_EVENTS];
static unsigned nseen;

void trace_startup_event(const char *event, const char *fmt, ...)
{
	uint64_t now = monotonic_ns();   /* before the lock: the time of the step */
	char line[256];
	int n;

	pthread_mutex_lock(&trace_lock);
	if (trace_startup_on < 0) {
		const char *e = getenv("MDVM_TRACE_STARTUP");
		trace_startup_on = e && *e && strcmp(e, "0") != 0;
	}
	if (!trace_startup_on)
		goto out;
	for (unsigned i = 0; i < nseen; i++)
		if (!strcmp(seen[i], event))
			goto out;
	if (nseen < TRACE_MAX_EVENTS)
		seen[nseen++] = event;   /* callers pass string literals */
	char detail[160];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	n = snprintf(line, sizeof(line), "mdvm-trace: %s %llu%s%s\n", event, (unsigned long long)now,
		     detail[0] ? " " : "", detail);
	if (n > 0 && (size_t)n < sizeof(line) && write(STDERR_FILENO, line, n) < 0) {
		/* nothing to do about it */
	}
out:
	pthread_mutex_unlock(&trace_lock);
}

void trace_startup_mem(struct guest_mem *gm)
{
	struct mm_range r[4];
	size_t n;
	uintptr_t base;

	if (!__builtin_expect(trace_startup_on != 0, 0))
		return;
	n = mm_ram_ranges(gm, r, 4);
	base = (uintptr_t)mm_guest_base(gm);
	/* The window [base, base + end of RAM): every host page backing guest RAM
	 * is mapped inside it, which lets a benchmark tell guest RAM from VMM memory. */
	trace_startup_event("memory", "window=0x%lx-0x%lx",
			    (unsigned long)base,
			    (unsigned long)(base + (n ? r[n - 1].gpa + r[n - 1].size : 0)));
}
