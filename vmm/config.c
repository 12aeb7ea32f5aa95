/* VM configuration: built-in defaults, a libvirt domain XML file, then the
 * `mdvm run` command line, in that order of precedence (last wins).
 *
 * Self-contained on purpose (libc + libxml2 only): the unit tests link this
 * file without the rest of the VMM, and error messages are returned in a
 * caller buffer instead of being logged, so the caller decides where they go.
 *
 * The XML reader accepts a strict subset of libvirt's domain format. Anything
 * that would change what the guest sees and that mdvm does not implement is
 * an error naming the file, line and element: silently ignoring a <disk> or
 * an <interface> would boot a VM that differs from what the file describes.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE   /* asprintf, strndup; the Makefile also defines it */
#endif
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libxml/parser.h>
#include <libxml/tree.h>
#include <libxml/xmlerror.h>

#include "config.h"

#define MDVM_NS          "https://mdvm.dev/schemas/domain/1.0"
#define DEFAULT_CONFIG   "configs/default.xml"
#define CONFIG_MIN_MEM   (2ULL << 20)
#define CONFIG_MEM_ALIGN 4096ULL
#define CMDLINE_MAX      4096   /* bytes including the NUL */

/* ---------------------------------------------------------------- helpers */

static void seterr(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || !errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

/* Configuration strings are tiny; running out of memory here is not worth a
 * recovery path (and util.c's xmalloc is deliberately not used, see above). */
static char *cfg_strdup(const char *s)
{
	char *p;

	if (!s)
		return NULL;
	p = strdup(s);
	if (!p) {
		fprintf(stderr, "mdvm: out of memory\n");
		abort();
	}
	return p;
}

static void set_str(char **dst, const char *s)
{
	free(*dst);
	*dst = cfg_strdup(s);
}

/* "256 MiB", "1.5 GiB" style rendering for messages and --check-config. */
static void fmt_size(uint64_t v, char *buf, size_t len)
{
	static const char *const units[] = { "bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
	unsigned u = 0;

	while (u + 1 < sizeof(units) / sizeof(units[0]) && v >= 1024 && v % 1024 == 0) {
		v /= 1024;
		u++;
	}
	snprintf(buf, len, "%" PRIu64 " %s", v, units[u]);
}

/* Strict unsigned decimal: digits only, no sign, no spaces, no overflow. */
static int parse_u64(const char *s, uint64_t *out)
{
	uint64_t v = 0;

	if (!s || !*s)
		return -1;
	for (; *s; s++) {
		if (!isdigit((unsigned char)*s))
			return -1;
		if (v > (UINT64_MAX - (uint64_t)(*s - '0')) / 10)
			return -2;
		v = v * 10 + (uint64_t)(*s - '0');
	}
	*out = v;
	return 0;
}

/* ------------------------------------------------------------ the defaults */

void config_init(struct vm_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->name = cfg_strdup("mdvm");
	cfg->mem_size = CONFIG_DEFAULT_MEM;
	cfg->ncpus = 1;
	cfg->console = CONSOLE_STDIO;
	cfg->backing = MM_BACKING_AUTO;
	cfg->balloon = 1;
	cfg->balloon_autodeflate = 1;
	cfg->balloon_reporting = 1;
}

void config_free(struct vm_config *cfg)
{
	if (!cfg)
		return;
	free(cfg->name);
	free(cfg->kernel);
	free(cfg->initrd);
	free(cfg->cmdline);
	free(cfg->control_path);
	free(cfg->incoming);
	free(cfg->console_path);
	memset(cfg, 0, sizeof(*cfg));
}

/* ------------------------------------------------------------------ sizes */

int config_parse_size(const char *s, uint64_t *out, char *err, size_t errlen)
{
	const char *p = s ? s : "";
	unsigned shift = 0;
	uint64_t v = 0;
	int overflow = 0;

	if (!isdigit((unsigned char)*p))
		goto bad;   /* also "", "-1", "+1", " 1" */
	for (; isdigit((unsigned char)*p); p++) {
		if (v > (UINT64_MAX - (uint64_t)(*p - '0')) / 10)
			overflow = 1;
		else
			v = v * 10 + (uint64_t)(*p - '0');
	}
	if (*p) {
		switch (toupper((unsigned char)*p)) {
		case 'K': shift = 10; break;
		case 'M': shift = 20; break;
		case 'G': shift = 30; break;
		case 'T': shift = 40; break;
		default: goto bad;
		}
		p++;
		/* "MiB" is the unambiguous spelling; "MB" is refused because it
		 * means 10^6 to some users and 2^20 to others. */
		if (*p && strcmp(p, "iB") != 0 && strcmp(p, "ib") != 0)
			goto bad;
	}
	/* Junk is reported before overflow: "99999999999999999999X" is junk. */
	if (overflow || (shift && v > (UINT64_MAX >> shift))) {
		seterr(err, errlen, "invalid size '%s': too large", s);
		return -1;
	}
	if (v == 0) {
		seterr(err, errlen, "invalid size '%s': must be greater than zero", s);
		return -1;
	}
	*out = v << shift;
	return 0;
bad:
	seterr(err, errlen, "invalid size '%s': expected a number with an optional K/M/G/T suffix",
	       s ? s : "");
	return -1;
}

/* Range checks shared by the XML reader (which prefixes file:line) and the
 * final CLI validation. Return 0 or -1 with a message without prefix. */
static int check_mem(uint64_t v, char *err, size_t errlen)
{
	char a[32], b[32];

	fmt_size(v, a, sizeof(a));
	if (v < CONFIG_MIN_MEM) {
		fmt_size(CONFIG_MIN_MEM, b, sizeof(b));
		seterr(err, errlen, "memory %s is below the minimum of %s", a, b);
		return -1;
	}
	if (v > CONFIG_MAX_MEM) {
		fmt_size(CONFIG_MAX_MEM, b, sizeof(b));
		seterr(err, errlen, "memory %s exceeds the maximum of %s", a, b);
		return -1;
	}
	if (v % CONFIG_MEM_ALIGN) {
		seterr(err, errlen, "memory %s is not a multiple of 4 KiB", a);
		return -1;
	}
	return 0;
}

static int check_cpus_str(const char *s, unsigned *out, char *err, size_t errlen)
{
	uint64_t v;

	if (parse_u64(s, &v) < 0 || v < 1 || v > CONFIG_MAX_CPUS) {
		seterr(err, errlen, "invalid vCPU count '%s': expected a number from 1 to %d",
		       s, CONFIG_MAX_CPUS);
		return -1;
	}
	*out = (unsigned)v;
	return 0;
}

static int check_cmdline(const char *s, char *err, size_t errlen)
{
	size_t n = s ? strlen(s) : 0;

	if (n >= CMDLINE_MAX) {
		seterr(err, errlen, "cmdline is %zu bytes; the limit is %d", n, CMDLINE_MAX - 1);
		return -1;
	}
	return 0;
}

/* ------------------------------------------------------------- XML reader */

struct xml_ctx {
	const char *path;     /* as given, for messages */
	char *dir;            /* directory of path, for relative paths; NULL = cwd */
	struct vm_config *cfg;
	char *err;
	size_t errlen;
	/* what was seen, for duplicates and cross-checks */
	int have_memory, have_vcpu, have_os, have_devices, have_serial, have_console;
	int have_current, have_membacking, have_mdvm_backing, hugepages;
	enum mm_backing mdvm_backing;
	uint64_t current_mem;
	long current_line;
	char *os_kernel, *mdvm_kernel;
	long os_kernel_line, mdvm_kernel_line;
	enum console_kind serial_kind, console_kind;
	char *serial_path, *console_path;
	long console_line;
};

static void xerr(struct xml_ctx *x, xmlNodePtr n, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void xerr(struct xml_ctx *x, xmlNodePtr n, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	long line = n ? xmlGetLineNo(n) : -1;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (line > 0)
		seterr(x->err, x->errlen, "%s:%ld: %s", x->path, line, msg);
	else
		seterr(x->err, x->errlen, "%s: %s", x->path, msg);
}

static const char *nname(xmlNodePtr n)
{
	return (const char *)n->name;
}

static int is_mdvm_ns(xmlNodePtr n)
{
	return n->ns && n->ns->href && strcmp((const char *)n->ns->href, MDVM_NS) == 0;
}

/* Element text with surrounding whitespace removed (caller frees). */
static char *node_text(xmlNodePtr n)
{
	xmlChar *c = xmlNodeGetContent(n);
	char *s, *b, *e;

	s = cfg_strdup(c ? (const char *)c : "");
	xmlFree(c);
	for (b = s; isspace((unsigned char)*b); b++)
		;
	e = b + strlen(b);
	while (e > b && isspace((unsigned char)e[-1]))
		e--;
	*e = '\0';
	memmove(s, b, (size_t)(e - b) + 1);
	return s;
}

static char *attr(xmlNodePtr n, const char *name)
{
	xmlChar *v = xmlGetNoNsProp(n, (const xmlChar *)name);
	char *s = v ? cfg_strdup((const char *)v) : NULL;

	xmlFree(v);
	return s;
}

/* Reject attributes outside `allowed` (NULL-terminated). Namespaced
 * attributes from other vocabularies are left alone. */
static int check_attrs(struct xml_ctx *x, xmlNodePtr n, const char *const *allowed)
{
	for (xmlAttrPtr a = n->properties; a; a = a->next) {
		int ok = 0;

		if (a->ns)
			continue;
		for (const char *const *p = allowed; p && *p; p++)
			if (strcmp((const char *)a->name, *p) == 0)
				ok = 1;
		if (!ok) {
			xerr(x, n, "attribute '%s' of <%s> is not supported by mdvm",
			     (const char *)a->name, nname(n));
			return -1;
		}
	}
	return 0;
}

static int unsupported(struct xml_ctx *x, xmlNodePtr n)
{
	if (n->ns && n->ns->prefix)
		xerr(x, n, "<%s:%s> is not supported by mdvm", (const char *)n->ns->prefix, nname(n));
	else
		xerr(x, n, "<%s> is not supported by mdvm", nname(n));
	return -1;
}

static int no_children(struct xml_ctx *x, xmlNodePtr n)
{
	for (xmlNodePtr c = n->children; c; c = c->next)
		if (c->type == XML_ELEMENT_NODE)
			return unsupported(x, c);
	return 0;
}

static int is(xmlNodePtr n, const char *name)
{
	return !n->ns && strcmp(nname(n), name) == 0;
}

static int dup_check(struct xml_ctx *x, xmlNodePtr n, int *seen)
{
	if (*seen) {
		xerr(x, n, "<%s> given more than once", nname(n));
		return -1;
	}
	*seen = 1;
	return 0;
}

/* Relative paths in the file are relative to the file's directory, so a
 * config keeps working whatever the current directory is. */
static char *resolve_path(struct xml_ctx *x, const char *p)
{
	char *r;

	if (p[0] == '/' || !x->dir)
		return cfg_strdup(p);
	if (asprintf(&r, "%s/%s", x->dir, p) < 0) {
		fprintf(stderr, "mdvm: out of memory\n");
		abort();
	}
	return r;
}

/* libvirt's scaled integers (virScaleInteger): unit names are
 * case-insensitive; "b"/"bytes" = 1, "k"/"KiB" = 1024, "KB" = 1000, and so
 * on up to exbibytes. The default unit is KiB. */
static int libvirt_unit(const char *unit, uint64_t *scale)
{
	uint64_t base;
	unsigned power;

	if (!unit || !*unit) {
		*scale = 1024;
		return 0;
	}
	if (strcasecmp(unit, "b") == 0 || strcasecmp(unit, "bytes") == 0) {
		*scale = 1;
		return 0;
	}
	switch (tolower((unsigned char)unit[0])) {
	case 'k': power = 1; break;
	case 'm': power = 2; break;
	case 'g': power = 3; break;
	case 't': power = 4; break;
	case 'p': power = 5; break;
	case 'e': power = 6; break;
	default: return -1;
	}
	if (unit[1] == '\0' || strcasecmp(unit + 1, "ib") == 0)
		base = 1024;
	else if (strcasecmp(unit + 1, "b") == 0)
		base = 1000;
	else
		return -1;
	*scale = 1;
	while (power--)
		*scale *= base;
	return 0;
}

static int xml_scaled(struct xml_ctx *x, xmlNodePtr n, uint64_t *out)
{
	static const char *const attrs[] = { "unit", "dumpCore", NULL };
	char *unit, *text;
	uint64_t v, scale;
	int ret = -1;

	if (check_attrs(x, n, attrs) < 0 || no_children(x, n) < 0)
		return -1;
	unit = attr(n, "unit");
	text = node_text(n);
	if (libvirt_unit(unit, &scale) < 0) {
		xerr(x, n, "<%s>: unknown unit '%s' (use b, KiB, MiB, GiB or TiB)", nname(n), unit);
	} else if (parse_u64(text, &v) < 0) {
		xerr(x, n, "<%s>: invalid value '%s': expected a whole number", nname(n), text);
	} else if (scale > 1 && v > UINT64_MAX / scale) {
		xerr(x, n, "<%s>: value '%s %s' is too large", nname(n), text, unit ? unit : "KiB");
	} else {
		*out = v * scale;
		ret = 0;
	}
	free(unit);
	free(text);
	return ret;
}

static int xml_memory(struct xml_ctx *x, xmlNodePtr n)
{
	char msg[256];
	uint64_t v;

	if (dup_check(x, n, &x->have_memory) < 0 || xml_scaled(x, n, &v) < 0)
		return -1;
	if (check_mem(v, msg, sizeof(msg)) < 0) {
		xerr(x, n, "%s", msg);
		return -1;
	}
	x->cfg->mem_size = v;
	return 0;
}

static int xml_current_memory(struct xml_ctx *x, xmlNodePtr n)
{
	if (dup_check(x, n, &x->have_current) < 0 || xml_scaled(x, n, &x->current_mem) < 0)
		return -1;
	x->current_line = xmlGetLineNo(n);
	return 0;
}

static int xml_vcpu(struct xml_ctx *x, xmlNodePtr n)
{
	static const char *const attrs[] = { "placement", "current", NULL };
	char msg[256];
	char *text, *placement, *current;
	unsigned cpus;
	int ret = -1;

	if (dup_check(x, n, &x->have_vcpu) < 0 || check_attrs(x, n, attrs) < 0 ||
	    no_children(x, n) < 0)
		return -1;
	text = node_text(n);
	placement = attr(n, "placement");
	current = attr(n, "current");
	if (check_cpus_str(text, &cpus, msg, sizeof(msg)) < 0)
		xerr(x, n, "%s", msg);
	else if (placement && strcmp(placement, "static") && strcmp(placement, "auto"))
		xerr(x, n, "<vcpu>: invalid placement '%s': expected static or auto", placement);
	/* Hot-pluggable vCPUs (current < max) are not implemented. */
	else if (current && strcmp(current, text))
		xerr(x, n, "<vcpu current='%s'> differs from the vCPU count %s; vCPU hotplug is not supported",
		     current, text);
	else {
		x->cfg->ncpus = cpus;
		ret = 0;
	}
	free(text);
	free(placement);
	free(current);
	return ret;
}

static int xml_os(struct xml_ctx *x, xmlNodePtr n)
{
	int have_type = 0, have_cmdline = 0, have_kernel = 0, have_initrd = 0;

	if (dup_check(x, n, &x->have_os) < 0 || check_attrs(x, n, NULL) < 0)
		return -1;
	for (xmlNodePtr c = n->children; c; c = c->next) {
		if (c->type != XML_ELEMENT_NODE)
			continue;
		if (is(c, "type")) {
			static const char *const attrs[] = { "arch", NULL };
			char *arch, *t;
			int bad;

			if (dup_check(x, c, &have_type) < 0 || check_attrs(x, c, attrs) < 0)
				return -1;
			arch = attr(c, "arch");
			t = node_text(c);
			bad = 1;
			if (arch && strcmp(arch, "x86_64"))
				xerr(x, c, "<type arch='%s'>: only x86_64 guests are supported", arch);
			else if (strcmp(t, "hvm"))
				xerr(x, c, "<type>%s</type>: only 'hvm' is supported", t);
			else
				bad = 0;
			free(arch);
			free(t);
			if (bad)
				return -1;
		} else if (is(c, "kernel")) {
			char *t;

			if (dup_check(x, c, &have_kernel) < 0 || check_attrs(x, c, NULL) < 0)
				return -1;
			t = node_text(c);
			if (!*t) {
				free(t);
				xerr(x, c, "<kernel> is empty");
				return -1;
			}
			x->os_kernel = resolve_path(x, t);
			x->os_kernel_line = xmlGetLineNo(c);
			free(t);
		} else if (is(c, "cmdline")) {
			char msg[256];
			xmlChar *t;

			if (dup_check(x, c, &have_cmdline) < 0 || check_attrs(x, c, NULL) < 0)
				return -1;
			/* Not trimmed: the guest gets exactly what the file says. */
			t = xmlNodeGetContent(c);
			if (check_cmdline(t ? (const char *)t : "", msg, sizeof(msg)) < 0) {
				xmlFree(t);
				xerr(x, c, "%s", msg);
				return -1;
			}
			set_str(&x->cfg->cmdline, t ? (const char *)t : "");
			xmlFree(t);
		} else if (is(c, "initrd")) {
			char *t;

			if (dup_check(x, c, &have_initrd) < 0 || check_attrs(x, c, NULL) < 0)
				return -1;
			t = node_text(c);
			if (!*t) {
				free(t);
				xerr(x, c, "<initrd> is empty");
				return -1;
			}
			free(x->cfg->initrd);
			x->cfg->initrd = resolve_path(x, t);
			free(t);
		} else if (is(c, "loader") || is(c, "boot") || is(c, "nvram")) {
			xerr(x, c, "<%s> is not supported by mdvm: it boots an ELF kernel directly, use <kernel>",
			     nname(c));
			return -1;
		} else {
			return unsupported(x, c);
		}
	}
	if (!have_type) {
		xerr(x, n, "<os> needs <type arch='x86_64'>hvm</type>");
		return -1;
	}
	return 0;
}

/* <serial> and <console>: the one character device mdvm has (COM1). */
static int xml_chardev(struct xml_ctx *x, xmlNodePtr n, enum console_kind *kind, char **path)
{
	static const char *const attrs[] = { "type", NULL };
	char *type;
	int ret = -1, have_source = 0, have_target = 0;

	if (check_attrs(x, n, attrs) < 0)
		return -1;
	type = attr(n, "type");
	if (!type) {
		xerr(x, n, "<%s> needs a type attribute (pty, stdio, file or null)", nname(n));
		return -1;
	}
	/* A pty would need a reader to attach; mdvm's console is its stdio. */
	if (!strcmp(type, "pty") || !strcmp(type, "stdio"))
		*kind = CONSOLE_STDIO;
	else if (!strcmp(type, "file"))
		*kind = CONSOLE_FILE;
	else if (!strcmp(type, "null"))
		*kind = CONSOLE_NONE;
	else {
		xerr(x, n, "<%s type='%s'> is not supported by mdvm (use pty, stdio, file or null)",
		     nname(n), type);
		goto out;
	}

	for (xmlNodePtr c = n->children; c; c = c->next) {
		if (c->type != XML_ELEMENT_NODE)
			continue;
		if (is(c, "source")) {
			static const char *const sattrs[] = { "path", "append", NULL };
			char *p;

			if (dup_check(x, c, &have_source) < 0 || check_attrs(x, c, sattrs) < 0 ||
			    no_children(x, c) < 0)
				goto out;
			p = attr(c, "path");
			if (*kind == CONSOLE_FILE) {
				if (!p || !*p) {
					free(p);
					xerr(x, c, "<source> of a file <%s> needs a path", nname(n));
					goto out;
				}
				free(*path);
				*path = resolve_path(x, p);
			}
			free(p);
		} else if (is(c, "target")) {
			static const char *const tattrs[] = { "port", "type", NULL };
			char *port, *ttype;
			int bad = 0;

			if (dup_check(x, c, &have_target) < 0 || check_attrs(x, c, tattrs) < 0 ||
			    no_children(x, c) < 0)
				goto out;
			port = attr(c, "port");
			ttype = attr(c, "type");
			if (port && strcmp(port, "0")) {
				xerr(x, c, "<target port='%s'>: mdvm has a single serial port, port 0", port);
				bad = 1;
			} else if (ttype && strcmp(ttype, "serial") && strcmp(ttype, "isa-serial")) {
				xerr(x, c, "<target type='%s'> is not supported by mdvm (only the ISA serial port)",
				     ttype);
				bad = 1;
			}
			free(port);
			free(ttype);
			if (bad)
				goto out;
		} else if (is(c, "alias")) {
			/* a name for management tools only */
		} else {
			unsupported(x, c);
			goto out;
		}
	}
	if (*kind == CONSOLE_FILE && !*path) {
		xerr(x, n, "<%s type='file'> needs <source path='...'/>", nname(n));
		goto out;
	}
	ret = 0;
out:
	free(type);
	return ret;
}

static int xml_devices(struct xml_ctx *x, xmlNodePtr n)
{
	if (dup_check(x, n, &x->have_devices) < 0 || check_attrs(x, n, NULL) < 0)
		return -1;
	for (xmlNodePtr c = n->children; c; c = c->next) {
		if (c->type != XML_ELEMENT_NODE)
			continue;
		if (is(c, "emulator")) {
			/* libvirt's path to the VMM binary; we are the VMM */
		} else if (is(c, "serial")) {
			if (x->have_serial) {
				xerr(x, c, "only one <serial> is supported by mdvm");
				return -1;
			}
			x->have_serial = 1;
			if (xml_chardev(x, c, &x->serial_kind, &x->serial_path) < 0)
				return -1;
		} else if (is(c, "console")) {
			if (x->have_console) {
				xerr(x, c, "only one <console> is supported by mdvm");
				return -1;
			}
			x->have_console = 1;
			x->console_line = xmlGetLineNo(c);
			if (xml_chardev(x, c, &x->console_kind, &x->console_path) < 0)
				return -1;
		} else if (is(c, "memballoon")) {
			/* As libvirt: a virtio balloon unless <memballoon model='none'/>;
			 * autodeflate / freePageReporting: libvirt's attribute names. */
			static const char *const attrs[] = { "model", "autodeflate", "freePageReporting", NULL };
			static const char *const feat[] = { "autodeflate", "freePageReporting" };
			int *dst[] = { &x->cfg->balloon_autodeflate, &x->cfg->balloon_reporting };
			char *model;
			int on;

			if (check_attrs(x, c, attrs) < 0 || no_children(x, c) < 0)
				return -1;
			model = attr(c, "model");
			on = !model ? -1 : !strcmp(model, "virtio") ? 1 : !strcmp(model, "none") ? 0 : -1;
			free(model);
			if (on < 0)
				return unsupported(x, c);
			x->cfg->balloon = on;
			for (int i = 0; i < 2; i++) {
				char *v = attr(c, feat[i]);
				if (!v)
					continue;
				int ok = !strcmp(v, "on") || !strcmp(v, "off");
				if (ok)
					*dst[i] = !strcmp(v, "on");
				else
					xerr(x, c, "<memballoon %s='%s'>: expected 'on' or 'off'", feat[i], v);
				free(v);
				if (!ok)
					return -1;
			}
		} else {
			return unsupported(x, c);
		}
	}
	return 0;
}

static int xml_memory_backing(struct xml_ctx *x, xmlNodePtr n)
{
	if (dup_check(x, n, &x->have_membacking) < 0 || check_attrs(x, n, NULL) < 0)
		return -1;
	for (xmlNodePtr c = n->children; c; c = c->next) {
		if (c->type != XML_ELEMENT_NODE)
			continue;
		if (!is(c, "hugepages"))
			return unsupported(x, c);
		if (check_attrs(x, c, NULL) < 0)
			return -1;
		/* mdvm's hugetlb backing uses the default 2 MiB pages only. */
		for (xmlNodePtr p = c->children; p; p = p->next) {
			static const char *const attrs[] = { "size", "unit", NULL };
			char *size, *unit;
			uint64_t v, scale;
			int ok;

			if (p->type != XML_ELEMENT_NODE)
				continue;
			if (!is(p, "page") || check_attrs(x, p, attrs) < 0)
				return is(p, "page") ? -1 : unsupported(x, p);
			size = attr(p, "size");
			unit = attr(p, "unit");
			ok = size && parse_u64(size, &v) == 0 && libvirt_unit(unit, &scale) == 0 &&
			     v <= UINT64_MAX / scale && v * scale == (2ULL << 20);
			if (!ok)
				xerr(x, p, "<page size='%s'%s%s%s>: only 2 MiB huge pages are supported",
				     size ? size : "", unit ? " unit='" : "", unit ? unit : "", unit ? "'" : "");
			free(size);
			free(unit);
			if (!ok)
				return -1;
		}
		x->hugepages = 1;
	}
	return 0;
}

/* <metadata><mdvm:config xmlns:mdvm="...">: settings libvirt has no words
 * for. They live in <metadata> because libvirt's schema rejects foreign
 * elements directly under <domain> (only its own qemu: namespace is let in),
 * so files using them still pass virt-xml-validate. */
static int xml_mdvm_config(struct xml_ctx *x, xmlNodePtr n)
{
	int have_control = 0, have_kernel = 0;

	if (check_attrs(x, n, NULL) < 0)
		return -1;
	for (xmlNodePtr c = n->children; c; c = c->next) {
		if (c->type != XML_ELEMENT_NODE)
			continue;
		if (!is_mdvm_ns(c))
			return unsupported(x, c);
		if (!strcmp(nname(c), "backing")) {
			char *t;
			int bad;

			if (dup_check(x, c, &x->have_mdvm_backing) < 0 || check_attrs(x, c, NULL) < 0 ||
			    no_children(x, c) < 0)
				return -1;
			t = node_text(c);
			bad = mm_backing_parse(t, &x->mdvm_backing) < 0;
			if (bad)
				xerr(x, c, "<mdvm:backing>: unknown backing '%s' (use auto, hugetlb, thp, memfd or anon)", t);
			free(t);
			if (bad)
				return -1;
		} else if (!strcmp(nname(c), "control")) {
			static const char *const attrs[] = { "path", NULL };
			char *p;

			if (dup_check(x, c, &have_control) < 0 || check_attrs(x, c, attrs) < 0 ||
			    no_children(x, c) < 0)
				return -1;
			p = attr(c, "path");
			if (!p || !*p) {
				free(p);
				xerr(x, c, "<mdvm:control> needs a path attribute");
				return -1;
			}
			free(x->cfg->control_path);
			x->cfg->control_path = resolve_path(x, p);
			free(p);
		} else if (!strcmp(nname(c), "kernel")) {
			char *t;

			if (dup_check(x, c, &have_kernel) < 0 || check_attrs(x, c, NULL) < 0 ||
			    no_children(x, c) < 0)
				return -1;
			t = node_text(c);
			if (!*t) {
				free(t);
				xerr(x, c, "<mdvm:kernel> is empty");
				return -1;
			}
			x->mdvm_kernel = resolve_path(x, t);
			x->mdvm_kernel_line = xmlGetLineNo(c);
			free(t);
		} else {
			return unsupported(x, c);
		}
	}
	return 0;
}

static int xml_metadata(struct xml_ctx *x, xmlNodePtr n)
{
	int have_cfg = 0;

	/* Other applications' metadata is none of our business. */
	for (xmlNodePtr c = n->children; c; c = c->next) {
		if (c->type != XML_ELEMENT_NODE || !is_mdvm_ns(c))
			continue;
		if (strcmp(nname(c), "config"))
			return unsupported(x, c);
		if (dup_check(x, c, &have_cfg) < 0 || xml_mdvm_config(x, c) < 0)
			return -1;
	}
	return 0;
}

/* Elements that describe or manage the domain but do not change what the
 * guest sees or how mdvm runs it. */
static const char *const ignored_elements[] = {
	"uuid", "title", "description", "on_poweroff", "on_reboot", "on_crash", "on_lockfailure",
	NULL,
};

static int xml_domain(struct xml_ctx *x, xmlNodePtr root)
{
	static const char *const attrs[] = { "type", "id", NULL };
	char *type;
	int have_name = 0;

	if (!root || root->ns || strcmp(nname(root), "domain")) {
		xerr(x, root, "the root element must be <domain type='kvm'>");
		return -1;
	}
	if (check_attrs(x, root, attrs) < 0)
		return -1;
	type = attr(root, "type");
	if (!type || strcmp(type, "kvm")) {
		xerr(x, root, "<domain type='%s'>: mdvm runs only type='kvm' domains", type ? type : "");
		free(type);
		return -1;
	}
	free(type);

	for (xmlNodePtr c = root->children; c; c = c->next) {
		int ignored = 0;

		if (c->type != XML_ELEMENT_NODE)
			continue;
		for (const char *const *p = ignored_elements; *p; p++)
			if (is(c, *p))
				ignored = 1;
		if (ignored)
			continue;
		if (is(c, "name")) {
			char *t;

			if (dup_check(x, c, &have_name) < 0)
				return -1;
			t = node_text(c);
			if (!*t) {
				free(t);
				xerr(x, c, "<name> is empty");
				return -1;
			}
			free(x->cfg->name);
			x->cfg->name = t;
		} else if (is(c, "metadata")) {
			if (xml_metadata(x, c) < 0)
				return -1;
		} else if (is(c, "memory")) {
			if (xml_memory(x, c) < 0)
				return -1;
		} else if (is(c, "currentMemory")) {
			if (xml_current_memory(x, c) < 0)
				return -1;
		} else if (is(c, "vcpu")) {
			if (xml_vcpu(x, c) < 0)
				return -1;
		} else if (is(c, "os")) {
			if (xml_os(x, c) < 0)
				return -1;
		} else if (is(c, "devices")) {
			if (xml_devices(x, c) < 0)
				return -1;
		} else if (is(c, "memoryBacking")) {
			if (xml_memory_backing(x, c) < 0)
				return -1;
		} else {
			return unsupported(x, c);
		}
	}

	/* Cross-element checks, now that everything has been seen. */
	if (!x->have_memory) {
		xerr(x, root, "<memory> is required");
		return -1;
	}
	if (!x->have_os) {
		xerr(x, root, "<os> is required");
		return -1;
	}
	if (x->have_current && x->current_mem != x->cfg->mem_size) {
		seterr(x->err, x->errlen, "%s:%ld: currentMemory != memory is not supported; use the balloon",
		       x->path, x->current_line);
		return -1;
	}
	if (x->hugepages && x->have_mdvm_backing && x->mdvm_backing != MM_BACKING_HUGETLB) {
		xerr(x, root, "<memoryBacking><hugepages/> conflicts with <mdvm:backing>%s</mdvm:backing>",
		     mm_backing_name(x->mdvm_backing));
		return -1;
	}
	if (x->hugepages)
		x->cfg->backing = MM_BACKING_HUGETLB;
	else if (x->have_mdvm_backing)
		x->cfg->backing = x->mdvm_backing;
	if (x->os_kernel && x->mdvm_kernel) {
		seterr(x->err, x->errlen, "%s:%ld: <mdvm:kernel> and <os><kernel> both given; use one",
		       x->path, x->mdvm_kernel_line);
		return -1;
	}
	if (x->os_kernel || x->mdvm_kernel) {
		free(x->cfg->kernel);
		x->cfg->kernel = x->os_kernel ? x->os_kernel : x->mdvm_kernel;
		x->os_kernel = x->mdvm_kernel = NULL;
	}

	/* Console: libvirt writes a <console> that mirrors serial port 0; that
	 * copy is ignored. A lone <console> defines the port. No character
	 * device at all means the guest has no console output. */
	if (x->have_serial && x->have_console) {
		int same = x->serial_kind == x->console_kind &&
			   (x->serial_kind != CONSOLE_FILE ||
			    strcmp(x->serial_path, x->console_path) == 0);
		if (!same) {
			seterr(x->err, x->errlen, "%s:%ld: <console> differs from <serial>; mdvm has one serial port",
			       x->path, x->console_line);
			return -1;
		}
	}
	if (x->have_serial || x->have_console) {
		x->cfg->console = x->have_serial ? x->serial_kind : x->console_kind;
		free(x->cfg->console_path);
		x->cfg->console_path = NULL;
		if (x->cfg->console == CONSOLE_FILE)
			x->cfg->console_path = cfg_strdup(x->have_serial ? x->serial_path : x->console_path);
	} else {
		x->cfg->console = CONSOLE_NONE;
		free(x->cfg->console_path);
		x->cfg->console_path = NULL;
	}
	return 0;
}

int config_load_xml(const char *path, struct vm_config *cfg, char *err, size_t errlen)
{
	struct xml_ctx x = { .path = path, .cfg = cfg, .err = err, .errlen = errlen };
	xmlParserCtxtPtr ctxt;
	xmlDocPtr doc;
	const char *slash;
	int fd, ret;

	/* Give the plain OS reason ("No such file or directory") rather than
	 * libxml2's "failed to load external entity". */
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		seterr(err, errlen, "%s: %s", path, strerror(errno));
		return -1;
	}
	close(fd);

	slash = strrchr(path, '/');
	if (slash)
		x.dir = slash == path ? cfg_strdup("/") : strndup(path, (size_t)(slash - path));

	ctxt = xmlNewParserCtxt();
	if (!ctxt) {
		seterr(err, errlen, "%s: cannot create an XML parser", path);
		free(x.dir);
		return -1;
	}
	/* NONET: never fetch DTDs or entities over the network. NOERROR and
	 * NOWARNING: libxml2 must not print on its own; we report the error. */
	doc = xmlCtxtReadFile(ctxt, path, NULL,
			      XML_PARSE_NONET | XML_PARSE_NOBLANKS | XML_PARSE_BIG_LINES |
			      XML_PARSE_NOERROR | XML_PARSE_NOWARNING);
	if (!doc) {
		const xmlError *e = xmlCtxtGetLastError(ctxt);
		char msg[256];
		size_t n;

		snprintf(msg, sizeof(msg), "%s", e && e->message ? e->message : "not well-formed XML");
		n = strlen(msg);
		while (n && (msg[n - 1] == '\n' || msg[n - 1] == ' '))
			msg[--n] = '\0';
		if (e && e->line > 0)
			seterr(err, errlen, "%s:%d: %s", path, e->line, msg);
		else
			seterr(err, errlen, "%s: %s", path, msg);
		xmlFreeParserCtxt(ctxt);
		free(x.dir);
		return -1;
	}

	ret = xml_domain(&x, xmlDocGetRootElement(doc));

	free(x.os_kernel);
	free(x.mdvm_kernel);
	free(x.serial_path);
	free(x.console_path);
	free(x.dir);
	xmlFreeDoc(doc);
	xmlFreeParserCtxt(ctxt);
	return ret;
}

/* ------------------------------------------- --inject-memory-error-at */

/* GPA[:KIND][@MS]: GPA decimal or 0x-hex with an optional K/M/G suffix. */
int config_parse_inject_at(const char *s, struct mce_inject_at *out, char *err, size_t errlen)
{
	char buf[128], *gpa_s, *kind_s, *ms_s, *end;
	uint64_t gpa, ms = 0;
	int kind = 0;

	if (!s || !*s || strlen(s) >= sizeof(buf)) {
		seterr(err, errlen, "invalid value '%s': expected GPA[:KIND][@MS]", s ? s : "");
		return -1;
	}
	strcpy(buf, s);
	gpa_s = buf;
	ms_s = strchr(buf, '@');
	if (ms_s)
		*ms_s++ = '\0';
	kind_s = strchr(buf, ':');
	if (kind_s)
		*kind_s++ = '\0';
	errno = 0;
	if (!isdigit((unsigned char)*gpa_s))
		goto bad_gpa;
	gpa = strtoull(gpa_s, &end, 0);
	if (errno)
		goto bad_gpa;
	if (*end) {
		unsigned shift = toupper((unsigned char)*end) == 'K' ? 10 : toupper((unsigned char)*end) == 'M' ? 20 :
				 toupper((unsigned char)*end) == 'G' ? 30 : 0;
		if (!shift || end[1] || gpa > (UINT64_MAX >> shift))
			goto bad_gpa;
		gpa <<= shift;
	}
	if (gpa & 0xfff) {
		seterr(err, errlen, "GPA 0x%" PRIx64 " is not 4 KiB aligned", gpa);
		return -1;
	}
	if (kind_s) {
		if (!strcmp(kind_s, "action-optional") || !strcmp(kind_s, "ao"))
			kind = 0;
		else if (!strcmp(kind_s, "action-required") || !strcmp(kind_s, "ar"))
			kind = 1;
		else {
			seterr(err, errlen, "invalid kind '%s': expected action-optional (ao) or "
			       "action-required (ar)", kind_s);
			return -1;
		}
	}
	if (ms_s && (parse_u64(ms_s, &ms) < 0 || ms > 24ULL * 3600 * 1000)) {
		seterr(err, errlen, "invalid delay '%s': expected milliseconds (at most a day)", ms_s);
		return -1;
	}
	*out = (struct mce_inject_at){ .gpa = gpa, .kind = kind, .delay_ms = ms };
	return 0;
bad_gpa:
	seterr(err, errlen, "invalid GPA '%s' in '%s': expected a number (0x-hex, decimal, K/M/G suffix)",
	       gpa_s, s);
	return -1;
}

/* ------------------------------------------------------------ `mdvm run` */

void config_print_run_usage(void *stream)
{
	FILE *f = stream;

	fprintf(f,
		"Usage: mdvm run [OPTIONS]\n"
		"\n"
		"Boot a VM described by a libvirt domain XML file and/or options.\n"
		"Options override the file; the file overrides the built-in defaults.\n"
		"Without --config and --kernel, configs/default.xml is used if it exists.\n"
		"\n"
		"  --config FILE        libvirt domain XML (see docs/configuration.md)\n"
		"  --memory SIZE        guest RAM, e.g. 512M, 4G, 512MiB (default 256M;\n"
		"                       2 MiB to 4 TiB, a multiple of 4 KiB)\n"
		"  --cpus N             number of vCPUs, 1 to %d (default 1)\n"
		"  --kernel FILE        guest kernel: an ELF with a PVH entry note or a\n"
		"                       Linux bzImage\n"
		"  --initrd FILE        initial ramdisk for a Linux kernel\n"
		"  --cmdline STR        guest kernel command line (under 4096 bytes)\n"
		"  --control PATH       QMP control socket to create at PATH\n"
		"  --console KIND       stdio (default), file:PATH or none\n"
		"  --backing KIND       guest RAM backing: auto (default), hugetlb, thp,\n"
		"                       memfd or anon\n"
		"  --reserve-hugepages  raise vm.nr_hugepages if too few are free (root)\n"
		"  --balloon on|off     virtio-balloon device (default on)\n"
		"  --compaction auto|off  background compaction of guest RAM (default off)\n"
		"  --incoming URI       wait for a live migration on tcp:HOST:PORT or unix:PATH\n"
		"  --inject-memory-error-at GPA[:KIND][@MS]\n"
		"                       poison the guest page at GPA MS milliseconds after\n"
		"                       start (default 0); KIND action-optional (default)\n"
		"                       or action-required (ao/ar); repeatable\n"
		"  -h, --help           show this help and exit\n"
		"\n"
		"Environment (docs/memory-errors.md):\n"
		"  MDVM_MCE=auto|native|emulated|off   machine-check back end (default auto)\n"
		"  MDVM_MCE_ENCODING=auto|intel|amd    memory-error encoding (default auto:\n"
		"                       AMD on AMD/Hygon hosts, else Intel)\n",
		CONFIG_MAX_CPUS);
}

enum {
	OPT_CONFIG = 256, OPT_MEMORY, OPT_CPUS, OPT_KERNEL, OPT_INITRD, OPT_CMDLINE, OPT_CONTROL,
	OPT_CONSOLE, OPT_BACKING, OPT_RESERVE, OPT_CHECK, OPT_BALLOON, OPT_COMPACTION, OPT_INJECT_AT,
	OPT_INCOMING,
};

static const struct option run_options[] = {
	{ "config",            required_argument, NULL, OPT_CONFIG },
	{ "memory",            required_argument, NULL, OPT_MEMORY },
	{ "cpus",              required_argument, NULL, OPT_CPUS },
	{ "kernel",            required_argument, NULL, OPT_KERNEL },
	{ "initrd",            required_argument, NULL, OPT_INITRD },
	{ "cmdline",           required_argument, NULL, OPT_CMDLINE },
	{ "control",           required_argument, NULL, OPT_CONTROL },
	{ "console",           required_argument, NULL, OPT_CONSOLE },
	{ "backing",           required_argument, NULL, OPT_BACKING },
	{ "reserve-hugepages", no_argument,       NULL, OPT_RESERVE },
	{ "balloon",           required_argument, NULL, OPT_BALLOON },
	{ "compaction",        required_argument, NULL, OPT_COMPACTION },
	{ "inject-memory-error-at", required_argument, NULL, OPT_INJECT_AT },
	{ "incoming",          required_argument, NULL, OPT_INCOMING },
	{ "check-config",      no_argument,       NULL, OPT_CHECK },  /* hidden */
	{ "help",              no_argument,       NULL, 'h' },
	{ NULL, 0, NULL, 0 },
};

static const char *opt_name(int val)
{
	for (const struct option *o = run_options; o->name; o++)
		if (o->val == val)
			return o->name;
	return "?";
}

/* getopt only says "something was wrong"; name the offending word. */
static void getopt_error(int c, int argc, char **argv, char *err, size_t errlen)
{
	const char *word = optind - 1 < argc && optind >= 1 ? argv[optind - 1] : "";

	if (c == ':') {
		if (optopt >= 256 || optopt == 'h')
			seterr(err, errlen, "option '--%s' requires an argument", opt_name(optopt));
		else
			seterr(err, errlen, "option '-%c' requires an argument", optopt);
		return;
	}
	if (optopt && optopt < 256) {
		seterr(err, errlen, "unknown option '-%c' (see mdvm run --help)", optopt);
		return;
	}
	if (optopt >= 256) {
		/* "--reserve-hugepages=x": an argument to a flag */
		seterr(err, errlen, "option '--%s' takes no argument", opt_name(optopt));
		return;
	}
	{
		/* Unknown, or an abbreviation matching several options (getopt
		 * accepts unambiguous prefixes such as --mem). Drop any "=value". */
		size_t n = strcspn(word, "="), matches = 0;
		char list[256] = "";

		if (n > 2 && word[0] == '-' && word[1] == '-') {
			for (const struct option *o = run_options; o->name; o++) {
				if (o->val == OPT_CHECK || strncmp(o->name, word + 2, n - 2))
					continue;
				matches++;
				snprintf(list + strlen(list), sizeof(list) - strlen(list), "%s--%s",
					 matches > 1 ? ", " : "", o->name);
			}
		}
		if (matches > 1)
			seterr(err, errlen, "ambiguous option '%.*s': could be %s", (int)n, word, list);
		else
			seterr(err, errlen, "unknown option '%.*s' (see mdvm run --help)", (int)n, word);
	}
}

static int console_parse(const char *s, struct vm_config *cfg, char *err, size_t errlen)
{
	if (!strcmp(s, "stdio")) {
		cfg->console = CONSOLE_STDIO;
	} else if (!strcmp(s, "none")) {
		cfg->console = CONSOLE_NONE;
	} else if (!strncmp(s, "file:", 5) && s[5]) {
		cfg->console = CONSOLE_FILE;
		set_str(&cfg->console_path, s + 5);
		return 0;
	} else {
		seterr(err, errlen, "invalid --console '%s': expected stdio, file:PATH or none", s);
		return -1;
	}
	free(cfg->console_path);
	cfg->console_path = NULL;
	return 0;
}

static int check_kernel(const char *what, const char *path, char *err, size_t errlen)
{
	struct stat st;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0) {
		seterr(err, errlen, "%s '%s': %s", what, path, strerror(errno));
		return -1;
	}
	if (fstat(fd, &st) < 0) {
		seterr(err, errlen, "%s '%s': %s", what, path, strerror(errno));
		close(fd);
		return -1;
	}
	close(fd);
	if (!S_ISREG(st.st_mode)) {
		seterr(err, errlen, "%s '%s': %s", what, path,
		       S_ISDIR(st.st_mode) ? strerror(EISDIR) : "not a regular file");
		return -1;
	}
	return 0;
}

/* The console file is created when the VM starts; catch the usual mistakes
 * (missing directory, a directory as the file) now, without creating it. */
static int check_console_file(const char *path, char *err, size_t errlen)
{
	struct stat st;
	char *dir, *slash;
	int ret = 0;

	if (!path || !*path) {
		seterr(err, errlen, "console file: empty path");
		return -1;
	}
	if (stat(path, &st) == 0) {
		if (S_ISDIR(st.st_mode)) {
			seterr(err, errlen, "console file '%s': %s", path, strerror(EISDIR));
			return -1;
		}
		return 0;
	}
	dir = cfg_strdup(path);
	slash = strrchr(dir, '/');
	if (slash) {
		if (slash == dir)
			slash[1] = '\0';
		else
			*slash = '\0';
		if (stat(dir, &st) < 0) {
			seterr(err, errlen, "console file '%s': %s", path, strerror(errno));
			ret = -1;
		} else if (!S_ISDIR(st.st_mode)) {
			seterr(err, errlen, "console file '%s': %s", path, strerror(ENOTDIR));
			ret = -1;
		}
	}
	free(dir);
	return ret;
}

static void print_config(FILE *f, const struct vm_config *cfg)
{
	char size[32];

	fmt_size(cfg->mem_size, size, sizeof(size));
	fprintf(f, "name: %s\n", cfg->name ? cfg->name : "");
	fprintf(f, "memory: %s (%" PRIu64 " bytes)\n", size, cfg->mem_size);
	fprintf(f, "cpus: %u\n", cfg->ncpus);
	fprintf(f, "kernel: %s\n", cfg->kernel ? cfg->kernel : "");
	fprintf(f, "initrd: %s\n", cfg->initrd ? cfg->initrd : "");
	fprintf(f, "cmdline: %s\n", cfg->cmdline ? cfg->cmdline : "");
	if (cfg->console == CONSOLE_FILE)
		fprintf(f, "console: file:%s\n", cfg->console_path);
	else
		fprintf(f, "console: %s\n", cfg->console == CONSOLE_STDIO ? "stdio" : "none");
	fprintf(f, "backing: %s\n", mm_backing_name(cfg->backing));
	fprintf(f, "reserve-hugepages: %s\n", cfg->reserve_hugepages ? "yes" : "no");
	fprintf(f, "balloon: %s", cfg->balloon ? "on" : "off");
	if (cfg->balloon)
		fprintf(f, " (autodeflate %s, free page reporting %s)", cfg->balloon_autodeflate ? "on" : "off",
			cfg->balloon_reporting ? "on" : "off");
	fprintf(f, "\n");
	fprintf(f, "compaction: %s\n", cfg->compaction ? "auto" : "off");
	fprintf(f, "control: %s\n", cfg->control_path ? cfg->control_path : "none");
	if (cfg->incoming)
		fprintf(f, "incoming: %s\n", cfg->incoming);
}

/* Migration URI syntax (the address is resolved when used). */
static int check_incoming(const char *uri, char *msg, size_t len)
{
	if (!strncmp(uri, "unix:", 5)) {
		if (!uri[5] || strlen(uri + 5) > 107) {
			snprintf(msg, len, "'%s': unix: needs a socket path of 1..107 bytes", uri);
			return -1;
		}
		return 0;
	}
	if (!strncmp(uri, "tcp:", 4)) {
		const char *colon = strrchr(uri + 4, ':');
		char *end;
		long port = colon ? strtol(colon + 1, &end, 10) : 0;
		if (!colon || !colon[1] || *end || port < 1 || port > 65535) {
			snprintf(msg, len, "'%s': expected tcp:HOST:PORT with a port in 1..65535", uri);
			return -1;
		}
		return 0;
	}
	snprintf(msg, len, "'%s': expected tcp:HOST:PORT or unix:PATH", uri);
	return -1;
}

/* Returns 0: run the VM; 1: --help was printed (exit 0); 2: --check-config
 * printed the resolved configuration (exit 0, create no VM); -1: error. */
int config_parse_run_args(int argc, char **argv, struct vm_config *cfg, char *err, size_t errlen)
{
	/* Leading ':' makes getopt report a missing argument as ':' and keeps
	 * it quiet: every message is ours. */
	static const char shortopts[] = ":h";
	const char *config_path = NULL;
	int have_kernel = 0, check_only = 0, c;
	char msg[512];

	/* Pass 1: --help, --config and --check-config, so the file is loaded
	 * first wherever --config appears and the options then override it.
	 * optind = 0 makes glibc reinitialise (we may be called repeatedly). */
	opterr = 0;
	optind = 0;
	while ((c = getopt_long(argc, argv, shortopts, run_options, NULL)) != -1) {
		switch (c) {
		case 'h':
			config_print_run_usage(stdout);
			return 1;
		case OPT_CONFIG:
			if (config_path) {
				seterr(err, errlen, "--config given more than once");
				return -1;
			}
			config_path = optarg;
			break;
		case OPT_KERNEL:
			have_kernel = 1;
			break;
		case OPT_CHECK:
			check_only = 1;
			break;
		case '?':
		case ':':
			getopt_error(c, argc, argv, err, errlen);
			return -1;
		default:
			break;
		}
	}
	if (optind < argc) {
		seterr(err, errlen, "unexpected argument '%s' (see mdvm run --help)", argv[optind]);
		return -1;
	}

	if (!config_path && !have_kernel) {
		if (access(DEFAULT_CONFIG, F_OK) == 0) {
			config_path = DEFAULT_CONFIG;
		} else {
			seterr(err, errlen, "no kernel: give --kernel ELF or --config FILE");
			return -1;
		}
	}
	if (config_path && config_load_xml(config_path, cfg, err, errlen) < 0)
		return -1;

	/* Pass 2: overrides, in command-line order (the last one wins). */
	optind = 0;
	while ((c = getopt_long(argc, argv, shortopts, run_options, NULL)) != -1) {
		switch (c) {
		case OPT_MEMORY:
			if (config_parse_size(optarg, &cfg->mem_size, msg, sizeof(msg)) < 0) {
				seterr(err, errlen, "--memory: %s", msg);
				return -1;
			}
			if (check_mem(cfg->mem_size, msg, sizeof(msg)) < 0) {
				seterr(err, errlen, "--memory %s: %s", optarg, msg);
				return -1;
			}
			break;
		case OPT_CPUS:
			if (check_cpus_str(optarg, &cfg->ncpus, msg, sizeof(msg)) < 0) {
				seterr(err, errlen, "--cpus: %s", msg);
				return -1;
			}
			break;
		case OPT_KERNEL:
			if (!*optarg) {
				seterr(err, errlen, "--kernel: empty path");
				return -1;
			}
			set_str(&cfg->kernel, optarg);
			break;
		case OPT_INITRD:
			if (!*optarg) {
				seterr(err, errlen, "--initrd: empty path");
				return -1;
			}
			set_str(&cfg->initrd, optarg);
			break;
		case OPT_CMDLINE:
			if (check_cmdline(optarg, msg, sizeof(msg)) < 0) {
				seterr(err, errlen, "--cmdline: %s", msg);
				return -1;
			}
			set_str(&cfg->cmdline, optarg);
			break;
		case OPT_CONTROL:
			if (!*optarg) {
				seterr(err, errlen, "--control: empty path");
				return -1;
			}
			set_str(&cfg->control_path, optarg);
			break;
		case OPT_CONSOLE:
			if (console_parse(optarg, cfg, err, errlen) < 0)
				return -1;
			break;
		case OPT_BACKING:
			if (mm_backing_parse(optarg, &cfg->backing) < 0) {
				seterr(err, errlen,
				       "invalid --backing '%s': expected auto, hugetlb, thp, memfd or anon", optarg);
				return -1;
			}
			break;
		case OPT_RESERVE:
			cfg->reserve_hugepages = 1;
			break;
		case OPT_BALLOON:
			if (strcmp(optarg, "on") && strcmp(optarg, "off")) {
				seterr(err, errlen, "invalid --balloon '%s': expected on or off", optarg);
				return -1;
			}
			cfg->balloon = !strcmp(optarg, "on");
			break;
		case OPT_COMPACTION:
			if (strcmp(optarg, "auto") && strcmp(optarg, "off")) {
				seterr(err, errlen, "invalid --compaction '%s': expected auto or off", optarg);
				return -1;
			}
			cfg->compaction = !strcmp(optarg, "auto");
			break;
		case OPT_INCOMING:
			if (check_incoming(optarg, msg, sizeof(msg)) < 0) {
				seterr(err, errlen, "--incoming: %s", msg);
				return -1;
			}
			set_str(&cfg->incoming, optarg);
			break;
		case OPT_INJECT_AT:
			if (cfg->n_inject_at == CONFIG_MAX_INJECT_AT) {
				seterr(err, errlen, "--inject-memory-error-at given more than %d times",
				       CONFIG_MAX_INJECT_AT);
				return -1;
			}
			if (config_parse_inject_at(optarg, &cfg->inject_at[cfg->n_inject_at], msg,
						   sizeof(msg)) < 0) {
				seterr(err, errlen, "--inject-memory-error-at: %s", msg);
				return -1;
			}
			cfg->n_inject_at++;
			break;
		default:
			break;
		}
	}

	/* Final checks on the merged result. Sizes and counts were checked as
	 * they were read; what is left depends on the whole. */
	if (!cfg->kernel) {
		seterr(err, errlen, "no kernel: give --kernel ELF or <kernel> in %s",
		       config_path ? config_path : "the config");
		return -1;
	}
	if (check_kernel("kernel", cfg->kernel, err, errlen) < 0)
		return -1;
	if (cfg->initrd && check_kernel("initrd", cfg->initrd, err, errlen) < 0)
		return -1;
	if (cfg->console == CONSOLE_FILE && check_console_file(cfg->console_path, err, errlen) < 0)
		return -1;
	if (cfg->reserve_hugepages && cfg->backing != MM_BACKING_HUGETLB &&
	    cfg->backing != MM_BACKING_AUTO) {
		seterr(err, errlen, "--reserve-hugepages needs --backing hugetlb or auto (backing is %s)",
		       mm_backing_name(cfg->backing));
		return -1;
	}

	if (check_only) {
		print_config(stdout, cfg);
		fflush(stdout);
		return 2;
	}
	return 0;
}
