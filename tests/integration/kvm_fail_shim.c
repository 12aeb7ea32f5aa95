/* LD_PRELOAD shim for test_kvm_errors.py: makes one KVM ioctl fail.
 *
 *   MDVM_FAIL_IOCTL=KVM_CREATE_VM   the ioctl to fail (names below)
 *   MDVM_FAIL_ERRNO=12              errno it fails with (default ENOMEM)
 *   MDVM_FAIL_SKIP=1                let that many calls succeed first (default 0)
 *   MDVM_FAIL_IF_EXISTS=PATH        fail only once PATH exists (a test's trigger)
 *
 * Every other ioctl goes to libc's. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/kvm.h>

static const struct {
	const char *name;
	unsigned long req;
} kvm_ioctls[] = {
	{ "KVM_GET_API_VERSION", KVM_GET_API_VERSION },
	{ "KVM_CREATE_VM", KVM_CREATE_VM },
	{ "KVM_GET_VCPU_MMAP_SIZE", KVM_GET_VCPU_MMAP_SIZE },
	{ "KVM_CREATE_IRQCHIP", KVM_CREATE_IRQCHIP },
	{ "KVM_CREATE_PIT2", KVM_CREATE_PIT2 },
	{ "KVM_SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION },
	{ "KVM_CREATE_VCPU", KVM_CREATE_VCPU },
	{ "KVM_GET_SUPPORTED_CPUID", KVM_GET_SUPPORTED_CPUID },
	{ "KVM_SET_CPUID2", KVM_SET_CPUID2 },
	{ "KVM_SET_SREGS", KVM_SET_SREGS },
	{ "KVM_SET_REGS", KVM_SET_REGS },
	{ "KVM_RUN", KVM_RUN },
};

int ioctl(int fd, unsigned long req, ...)
{
	static int (*real)(int, unsigned long, ...);
	const char *want = getenv("MDVM_FAIL_IOCTL");
	va_list ap;
	void *arg;

	va_start(ap, req);
	arg = va_arg(ap, void *);
	va_end(ap);
	if (want) {
		for (size_t i = 0; i < sizeof(kvm_ioctls) / sizeof(kvm_ioctls[0]); i++) {
			if (kvm_ioctls[i].req == req && !strcmp(kvm_ioctls[i].name, want)) {
				static int calls;
				const char *skip = getenv("MDVM_FAIL_SKIP");
				const char *e = getenv("MDVM_FAIL_ERRNO");
				const char *trigger = getenv("MDVM_FAIL_IF_EXISTS");

				if (trigger && access(trigger, F_OK) != 0)
					break;
				if (skip && __atomic_fetch_add(&calls, 1, __ATOMIC_SEQ_CST) < atoi(skip))
					break;
				errno = e ? atoi(e) : ENOMEM;
				return -1;
			}
		}
	}
	if (!real)
		real = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
	return real(fd, req, arg);
}
