/* Hardware-reduced ACPI sleep registers (FADT SLEEP_CONTROL_REG and
 * SLEEP_STATUS_REG, ACPI 6.x §4.8.3.7): the guest powers off by writing
 * SLP_EN with the SLP_TYP of \_S5 (vmm/acpi.c). */
#include <string.h>
#include "devices.h"
#include "../vmm/bus.h"
#include "../vmm/layout.h"
#include "../vmm/vm.h"

#define SLP_EN        0x20
#define SLP_TYP_SHIFT 2
#define SLP_TYP_MASK  0x1c
#define SLP_TYP_S5    5      /* must match \_S5 in the DSDT */

static void acpi_sleep_io(void *opaque, struct vcpu *vcpu, uint64_t off, uint8_t *data,
			  uint32_t len, bool is_write)
{
	if (!is_write) {
		memset(data, 0, len);    /* WAK_STS never set: no sleep state to wake from */
		return;
	}
	if (off == 0 && (data[0] & SLP_EN) &&
	    ((data[0] & SLP_TYP_MASK) >> SLP_TYP_SHIFT) == SLP_TYP_S5)
		vm_request_exit(opaque, 0, "guest powered off");
}

int acpi_pm_create(struct vm *vm)
{
	return bus_register_pio(MDVM_ACPI_SLEEP_PORT, 2, acpi_sleep_io, vm);
}
