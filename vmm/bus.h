/* Port-I/O and MMIO dispatch for emulated devices. Registration happens
 * before vCPUs start; lookups are lock-free afterwards. Handlers run on the
 * vCPU thread that exited; a device serialises its own state. */
#ifndef MDVM_BUS_H
#define MDVM_BUS_H
#include <stdbool.h>
#include <stdint.h>

struct vcpu;
/* data: len bytes (1, 2, 4 or 8), little-endian; fill it on reads. */
typedef void (*bus_io_fn)(void *opaque, struct vcpu *vcpu, uint64_t offset,
			  uint8_t *data, uint32_t len, bool is_write);

int  bus_register_pio(uint16_t base, uint16_t len, bus_io_fn fn, void *opaque);
int  bus_register_mmio(uint64_t base, uint64_t len, bus_io_fn fn, void *opaque);
/* Return false when nothing is registered at addr (reads then see all ones). */
bool bus_pio(struct vcpu *vcpu, uint16_t port, uint8_t *data, uint32_t len, bool is_write);
bool bus_mmio(struct vcpu *vcpu, uint64_t addr, uint8_t *data, uint32_t len, bool is_write);
#endif
