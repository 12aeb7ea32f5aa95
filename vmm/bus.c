/* Port-I/O and MMIO dispatch. Devices register before the vCPUs start, so
 * the tables are read without locks afterwards. */
#include <errno.h>
#include <string.h>
#include "bus.h"

#define BUS_MAX 32

struct bus_range {
	uint64_t base, len;
	bus_io_fn fn;
	void *opaque;
};

struct bus {
	struct bus_range r[BUS_MAX];
	int n;
};

static struct bus pio_bus, mmio_bus;

static int bus_add(struct bus *b, uint64_t base, uint64_t len, bus_io_fn fn, void *opaque)
{
	if (b->n == BUS_MAX || len == 0) {
		errno = ENOSPC;
		return -1;
	}
	for (int i = 0; i < b->n; i++)
		if (base < b->r[i].base + b->r[i].len && b->r[i].base < base + len) {
			errno = EEXIST;
			return -1;
		}
	b->r[b->n++] = (struct bus_range){ base, len, fn, opaque };
	return 0;
}

static bool bus_dispatch(struct bus *b, struct vcpu *vcpu, uint64_t addr, uint8_t *data,
			 uint32_t len, bool is_write)
{
	for (int i = 0; i < b->n; i++) {
		struct bus_range *r = &b->r[i];
		if (addr >= r->base && addr - r->base < r->len) {
			r->fn(r->opaque, vcpu, addr - r->base, data, len, is_write);
			return true;
		}
	}
	if (!is_write)
		memset(data, 0xff, len);
	return false;
}

int bus_register_pio(uint16_t base, uint16_t len, bus_io_fn fn, void *opaque)
{
	return bus_add(&pio_bus, base, len, fn, opaque);
}

int bus_register_mmio(uint64_t base, uint64_t len, bus_io_fn fn, void *opaque)
{
	return bus_add(&mmio_bus, base, len, fn, opaque);
}

bool bus_pio(struct vcpu *vcpu, uint16_t port, uint8_t *data, uint32_t len, bool is_write)
{
	return bus_dispatch(&pio_bus, vcpu, port, data, len, is_write);
}

bool bus_mmio(struct vcpu *vcpu, uint64_t addr, uint8_t *data, uint32_t len, bool is_write)
{
	return bus_dispatch(&mmio_bus, vcpu, addr, data, len, is_write);
}
