/* Memory errors as machine checks: back ends, vCPU hooks, host SIGBUS
 * handling (see mce.h and docs/memory-errors.md). */
#include <cpuid.h>
#include <errno.h>
#include <inttypes.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "../mm/mm.h"
#include "config.h"
#include "loop.h"
#include "mca.h"
#include "mce.h"
#include "qmp.h"
#include "util.h"
#include "vm.h"

#ifndef BUS_MCEERR_AR
#define BUS_MCEERR_AR 4
#define BUS_MCEERR_AO 5
#endif
/* Linux 6.8 UAPI, newer than Debian 12's headers. */
#ifndef KVM_EXIT_MEMORY_FAULT
#define KVM_EXIT_MEMORY_FAULT 39
#endif
struct kvm_memory_fault_info { uint64_t flags, gpa, size; };

#define MCE_QUEUE     64     /* SRAO errors waiting per vCPU */
#define SIG_RING      64     /* SRAO errors from SIGBUS handlers */
#define X86_CR4_MCE   (1ULL << 6)
#define CPUID_1_EDX_MCE (1u << 7)
#define CPUID_1_EDX_MCA (1u << 14)

enum mce_backend { MCE_OFF = 0, MCE_NATIVE, MCE_EMULATED };
static const char *const backend_names[] = { "off", "native", "emulated" };

struct mce_vcpu {
	struct mce *m;
	int index, fd;
	struct kvm_run *run;
	_Atomic pid_t tid;
	pthread_mutex_t lock;          /* mca and queue: vCPU thread vs control plane */
	struct mca mca;                /* emulated back end's registers */
	uint64_t queue[MCE_QUEUE];     /* SRAO page addresses waiting for MCIP to clear */
	unsigned qhead, qlen;
	_Atomic unsigned pending;      /* qlen, for a lock-free check before KVM_RUN */
	_Atomic uint64_t sig_ar;       /* GPA + 1 from SIGBUS BUS_MCEERR_AR on this thread */
	_Atomic uint64_t raise_hva;    /* test hook: raise SIGBUS here (hva | kind << 63) + 1 */
	bool native_msrs;              /* KVM_GET_MSRS reads back the MCA registers */
	bool just_injected;            /* native: #MC injected, no exit since */
	bool just_injected_ar;         /* ...and it was an SRAR */
};

struct mce {
	struct vm *vm;
	struct guest_mem *gm;
	enum mce_backend backend;
	uint64_t mcg_cap;
	bool amd;                      /* AMD encoding (MDVM_MCE_ENCODING) */
	bool host_amd;                 /* host (and guest) vendor AMD or Hygon */
	pid_t main_tid;                /* the main loop's thread */
	int ncpus;
	struct mce_vcpu **vcpus;
	/* For the SIGBUS handler: read-only after creation. */
	uintptr_t base;
	struct mm_range ranges[8];
	size_t nranges;
	int sig_efd;
	_Atomic uint64_t sig_ring[SIG_RING];   /* GPA + 1, or 1 << 63 | host address (outside RAM) */
	_Atomic unsigned sig_head;
	_Atomic uint64_t sig_fatal;    /* host address + 1: BUS_MCEERR_AR outside guest RAM */
	/* Counters for query-mce. */
	_Atomic uint64_t n_ao, n_ar, n_ignored, n_shutdown, n_host;
};

static struct mce *g_mce;              /* the SIGBUS handler's view */
static __thread struct mce_vcpu *tls_vcpu;

const char *mce_backend_name(struct mce *m) { return backend_names[m->backend]; }

/* ---- events (QEMU's MEMORY_FAILURE), emitted on the main loop */
struct mf_event {
	bool guest, ar, recursive;
	const char *action;
};

static void mf_emit(void *opaque)
{
	struct mf_event *e = opaque;

	qmp_emit_event("MEMORY_FAILURE",
		       json_pack("{s:s, s:s, s:{s:b, s:b}}",
				 "recipient", e->guest ? "guest" : "hypervisor",
				 "action", e->action,
				 "flags", "action-required", e->ar, "recursive", e->recursive));
	free(e);
}

static void memory_failure_event(bool guest, const char *action, bool ar, bool recursive)
{
	struct mf_event *e = xmalloc(sizeof(*e));

	*e = (struct mf_event){ .guest = guest, .ar = ar, .recursive = recursive, .action = action };
	loop_call(mf_emit, e);
}

/* ---- guest pages */
static bool gpa_is_ram(struct mce *m, uint64_t gpa)
{
	for (size_t i = 0; i < m->nranges; i++)
		if (gpa >= m->ranges[i].gpa && gpa - m->ranges[i].gpa < m->ranges[i].size)
			return true;
	return false;
}

static bool page_poisoned(struct mce *m, uint64_t gpa)
{
	return memdesc_type(memdesc_lookup(m->gm, gpa >> MM_PAGE_SHIFT)) == MEMDESC_POISONED;
}

/* Make the page POISONED through its memdesc owner; 0 or -errno
 * (-EALREADY: poisoned before, -EFAULT: not RAM). */
static int poison_page(struct mce *m, uint64_t gfn)
{
	enum memdesc_type t = memdesc_type(memdesc_lookup(m->gm, gfn));
	bool reserved;
	int rc;

	if (t == MEMDESC_POISONED)
		return -EALREADY;
	if (t == MEMDESC_MMIO || !gpa_is_ram(m, gfn << MM_PAGE_SHIFT))
		return -EFAULT;
	rc = mm_poison_page(m->gm, gfn, &reserved);
	if (rc < 0)
		return rc;
	if (reserved)
		pr_warn("memory error at GPA 0x%" PRIx64 " hit a reserved (firmware) page",
			gfn << MM_PAGE_SHIFT);
	return 0;
}

/* ---- delivery on the vCPU thread */
static bool vcpu_cr4_mce(struct mce_vcpu *mv)
{
	struct kvm_sregs sr;

	return ioctl(mv->fd, KVM_GET_SREGS, &sr) == 0 && (sr.cr4 & X86_CR4_MCE);
}

/* MCG_STATUS.MCIP as the guest last left it; native back ends whose KVM does
 * not read MSRs back to user space report false (KVM checks it itself). */
static bool vcpu_mcip(struct mce_vcpu *mv)
{
	if (mv->m->backend == MCE_EMULATED) {
		bool mcip;
		pthread_mutex_lock(&mv->lock);
		mcip = mv->mca.mcg_status & MCG_STATUS_MCIP;
		pthread_mutex_unlock(&mv->lock);
		return mcip;
	}
	if (!mv->native_msrs)
		return false;
	struct { struct kvm_msrs h; struct kvm_msr_entry e[1]; } msrs = {
		.h.nmsrs = 1, .e = { { .index = MSR_MCG_STATUS } } };
	return ioctl(mv->fd, KVM_GET_MSRS, &msrs) == 1 && (msrs.e[0].data & MCG_STATUS_MCIP);
}

