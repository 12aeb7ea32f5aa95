/* ACPI tables for guests that use them (Linux): RSDP, XSDT, a hardware-reduced
 * FADT (power-off through the sleep control register), MADT (one local APIC
 * per vCPU, the in-kernel IOAPIC) and a DSDT with \_S5, COM1, the RTC and one LNRO0005
 * device per virtio-mmio transport. */
#ifndef MDVM_ACPI_H
#define MDVM_ACPI_H
#include <stddef.h>
#include <stdint.h>

struct guest_mem;

/* Describe a virtio-mmio transport in the DSDT (call before acpi_build;
 * devices do so when they are created). Edge-triggered, active high. */
void acpi_add_virtio_mmio(uint64_t gpa, uint64_t size, int irq);

/* Write the tables at MDVM_ACPI_GPA; returns the RSDP's address, 0 on failure. */
uint64_t acpi_build(struct guest_mem *gm, int ncpus, char *err, size_t errlen);

/* Encode the DSDT body (AML after the header) into buf; returns its length
 * or 0 if buf is too small. Exposed for tests. */
size_t acpi_dsdt_aml(uint8_t *buf, size_t len);
#endif
