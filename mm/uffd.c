/* First touch: a userfaultfd (MISSING mode) on the never-touched placeholder
 * mappings of guest RAM, served by a thread owned by mm/. vCPU accesses reach
 * it through KVM's get_user_pages (the guest blocks until the folio is
 * mapped), other threads through their own page faults. */
#include "mm_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
struct uffdio_poison {
	struct uffdio_range range;
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)
	__u64 mode;
	__s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

static int uffd_open(void)
{
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd >= 0)
		return fd;
	int e = errno;
	int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev >= 0) {
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
		e = errno;
		close(dev);
		if (fd >= 0)
			return fd;
	}
	errno = e;
	return -1;
}

int uffd_register_range(struct guest_mem *gm, uint64_t gpa, uint64_t size)
{
	/* WP too when the host has it: a migration then only write-protects
	 * (registering would split the VMA inside the stall window), and a
	 * later registration cannot drop MISSING by asking for WP alone. */
	struct uffdio_register reg = {
		.range = { (uint64_t)(uintptr_t)(gm->base + gpa), size },
		.mode = UFFDIO_REGISTER_MODE_MISSING | (gm->have_wp ? UFFDIO_REGISTER_MODE_WP : 0),
	};
	if (ioctl(gm->uffd, UFFDIO_REGISTER, &reg) < 0)
		return -errno;
	if (reg.ioctls & (1ULL << _UFFDIO_POISON))
		gm->have_poison = true;
	return 0;
}

int uffd_arm_range(struct guest_mem *gm, uint64_t gpa, uint64_t size)
{
	return gm->uffd < 0 ? -EOPNOTSUPP : uffd_register_range(gm, gpa, size);
}

int uffd_zeropage(struct guest_mem *gm, uint64_t gpa, uint64_t size)
{
	struct uffdio_zeropage z = { .range = { (uint64_t)(uintptr_t)(gm->base + gpa), size } };
	if (ioctl(gm->uffd, UFFDIO_ZEROPAGE, &z) < 0 && errno != EEXIST)
		return -errno;
	return 0;
}

int uffd_unregister_range(struct guest_mem *gm, uint64_t gpa, uint64_t size)
{
	struct uffdio_range r = { (uint64_t)(uintptr_t)(gm->base + gpa), size };
	return ioctl(gm->uffd, UFFDIO_UNREGISTER, &r) < 0 ? -errno : 0;
}

/* Kernels before 6.6 have no UFFDIO_POISON: put a page in and poison it for
 * real (MADV_HWPOISON: CONFIG_MEMORY_FAILURE and CAP_SYS_ADMIN), so a KVM
 * access gets -EHWPOISON and the vCPU thread SIGBUS BUS_MCEERR_AR, as for a
 * host memory error. Costs the host that page; never for the zero page. */
static int uffd_hwpoison(struct guest_mem *gm, uint64_t gpa, uint64_t size)
{
	static const uint8_t zero[MM_PAGE_SIZE];
	for (uint64_t off = 0; off < size; off += MM_PAGE_SIZE) {
		uint8_t *at = gm->base + gpa + off;
		struct uffdio_copy c = { .dst = (uint64_t)(uintptr_t)at, .src = (uint64_t)(uintptr_t)zero,
					 .len = MM_PAGE_SIZE, .mode = UFFDIO_COPY_MODE_DONTWAKE };
		if (ioctl(gm->uffd, UFFDIO_COPY, &c) < 0) {
			if (errno == EEXIST)
				continue;   /* a live page is there: never poison it */
			return -errno;
		}
		if (madvise(at, MM_PAGE_SIZE, MADV_HWPOISON) < 0) {
			int e = errno;
			madvise(at, MM_PAGE_SIZE, MADV_DONTNEED);   /* back to a placeholder */
			return e == EINVAL || e == EPERM ? -EOPNOTSUPP : -e;
		}
	}
	return 0;
}

