/* Ports through which the guest ends the VM: the debug-exit port (exit code),
 * the ACPI-style power-off port and the reset control register. */
#include <string.h>
#include "devices.h"
#include "../vmm/bus.h"
#include "../vmm/layout.h"
#include "../vmm/util.h"
#include "../vmm/vm.h"

static void debug_exit_io(void *opaque, struct vcpu *vcpu, uint64_t off, uint8_t *data,
			  uint32_t len, bool is_write)
{
	if (!is_write) {
		memset(data, 0xff, len);
		return;
	}
	vm_request_exit(opaque, data[0], "guest wrote to the debug-exit port");
}

static void poweroff_io(void *opaque, struct vcpu *vcpu, uint64_t off, uint8_t *data,
			uint32_t len, bool is_write)
{
	uint16_t v = data[0] | (len > 1 ? data[1] << 8 : 0);

	if (!is_write) {
		memset(data, 0, len);
		return;
	}
	/* PM1a_CNT: SLP_EN (bit 13) with SLP_TYP 0 (S5), as QEMU's PIIX4. */
	if (off == 0 && len >= 2 && (v & 0x2000))
		vm_request_exit(opaque, 0, "guest powered off");
}

static void reset_io(void *opaque, struct vcpu *vcpu, uint64_t off, uint8_t *data,
		     uint32_t len, bool is_write)
{
	if (!is_write) {
		memset(data, 0, len);
		return;
	}
	if (data[0] & 0x04) {
		pr_info("guest reset through port 0xcf9 (ACPI reset register)");
		vm_guest_reset(opaque);
	}
}

int power_create(struct vm *vm)
{
	if (bus_register_pio(MDVM_DEBUG_EXIT_PORT, 2, debug_exit_io, vm) < 0 ||
	    bus_register_pio(MDVM_POWEROFF_PORT, 2, poweroff_io, vm) < 0 ||
	    bus_register_pio(MDVM_RESET_PORT, 1, reset_io, vm) < 0)
		return -1;
	return 0;
}
