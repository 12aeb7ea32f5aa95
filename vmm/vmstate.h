/* Saving and restoring KVM state for migration: per-vCPU state and the
 * VM-wide in-kernel devices. Blobs are lists of items {u32 id, u32 len,
 * data}; unknown ids are refused (docs/migration.md). */
#ifndef MDVM_VMSTATE_H
#define MDVM_VMSTATE_H
#include <stddef.h>
#include <stdint.h>

struct vm;

struct blob {
	uint8_t *p;
	size_t len, cap;
};
void blob_put(struct blob *b, uint32_t id, const void *data, size_t len);
/* Iterate: returns 1 with id, data, len set; 0 at the end; -1 if malformed. */
int  blob_next(const uint8_t *p, size_t len, size_t *off, uint32_t *id, const void **data,
	       uint32_t *dlen);

/* Learn which MSRs this host can read: at VM creation, before vCPU 0 runs
 * (a vCPU ioctl from another thread waits until that vCPU leaves KVM_RUN,
 * which a busy guest may not do for seconds). 0 or -1 with err. */
int vmstate_prepare(struct vm *vm, char *err, size_t errlen);
/* vCPUs must be parked (vm_stop_for_migration) or not yet started. */
int vmstate_save_vcpu(struct vm *vm, int index, struct blob *b, char *err, size_t errlen);
int vmstate_load_vcpu(struct vm *vm, int index, const void *p, size_t len, char *err, size_t errlen);
/* KVM clock, PIC master/slave, IOAPIC, PIT. */
int vmstate_save_vm(struct vm *vm, struct blob *b, char *err, size_t errlen);
int vmstate_load_vm(struct vm *vm, const void *p, size_t len, char *err, size_t errlen);
#endif