int uffd_poison(struct guest_mem *gm, uint64_t gpa, uint64_t size)
{
	if (!gm->have_poison)
		return gm->backing == MM_BACKING_HUGETLB ? -EOPNOTSUPP : uffd_hwpoison(gm, gpa, size);
	struct uffdio_poison p = { .range = { (uint64_t)(uintptr_t)(gm->base + gpa), size } };
	if (ioctl(gm->uffd, UFFDIO_POISON, &p) < 0 && errno != EEXIST)
		return -errno;
	return 0;
}

/* Write-protect for a folio migration (mm/migrate.c). The caller has
 * registered the range (region_arm: MISSING + WP); the remap that ends the
 * migration replaces the protected VMA. */
int uffd_wp_range(struct guest_mem *gm, uint64_t gpa, uint64_t size)
{
	if (!gm->have_wp)
		return -EOPNOTSUPP;
	struct uffdio_writeprotect wp = { .range = { (uint64_t)(uintptr_t)(gm->base + gpa), size },
					  .mode = UFFDIO_WRITEPROTECT_MODE_WP };
	return ioctl(gm->uffd, UFFDIO_WRITEPROTECT, &wp) < 0 ? -errno : 0;
}

/* Lift the protection (a failed migration keeps the old location) and wake. */
int uffd_unprotect_range(struct guest_mem *gm, uint64_t gpa, uint64_t size)
{
	struct uffdio_writeprotect wp = { .range = { (uint64_t)(uintptr_t)(gm->base + gpa), size },
					  .mode = 0 };
	return ioctl(gm->uffd, UFFDIO_WRITEPROTECT, &wp) < 0 ? -errno : 0;
}

void uffd_wake_range(struct guest_mem *gm, uint64_t gpa, uint64_t size)
{
	struct uffdio_range r = { (uint64_t)(uintptr_t)(gm->base + gpa), size };
	ioctl(gm->uffd, UFFDIO_WAKE, &r);
}

static void uffd_wake(struct guest_mem *gm, uint64_t gfn, uint64_t nr)
{
	struct uffdio_range r = { (uint64_t)(uintptr_t)(gm->base + (gfn << MM_PAGE_SHIFT)),
				  nr << MM_PAGE_SHIFT };
	ioctl(gm->uffd, UFFDIO_WAKE, &r);
}

static void handle_fault(struct guest_mem *gm, uint64_t addr)
{
	uint64_t gfn = (addr - (uint64_t)(uintptr_t)gm->base) >> MM_PAGE_SHIFT;
	uint64_t wake_gfn = gfn, wake_nr = 1;

	pthread_mutex_lock(&gm->lock);
	memdesc_t md = mdt_get(&gm->md, gfn);
	switch (memdesc_type(md)) {
	case MEMDESC_UNBACKED:
	case MEMDESC_BALLOONED: {   /* touching a ballooned page deflates it (that page only) */
		static unsigned told;
		if (memdesc_type(md) == MEMDESC_BALLOONED && !gm->cfg.quiet && told < 4 && ++told)
			mm_log(gm, "guest RAM: GPA 0x%llx touched while in the balloon: backed again "
			       "(the balloon driver did not deflate it first)",
			       (unsigned long long)(gfn << MM_PAGE_SHIFT));
		int rc = populate_locked(gm, gfn, 1, gm->fault_order, MEMDESC_FOLIO);
		if (rc) {
			mm_log(gm, "guest RAM: cannot back GPA 0x%llx: %s",
			       (unsigned long long)(gfn << MM_PAGE_SHIFT), strerror(-rc));
			/* A SIGBUS (memory failure) in the faulting thread beats a hang. */
			if (uffd_poison(gm, gfn << MM_PAGE_SHIFT, MM_PAGE_SIZE) < 0)
				abort();
			break;
		}
		atomic_fetch_add(&gm->faults, 1);
		break;
	}
	case MEMDESC_POISONED:
		if (uffd_poison(gm, gfn << MM_PAGE_SHIFT, MM_PAGE_SIZE) < 0)
			mm_log(gm, "guest touched poisoned GPA 0x%llx and UFFDIO_POISON is unavailable",
			       (unsigned long long)(gfn << MM_PAGE_SHIFT));
		break;
	default:
		break;   /* populated meanwhile (another vCPU, mm_write) */
	}
	struct folio *f = memdesc_folio(mdt_get(&gm->md, gfn));
	if (f)   /* a hole of an armed mapping (released page, new folio) */
		resolve_folio_fault(gm, f, gfn);
	if (f) {
		wake_gfn = f->gfn;
		wake_nr = folio_nr_pages(f);
	}
	if (gm->backing == MM_BACKING_HUGETLB) {
		wake_gfn = gfn & ~(uint64_t)(MM_REGION_PAGES - 1);
		wake_nr = MM_REGION_PAGES;
	}
	pthread_mutex_unlock(&gm->lock);
	uffd_wake(gm, wake_gfn, wake_nr);
}