/* An action-optional error waits while the guest handles the last #MC
 * (MCIP) and, with the AMD encoding (no #MC: found by the guest's poll),
 * while the memory bank still holds an error the guest has not read, so
 * it is not overwritten. */
static bool vcpu_busy(struct mce_vcpu *mv)
{
	if (vcpu_mcip(mv))
		return true;
	if (!mv->m->amd)
		return false;
	if (mv->m->backend == MCE_EMULATED) {
		bool val;
		pthread_mutex_lock(&mv->lock);
		val = mv->mca.bank[MCA_MEM_BANK].status & MCI_STATUS_VAL;
		pthread_mutex_unlock(&mv->lock);
		return val;
	}
	if (!mv->native_msrs)
		return false;
	struct { struct kvm_msrs h; struct kvm_msr_entry e[1]; } msrs = {
		.h.nmsrs = 1, .e = { { .index = MSR_MC0_CTL + 4 * MCA_MEM_BANK + 1 } } };
	return ioctl(mv->fd, KVM_GET_MSRS, &msrs) == 1 && (msrs.e[0].data & MCI_STATUS_VAL);
}

static void machine_check_shutdown(struct mce_vcpu *mv, uint64_t gpa, bool ar, bool recursive)
{
	struct mce *m = mv->m;

	atomic_fetch_add(&m->n_shutdown, 1);
	memory_failure_event(true, "reset", ar, recursive);
	pr_err("vcpu %d: machine check for GPA 0x%" PRIx64 " %s: the guest CPU shuts down",
	       mv->index, gpa, recursive ? "while MCG_STATUS.MCIP was set (a machine check "
	       "during a machine check)" : "with CR4.MCE clear");
	vm_request_exit(m->vm, 0, "guest reset; exiting (machine-check shutdown)");
}

/* Raise a memory error for the page at gpa on this vCPU (vCPU thread). */
static void deliver(struct mce_vcpu *mv, uint64_t gpa, enum mce_kind kind)
{
	struct mce *m = mv->m;
	bool ar = kind == MCE_AR;
	uint64_t status = ar ? mca_status_srar() : mca_status_srao();
	uint64_t mcg = ar ? mca_mcg_status_srar() : mca_mcg_status_srao();
	uint64_t addr = gpa & ~(MM_PAGE_SIZE - 1);

	if (m->amd) {
		status = ar ? mca_status_amd_consumed() : mca_status_amd_deferred();
		/* RIPV too, as QEMU: Linux before 6.4 kills the task without
		 * memory_failure() (no SIGBUS BUS_MCEERR_AR) when RIPV is clear. */
		mcg |= MCG_STATUS_RIPV;
	}
	/* An AMD deferred error is only logged: no #MC, the guest polls. */
	bool signal = status & MCI_STATUS_UC;
	if (m->backend == MCE_NATIVE) {
		struct kvm_x86_mce mce = { .status = status, .addr = addr, .misc = MCI_MISC_PHYS_4K,
					   .mcg_status = signal ? mcg : 0, .bank = MCA_MEM_BANK };
		bool mcip = signal && vcpu_mcip(mv);
		if (signal && (mcip || !vcpu_cr4_mce(mv))) {
			machine_check_shutdown(mv, addr, ar, mcip);
			return;
		}
		if (ioctl(mv->fd, KVM_X86_SET_MCE, &mce) < 0) {
			pr_err("vcpu %d: KVM_X86_SET_MCE failed: %s", mv->index, strerror(errno));
			return;
		}
		mv->just_injected = signal;
		mv->just_injected_ar = ar;
	} else {
		bool cr4 = vcpu_cr4_mce(mv);
		enum mca_inject_result r;

		pthread_mutex_lock(&mv->lock);
		bool mcip = mv->mca.mcg_status & MCG_STATUS_MCIP;
		r = mca_inject(&mv->mca, MCA_MEM_BANK, status, addr, MCI_MISC_PHYS_4K,
			       signal ? mcg : mv->mca.mcg_status, cr4);
		pthread_mutex_unlock(&mv->lock);
		if (r == MCA_INJECT_SHUTDOWN) {
			machine_check_shutdown(mv, addr, ar, mcip);
			return;
		}
		if (r == MCA_INJECT_IGNORED) {
			atomic_fetch_add(&m->n_ignored, 1);
			memory_failure_event(true, "ignore", ar, false);
			pr_info("vcpu %d: memory error at GPA 0x%" PRIx64 " not signalled: the guest "
				"disabled machine-check reporting (MCG_CTL/MC%d_CTL)", mv->index, addr,
				MCA_MEM_BANK);
			return;
		}
		if (r == MCA_INJECT_LOGGED)
			goto logged;
		struct kvm_vcpu_events ev;
		if (ioctl(mv->fd, KVM_GET_VCPU_EVENTS, &ev) < 0) {
			pr_err("vcpu %d: KVM_GET_VCPU_EVENTS failed: %s", mv->index, strerror(errno));
			return;
		}
		/* `injected` (not `pending`): delivered on the next entry without
		 * KVM_CAP_EXCEPTION_PAYLOAD; #MC has no error code. */
		ev.flags = 0;
		ev.exception.injected = 1;
		ev.exception.pending = 0;
		ev.exception.nr = 18;
		ev.exception.has_error_code = 0;
		ev.exception.error_code = 0;
		if (ioctl(mv->fd, KVM_SET_VCPU_EVENTS, &ev) < 0) {
			pr_err("vcpu %d: KVM_SET_VCPU_EVENTS (#MC) failed: %s", mv->index, strerror(errno));
			return;
		}
	}
logged:
	atomic_fetch_add(ar ? &m->n_ar : &m->n_ao, 1);
	memory_failure_event(true, "inject", ar, false);
	pr_info("vcpu %d: machine check %s: %s memory error at GPA 0x%" PRIx64, mv->index,
		signal ? "injected" : "logged (deferred, no #MC)",
		!m->amd ? (ar ? "action-required (SRAR)" : "action-optional (SRAO)")
			: (ar ? "consumed (UC, poison)" : "deferred"), addr);
}

static int raise_sigbus_self(enum mce_kind kind, uint64_t hva)
{
	siginfo_t si;

	memset(&si, 0, sizeof(si));
	si.si_signo = SIGBUS;
	si.si_code = kind == MCE_AR ? BUS_MCEERR_AR : BUS_MCEERR_AO;
	si.si_addr = (void *)(uintptr_t)hva;
	si.si_addr_lsb = MM_PAGE_SHIFT;
	/* The kernel lets a thread send a kernel-style si_code only to itself. */
	return (int)syscall(SYS_rt_tgsigqueueinfo, getpid(), (pid_t)syscall(SYS_gettid), SIGBUS, &si);
}

