/* Small helpers shared by every part of mdvm. No KVM, no jansson: the unit
 * tests link util.c on its own. */
#ifndef MDVM_UTIL_H
#define MDVM_UTIL_H
#include <stddef.h>
#include <stdint.h>

/* "mdvm: <msg>\n" on stderr as one write(2), so lines from vCPU threads and
 * the main loop never interleave. A trailing newline in fmt is optional. */
void pr_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void pr_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));  /* "mdvm: warning: " */
void pr_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* pr_err() then exit(1). */
void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* Allocation that cannot fail: abort() on OOM (a VMM that half-works after
 * an allocation failure is worse than one that stops). */
void *xmalloc(size_t size);
void *xcalloc(size_t nmemb, size_t size);
void *xrealloc(void *ptr, size_t size);
char *xstrdup(const char *s);

/* CLOCK_MONOTONIC in nanoseconds. */
uint64_t monotonic_ns(void);

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#endif