static void *uffd_main(void *arg)
{
	struct guest_mem *gm = arg;
	struct uffd_msg msgs[16];
	for (;;) {
		struct pollfd pf[2] = { { gm->uffd, POLLIN, 0 }, { gm->stop_fd, POLLIN, 0 } };
		if (poll(pf, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (pf[1].revents)
			break;
		ssize_t n = read(gm->uffd, msgs, sizeof(msgs));
		if (n < 0)
			continue;
		for (size_t i = 0; i < (size_t)n / sizeof(msgs[0]); i++)
			/* Write-protect faults belong to a folio migration,
			 * which wakes its writers when the folio is remapped. */
			if (msgs[i].event == UFFD_EVENT_PAGEFAULT &&
			    !(msgs[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP))
				handle_fault(gm, msgs[i].arg.pagefault.address);
	}
	return NULL;
}

/* Opens the userfaultfd; the caller then registers the placeholders and
 * starts the thread with uffd_run(). */
int uffd_start(struct guest_mem *gm, char *why, size_t whylen)
{
	gm->uffd = uffd_open();
	if (gm->uffd < 0) {
		snprintf(why, whylen, "userfaultfd: %s", strerror(errno));
		return -1;
	}
	/* Write-protect (folio migration) on shmem/hugetlb and on anonymous
	 * pages never faulted in needs features that must be asked for up
	 * front; a probe descriptor tells whether the kernel has them. */
	const uint64_t wp_feat = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM |
				 (1ULL << 13) /* UFFD_FEATURE_WP_UNPOPULATED (6.4) */;
	uint64_t feat = 0;
	int probe = uffd_open();
	if (probe >= 0) {
		struct uffdio_api pa = { .api = UFFD_API, .features = 0 };
		if (ioctl(probe, UFFDIO_API, &pa) == 0 && (pa.features & wp_feat) == wp_feat)
			feat = wp_feat;
		close(probe);
	}
	struct uffdio_api api = { .api = UFFD_API, .features = feat };
	gm->have_wp = feat != 0;
	if (ioctl(gm->uffd, UFFDIO_API, &api) < 0) {
		snprintf(why, whylen, "UFFDIO_API: %s", strerror(errno));
		goto fail;
	}
	gm->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (gm->stop_fd < 0) {
		snprintf(why, whylen, "eventfd: %s", strerror(errno));
		goto fail;
	}
	int rc = pthread_create(&gm->uffd_thread, NULL, uffd_main, gm);
	if (rc) {
		snprintf(why, whylen, "pthread_create: %s", strerror(rc));
		goto fail;
	}
	gm->uffd_running = true;
	return 0;
fail:
	close(gm->uffd);
	gm->uffd = -1;
	if (gm->stop_fd >= 0)
		close(gm->stop_fd);
	gm->stop_fd = -1;
	return -1;
}

void uffd_stop(struct guest_mem *gm)
{
	if (gm->uffd_running) {
		uint64_t one = 1;
		if (write(gm->stop_fd, &one, sizeof(one)) < 0)
			abort();
		pthread_join(gm->uffd_thread, NULL);
		gm->uffd_running = false;
	}
	if (gm->uffd >= 0)
		close(gm->uffd);
	if (gm->stop_fd >= 0)
		close(gm->stop_fd);
	gm->uffd = gm->stop_fd = -1;
}