void mce_vcpu_pre_run(struct mce_vcpu *mv)
{
	uint64_t s;

	if (!mv)
		return;
	s = atomic_exchange(&mv->raise_hva, 0);
	if (s) {
		s--;
		if (raise_sigbus_self(s >> 63 ? MCE_AR : MCE_AO, s & ~(1ULL << 63)) < 0)
			pr_err("vcpu %d: rt_tgsigqueueinfo: %s", mv->index, strerror(errno));
	}
	s = atomic_exchange(&mv->sig_ar, 0);
	if (s) {
		/* The host kernel found the page bad under this vCPU's access. */
		int rc = poison_page(mv->m, (s - 1) >> MM_PAGE_SHIFT);
		if (rc < 0 && rc != -EALREADY)
			pr_warn("vcpu %d: host memory error at GPA 0x%" PRIx64 ": cannot isolate the page: %s",
				mv->index, s - 1, strerror(-rc));
		atomic_fetch_add(&mv->m->n_host, 1);
		deliver(mv, s - 1, MCE_AR);
		return;            /* one #MC per entry */
	}
	if (!atomic_load(&mv->pending) || vcpu_busy(mv))
		return;            /* SRAO waits until the guest has handled the last one */
	uint64_t gpa;
	pthread_mutex_lock(&mv->lock);
	if (!mv->qlen) {
		pthread_mutex_unlock(&mv->lock);
		return;
	}
	gpa = mv->queue[mv->qhead];
	mv->qhead = (mv->qhead + 1) % MCE_QUEUE;
	mv->qlen--;
	atomic_store(&mv->pending, mv->qlen);
	pthread_mutex_unlock(&mv->lock);
	deliver(mv, gpa, MCE_AO);
}

/* An SRAR error reaching the queue makes the SRAO for that page redundant. */
static void queue_drop(struct mce_vcpu *mv, uint64_t page)
{
	pthread_mutex_lock(&mv->lock);
	for (unsigned i = 0; i < mv->qlen; i++) {
		unsigned k = (mv->qhead + i) % MCE_QUEUE;
		if (mv->queue[k] == page)
			mv->queue[k] = UINT64_MAX;   /* tombstone, skipped below */
	}
	while (mv->qlen && mv->queue[mv->qhead] == UINT64_MAX) {
		mv->qhead = (mv->qhead + 1) % MCE_QUEUE;
		mv->qlen--;
	}
	atomic_store(&mv->pending, mv->qlen);
	pthread_mutex_unlock(&mv->lock);
}

/* A vCPU touched a poisoned page and KVM's instruction emulator turned the
 * access into an MMIO exit (this host's KVM does so: it cannot read the
 * page). The instruction must not complete: finish KVM's pending emulation
 * with the poisoned data discarded, put the registers back as they were
 * before the instruction (MCG_STATUS.EIPV: RIP is the faulting one), then
 * raise SRAR. */
static void srar_from_mmio(struct mce_vcpu *mv, uint64_t gpa)
{
	struct kvm_run *run = mv->run;
	struct kvm_regs saved;
	bool have_regs = ioctl(mv->fd, KVM_GET_REGS, &saved) == 0;

	for (int i = 0; i < 8; i++) {
		if (run->exit_reason == KVM_EXIT_MMIO && !run->mmio.is_write)
			memset(run->mmio.data, 0xff, sizeof(run->mmio.data));
		run->immediate_exit = 1;
		int rc = ioctl(mv->fd, KVM_RUN, 0);
		run->immediate_exit = 0;
		if (rc < 0)
			break;          /* EINTR: emulation complete, nothing entered */
		/* rc == 0: a further access of the same instruction (the write half
		 * of a read-modify-write): dropped as well. */
	}
	if (have_regs)
		ioctl(mv->fd, KVM_SET_REGS, &saved);
	queue_drop(mv, gpa & ~(MM_PAGE_SIZE - 1));
	deliver(mv, gpa, MCE_AR);
}

bool mce_handle_exit(struct mce_vcpu *mv)
{
	struct kvm_run *run;

	if (!mv)
		return false;
	run = mv->run;
	if (run->exit_reason != KVM_EXIT_SHUTDOWN)
		mv->just_injected = false;
	switch (run->exit_reason) {
	case KVM_EXIT_X86_RDMSR: {
		uint64_t val = 0;
		int rc = -1;
		if (mv->m->backend == MCE_EMULATED) {
			pthread_mutex_lock(&mv->lock);
			rc = mca_rdmsr(&mv->mca, run->msr.index, &val);
			pthread_mutex_unlock(&mv->lock);
		}
		run->msr.data = val;
		run->msr.error = rc < 0;
		return true;
	}
	case KVM_EXIT_X86_WRMSR: {
		int rc = -1;
		if (mv->m->backend == MCE_EMULATED) {
			pthread_mutex_lock(&mv->lock);
			rc = mca_wrmsr(&mv->mca, run->msr.index, run->msr.data);
			pthread_mutex_unlock(&mv->lock);
		}
		run->msr.error = rc < 0;
		return true;
	}
	case KVM_EXIT_MMIO:
		if (!page_poisoned(mv->m, run->mmio.phys_addr))
			return false;
		srar_from_mmio(mv, run->mmio.phys_addr);
		return true;
	}
	return false;
}

bool mce_handle_run_error(struct mce_vcpu *mv, int e)
{
	struct kvm_memory_fault_info *mf;

	if (!mv || e != EFAULT || mv->run->exit_reason != KVM_EXIT_MEMORY_FAULT)
		return false;
	/* Hardware-virtualising KVM: the guest's access to the inaccessible
	 * page stopped before the instruction ran. */
	mf = (struct kvm_memory_fault_info *)(void *)&mv->run->mmio;
	if (!page_poisoned(mv->m, mf->gpa))
		return false;
	queue_drop(mv, mf->gpa & ~(MM_PAGE_SIZE - 1));
	deliver(mv, mf->gpa, MCE_AR);
	return true;
}

bool mce_handle_shutdown(struct mce_vcpu *mv)
{
	if (!mv || !mv->just_injected)
		return false;
	/* KVM shuts the vCPU down itself for an #MC during an #MC. */
	mv->just_injected = false;
	atomic_fetch_add(&mv->m->n_shutdown, 1);
	memory_failure_event(true, "reset", mv->just_injected_ar, true);
	pr_err("vcpu %d: machine check while MCG_STATUS.MCIP was set (a machine check during a "
	       "machine check): the guest CPU shuts down", mv->index);
	return true;
}

/* ---- host memory errors: SIGBUS with BUS_MCEERR_AR/AO */
static void sig_write(const char *s) { ssize_t r = write(STDERR_FILENO, s, strlen(s)); (void)r; }

static char *sig_hex(char *p, uint64_t v)
{
	char tmp[17];
	int n = 0;

	*p++ = '0';
	*p++ = 'x';
	do {
		tmp[n++] = "0123456789abcdef"[v & 0xf];
		v >>= 4;
	} while (v);
	while (n)
		*p++ = tmp[--n];
	*p = '\0';
	return p;
}

static void sigbus_fatal(const char *what, uint64_t addr, const char *tail)
{
	char buf[256], *p = buf;

	p = stpcpy(p, "mdvm: fatal: ");
	p = stpcpy(p, what);
	p = sig_hex(p, addr);
	p = stpcpy(p, tail);
	stpcpy(p, "\n");
	sig_write(buf);
	_exit(1);
}

