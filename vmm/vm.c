/* The VM: KVM setup, one thread per vCPU, exit dispatch and the pause
 * protocol the control plane uses. */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "acpi.h"
#include "boot.h"
#include "layout.h"
#include "loop.h"
#include "qmp.h"
#include "trace.h"
#include "util.h"
#include "vm.h"
#include "vmstate.h"
#include "bus.h"
#include "dirty_kvm.h"
#include "../devices/devices.h"
#include "../devices/virtio_balloon.h"
#include "../mm/mm.h"
#include "mce.h"

#define VCPU_KICK_SIGNAL SIGUSR1

struct vcpu {
	struct vm *vm;
	int id, fd;
	struct kvm_run *run;
	pthread_t thread;
	pid_t tid;
	bool started;
	struct mce_vcpu *mce;     /* machine checks (vmm/mce.c) */
};

struct vm {
	const struct vm_config *cfg;
	int kvm_fd, vm_fd;
	size_t run_size;
	struct guest_mem *gm;
	struct vcpu *vcpus;
	int ncpus;
	struct serial *serial;
	struct testdev *testdev;
	struct rtc *rtc;
	struct virtio_balloon *balloon;
	char *cmdline;            /* cfg->cmdline + virtio_mmio.device= for our devices */
	int console_fd;
	struct boot_image img;

	pthread_mutex_t lock;
	pthread_cond_t cond;
	enum vm_state state;
	bool pause_req, exiting;
	bool mig_was_paused;      /* vm_stop_for_migration found it paused */
	int parked;               /* vCPU threads waiting in vcpu_park() */
	int exit_code;
	struct mce *mce;
	_Atomic unsigned throttle_pct;  /* auto-converge: share of time vCPUs sleep */
	pthread_t throttle_thread;      /* kicks the vCPUs every 10 ms while throttling */
	bool throttle_thread_live;
};

const char *vm_state_name(enum vm_state s)
{
	switch (s) {
	case VM_STATE_PRELAUNCH:      return "prelaunch";
	case VM_STATE_RUNNING:        return "running";
	case VM_STATE_PAUSED:         return "paused";
	case VM_STATE_SHUTDOWN:       return "shutdown";
	case VM_STATE_INTERNAL_ERROR: return "internal-error";
	case VM_STATE_INMIGRATE:      return "inmigrate";
	case VM_STATE_FINISH_MIGRATE: return "finish-migrate";
	case VM_STATE_POSTMIGRATE:    return "postmigrate";
	}
	return "unknown";
}

#define VERR(...) ({ snprintf(err, errlen, __VA_ARGS__); -1; })

/* ---- mm/ -> KVM: the narrow hypervisor interface */
static int kvm_set_region(void *opaque, uint32_t slot, uint64_t gpa, uint64_t size,
			  void *hva, bool log_dirty)
{
	/* Through the dirty harvester: it adds logging to slots while a dirty
	 * log is open and needs every slot's GPA to translate what it harvests. */
	(void)opaque;
	return dirty_kvm_set_region(slot, gpa, size, hva, log_dirty);
}

static const struct mm_hv_ops kvm_mm_ops = { .set_region = kvm_set_region };

void vm_irq_line(struct vm *vm, int irq, int level)
{
	struct kvm_irq_level l = { .irq = irq, .level = level };
	ioctl(vm->vm_fd, KVM_IRQ_LINE, &l);
}

