/* Guest memory: first, simple implementation of mm.h (one backing object,
 * mapped at GPA 0 / hole_end inside one reserved host range). */
#include "mm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif
#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26)
#endif

#define MM_MAX_RANGES 2

struct guest_mem {
	struct mm_config cfg;
	enum mm_backing backing;
	const struct mm_hv_ops *ops;
	void *opaque;
	uint8_t *base;          /* host address of GPA 0 */
	uint64_t span;          /* bytes reserved at base */
	int fd;                 /* memfd, or -1 */
	size_t nranges;
	struct mm_range ranges[MM_MAX_RANGES];
};

static const char *const backing_names[] = {
	[MM_BACKING_AUTO] = "auto",
	[MM_BACKING_HUGETLB] = "hugetlb",
	[MM_BACKING_THP] = "thp",
	[MM_BACKING_MEMFD] = "memfd",
	[MM_BACKING_ANON] = "anon",
};

const char *mm_backing_name(enum mm_backing b)
{
	if ((unsigned)b < sizeof(backing_names) / sizeof(backing_names[0]))
		return backing_names[b];
	return "?";
}

int mm_backing_parse(const char *s, enum mm_backing *out)
{
	for (unsigned i = 0; i < sizeof(backing_names) / sizeof(backing_names[0]); i++) {
		if (s && strcasecmp(s, backing_names[i]) == 0) {
			*out = (enum mm_backing)i;
			return 0;
		}
	}
	return -1;
}

static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
	if (!err || !errlen)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