static void sigbus_handler(int sig, siginfo_t *si, void *uc)
{
	struct mce *m = g_mce;
	uintptr_t hva = (uintptr_t)si->si_addr;
	int code = si->si_code;
	uint64_t gpa = UINT64_MAX;

	(void)sig; (void)uc;
	if (code != BUS_MCEERR_AR && code != BUS_MCEERR_AO)
		sigbus_fatal("SIGBUS (not a memory error) at host address ", hva, "");
	if (m && hva >= m->base)
		for (size_t i = 0; i < m->nranges; i++)
			if (hva - m->base >= m->ranges[i].gpa &&
			    hva - m->base - m->ranges[i].gpa < m->ranges[i].size)
				gpa = hva - m->base;
	if (code == BUS_MCEERR_AR) {
		/* Outside guest RAM: fatal. Off the main thread, the main loop
		 * emits MEMORY_FAILURE (hypervisor, fatal) first, as QEMU does,
		 * and exits; this thread must not return to the bad access. */
		if (gpa == UINT64_MAX && m && m->sig_efd >= 0 &&
		    (pid_t)syscall(SYS_gettid) != m->main_tid) {
			uint64_t one = 1, expect = 0;
			if (atomic_compare_exchange_strong(&m->sig_fatal, &expect, (uint64_t)hva + 1)) {
				ssize_t r = write(m->sig_efd, &one, sizeof(one));
				(void)r;
			}
			struct timespec ts = { .tv_sec = 5 }, rem;
			while (nanosleep(&ts, &rem) < 0 && errno == EINTR)
				ts = rem;
			/* The main loop did not exit: do it here, without event. */
		}
		if (gpa == UINT64_MAX)
			sigbus_fatal("hardware memory error (SIGBUS BUS_MCEERR_AR) at host address ", hva,
				     ", outside guest RAM: memory used by mdvm itself");
		if (!tls_vcpu)
			sigbus_fatal("hardware memory error (SIGBUS BUS_MCEERR_AR) in mdvm's own access "
				     "to guest RAM at GPA ", gpa, "");
		/* Raised on the vCPU before its next entry (mce_vcpu_pre_run). */
		atomic_store(&tls_vcpu->sig_ar, gpa + 1);
		return;
	}
	/* Action optional: the main loop isolates the page and tells the guest. */
	if (!m)
		return;
	unsigned slot = atomic_fetch_add(&m->sig_head, 1) % SIG_RING;
	atomic_store(&m->sig_ring[slot], gpa == UINT64_MAX ? (1ULL << 63) | hva : gpa + 1);
	uint64_t one = 1;
	ssize_t r = write(m->sig_efd, &one, sizeof(one));
	(void)r;
}

static void queue_ao(struct mce *m, int cpu, uint64_t page);

static void sig_ring_drain(void *opaque, uint32_t events)
{
	struct mce *m = opaque;
	uint64_t cnt;

	(void)events;
	if (read(m->sig_efd, &cnt, sizeof(cnt)) < 0)
		return;
	uint64_t fatal = atomic_load(&m->sig_fatal);
	if (fatal) {
		atomic_fetch_add(&m->n_host, 1);
		qmp_emit_event("MEMORY_FAILURE",
			       json_pack("{s:s, s:s, s:{s:b, s:b}}", "recipient", "hypervisor",
					 "action", "fatal", "flags", "action-required", 1, "recursive", 0));
		pr_err("fatal: hardware memory error (SIGBUS BUS_MCEERR_AR) at host address 0x%" PRIx64
		       ", outside guest RAM: memory used by mdvm itself", fatal - 1);
		qmp_server_stop();      /* delivers the event */
		fflush(NULL);
		_exit(1);
	}
	for (unsigned i = 0; i < SIG_RING; i++) {
		uint64_t v = atomic_exchange(&m->sig_ring[i], 0);
		if (!v)
			continue;
		atomic_fetch_add(&m->n_host, 1);
		if (v >> 63) {
			memory_failure_event(false, "ignore", false, false);
			pr_warn("host memory error (action optional) at host address 0x%" PRIx64
				", outside guest RAM: ignored", (uint64_t)(v & ~(1ULL << 63)));
			continue;
		}
		uint64_t gpa = v - 1;
		int rc = poison_page(m, gpa >> MM_PAGE_SHIFT);
		if (rc == -EALREADY)
			continue;       /* the guest was told already */
		if (rc < 0)
			pr_warn("host memory error at GPA 0x%" PRIx64 ": cannot isolate the page: %s",
				gpa, strerror(-rc));
		pr_info("host memory error (action optional) at GPA 0x%" PRIx64, gpa);
		queue_ao(m, 0, gpa & ~(MM_PAGE_SIZE - 1));
	}
}

/* ---- creation */
static int setup_emulated(struct mce *m, int vm_fd, char *err, size_t errlen)
{
	static uint8_t deny[(4 * MCA_BANKS_MAX + 7) / 8];   /* all bits 0: deny = exit to us */
	struct kvm_enable_cap cap = { .cap = KVM_CAP_X86_USER_SPACE_MSR,
				      .args = { KVM_MSR_EXIT_REASON_FILTER } };
	struct kvm_msr_filter f = { .flags = KVM_MSR_FILTER_DEFAULT_ALLOW };

	if (ioctl(vm_fd, KVM_ENABLE_CAP, &cap) < 0) {
		snprintf(err, errlen, "KVM_CAP_X86_USER_SPACE_MSR: %s", strerror(errno));
		return -1;
	}
	/* Only the MCA registers leave the kernel; every other MSR stays KVM's. */
	f.ranges[0] = (struct kvm_msr_filter_range){ .flags = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE,
		.nmsrs = 3, .base = MSR_MCG_CAP, .bitmap = deny };
	f.ranges[1] = (struct kvm_msr_filter_range){ .flags = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE,
		.nmsrs = 4 * (m->mcg_cap & 0xff), .base = MSR_MC0_CTL, .bitmap = deny };
	if (ioctl(vm_fd, KVM_X86_SET_MSR_FILTER, &f) < 0) {
		snprintf(err, errlen, "KVM_X86_SET_MSR_FILTER: %s", strerror(errno));
		return -1;
	}
	return 0;
}

static bool native_available(int kvm_fd)
{
	uint64_t sup = 0;
	int banks = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MCE);

	return banks >= MCA_BANKS && ioctl(kvm_fd, KVM_X86_GET_MCE_CAP_SUPPORTED, &sup) == 0 &&
	       (sup & (MCG_CTL_P | MCG_SER_P)) == (MCG_CTL_P | MCG_SER_P);
}

static bool emulated_available(int kvm_fd, int vm_fd)
{
	int r = ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_X86_USER_SPACE_MSR);

	/* Which exit reasons are valid is only known when enabling (setup_emulated). */
	return r > 0 && ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_X86_MSR_FILTER) > 0;
}

static void schedule_config(struct mce *m);

