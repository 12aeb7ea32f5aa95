/* KVM as a dirty_source (mm/dirty.h): the dirty ring when the host offers
 * it, else the dirty bitmap with manual protection and chunked clears.
 * One VM per process, so the harvester is a singleton. vm.c calls the
 * hooks below at the right moments of VM creation and from the vCPU loop. */
#ifndef MDVM_DIRTY_KVM_H
#define MDVM_DIRTY_KVM_H
#include <stdbool.h>
#include <stdint.h>

struct guest_mem;

/* After KVM_CREATE_VM, before any vCPU: picks and enables the mode
 * (MDVM_DIRTY=bitmap|ring forces one). */
void dirty_kvm_init(int kvm_fd, int vm_fd);
/* After each KVM_CREATE_VCPU (maps its ring). 0 or -1 (errno). */
int  dirty_kvm_vcpu_init(int index, int vcpu_fd);
/* mm's set_region hook: every KVM_SET_USER_MEMORY_REGION goes through
 * here, so slots created while logging is on log too. >= 0 or -1 (errno). */
int  dirty_kvm_set_region(uint32_t slot, uint64_t gpa, uint64_t size, void *hva, bool log_dirty);
/* KVM_EXIT_DIRTY_RING_FULL on vCPU `index`: harvest and reset. */
void dirty_kvm_ring_full(int index);
/* Any other exit of vCPU `index`: harvest early if its ring is filling. */
void dirty_kvm_vcpu_exit(int index);
/* Create the tracker for gm with KVM as its source (after mm_create). */
void dirty_kvm_attach(struct guest_mem *gm);
const char *dirty_kvm_mode(void);   /* "ring", "bitmap" or "none" */
#endif