struct guest_mem *mm_create(const struct mm_config *cfg, const struct mm_hv_ops *ops,
			    void *opaque, char *err, size_t errlen)
{
	const uint64_t page = 4096, huge = 2ULL << 20;
	if (!cfg || cfg->ram_size == 0 || cfg->ram_size % page) {
		seterr(err, errlen, "guest RAM size must be a non-zero multiple of 4 KiB");
		return NULL;
	}
	struct guest_mem *gm = calloc(1, sizeof(*gm));
	if (!gm) {
		seterr(err, errlen, "out of memory");
		return NULL;
	}
	gm->cfg = *cfg;
	gm->ops = ops;
	gm->opaque = opaque;
	gm->fd = -1;

	bool hole = cfg->hole_end > cfg->hole_start;
	uint64_t low = cfg->ram_size, high = 0;
	if (hole && low > cfg->hole_start) {
		low = cfg->hole_start;
		high = cfg->ram_size - low;
	}
	if (low)
		gm->ranges[gm->nranges++] = (struct mm_range){ 0, low };
	if (high)
		gm->ranges[gm->nranges++] = (struct mm_range){ cfg->hole_end, high };
	struct mm_range *last = &gm->ranges[gm->nranges - 1];
	gm->span = last->gpa + last->size;

	enum mm_backing b = cfg->backing == MM_BACKING_AUTO ? MM_BACKING_MEMFD : cfg->backing;
	if (b == MM_BACKING_HUGETLB && (low % huge || high % huge)) {
		seterr(err, errlen, "hugetlb backing needs RAM ranges in multiples of 2 MiB");
		goto fail;
	}
	gm->backing = b;

	/* Reserve span + 2 MiB and keep a 2 MiB-aligned window (hugetlb, THP). */
	uint8_t *raw = mmap(NULL, gm->span + huge, PROT_NONE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (raw == MAP_FAILED) {
		seterr(err, errlen, "reserving %llu bytes of address space: %s",
		       (unsigned long long)gm->span, strerror(errno));
		goto fail;
	}
	gm->base = (uint8_t *)(((uintptr_t)raw + huge - 1) & ~(uintptr_t)(huge - 1));
	if (gm->base > raw)
		munmap(raw, (size_t)(gm->base - raw));
	if (gm->base + gm->span < raw + gm->span + huge)
		munmap(gm->base + gm->span, (size_t)(raw + gm->span + huge - (gm->base + gm->span)));

	if (b == MM_BACKING_HUGETLB || b == MM_BACKING_MEMFD) {
		unsigned flags = MFD_CLOEXEC;
		if (b == MM_BACKING_HUGETLB)
			flags |= MFD_HUGETLB | MFD_HUGE_2MB;
		gm->fd = memfd_create("mdvm-ram", flags);
		if (gm->fd < 0) {
			seterr(err, errlen, "memfd_create: %s", strerror(errno));
			goto fail;
		}
		if (ftruncate(gm->fd, (off_t)cfg->ram_size) < 0) {
			seterr(err, errlen, "ftruncate guest RAM: %s", strerror(errno));
			goto fail;
		}
	}
	uint64_t off = 0;
	for (size_t i = 0; i < gm->nranges; i++) {
		struct mm_range *r = &gm->ranges[i];
		void *want = gm->base + r->gpa, *p;
		if (gm->fd >= 0)
			p = mmap(want, r->size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
				 gm->fd, (off_t)off);
		else
			p = mmap(want, r->size, PROT_READ | PROT_WRITE,
				 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
		if (p == MAP_FAILED) {
			seterr(err, errlen, "mapping guest RAM: %s", strerror(errno));
			goto fail;
		}
		if (b == MM_BACKING_THP)
			madvise(p, r->size, MADV_HUGEPAGE);
		off += r->size;
	}
	if (ops && ops->set_region) {
		for (size_t i = 0; i < gm->nranges; i++) {
			struct mm_range *r = &gm->ranges[i];
			int rc = ops->set_region(opaque, (uint32_t)i, r->gpa, r->size,
						 gm->base + r->gpa, false);
			if (rc < 0) {
				seterr(err, errlen, "registering guest RAM slot %zu: %s", i,
				       strerror(rc < -1 ? -rc : errno));
				goto fail;
			}
		}
	}
	return gm;
fail:
	mm_destroy(gm);
	return NULL;
}

void mm_destroy(struct guest_mem *gm)
{
	if (!gm)
		return;
	if (gm->base)
		munmap(gm->base, gm->span);
	if (gm->fd >= 0)
		close(gm->fd);
	free(gm);
}

enum mm_backing mm_backing(const struct guest_mem *gm) { return gm->backing; }
uint64_t mm_ram_size(const struct guest_mem *gm) { return gm->cfg.ram_size; }

size_t mm_ram_ranges(const struct guest_mem *gm, struct mm_range *out, size_t max)
{
	size_t n = gm->nranges < max ? gm->nranges : max;
	for (size_t i = 0; i < n; i++)
		out[i] = gm->ranges[i];
	return gm->nranges;
}

static const struct mm_range *find_range(const struct guest_mem *gm, uint64_t gpa, uint64_t len)
{
	for (size_t i = 0; i < gm->nranges; i++) {
		const struct mm_range *r = &gm->ranges[i];
		if (gpa >= r->gpa && gpa - r->gpa < r->size && len <= r->size - (gpa - r->gpa))
			return r;
	}
	return NULL;
}

void *mm_gpa_to_hva(struct guest_mem *gm, uint64_t gpa, uint64_t len)
{
	if (!find_range(gm, gpa, len ? len : 1))
		return NULL;
	return gm->base + gpa;
}

static int copy_guest(struct guest_mem *gm, uint64_t gpa, void *buf, size_t len, bool write)
{
	/* Validate everything first: no partial copies. */
	uint64_t g = gpa;
	size_t left = len;
	while (left) {
		const struct mm_range *r = find_range(gm, g, 1);
		if (!r) {
			errno = EFAULT;
			return -1;
		}
		uint64_t n = r->gpa + r->size - g;
		if (n > left)
			n = left;
		g += n;
		left -= n;
	}
	if (write) {
		memcpy(gm->base + gpa, buf, len);
		mm_mark_dirty(gm, gpa, len);
	} else {
		memcpy(buf, gm->base + gpa, len);
	}
	return 0;
}

int mm_read(struct guest_mem *gm, uint64_t gpa, void *buf, size_t len)
{
	return copy_guest(gm, gpa, buf, len, false);
}

int mm_write(struct guest_mem *gm, uint64_t gpa, const void *buf, size_t len)
{
	return copy_guest(gm, gpa, (void *)buf, len, true);
}

void mm_mark_dirty(struct guest_mem *gm, uint64_t gpa, uint64_t len)
{
	(void)gm; (void)gpa; (void)len;
}

int mm_mark_reserved(struct guest_mem *gm, uint64_t gpa, uint64_t len)
{
	(void)gm; (void)gpa; (void)len;
	return 0;
}