struct mce *mce_create(struct vm *vm, int kvm_fd, int vm_fd, char *err, size_t errlen)
{
	struct mce *m = xcalloc(1, sizeof(*m));
	const char *want = getenv("MDVM_MCE");
	bool native = native_available(kvm_fd), emul = emulated_available(kvm_fd, vm_fd);
	struct sigaction sa = { .sa_sigaction = sigbus_handler, .sa_flags = SA_SIGINFO };

	m->vm = vm;
	m->gm = vm_mem(vm);
	m->ncpus = vm_ncpus(vm);
	m->vcpus = xcalloc(m->ncpus, sizeof(*m->vcpus));
	m->mcg_cap = MCG_CTL_P | MCG_SER_P | MCA_BANKS;   /* no CMCI, no LMCE */
	m->sig_efd = -1;
	m->main_tid = (pid_t)syscall(SYS_gettid);
	/* The guest sees the host's vendor; Linux on AMD recovers only from
	 * AMD-encoded errors (an Intel SRAO in kernel context panics it), so
	 * the encoding follows the host vendor unless MDVM_MCE_ENCODING says. */
	const char *enc = getenv("MDVM_MCE_ENCODING");
	unsigned a, b, c, d;
	if (__get_cpuid(0, &a, &b, &c, &d))
		m->host_amd = (b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163) ||  /* AuthenticAMD */
			      (b == 0x6f677948 && d == 0x6e65476e && c == 0x656e6975);     /* HygonGenuine */
	if (!enc || !*enc || !strcmp(enc, "auto"))
		m->amd = m->host_amd;
	else if (!strcmp(enc, "amd") || !strcmp(enc, "intel"))
		m->amd = !strcmp(enc, "amd");
	else {
		snprintf(err, errlen, "MDVM_MCE_ENCODING=%s: expected intel, amd or auto", enc);
		goto fail;
	}
	if (!want || !*want || !strcmp(want, "auto"))
		m->backend = native ? MCE_NATIVE : emul ? MCE_EMULATED : MCE_OFF;
	else if (!strcmp(want, "native") && native)
		m->backend = MCE_NATIVE;
	else if (!strcmp(want, "emulated") && emul)
		m->backend = MCE_EMULATED;
	else if (!strcmp(want, "off"))
		m->backend = MCE_OFF;
	else {
		snprintf(err, errlen, "MDVM_MCE=%s: %s", want,
			 !strcmp(want, "native") || !strcmp(want, "emulated")
			 ? "this KVM does not support that machine-check back end"
			 : "expected auto, native, emulated or off");
		goto fail;
	}
	if (m->backend == MCE_EMULATED && setup_emulated(m, vm_fd, err, errlen) < 0)
		goto fail;
	m->base = (uintptr_t)mm_guest_base(m->gm);
	m->nranges = mm_ram_ranges(m->gm, m->ranges, ARRAY_SIZE(m->ranges));
	if (m->nranges > ARRAY_SIZE(m->ranges))
		m->nranges = ARRAY_SIZE(m->ranges);
	m->sig_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (m->sig_efd < 0 || loop_add_fd(m->sig_efd, EPOLLIN, sig_ring_drain, m) < 0) {
		snprintf(err, errlen, "machine checks: eventfd: %s", strerror(errno));
		goto fail;
	}
	g_mce = m;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGBUS, &sa, NULL);
	if (m->backend == MCE_OFF)
		pr_warn("machine checks: off (%s): memory errors are not reported to the guest",
			want && !strcmp(want, "off") ? "MDVM_MCE=off"
			: "KVM has neither MCE banks nor user-space MSR filtering");
	else
		pr_info("machine checks: %s back end (%u banks, MCG_CAP 0x%" PRIx64 ", %s encoding)",
			backend_names[m->backend], MCA_BANKS, m->mcg_cap, m->amd ? "amd" : "intel");
	schedule_config(m);
	return m;
fail:
	mce_destroy(m);
	return NULL;
}

void mce_destroy(struct mce *m)
{
	if (!m)
		return;
	if (g_mce == m) {
		signal(SIGBUS, SIG_DFL);
		g_mce = NULL;
	}
	if (m->sig_efd >= 0) {
		loop_del_fd(m->sig_efd);
		close(m->sig_efd);
	}
	for (int i = 0; i < m->ncpus; i++) {
		if (m->vcpus[i])
			pthread_mutex_destroy(&m->vcpus[i]->lock);
		free(m->vcpus[i]);
	}
	free(m->vcpus);
	free(m);
}

void mce_cpuid_1(struct mce *m, uint32_t *edx)
{
	if (!m)
		return;
	/* Off: no machine-check architecture, so no guest expects one. */
	if (m->backend == MCE_OFF)
		*edx &= ~(CPUID_1_EDX_MCE | CPUID_1_EDX_MCA);
	else
		*edx |= CPUID_1_EDX_MCE | CPUID_1_EDX_MCA;
}

/* AMD: Linux recovers from uncorrected errors only with SUCCOR (and from
 * an overflowed one with OVERFLOW_RECOV); KVM does not report them. */
void mce_cpuid_80000007(struct mce *m, uint32_t *ebx)
{
	if (m && m->backend != MCE_OFF && m->host_amd)
		*ebx |= (1u << 0) | (1u << 1);
}

/* Off: mce_cpuid_1 cleared MCE/MCA, but some KVMs (this project's
 * kvm_pvm) set them again; then the guest finds KVM's own banks, which
 * nothing ever fills. Say so rather than pretend. */
static void off_cpuid_check(int fd)
{
	struct { struct kvm_cpuid2 h; struct kvm_cpuid_entry2 e[256]; } c;

	memset(&c, 0, sizeof(c));
	c.h.nent = 256;
	if (ioctl(fd, KVM_GET_CPUID2, &c) < 0)
		return;
	for (unsigned i = 0; i < c.h.nent; i++)
		if (c.e[i].function == 1 && (c.e[i].edx & (CPUID_1_EDX_MCE | CPUID_1_EDX_MCA)))
			pr_warn("machine checks: off, but KVM keeps CPUID MCE/MCA set: the guest "
				"sees KVM's own machine-check registers, never written by mdvm");
}

struct mce_vcpu *mce_vcpu_create(struct mce *m, int index, int fd, struct kvm_run *run,
				 char *err, size_t errlen)
{
	struct mce_vcpu *mv;

	if (m && m->backend == MCE_OFF && index == 0)
		off_cpuid_check(fd);
	if (!m || m->backend == MCE_OFF || index >= m->ncpus)
		return NULL;
	mv = xcalloc(1, sizeof(*mv));
	mv->m = m;
	mv->index = index;
	mv->fd = fd;
	mv->run = run;
	pthread_mutex_init(&mv->lock, NULL);
	mca_init(&mv->mca, m->mcg_cap);
	if (m->backend == MCE_NATIVE) {
		uint64_t cap = m->mcg_cap;
		if (ioctl(fd, KVM_X86_SETUP_MCE, &cap) < 0) {
			snprintf(err, errlen, "KVM_X86_SETUP_MCE on vcpu %d: %s", index, strerror(errno));
			pthread_mutex_destroy(&mv->lock);
			free(mv);
			return NULL;
		}
		/* Some KVMs (this project's PVM hosts) do not read MCA registers
		 * back through KVM_GET_MSRS: then MCIP is KVM's business alone. */
		struct { struct kvm_msrs h; struct kvm_msr_entry e[1]; } msrs = {
			.h.nmsrs = 1, .e = { { .index = MSR_MCG_CAP } } };
		mv->native_msrs = ioctl(fd, KVM_GET_MSRS, &msrs) == 1 && msrs.e[0].data == cap;
	}
	m->vcpus[index] = mv;
	return mv;
}

