/* Memory errors delivered to the guest as x86 machine checks (docs/memory-errors.md).
 *
 * One interface, two back ends chosen at VM creation:
 *  - native: KVM has MCE banks (KVM_CAP_MCE, KVM_X86_GET_MCE_CAP_SUPPORTED):
 *    KVM_X86_SETUP_MCE per vCPU, KVM_X86_SET_MCE to inject, KVM keeps the MSRs;
 *  - emulated: the MCA MSRs are denied by a KVM MSR filter so guest
 *    RDMSR/WRMSR exit to mdvm (vmm/mca.c keeps them), #MC goes in with
 *    KVM_SET_VCPU_EVENTS.
 * MDVM_MCE=native|emulated|off in the environment overrides the choice.
 *
 * A poisoned page (memdesc type POISONED, owned by mm/) is inaccessible to the
 * guest; its first access by a vCPU becomes an SRAR machine check on that vCPU. */
#ifndef MDVM_MCE_H
#define MDVM_MCE_H
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct vm;
struct mce;
struct mce_vcpu;
struct kvm_run;

enum mce_kind { MCE_AO = 0, MCE_AR = 1 };   /* action-optional (SRAO), action-required (SRAR) */
#define MCE_COUNT_MAX 512                   /* pages per inject-memory-error */

/* vm.c hooks, in the order vm.c calls them. */
struct mce *mce_create(struct vm *vm, int kvm_fd, int vm_fd, char *err, size_t errlen);
void mce_destroy(struct mce *m);
void mce_cpuid_1(struct mce *m, uint32_t *edx);          /* CPUID.1:EDX MCE, MCA */
void mce_cpuid_80000007(struct mce *m, uint32_t *ebx);   /* AMD: SUCCOR, OVERFLOW_RECOV */
struct mce_vcpu *mce_vcpu_create(struct mce *m, int index, int fd, struct kvm_run *run,
				 char *err, size_t errlen);
void mce_vcpu_thread_start(struct mce_vcpu *mv);           /* on the vCPU thread */
void mce_vcpu_pre_run(struct mce_vcpu *mv);                /* before each KVM_RUN */
/* After KVM_RUN returned 0: true if the exit was ours (MCA MSR, access to a
 * poisoned page) and has been handled. */
bool mce_handle_exit(struct mce_vcpu *mv);
/* After KVM_RUN failed with errno e: true if handled (memory fault on a
 * poisoned page) and the vCPU can re-enter. */
bool mce_handle_run_error(struct mce_vcpu *mv, int e);
/* KVM_EXIT_SHUTDOWN: true if it is KVM's answer to a machine check we just
 * injected (native back end), which mce.c has reported. */
bool mce_handle_shutdown(struct mce_vcpu *mv);
/* System reset, vCPUs parked: MCA registers to power-on state and poisoned
 * pages replaced with fresh (zero) memory. */
void mce_reset(struct mce *m);

/* Control plane (main loop thread). 0, or -1 with err set. */
int mce_inject_memory_error(struct mce *m, uint64_t gpa, uint64_t count, enum mce_kind kind,
			    int cpu, char *err, size_t errlen);
json_t *mce_query(struct mce *m);
const char *mce_backend_name(struct mce *m);
/* Test hook: raise SIGBUS with si_code BUS_MCEERR_AR/AO and si_addr `hva`
 * on vCPU `cpu`'s thread, or on the main thread when cpu < 0. */
int mce_raise_sigbus(struct mce *m, enum mce_kind kind, uint64_t hva, int cpu,
		     char *err, size_t errlen);
/* Migration: the MCE section (vCPUs parked). save returns a malloc'd
 * blob or NULL with err; load: 0 or -1 with err (vCPUs created, not run). */
void *mce_state_save(struct mce *m, size_t *len, char *err, size_t errlen);
int  mce_state_load(struct mce *m, const void *p, size_t len, char *err, size_t errlen);
/* Scheduled injections from `mdvm run --inject-memory-error-at` (cfg). */
void mce_schedule_config(struct mce *m);
#endif
