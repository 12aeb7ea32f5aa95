/* Shared helpers; see util.h. Deliberately free of KVM and jansson. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "util.h"

/* Format the whole line first and emit it with a single write(2): stdio's
 * stderr is unbuffered, so fprintf would issue several writes and lines from
 * different threads could interleave. */
static void pr_line(const char *prefix, const char *fmt, va_list ap)
{
	char stack[1024], *buf = stack;
	va_list ap2;
	int plen = (int)strlen(prefix), n;
	size_t cap = sizeof(stack);
	int saved_errno = errno;   /* callers may print then look at errno */

	va_copy(ap2, ap);
	n = vsnprintf(NULL, 0, fmt, ap2);
	va_end(ap2);
	if (n < 0)
		n = 0;
	if ((size_t)plen + (size_t)n + 2 > cap) {
		cap = (size_t)plen + (size_t)n + 2;
		buf = malloc(cap);
		if (!buf) {          /* still say something */
			buf = stack;
			cap = sizeof(stack);
		}
	}
	memcpy(buf, prefix, (size_t)plen);
	n = vsnprintf(buf + plen, cap - (size_t)plen - 1, fmt, ap);
	if (n < 0)
		n = 0;
	size_t len = (size_t)plen + (size_t)n;
	if (len > cap - 2)
		len = cap - 2;
	if (len == 0 || buf[len - 1] != '\n')
		buf[len++] = '\n';

	size_t off = 0;
	while (off < len) {
		ssize_t w = write(STDERR_FILENO, buf + off, len - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			break;
		off += (size_t)w;
	}
	if (buf != stack)
		free(buf);
	errno = saved_errno;
}

void pr_err(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	pr_line("mdvm: ", fmt, ap);
	va_end(ap);
}

void pr_warn(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	pr_line("mdvm: warning: ", fmt, ap);
	va_end(ap);
}

void pr_info(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	pr_line("mdvm: ", fmt, ap);
	va_end(ap);
}

void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	pr_line("mdvm: ", fmt, ap);
	va_end(ap);
	exit(1);
}

static void oom(size_t size)
{
	/* No allocation here: report with a fixed buffer and abort. */
	char buf[96];
	int n = snprintf(buf, sizeof(buf), "mdvm: out of memory (%zu bytes)\n", size);
	if (n > 0 && write(STDERR_FILENO, buf, (size_t)n) < 0) {
		/* nothing more we can do */
	}
	abort();
}

void *xmalloc(size_t size)
{
	void *p = malloc(size ? size : 1);
	if (!p)
		oom(size);
	return p;
}

void *xcalloc(size_t nmemb, size_t size)
{
	void *p = calloc(nmemb ? nmemb : 1, size ? size : 1);
	if (!p)
		oom(nmemb * size);
	return p;
}

void *xrealloc(void *ptr, size_t size)
{
	void *p = realloc(ptr, size ? size : 1);
	if (!p)
		oom(size);
	return p;
}

char *xstrdup(const char *s)
{
	char *p = strdup(s);
	if (!p)
		oom(strlen(s) + 1);
	return p;
}

uint64_t monotonic_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}