void mce_vcpu_thread_start(struct mce_vcpu *mv)
{
	if (!mv)
		return;
	tls_vcpu = mv;
	atomic_store(&mv->tid, (pid_t)syscall(SYS_gettid));
}

/* ---- control plane */
static void queue_ao(struct mce *m, int cpu, uint64_t page)
{
	struct mce_vcpu *mv = m->vcpus[cpu];

	if (!mv)
		return;
	pthread_mutex_lock(&mv->lock);
	if (mv->qlen == MCE_QUEUE) {
		pthread_mutex_unlock(&mv->lock);
		pr_warn("vcpu %d: %d machine checks already queued; memory error at GPA 0x%" PRIx64
			" not signalled (the page stays poisoned)", cpu, MCE_QUEUE, page);
		return;
	}
	mv->queue[(mv->qhead + mv->qlen) % MCE_QUEUE] = page;
	mv->qlen++;
	atomic_store(&mv->pending, mv->qlen);
	pthread_mutex_unlock(&mv->lock);
	vm_kick_vcpu(m->vm, cpu);
}

int mce_inject_memory_error(struct mce *m, uint64_t gpa, uint64_t count, enum mce_kind kind,
			    int cpu, char *err, size_t errlen)
{
	enum vm_state st = vm_get_state(m->vm);

	if (gpa & (MM_PAGE_SIZE - 1)) {
		snprintf(err, errlen, "gpa 0x%" PRIx64 " is not 4 KiB aligned", gpa);
		return -1;
	}
	if (count < 1 || count > MCE_COUNT_MAX) {
		snprintf(err, errlen, "count must be 1..%d", MCE_COUNT_MAX);
		return -1;
	}
	if (cpu < 0 || cpu >= m->ncpus) {
		snprintf(err, errlen, "cpu-index %d: the VM has vCPUs 0..%d", cpu, m->ncpus - 1);
		return -1;
	}
	/* Elsewhere the error would be lost: a migrated-away source, its
	 * final pass (the pages are being sent), a destination not loaded. */
	if (st != VM_STATE_RUNNING && st != VM_STATE_PAUSED && st != VM_STATE_PRELAUNCH) {
		snprintf(err, errlen, "the VM is not running (status: %s)", vm_state_name(st));
		return -1;
	}
	/* Check every page first: a bad request changes nothing. */
	for (uint64_t i = 0; i < count; i++) {
		uint64_t g = gpa + i * MM_PAGE_SIZE;
		if (!gpa_is_ram(m, g)) {
			snprintf(err, errlen, "GPA 0x%" PRIx64 " is not guest RAM", g);
			return -1;
		}
		if (page_poisoned(m, g)) {
			snprintf(err, errlen, "GPA 0x%" PRIx64 " is already poisoned", g);
			return -1;
		}
	}
	/* Action-optional: keep the vCPUs out of the guest while the page is
	 * poisoned and the error queued, so the target vCPU takes the SRAO at
	 * its next entry before any guest code can run into the page (which
	 * would turn the report into an SRAR). */
	bool paused = kind == MCE_AO && st == VM_STATE_RUNNING && vm_pause(m->vm) == 0;
	int ret = 0;
	for (uint64_t i = 0; i < count; i++) {
		uint64_t g = gpa + i * MM_PAGE_SIZE;
		int rc = poison_page(m, g >> MM_PAGE_SHIFT);
		if (rc < 0) {
			snprintf(err, errlen, "cannot poison GPA 0x%" PRIx64 ": %s%s", g, strerror(-rc),
				 i ? " (the pages before it are poisoned)" : "");
			ret = -1;
			break;
		}
		pr_info("memory error injected at GPA 0x%" PRIx64 " (%s): page poisoned", g,
			kind == MCE_AR ? "action-required: raised when a vCPU touches it"
				       : "action-optional");
		if (kind == MCE_AO && m->backend != MCE_OFF)
			queue_ao(m, cpu, g);
	}
	if (paused)
		vm_resume(m->vm);
	return ret;
}

int mce_raise_sigbus(struct mce *m, enum mce_kind kind, uint64_t hva, int cpu,
		     char *err, size_t errlen)
{
	if (cpu >= 0) {
		struct mce_vcpu *mv = cpu < m->ncpus ? m->vcpus[cpu] : NULL;
		if (!mv || !atomic_load(&mv->tid)) {
			snprintf(err, errlen, "vCPU %d has no running thread", cpu);
			return -1;
		}
		/* Raised by the vCPU thread on itself, before its next entry. */
		atomic_store(&mv->raise_hva, (hva | (uint64_t)(kind == MCE_AR) << 63) + 1);
		vm_kick_vcpu(m->vm, cpu);
		return 0;
	}
	if (raise_sigbus_self(kind, hva) < 0) {
		snprintf(err, errlen, "rt_tgsigqueueinfo: %s", strerror(errno));
		return -1;
	}
	return 0;
}

void mce_reset(struct mce *m)
{
	struct mm_stats st;
	uint64_t replaced = 0;

	if (!m)
		return;
	for (int i = 0; i < m->ncpus; i++) {
		struct mce_vcpu *mv = m->vcpus[i];
		if (!mv)
			continue;
		pthread_mutex_lock(&mv->lock);
		mca_reset(&mv->mca);
		mv->qlen = mv->qhead = 0;
		atomic_store(&mv->pending, 0);
		atomic_store(&mv->sig_ar, 0);
		pthread_mutex_unlock(&mv->lock);
		if (m->backend == MCE_NATIVE) {
			uint64_t cap = m->mcg_cap;
			struct { struct kvm_msrs h; struct kvm_msr_entry e[1 + 3 * MCA_BANKS]; } msrs = { 0 };
			ioctl(mv->fd, KVM_X86_SETUP_MCE, &cap);
			msrs.e[msrs.h.nmsrs++].index = MSR_MCG_STATUS;
			for (unsigned b = 0; b < MCA_BANKS; b++)
				for (unsigned r = 1; r < 4; r++)
					msrs.e[msrs.h.nmsrs++].index = MSR_MC0_CTL + 4 * b + r;
			ioctl(mv->fd, KVM_SET_MSRS, &msrs);
		}
	}
	/* As QEMU: a reset replaces the poisoned pages with fresh memory. */
	mm_query_stats(m->gm, &st);
	if (!st.pages[MEMDESC_POISONED])
		return;
	for (size_t r = 0; r < m->nranges; r++) {
		long rc = mm_unpoison_range(m->gm, m->ranges[r].gpa >> MM_PAGE_SHIFT,
					    m->ranges[r].size >> MM_PAGE_SHIFT);
		if (rc < 0)
			pr_warn("system reset: cannot replace poisoned pages in [0x%" PRIx64 ", 0x%" PRIx64 "): %s",
				m->ranges[r].gpa, m->ranges[r].gpa + m->ranges[r].size, strerror((int)-rc));
		else
			replaced += (uint64_t)rc;
	}
	if (replaced)
		pr_info("system reset: %" PRIu64 " poisoned page%s replaced with fresh memory",
			replaced, replaced == 1 ? "" : "s");
}