int vm_add_ioeventfd(struct vm *vm, uint64_t gpa, uint32_t len, uint64_t datamatch)
{
	int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	struct kvm_ioeventfd io = { .datamatch = datamatch, .addr = gpa, .len = len,
				    .flags = KVM_IOEVENTFD_FLAG_DATAMATCH };

	io.fd = fd;
	if (fd >= 0 && ioctl(vm->vm_fd, KVM_IOEVENTFD, &io) < 0) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

int vm_add_irqfd(struct vm *vm, int gsi)
{
	int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	struct kvm_irqfd irq = { .gsi = (uint32_t)gsi };

	irq.fd = (uint32_t)fd;
	if (fd >= 0 && ioctl(vm->vm_fd, KVM_IRQFD, &irq) < 0) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

struct virtio_balloon *vm_balloon(struct vm *vm) { return vm->balloon; }

/* ---- vCPU setup */
static int vcpu_setup_cpuid(struct vm *vm, struct vcpu *v, char *err, size_t errlen)
{
	int nent = 256;
	struct kvm_cpuid2 *c = xcalloc(1, sizeof(*c) + nent * sizeof(c->entries[0]));

	c->nent = nent;
	if (ioctl(vm->kvm_fd, KVM_GET_SUPPORTED_CPUID, c) < 0) {
		free(c);
		return VERR("KVM_GET_SUPPORTED_CPUID failed: %s", strerror(errno));
	}
	for (unsigned i = 0; i < c->nent; i++) {
		struct kvm_cpuid_entry2 *e = &c->entries[i];
		switch (e->function) {
		case 1:
			mce_cpuid_1(vm->mce, &e->edx);
			e->ebx = (e->ebx & 0x0000ffff) | ((uint32_t)vm->ncpus << 16) | ((uint32_t)v->id << 24);
			e->ecx |= 1u << 31;          /* hypervisor present */
			if (ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_TSC_DEADLINE_TIMER) > 0)
				e->ecx |= 1u << 24;  /* TSC deadline: Linux needs no LAPIC timer calibration */
			break;
		case 0xb:
		case 0x1f:
			e->edx = v->id;              /* x2APIC id */
			break;
		case 0x80000007:
			mce_cpuid_80000007(vm->mce, &e->ebx);
			break;
		case 0x40000000:                     /* KVM signature: guests use kvm-clock */
			e->ebx = 0x4b4d564b; e->ecx = 0x564b4d56; e->edx = 0x4d;
			break;
		}
	}
	if (ioctl(v->fd, KVM_SET_CPUID2, c) < 0) {
		free(c);
		return VERR("KVM_SET_CPUID2 failed: %s", strerror(errno));
	}
	free(c);
	return 0;
}

static void seg_flat(struct kvm_segment *s, uint16_t sel, uint8_t type)
{
	*s = (struct kvm_segment){ .base = 0, .limit = 0xffffffff, .selector = sel, .type = type,
				   .present = 1, .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1 };
}

/* The PVH entry state: 32-bit protected mode, paging off, flat segments,
 * EBX = hvm_start_info. */
static int vcpu_set_pvh_state(struct vm *vm, struct vcpu *v, char *err, size_t errlen)
{
	struct kvm_sregs sr;
	struct kvm_regs r = { .rflags = 2, .rip = vm->img.entry, .rbx = MDVM_BOOT_INFO_GPA };
	struct kvm_fpu fpu = { .fcw = 0x37f, .mxcsr = 0x1f80 };

	if (ioctl(v->fd, KVM_GET_SREGS, &sr) < 0)
		return VERR("KVM_GET_SREGS failed: %s", strerror(errno));
	seg_flat(&sr.cs, 0x10, 0xb);
	seg_flat(&sr.ds, 0x18, 0x3);
	sr.es = sr.fs = sr.gs = sr.ss = sr.ds;
	sr.tr = (struct kvm_segment){ .base = 0, .limit = 0x67, .selector = 0x20, .type = 0xb,
				      .present = 1, .s = 0 };
	sr.ldt = (struct kvm_segment){ .selector = 0, .type = 0x2, .present = 1, .limit = 0xffff };
	sr.gdt.base = MDVM_BOOT_GDT_GPA;
	sr.gdt.limit = 5 * 8 - 1;
	sr.idt.base = 0;
	sr.idt.limit = 0;
	sr.cr0 = 0x11;        /* PE | ET */
	sr.cr3 = 0;
	sr.cr4 = 0;
	sr.efer = 0;
	if (ioctl(v->fd, KVM_SET_SREGS, &sr) < 0)
		return VERR("KVM_SET_SREGS failed: %s", strerror(errno));
	if (ioctl(v->fd, KVM_SET_REGS, &r) < 0)
		return VERR("KVM_SET_REGS failed: %s", strerror(errno));
	if (ioctl(v->fd, KVM_SET_FPU, &fpu) < 0)
		return VERR("KVM_SET_FPU failed: %s", strerror(errno));
	return 0;
}

static int vcpu_set_boot_state(struct vm *vm, struct vcpu *v, char *err, size_t errlen)
{
	if (vm->img.mode == BOOT_MODE_LINUX64)
		return boot_linux_set_vcpu(v->fd, &vm->img, err, errlen);
	return vcpu_set_pvh_state(vm, v, err, errlen);
}

static int vm_write_boot_gdt(struct vm *vm)
{
	/* null, null, 32-bit code (0x10), 32-bit data (0x18), 32-bit TSS (0x20) */
	static const uint64_t gdt[5] = {
		0, 0, 0x00cf9b000000ffffULL, 0x00cf93000000ffffULL, 0x00008b0000000067ULL,
	};
	return mm_write(vm->gm, MDVM_BOOT_GDT_GPA, gdt, sizeof(gdt));
}

static int vm_load_kernel(struct vm *vm, char *err, size_t errlen)
{
	struct boot_args a = { .kernel = vm->cfg->kernel, .initrd = vm->cfg->initrd,
			       .cmdline = vm->cmdline };

	a.rsdp = acpi_build(vm->gm, vm->ncpus, err, errlen);
	if (!a.rsdp || boot_load(vm->gm, &a, &vm->img, err, errlen) < 0)
		return -1;
	if (vm_write_boot_gdt(vm) < 0)
		return VERR("cannot write the boot GDT");
	return 0;
}

/* ---- exits */
static void vcpu_dump(struct vcpu *v, const char *why)
{
	struct kvm_regs r;
	struct kvm_sregs sr;
	uint8_t insn[16];
	char bytes[64] = "";

	if (ioctl(v->fd, KVM_GET_REGS, &r) < 0 || ioctl(v->fd, KVM_GET_SREGS, &sr) < 0) {
		pr_err("vcpu %d: %s (registers unavailable)", v->id, why);
		return;
	}
	/* RIP is a guest-physical address only with paging off or identity-mapped
	 * code, which is what the test guest uses; best effort otherwise. */
	if (mm_read(v->vm->gm, sr.cs.base + r.rip, insn, sizeof(insn)) == 0)
		for (int i = 0; i < 16; i++)
			snprintf(bytes + 3 * i, sizeof(bytes) - 3 * i, "%02x ", insn[i]);
	pr_err("vcpu %d: %s: rip=0x%llx rsp=0x%llx rflags=0x%llx cr0=0x%llx cr3=0x%llx "
	       "cr4=0x%llx efer=0x%llx code: %s", v->id, why,
	       (unsigned long long)r.rip, (unsigned long long)r.rsp, (unsigned long long)r.rflags,
	       (unsigned long long)sr.cr0, (unsigned long long)sr.cr3, (unsigned long long)sr.cr4,
	       (unsigned long long)sr.efer, bytes[0] ? bytes : "(not in RAM)");
}

static void vcpu_handle_io(struct vcpu *v)
{
	struct kvm_run *run = v->run;
	uint8_t *data = (uint8_t *)run + run->io.data_offset;
	bool is_write = run->io.direction == KVM_EXIT_IO_OUT;

	for (uint32_t i = 0; i < run->io.count; i++) {
		bus_pio(v, run->io.port, data, run->io.size, is_write);
		data += run->io.size;
	}
}

static void vcpu_handle_mmio(struct vcpu *v)
{
	struct kvm_run *run = v->run;
	uint32_t len = run->mmio.len > 8 ? 8 : run->mmio.len;

	/* Guest RAM whose memslot is registered lazily (large guests). */
	if (mm_handle_mmio(v->vm->gm, run->mmio.phys_addr, run->mmio.data, len, run->mmio.is_write))
		return;
	if (!bus_mmio(v, run->mmio.phys_addr, run->mmio.data, len, run->mmio.is_write)) {
		static int warned;
		if (!__atomic_exchange_n(&warned, 1, __ATOMIC_RELAXED))
			pr_warn("vcpu %d: %s of unassigned guest-physical address 0x%llx ignored "
				"(further ones not reported)", v->id, run->mmio.is_write ? "write" : "read",
				(unsigned long long)run->mmio.phys_addr);
	}
}

static void vm_internal_error(struct vm *vm, struct vcpu *v, const char *why)
{
	vcpu_dump(v, why);
	pthread_mutex_lock(&vm->lock);
	if (!vm->exiting)
		vm->state = VM_STATE_INTERNAL_ERROR;
	pthread_mutex_unlock(&vm->lock);
	vm_request_exit(vm, 1, why);
}

/* Returns false when the vCPU must stop running. */
static bool vcpu_handle_exit(struct vcpu *v)
{
	struct kvm_run *run = v->run;
	char why[96];

	if (mce_handle_exit(v->mce))
		return true;
	switch (run->exit_reason) {
	case KVM_EXIT_IO:
		vcpu_handle_io(v);
		return true;
	case KVM_EXIT_MMIO:
		vcpu_handle_mmio(v);
		return true;
	case KVM_EXIT_DIRTY_RING_FULL:
		dirty_kvm_ring_full(v->id);
		return true;
	case KVM_EXIT_HLT:
		/* Only without an in-kernel LAPIC; nothing will wake us. */
		vm_request_exit(v->vm, 0, "guest halted");
		return false;
	case KVM_EXIT_SHUTDOWN:
		mce_handle_shutdown(v->mce);
		pr_info("vcpu %d: guest triple fault (shutdown)", v->id);
		vm_guest_reset(v->vm);
		return false;
	case KVM_EXIT_SYSTEM_EVENT:
		if (run->system_event.type == KVM_SYSTEM_EVENT_RESET) {
			vm_guest_reset(v->vm);
		} else {
			vm_request_exit(v->vm, 0, "guest powered off");
		}
		return false;
	case KVM_EXIT_INTERNAL_ERROR:
		snprintf(why, sizeof(why), "KVM internal error (suberror %u%s)", run->internal.suberror,
			 run->internal.suberror == KVM_INTERNAL_ERROR_EMULATION ? ": emulation failure" : "");
		vm_internal_error(v->vm, v, why);
		return false;
	case KVM_EXIT_FAIL_ENTRY:
		snprintf(why, sizeof(why), "VM entry failed (hardware reason 0x%llx)",
			 (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
		vm_internal_error(v->vm, v, why);
		return false;
	default:
		snprintf(why, sizeof(why), "unhandled KVM exit reason %u", run->exit_reason);
		vm_internal_error(v->vm, v, why);
		return false;
	}
}

/* Wait while the VM is paused or not yet started. Returns false on exit. */
static bool vcpu_park(struct vcpu *v, bool stop)
{
	struct vm *vm = v->vm;
	bool cont;

	pthread_mutex_lock(&vm->lock);
	if (vm->pause_req && !stop && !vm->exiting) {
		/* Complete the I/O of the last exit (KVM finishes an MMIO read or
		 * a string PIO only on the next KVM_RUN), so that a parked vCPU's
		 * registers can be saved: KVM_RUN with immediate_exit does just that. */
		pthread_mutex_unlock(&vm->lock);
		v->run->immediate_exit = 1;
		ioctl(v->fd, KVM_RUN, 0);
		v->run->immediate_exit = 0;
		pthread_mutex_lock(&vm->lock);
	}
	while ((vm->pause_req || stop) && !vm->exiting) {
		vm->parked++;
		pthread_cond_broadcast(&vm->cond);
		pthread_cond_wait(&vm->cond, &vm->lock);
		vm->parked--;
		/* A stopped vCPU (error, power-off) stays parked until exit. */
	}
	cont = !vm->exiting;
	pthread_mutex_unlock(&vm->lock);
	return cont;
}

/* Auto-converge: after running for a 10 ms slice, sleep pct/(100-pct) of it. */
static void vcpu_throttle(struct vcpu *v)
{
	static __thread uint64_t slice_start;
	unsigned pct = v->vm->throttle_pct;
	uint64_t now;

	if (!pct) {
		slice_start = 0;
		return;
	}
	now = monotonic_ns();
	if (!slice_start) {
		slice_start = now;
		return;
	}
	if (now - slice_start < 10000000ULL)
		return;
	/* Sleep to the deadline; kicks (signals) cut nanosleep short, and
	 * only a pause request or the throttle going off may end it early. */
	uint64_t until = now + (now - slice_start) * pct / (100 - pct);
	while ((now = monotonic_ns()) < until && v->vm->throttle_pct &&
	       !__atomic_load_n(&v->vm->pause_req, __ATOMIC_RELAXED)) {
		uint64_t ns = until - now > 5000000ULL ? 5000000ULL : until - now;
		struct timespec ts = { .tv_sec = 0, .tv_nsec = (long)ns };
		nanosleep(&ts, NULL);
	}
	slice_start = monotonic_ns();
}

static void *vcpu_thread(void *arg)
{
	struct vcpu *v = arg;
	struct vm *vm = v->vm;
	char name[16];

	v->tid = (pid_t)syscall(SYS_gettid);
	mce_vcpu_thread_start(v->mce);
	snprintf(name, sizeof(name), "mdvm-vcpu%d", v->id);
	pthread_setname_np(pthread_self(), name);
	for (;;) {
		if (!vcpu_park(v, false))
			break;
		vcpu_throttle(v);
		mce_vcpu_pre_run(v->mce);
		trace_startup("kvm-run");
		if (ioctl(v->fd, KVM_RUN, 0) < 0) {
			if (mce_handle_run_error(v->mce, errno))
				continue;
			if (errno == EINTR || errno == EAGAIN) {
				v->run->immediate_exit = 0;
				continue;
			}
			pr_err("vcpu %d: KVM_RUN failed: %s", v->id, strerror(errno));
			vm_internal_error(vm, v, "KVM_RUN failed");
			vcpu_park(v, true);
			break;
		}
		trace_startup("first-exit");
		dirty_kvm_vcpu_exit(v->id);
		if (!vcpu_handle_exit(v)) {
			vcpu_park(v, true);
			break;
		}
	}
	return NULL;
}

static void vcpu_kick_handler(int sig) { (void)sig; }

static void vm_kick_all(struct vm *vm)
{
	/* A vCPU blocked in the test device's wait is not in KVM_RUN: wake it. */
	if (vm->testdev)
		testdev_kick(vm->testdev);
	for (int i = 0; i < vm->ncpus; i++) {
		if (!vm->vcpus[i].run)   /* creation failed before this vCPU was mapped */
			continue;
		__atomic_store_n(&vm->vcpus[i].run->immediate_exit, 1, __ATOMIC_SEQ_CST);
		if (vm->vcpus[i].started)
			pthread_kill(vm->vcpus[i].thread, VCPU_KICK_SIGNAL);
	}
}

/* ---- creation */
static int vm_open_kvm(struct vm *vm, char *err, size_t errlen)
{
	int v;

	vm->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (vm->kvm_fd < 0) {
		if (errno == ENOENT)
			return VERR("cannot open /dev/kvm: no such device (is the kvm module loaded? "
				    "is virtualization enabled?)");
		if (errno == EACCES || errno == EPERM)
			return VERR("cannot open /dev/kvm: permission denied (run as root or join "
				    "the group that owns /dev/kvm)");
		return VERR("cannot open /dev/kvm: %s", strerror(errno));
	}
	v = ioctl(vm->kvm_fd, KVM_GET_API_VERSION, 0);
	if (v < 0)
		return VERR("KVM_GET_API_VERSION failed: %s", strerror(errno));
	if (v != KVM_API_VERSION)
		return VERR("KVM API version %d, mdvm needs %d", v, KVM_API_VERSION);
	vm->vm_fd = ioctl(vm->kvm_fd, KVM_CREATE_VM, 0);
	if (vm->vm_fd < 0)
		return VERR("KVM_CREATE_VM failed: %s", strerror(errno));
	vm->run_size = ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if ((long)vm->run_size <= 0)
		return VERR("KVM_GET_VCPU_MMAP_SIZE failed: %s", strerror(errno));
	/* Needed on Intel hosts before the first KVM_RUN; harmless elsewhere. */
	ioctl(vm->vm_fd, KVM_SET_TSS_ADDR, 0xfffbd000UL);
	uint64_t idmap = 0xfffbc000ULL;
	ioctl(vm->vm_fd, KVM_SET_IDENTITY_MAP_ADDR, &idmap);
	if (ioctl(vm->vm_fd, KVM_CREATE_IRQCHIP, 0) < 0)
		return VERR("KVM_CREATE_IRQCHIP failed: %s", strerror(errno));
	struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
	if (ioctl(vm->vm_fd, KVM_CREATE_PIT2, &pit) < 0)
		return VERR("KVM_CREATE_PIT2 failed: %s", strerror(errno));
	dirty_kvm_init(vm->kvm_fd, vm->vm_fd);   /* the dirty ring must precede vCPUs */
	return 0;
}

static int vm_create_vcpus(struct vm *vm, char *err, size_t errlen)
{
	vm->vcpus = xcalloc(vm->ncpus, sizeof(*vm->vcpus));
	for (int i = 0; i < vm->ncpus; i++)
		vm->vcpus[i].fd = -1;   /* vm_destroy after a failure closes only real fds */
	for (int i = 0; i < vm->ncpus; i++) {
		struct vcpu *v = &vm->vcpus[i];

		v->vm = vm;
		v->id = i;
		v->fd = ioctl(vm->vm_fd, KVM_CREATE_VCPU, i);
		if (v->fd < 0)
			return VERR("KVM_CREATE_VCPU %d failed: %s", i, strerror(errno));
		v->run = mmap(NULL, vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
		if (v->run == MAP_FAILED) {
			v->run = NULL;
			return VERR("mmap of vcpu %d run area failed: %s", i, strerror(errno));
		}
		if (vcpu_setup_cpuid(vm, v, err, errlen) < 0)
			return -1;
		err[0] = '\0';
		v->mce = mce_vcpu_create(vm->mce, i, v->fd, v->run, err, errlen);
		if (!v->mce && *err)
			return -1;
		if (dirty_kvm_vcpu_init(i, v->fd) < 0)
			return VERR("mapping the dirty ring of vcpu %d failed: %s", i, strerror(errno));
	}
	/* APs stay in KVM's wait-for-SIPI state; the BSP enters the kernel. */
	return vcpu_set_boot_state(vm, &vm->vcpus[0], err, errlen);
}

static int vm_open_console(struct vm *vm, char *err, size_t errlen)
{
	switch (vm->cfg->console) {
	case CONSOLE_STDIO:
		vm->console_fd = STDOUT_FILENO;
		return 0;
	case CONSOLE_NONE:
		vm->console_fd = -1;
		return 0;
	case CONSOLE_FILE:
		vm->console_fd = open(vm->cfg->console_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
		if (vm->console_fd < 0)
			return VERR("console file '%s': %s", vm->cfg->console_path, strerror(errno));
		return 0;
	}
	return VERR("bad console kind");
}

struct vm *vm_create(const struct vm_config *cfg, char *err, size_t errlen)
{
	struct vm *vm = xcalloc(1, sizeof(*vm));
	struct mm_config mc = {
		.ram_size = cfg->mem_size,
		.backing = cfg->backing,
		.reserve_hugepages = cfg->reserve_hugepages,
		.hole_start = MDVM_MMIO_HOLE_START,
		.hole_end = MDVM_MMIO_HOLE_END,
	};
	struct sigaction sa = { .sa_handler = vcpu_kick_handler };

	vm->cfg = cfg;
	vm->ncpus = cfg->ncpus;
	vm->kvm_fd = vm->vm_fd = vm->console_fd = -1;
	vm->state = VM_STATE_PRELAUNCH;
	vm->pause_req = true;     /* vCPUs park until vm_start() */
	pthread_mutex_init(&vm->lock, NULL);
	pthread_cond_init(&vm->cond, NULL);
	sigemptyset(&sa.sa_mask);
	sigaction(VCPU_KICK_SIGNAL, &sa, NULL);

	if (vm_open_kvm(vm, err, errlen) < 0)
		goto fail;
	trace_startup("kvm");
	vm->gm = mm_create(&mc, &kvm_mm_ops, vm, err, errlen);
	if (!vm->gm)
		goto fail;
	trace_startup_mem(vm->gm);
	/* Before any vCPU exists: the MSR filter must be in place first. */
	vm->mce = mce_create(vm, vm->kvm_fd, vm->vm_fd, err, errlen);
	if (!vm->mce)
		goto fail;
	dirty_kvm_attach(vm->gm);
	if (vm_open_console(vm, err, errlen) < 0)
		goto fail;
	vm->serial = serial_create(vm, MDVM_COM1_PORT, MDVM_COM1_IRQ, vm->console_fd);
	vm->testdev = testdev_create(vm, MDVM_TESTDEV_GPA);
	vm->rtc = rtc_create(vm);
	if (!vm->serial || !vm->testdev || power_create(vm) < 0 || !vm->rtc ||
	    acpi_pm_create(vm) < 0) {
		VERR("cannot register devices: %s", strerror(errno));
		goto fail;
	}
	vm->cmdline = xstrdup(cfg->cmdline ? cfg->cmdline : "");
	if (cfg->balloon) {
		/* How a guest finds it (Linux: CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES). */
		char *c;
		vm->balloon = virtio_balloon_create(vm, MDVM_VIRTIO_MMIO_GPA, MDVM_VIRTIO_IRQ,
						    cfg->balloon_autodeflate, cfg->balloon_reporting);
		if (!vm->balloon) {
			VERR("cannot create the virtio balloon");
			goto fail;
		}
		/* ... and how a stock kernel does (no CMDLINE_DEVICES): ACPI. */
		acpi_add_virtio_mmio(MDVM_VIRTIO_MMIO_GPA, MDVM_VIRTIO_MMIO_SIZE, MDVM_VIRTIO_IRQ);
		if (asprintf(&c, "%s%svirtio_mmio.device=4K@0x%llx:%d", vm->cmdline, *vm->cmdline ? " " : "",
			     MDVM_VIRTIO_MMIO_GPA, MDVM_VIRTIO_IRQ) < 0)
			abort();
		free(vm->cmdline);
		vm->cmdline = c;
	}
	trace_startup("devices");
	if (vm_load_kernel(vm, err, errlen) < 0)
		goto fail;
	trace_startup("load");
	if (vm_create_vcpus(vm, err, errlen) < 0 || vmstate_prepare(vm, err, errlen) < 0)
		goto fail;
	trace_startup("vcpus");
	return vm;
fail:
	vm_destroy(vm);
	return NULL;
}

/* paused: incoming migration of a paused guest; the threads park at
 * once (pause_req is still set from creation) until `cont`. */
static int vm_spawn_vcpus(struct vm *vm, bool paused)
{
	for (int i = 0; i < vm->ncpus; i++) {
		struct vcpu *v = &vm->vcpus[i];
		int e = pthread_create(&v->thread, NULL, vcpu_thread, v);
		if (e) {
			pr_err("cannot create vCPU thread %d: %s", i, strerror(e));
			return -1;
		}
		v->started = true;
	}
	pthread_mutex_lock(&vm->lock);
	vm->state = paused ? VM_STATE_PAUSED : VM_STATE_RUNNING;
	vm->pause_req = paused;
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
	return 0;
}

int vm_start(struct vm *vm) { return vm_spawn_vcpus(vm, false); }
int vm_start_paused(struct vm *vm) { return vm_spawn_vcpus(vm, true); }

void vm_destroy(struct vm *vm)
{
	if (!vm)
		return;
	vm_throttle(vm, 0);       /* its thread kicks the vCPU threads */
	pthread_mutex_lock(&vm->lock);
	vm->exiting = true;
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
	if (vm->vcpus) {
		vm_kick_all(vm);
		for (int i = 0; i < vm->ncpus; i++) {
			struct vcpu *v = &vm->vcpus[i];
			if (v->started)
				pthread_join(v->thread, NULL);
			if (v->run)
				munmap(v->run, vm->run_size);
			if (v->fd >= 0)
				close(v->fd);
		}
		free(vm->vcpus);
	}
	mce_destroy(vm->mce);
	if (vm->gm)
		mm_destroy(vm->gm);
	if (vm->console_fd > STDERR_FILENO)
		close(vm->console_fd);
	if (vm->vm_fd >= 0)
		close(vm->vm_fd);
	if (vm->kvm_fd >= 0)
		close(vm->kvm_fd);
	free(vm->cmdline);
	free(vm);
}

/* ---- control plane */
enum vm_state vm_get_state(struct vm *vm)
{
	enum vm_state s;

	pthread_mutex_lock(&vm->lock);
	s = vm->state;
	pthread_mutex_unlock(&vm->lock);
	return s;
}

bool vm_is_running(struct vm *vm) { return vm_get_state(vm) == VM_STATE_RUNNING; }

/* Park every vCPU thread; caller holds no lock. */
static void vm_park_all(struct vm *vm)
{
	pthread_mutex_lock(&vm->lock);
	vm->pause_req = true;
	pthread_mutex_unlock(&vm->lock);
	vm_kick_all(vm);
	pthread_mutex_lock(&vm->lock);
	while (vm->parked < vm->ncpus && !vm->exiting) {
		pthread_mutex_unlock(&vm->lock);
		vm_kick_all(vm);   /* a vCPU may have re-entered KVM_RUN before seeing the request */
		pthread_mutex_lock(&vm->lock);
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_nsec += 10 * 1000000L;
		if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
		pthread_cond_timedwait(&vm->cond, &vm->lock, &ts);
	}
	bool all_parked = vm->parked == vm->ncpus;
	pthread_mutex_unlock(&vm->lock);
	/* Tell a kvm-clock guest it was stopped, so its watchdogs do not count
	 * the pause as a soft lockup (QEMU does the same on stop). EINVAL when
	 * the guest has no kvm-clock: nothing to tell. Safe: no vCPU is in KVM_RUN. */
	if (all_parked)
		for (int i = 0; i < vm->ncpus; i++)
			ioctl(vm->vcpus[i].fd, KVM_KVMCLOCK_CTRL, 0);
}

static void vm_unpark_all(struct vm *vm)
{
	pthread_mutex_lock(&vm->lock);
	vm->pause_req = false;
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
}

int vm_pause(struct vm *vm)
{
	enum vm_state s = vm_get_state(vm);

	if (s != VM_STATE_RUNNING)
		return s == VM_STATE_PAUSED ? 0 : -1;
	vm_park_all(vm);
	pthread_mutex_lock(&vm->lock);
	if (vm->state == VM_STATE_RUNNING)
		vm->state = VM_STATE_PAUSED;
	pthread_mutex_unlock(&vm->lock);
	return 0;
}

int vm_resume(struct vm *vm)
{
	pthread_mutex_lock(&vm->lock);
	/* postmigrate too: the operator's way back when the destination failed
	 * after the handover (QEMU allows the same); the source still holds
	 * the whole guest. */
	if (vm->state != VM_STATE_PAUSED && vm->state != VM_STATE_POSTMIGRATE) {
		int ret = vm->state == VM_STATE_RUNNING ? 0 : -1;
		pthread_mutex_unlock(&vm->lock);
		return ret;
	}
	if (vm->state == VM_STATE_POSTMIGRATE)
		pr_info("resuming the guest after it migrated away: the destination must not be running");
	vm->state = VM_STATE_RUNNING;
	pthread_mutex_unlock(&vm->lock);
	vm_unpark_all(vm);
	return 0;
}

int vm_reset(struct vm *vm)
{
	char err[256];
	enum vm_state s = vm_get_state(vm);
	int ret = 0;

	if (s != VM_STATE_RUNNING && s != VM_STATE_PAUSED)
		return -1;
	vm_park_all(vm);
	mce_reset(vm->mce);
	serial_reset(vm->serial);
	testdev_reset(vm->testdev);
	if (vm->balloon)
		virtio_balloon_system_reset(vm->balloon);
	for (int i = 1; i < vm->ncpus; i++) {
		struct kvm_mp_state mp = { .mp_state = KVM_MP_STATE_UNINITIALIZED };
		ioctl(vm->vcpus[i].fd, KVM_SET_MP_STATE, &mp);
	}
	if (vm_load_kernel(vm, err, sizeof(err)) < 0 ||
	    vcpu_set_boot_state(vm, &vm->vcpus[0], err, sizeof(err)) < 0) {
		pr_err("system reset failed: %s", err);
		ret = -1;
	}
	if (s == VM_STATE_RUNNING)
		vm_unpark_all(vm);
	return ret;
}

struct vm_exit_req {
	struct vm *vm;
	int code;
	char reason[96];
};

static void vm_exit_on_main(void *opaque)
{
	struct vm_exit_req *r = opaque;

	const char *why = !strncmp(r->reason, "guest reset", 11) ? "guest-reset" :
			  !strcmp(r->reason, "quit") ? "host-qmp-quit" :
			  !strncmp(r->reason, "host signal", 11) ? "host-signal" :
			  r->code != 0 && strncmp(r->reason, "guest", 5) ? "guest-panic" : "guest-shutdown";

	qmp_emit_event("SHUTDOWN", json_pack("{s:b, s:s}", "guest", strncmp(why, "host-", 5) != 0,
					     "reason", why));
	loop_quit(r->vm->exit_code);
	free(r);
}

void vm_request_exit(struct vm *vm, int code, const char *reason)
{
	struct vm_exit_req *r;

	pthread_mutex_lock(&vm->lock);
	if (vm->state == VM_STATE_SHUTDOWN) {
		pthread_mutex_unlock(&vm->lock);
		return;
	}
	if (vm->state != VM_STATE_INTERNAL_ERROR)
		vm->state = VM_STATE_SHUTDOWN;
	vm->exit_code = code;
	vm->pause_req = true;
	pthread_mutex_unlock(&vm->lock);
	if (code != 0 || (strcmp(reason, "guest powered off") && strcmp(reason, "quit")))
		pr_info("%s (exit status %d)", reason, code);
	r = xcalloc(1, sizeof(*r));
	r->vm = vm;
	r->code = code;
	snprintf(r->reason, sizeof(r->reason), "%s", reason);
	loop_call(vm_exit_on_main, r);
}

void vm_guest_reset(struct vm *vm)
{
	vm_request_exit(vm, 0, "guest reset; exiting");
}

struct guest_mem *vm_mem(struct vm *vm) { return vm->gm; }
struct mce *vm_mce(struct vm *vm) { return vm->mce; }

void vm_kick_vcpu(struct vm *vm, int index)
{
	struct vcpu *v = &vm->vcpus[index];

	__atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
	if (v->started)
		pthread_kill(v->thread, VCPU_KICK_SIGNAL);
}
const struct vm_config *vm_config(struct vm *vm) { return vm->cfg; }
int vm_ncpus(struct vm *vm) { return vm->ncpus; }

void vm_vcpu_info(struct vm *vm, int index, struct vcpu_info *out)
{
	struct vcpu *v = &vm->vcpus[index];

	/* No vCPU ioctl here: it would wait for the vCPU to leave KVM_RUN. */
	out->cpu_index = v->id;
	out->thread_id = v->tid;
	out->halted = false;
}

int vm_guest_command(struct vm *vm, const char *cmd, unsigned timeout_ms,
		     vm_guest_done_fn done, void *opaque)
{
	return testdev_post(vm->testdev, cmd, timeout_ms, done, opaque);
}

uint32_t vm_guest_sweeps(struct vm *vm) { return testdev_sweeps(vm->testdev); }

/* ---- live migration (vmm/migration.c) */
int vm_kvm_fd(struct vm *vm) { return vm->kvm_fd; }
int vm_fd(struct vm *vm) { return vm->vm_fd; }
int vm_vcpu_fd(struct vm *vm, int index) { return vm->vcpus[index].fd; }
struct serial *vm_serial(struct vm *vm) { return vm->serial; }
struct rtc *vm_rtc(struct vm *vm) { return vm->rtc; }
struct testdev *vm_testdev(struct vm *vm) { return vm->testdev; }

int vm_stop_for_migration(struct vm *vm)
{
	enum vm_state s = vm_get_state(vm);

	if (s != VM_STATE_RUNNING && s != VM_STATE_PAUSED)
		return -1;
	vm_park_all(vm);   /* a paused VM's vCPUs are parked already */
	pthread_mutex_lock(&vm->lock);
	if (vm->state == VM_STATE_RUNNING || vm->state == VM_STATE_PAUSED) {
		vm->mig_was_paused = vm->state == VM_STATE_PAUSED;
		vm->state = VM_STATE_FINISH_MIGRATE;
	}
	pthread_mutex_unlock(&vm->lock);
	return 0;
}

void vm_migration_finish(struct vm *vm, bool completed)
{
	pthread_mutex_lock(&vm->lock);
	if (vm->state == VM_STATE_FINISH_MIGRATE)
		vm->state = completed ? VM_STATE_POSTMIGRATE :
			    vm->mig_was_paused ? VM_STATE_PAUSED : VM_STATE_RUNNING;
	bool resume = vm->state == VM_STATE_RUNNING;
	pthread_mutex_unlock(&vm->lock);
	if (resume)
		vm_unpark_all(vm);
}

void vm_set_incoming(struct vm *vm)
{
	pthread_mutex_lock(&vm->lock);
	if (vm->state == VM_STATE_PRELAUNCH)
		vm->state = VM_STATE_INMIGRATE;
	pthread_mutex_unlock(&vm->lock);
}

/* A vCPU is throttled only when it comes back to mdvm (vcpu_throttle), and
 * a guest that rarely exits would hardly ever be: while the throttle is on,
 * kick every vCPU out of KVM_RUN each 10 ms (QEMU's CPU_THROTTLE_TIMESLICE).
 * A kick that lands outside KVM_RUN is lost; the next one is 10 ms later. */
static void *throttle_kicker(void *arg)
{
	struct vm *vm = arg;

	pthread_setname_np(pthread_self(), "mdvm-throttle");
	while (vm->throttle_pct) {
		struct timespec ts = { .tv_sec = 0, .tv_nsec = 10000000L };
		nanosleep(&ts, NULL);
		for (int i = 0; i < vm->ncpus && vm->throttle_pct; i++)
			if (vm->vcpus[i].started)
				pthread_kill(vm->vcpus[i].thread, VCPU_KICK_SIGNAL);
	}
	return NULL;
}

/* From one thread at a time (the migration thread; vm_destroy after it). */
void vm_throttle(struct vm *vm, unsigned pct)
{
	pct = pct > 99 ? 99 : pct;
	if (vm->throttle_pct == pct)
		return;
	vm->throttle_pct = pct;
	if (!pct) {
		if (vm->throttle_thread_live)
			pthread_join(vm->throttle_thread, NULL);
		vm->throttle_thread_live = false;
		return;
	}
	if (!vm->vcpus)
		return;
	if (!vm->throttle_thread_live)
		vm->throttle_thread_live = pthread_create(&vm->throttle_thread, NULL,
							  throttle_kicker, vm) == 0;
	vm_kick_all(vm);   /* make them look at it now */
}
