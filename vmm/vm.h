/* The virtual machine: KVM VM fd, vCPU threads, devices, guest memory.
 * Control-plane functions here are called from the main loop thread. */
#ifndef MDVM_VM_H
#define MDVM_VM_H
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include "config.h"

struct vm;
struct vcpu;
struct guest_mem;

enum vm_state {
	VM_STATE_PRELAUNCH = 0,
	VM_STATE_RUNNING,
	VM_STATE_PAUSED,          /* stopped by `stop` */
	VM_STATE_SHUTDOWN,        /* guest powered off / asked to exit */
	VM_STATE_INTERNAL_ERROR,  /* emulation failure, exception in KVM_RUN */
	VM_STATE_INMIGRATE,       /* --incoming: waiting for a migration stream */
	VM_STATE_FINISH_MIGRATE,  /* migration source, vCPUs stopped for the last pass */
	VM_STATE_POSTMIGRATE,     /* migration source after completion (paused) */
};
/* QMP "status" strings: "prelaunch", "running", "paused", "shutdown", "internal-error" */
const char *vm_state_name(enum vm_state s);

struct vcpu_info {
	int cpu_index;
	pid_t thread_id;
	bool halted;
};

struct vm *vm_create(const struct vm_config *cfg, char *err, size_t errlen);
int  vm_start(struct vm *vm);        /* spawn vCPU threads, running */
int  vm_start_paused(struct vm *vm); /* spawn them parked: paused (incoming migration) */
void vm_destroy(struct vm *vm);

enum vm_state vm_get_state(struct vm *vm);
bool vm_is_running(struct vm *vm);
/* Stop every vCPU and wait until none is in KVM_RUN. Idempotent. */
int  vm_pause(struct vm *vm);
int  vm_resume(struct vm *vm);
/* Reset vCPUs and devices and reload the kernel; keeps the run state. */
int  vm_reset(struct vm *vm);
/* Guest-initiated reset (reset port, triple fault): mdvm exits with status 0,
 * as a VMM for test guests should (QEMU's -no-reboot). Any thread. */
void vm_guest_reset(struct vm *vm);
/* Drive an interrupt line of the in-kernel irqchip. Any thread. */
void vm_irq_line(struct vm *vm, int irq, int level);
/* virtio-mmio plumbing. KVM_IOEVENTFD: an eventfd signalled when the guest
 * writes `datamatch` (len bytes) at MMIO gpa; KVM_IRQFD: an eventfd whose
 * every write pulses GSI `gsi`. Return the fd, or -1 (errno set). */
int  vm_add_ioeventfd(struct vm *vm, uint64_t gpa, uint32_t len, uint64_t datamatch);
int  vm_add_irqfd(struct vm *vm, int gsi);
struct virtio_balloon *vm_balloon(struct vm *vm);   /* NULL without one */
/* Ask the process to exit with `code` once the main loop gets to it. */
void vm_request_exit(struct vm *vm, int code, const char *reason);  /* any thread */

struct guest_mem *vm_mem(struct vm *vm);
/* Machine checks (vmm/mce.h); make vCPU `index` leave KVM_RUN soon. Any thread. */
struct mce *vm_mce(struct vm *vm);
void vm_kick_vcpu(struct vm *vm, int index);
const struct vm_config *vm_config(struct vm *vm);
int  vm_ncpus(struct vm *vm);
void vm_vcpu_info(struct vm *vm, int index, struct vcpu_info *out);

/* Test device: post a command to the guest; `done` runs on the main loop with
 * the guest's status and response text, or status -1 and resp NULL on
 * timeout/reset. Returns -1 if a command is already in flight (errno EBUSY). */
typedef void (*vm_guest_done_fn)(void *opaque, int status, const char *resp);
int  vm_guest_command(struct vm *vm, const char *cmd, unsigned timeout_ms,
		      vm_guest_done_fn done, void *opaque);
/* Completed walk sweeps the guest reported through the test device. */
uint32_t vm_guest_sweeps(struct vm *vm);

/* Live migration (vmm/migration.c, vmm/vmstate.c). */
struct serial;
struct testdev;
int  vm_kvm_fd(struct vm *vm);
int  vm_fd(struct vm *vm);
int  vm_vcpu_fd(struct vm *vm, int index);
struct serial *vm_serial(struct vm *vm);
struct rtc;
struct rtc *vm_rtc(struct vm *vm);
struct testdev *vm_testdev(struct vm *vm);
/* Park the vCPUs with their last I/O completed, RUNNING|PAUSED -> FINISH_MIGRATE. */
int  vm_stop_for_migration(struct vm *vm);
/* completed: -> POSTMIGRATE (vCPUs stay parked); else back to RUNNING or PAUSED. */
void vm_migration_finish(struct vm *vm, bool completed);
void vm_set_incoming(struct vm *vm);            /* PRELAUNCH -> INMIGRATE */
void vm_throttle(struct vm *vm, unsigned pct);  /* vCPUs sleep pct% of the time; any thread */
#endif