json_t *mce_query(struct mce *m)
{
	json_t *pages = json_array(), *vcpus = json_array();
	struct mm_stats st;
	uint64_t listed = 0;

	mm_query_stats(m->gm, &st);
	for (size_t r = 0; r < m->nranges && st.pages[MEMDESC_POISONED]; r++) {
		uint64_t g0 = m->ranges[r].gpa >> MM_PAGE_SHIFT;
		uint64_t n = m->ranges[r].size >> MM_PAGE_SHIFT;
		for (uint64_t gfn = g0; gfn < g0 + n && listed < 1024; gfn++)
			if (memdesc_type(memdesc_lookup(m->gm, gfn)) == MEMDESC_POISONED) {
				json_array_append_new(pages, json_integer((json_int_t)(gfn << MM_PAGE_SHIFT)));
				listed++;
			}
	}
	for (int i = 0; i < m->ncpus; i++) {
		struct mce_vcpu *mv = m->vcpus[i];
		json_t *banks = json_array();
		uint64_t mcg_status;
		unsigned queued;

		if (!mv)
			continue;
		pthread_mutex_lock(&mv->lock);
		mcg_status = mv->mca.mcg_status;
		queued = mv->qlen;
		for (unsigned b = 0; b < MCA_BANKS && m->backend == MCE_EMULATED; b++) {
			struct mca_bank *bk = &mv->mca.bank[b];
			if (bk->status & MCI_STATUS_VAL)
				json_array_append_new(banks, json_pack("{s:i, s:I, s:I, s:I}", "bank", b,
					"status", (json_int_t)bk->status, "addr", (json_int_t)bk->addr,
					"misc", (json_int_t)bk->misc));
		}
		pthread_mutex_unlock(&mv->lock);
		json_t *o = json_pack("{s:i, s:i, s:o}", "cpu-index", i, "queued", queued, "banks", banks);
		/* Native: the registers live in KVM; shown only where it reads them back. */
		if (m->backend == MCE_EMULATED)
			json_object_set_new(o, "mcg-status", json_integer((json_int_t)mcg_status));
		json_array_append_new(vcpus, o);
	}
	return json_pack("{s:s, s:i, s:I, s:I, s:o, s:{s:I, s:I}, s:I, s:I, s:I, s:o}",
			 "backend", backend_names[m->backend],
			 "banks", m->backend == MCE_OFF ? 0 : MCA_BANKS,
			 "mcg-cap", (json_int_t)(m->backend == MCE_OFF ? 0 : m->mcg_cap),
			 "poisoned-count", (json_int_t)st.pages[MEMDESC_POISONED],
			 "poisoned-pages", pages,
			 "injected", "action-optional", (json_int_t)atomic_load(&m->n_ao),
			 "action-required", (json_int_t)atomic_load(&m->n_ar),
			 "ignored", (json_int_t)atomic_load(&m->n_ignored),
			 "shutdowns", (json_int_t)atomic_load(&m->n_shutdown),
			 "host-errors", (json_int_t)atomic_load(&m->n_host),
			 "vcpus", vcpus);
}

/* ---- `mdvm run --inject-memory-error-at GPA[:kind][@ms]` */
struct scheduled {
	struct mce *m;
	struct mce_inject_at at;
};

static void scheduled_fire(void *opaque)
{
	struct scheduled *s = opaque;
	char err[256];

	if (mce_inject_memory_error(s->m, s->at.gpa, 1, (enum mce_kind)s->at.kind, 0, err, sizeof(err)) < 0)
		pr_err("--inject-memory-error-at 0x%" PRIx64 ": %s", s->at.gpa, err);
	free(s);
}

static void schedule_config(struct mce *m)
{
	const struct vm_config *cfg = vm_config(m->vm);

	for (unsigned i = 0; i < cfg->n_inject_at; i++) {
		struct scheduled *s = xmalloc(sizeof(*s));
		s->m = m;
		s->at = cfg->inject_at[i];
		loop_add_timer(s->at.delay_ms ? s->at.delay_ms : 1, scheduled_fire, s);
	}
}

/* ---- migration: the MCE section (docs/migration.md)
 *
 * Per vCPU: MCG_STATUS, MCG_CTL and every bank's CTL/STATUS/ADDR/MISC, the
 * SRAO errors still queued and a pending host SRAR. Registers are
 * architectural, so either back end loads what either saved; a guest
 * switched over in the middle of its #MC handler keeps MCIP set and its
 * banks, and a further error still shuts it down. */
#define MCE_STATE_VERSION 2

struct mce_state_hdr {
	uint32_t version, backend;
	uint64_t mcg_cap;
	uint32_t ncpus, nbanks;
	uint32_t amd, pad;   /* the encoding the guest has seen (v2) */
};

struct mce_state_vcpu {
	uint32_t index, qlen;
	uint64_t mcg_status, mcg_ctl, sig_ar;
	/* then nbanks x {ctl, status, addr, misc}, then qlen x u64 GPA */
};

/* Native back end: the registers live in KVM. 0 or -1 (errno). */
static int native_msrs_rw(struct mce_vcpu *mv, struct mca *a, bool write)
{
	unsigned nb = mca_nbanks(a), n = 0;
	struct { struct kvm_msrs h; struct kvm_msr_entry e[3 + 4 * MCA_BANKS_MAX]; } msrs;

	memset(&msrs, 0, sizeof(msrs));
	msrs.e[n++] = (struct kvm_msr_entry){ .index = MSR_MCG_STATUS, .data = a->mcg_status };
	msrs.e[n++] = (struct kvm_msr_entry){ .index = MSR_MCG_CTL, .data = a->mcg_ctl };
	for (unsigned b = 0; b < nb; b++) {
		const uint64_t v[4] = { a->bank[b].ctl, a->bank[b].status, a->bank[b].addr, a->bank[b].misc };
		for (unsigned r = 0; r < 4; r++)
			msrs.e[n++] = (struct kvm_msr_entry){ .index = MSR_MC0_CTL + 4 * b + r, .data = v[r] };
	}
	msrs.h.nmsrs = n;
	int got = ioctl(mv->fd, write ? KVM_SET_MSRS : KVM_GET_MSRS, &msrs);
	if (got != (int)n) {
		if (got >= 0)
			errno = EINVAL;
		return -1;
	}
	if (!write) {
		a->mcg_status = msrs.e[0].data;
		a->mcg_ctl = msrs.e[1].data;
		for (unsigned b = 0; b < nb; b++) {
			a->bank[b].ctl = msrs.e[2 + 4 * b].data;
			a->bank[b].status = msrs.e[3 + 4 * b].data;
			a->bank[b].addr = msrs.e[4 + 4 * b].data;
			a->bank[b].misc = msrs.e[5 + 4 * b].data;
		}
	}
	return 0;
}

void *mce_state_save(struct mce *m, size_t *len, char *err, size_t errlen)
{
	static struct mce off = { .backend = MCE_OFF };
	if (!m)
		m = &off;
	unsigned nb = m->backend == MCE_OFF ? 0 : MCA_BANKS;
	size_t cap = sizeof(struct mce_state_hdr) +
		     (size_t)m->ncpus * (sizeof(struct mce_state_vcpu) + (4 * nb + MCE_QUEUE) * 8);
	uint8_t *buf = xcalloc(1, cap), *p = buf;
	struct mce_state_hdr h = { .version = MCE_STATE_VERSION, .backend = m->backend,
				   .mcg_cap = m->backend == MCE_OFF ? 0 : m->mcg_cap,
				   .ncpus = (uint32_t)m->ncpus, .nbanks = nb, .amd = m->amd };

	memcpy(p, &h, sizeof(h));
	p += sizeof(h);
	for (int i = 0; i < m->ncpus; i++) {
		struct mce_vcpu *mv = m->vcpus[i];
		struct mce_state_vcpu v = { .index = (uint32_t)i };
		struct mca a;

		mca_init(&a, m->mcg_cap);
		if (mv) {
			pthread_mutex_lock(&mv->lock);
			a = mv->mca;
			v.qlen = mv->qlen;
			pthread_mutex_unlock(&mv->lock);
			if (m->backend == MCE_NATIVE && native_msrs_rw(mv, &a, false) < 0) {
				snprintf(err, errlen, "vcpu %d: reading the machine-check registers "
					 "(KVM_GET_MSRS): %s", i, strerror(errno));
				free(buf);
				return NULL;
			}
			v.sig_ar = atomic_load(&mv->sig_ar);
		}
		v.mcg_status = a.mcg_status;
		v.mcg_ctl = a.mcg_ctl;
		memcpy(p, &v, sizeof(v));
		p += sizeof(v);
		for (unsigned b = 0; b < nb; b++) {
			const uint64_t r[4] = { a.bank[b].ctl, a.bank[b].status, a.bank[b].addr, a.bank[b].misc };
			memcpy(p, r, sizeof(r));
			p += sizeof(r);
		}
		if (mv) {
			pthread_mutex_lock(&mv->lock);
			for (unsigned k = 0; k < v.qlen; k++) {
				uint64_t g = mv->queue[(mv->qhead + k) % MCE_QUEUE];
				memcpy(p, &g, 8);
				p += 8;
			}
			pthread_mutex_unlock(&mv->lock);
		}
	}
	*len = (size_t)(p - buf);
	return buf;
}

int mce_state_load(struct mce *m, const void *data, size_t len, char *err, size_t errlen)
{
	const uint8_t *p = data, *end = p + len;
	static struct mce off = { .backend = MCE_OFF };
	struct mce_state_hdr h;

	if (!m)
		m = &off;
	if (len < sizeof(h))
		return snprintf(err, errlen, "machine-check state: truncated"), -1;
	memcpy(&h, p, sizeof(h));
	p += sizeof(h);
	if (h.version != MCE_STATE_VERSION)
		return snprintf(err, errlen, "machine-check state version %u (this mdvm reads %u)",
				h.version, MCE_STATE_VERSION), -1;
	if ((h.backend == MCE_OFF) != (m->backend == MCE_OFF))
		return snprintf(err, errlen, "machine checks: %s back end on the source, %s here "
				"(MDVM_MCE must agree on off)", h.backend < 3 ? backend_names[h.backend] : "?",
				backend_names[m->backend]), -1;
	if (m->backend == MCE_OFF)
		return 0;
	/* The guest decodes its banks by what it has seen (and Linux by the
	 * CPU vendor): the encoding cannot change under it. */
	if (!!h.amd != m->amd)
		return snprintf(err, errlen, "machine checks: %s encoding on the source, %s here "
				"(MDVM_MCE_ENCODING must agree)", h.amd ? "amd" : "intel",
				m->amd ? "amd" : "intel"), -1;
	if (h.mcg_cap != m->mcg_cap || h.nbanks != MCA_BANKS || h.ncpus != (uint32_t)m->ncpus)
		return snprintf(err, errlen, "machine-check state: MCG_CAP 0x%" PRIx64 ", %u banks, %u vCPUs; "
				"this VM 0x%" PRIx64 ", %u, %d", h.mcg_cap, h.nbanks, h.ncpus, m->mcg_cap,
				MCA_BANKS, m->ncpus), -1;
	for (int i = 0; i < m->ncpus; i++) {
		struct mce_vcpu *mv = m->vcpus[i];
		struct mce_state_vcpu v;
		struct mca a;

		if ((size_t)(end - p) < sizeof(v))
			return snprintf(err, errlen, "machine-check state: truncated at vcpu %d", i), -1;
		memcpy(&v, p, sizeof(v));
		p += sizeof(v);
		if (v.index != (uint32_t)i || v.qlen > MCE_QUEUE ||
		    (size_t)(end - p) < (4 * (size_t)h.nbanks + v.qlen) * 8)
			return snprintf(err, errlen, "machine-check state: bad record for vcpu %d", i), -1;
		mca_init(&a, m->mcg_cap);
		a.mcg_status = v.mcg_status;
		a.mcg_ctl = v.mcg_ctl;
		for (unsigned b = 0; b < h.nbanks; b++) {
			uint64_t r[4];
			memcpy(r, p, sizeof(r));
			p += sizeof(r);
			a.bank[b] = (struct mca_bank){ .ctl = r[0], .status = r[1], .addr = r[2], .misc = r[3] };
		}
		if (!mv)
			return snprintf(err, errlen, "machine-check state: vcpu %d has no MCA", i), -1;
		if (m->backend == MCE_NATIVE && native_msrs_rw(mv, &a, true) < 0)
			return snprintf(err, errlen, "vcpu %d: loading the machine-check registers "
					"(KVM_SET_MSRS): %s", i, strerror(errno)), -1;
		pthread_mutex_lock(&mv->lock);
		mv->mca = a;
		mv->qhead = 0;
		mv->qlen = v.qlen;
		memcpy(mv->queue, p, v.qlen * 8);
		atomic_store(&mv->pending, mv->qlen);
		pthread_mutex_unlock(&mv->lock);
		p += v.qlen * 8;
		atomic_store(&mv->sig_ar, v.sig_ar);
	}
	if (p != end)
		return snprintf(err, errlen, "machine-check state: %zu trailing bytes", (size_t)(end - p)), -1;
	return 0;
}
