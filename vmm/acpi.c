/* ACPI tables, built once per boot in the reserved BIOS area below 1 MiB.
 * Hardware-reduced (as Firecracker and Cloud Hypervisor do): no PM1 event
 * blocks, no SCI, no FACS; power-off is a write of SLP_TYP|SLP_EN to the
 * sleep control register (devices/acpi_pm.c), reset goes to port 0xcf9.
 * A tiny AML encoder writes the few DSDT objects mdvm needs. */
#include <stdio.h>
#include <string.h>
#include "acpi.h"
#include "layout.h"
#include "../mm/mm.h"

#define ACPI_MAX_VIRTIO 16

static struct { uint64_t gpa, size; int irq; } virtio_devs[ACPI_MAX_VIRTIO];
static int nr_virtio;

void acpi_add_virtio_mmio(uint64_t gpa, uint64_t size, int irq)
{
	for (int i = 0; i < nr_virtio; i++)
		if (virtio_devs[i].gpa == gpa)
			return;   /* re-registered (a new VM in the same process) */
	if (nr_virtio < ACPI_MAX_VIRTIO)
		virtio_devs[nr_virtio++] = (typeof(virtio_devs[0])){ gpa, size, irq };
}

/* ---- AML: a byte buffer with nested PkgLength-prefixed packages */
struct aml {
	uint8_t *buf;
	size_t len, cap;
	bool overflow;
};

static void aml_byte(struct aml *a, uint8_t b)
{
	if (a->len < a->cap)
		a->buf[a->len] = b;
	else
		a->overflow = true;
	a->len++;
}

static void aml_bytes(struct aml *a, const void *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		aml_byte(a, ((const uint8_t *)p)[i]);
}

static void aml_le(struct aml *a, uint64_t v, int n)
{
	for (int i = 0; i < n; i++)
		aml_byte(a, v >> (8 * i));
}

/* Open a package: remember where its body starts; aml_end() inserts the
 * PkgLength in front of the body (ACPI 6.x §20.2.4). */
static size_t aml_begin(struct aml *a) { return a->len; }

static void aml_end(struct aml *a, size_t start)
{
	size_t body = a->len - start, n, total;
	uint8_t enc[4];

	n = body + 1 < 0x40 ? 1 : body + 2 < 0x1000 ? 2 : body + 3 < 0x100000 ? 3 : 4;
	total = body + n;
	if (n == 1) {
		enc[0] = total;
	} else {
		enc[0] = ((n - 1) << 6) | (total & 0xf);
		for (size_t i = 1; i < n; i++)
			enc[i] = total >> (4 + 8 * (i - 1));
	}
	for (size_t i = 0; i < n; i++)
		aml_byte(a, 0);   /* make room */
	if (!a->overflow) {
		memmove(a->buf + start + n, a->buf + start, body);
		memcpy(a->buf + start, enc, n);
	}
}

static void aml_integer(struct aml *a, uint64_t v)
{
	if (v == 0)
		aml_byte(a, 0x00);           /* ZeroOp */
	else if (v == 1)
		aml_byte(a, 0x01);           /* OneOp */
	else if (v <= 0xff)
		aml_byte(a, 0x0a), aml_le(a, v, 1);
	else if (v <= 0xffff)
		aml_byte(a, 0x0b), aml_le(a, v, 2);
	else if (v <= 0xffffffff)
		aml_byte(a, 0x0c), aml_le(a, v, 4);
	else
		aml_byte(a, 0x0e), aml_le(a, v, 8);
}

static void aml_name(struct aml *a, const char *name)   /* NameOp NameString */
{
	aml_byte(a, 0x08);
	aml_bytes(a, name, strlen(name));
}

static void aml_string(struct aml *a, const char *s)
{
	aml_byte(a, 0x0d);
	aml_bytes(a, s, strlen(s) + 1);
}

/* Device (name) { _HID EISAID, _UID, _CRS { IO (Decode16, port, port, 1, len), IRQNoFlags { irq } } }:
 * a legacy ISA device. Described so that Linux maps its IRQ through the
 * IOAPIC: with hardware-reduced ACPI there is no legacy PIC, so ISA IRQs
 * exist only for devices ACPI (or PNP) names. */
static void aml_isa_device(struct aml *a, const char *name, uint32_t eisa_id, uint16_t port,
			   uint8_t len, uint8_t irq)
{
	size_t dev, b;

	aml_byte(a, 0x5b);
	aml_byte(a, 0x82);
	dev = aml_begin(a);
	aml_bytes(a, name, 4);
	aml_name(a, "_HID");
	aml_byte(a, 0x0c);
	aml_le(a, eisa_id, 4);
	aml_name(a, "_UID");
	aml_integer(a, 1);
	aml_name(a, "_CRS");
	aml_byte(a, 0x11);
	b = aml_begin(a);
	aml_integer(a, 8 + 3 + 2);
	aml_bytes(a, "\x47\x01", 2);            /* IO, 16-bit decode */
	aml_le(a, port, 2);
	aml_le(a, port, 2);
	aml_byte(a, 1);
	aml_byte(a, len);
	aml_byte(a, 0x22);                       /* IRQNoFlags: edge, active high */
	aml_le(a, 1u << irq, 2);
	aml_bytes(a, "\x79\x00", 2);
	aml_end(a, b);
	aml_end(a, dev);
}

/* EISA ID "PNPxxxx": three 5-bit letters, then four hex digits, as bytes. */
#define EISA_PNP(hi, lo) (0xd041u | ((uint32_t)(hi) << 16) | ((uint32_t)(lo) << 24))

size_t acpi_dsdt_aml(uint8_t *buf, size_t len)
{
	struct aml a = { .buf = buf, .cap = len };
	size_t scope, pkg, dev, b;

	/* Name (\_S5, Package (4) { 5, 0, 0, 0 }): SLP_TYP 5 for S5. */
	aml_name(&a, "\\_S5_");
	aml_byte(&a, 0x12);
	pkg = aml_begin(&a);
	aml_byte(&a, 4);
	aml_integer(&a, 5);
	aml_integer(&a, 0);
	aml_integer(&a, 0);
	aml_integer(&a, 0);
	aml_end(&a, pkg);

	/* Scope (\_SB) { Device (VRnn) { _HID "LNRO0005", _UID, _CCA, _CRS } } */
	aml_byte(&a, 0x10);
	scope = aml_begin(&a);
	aml_bytes(&a, "\\_SB_", 5);
	aml_isa_device(&a, "COM1", EISA_PNP(0x05, 0x01), MDVM_COM1_PORT, 8, MDVM_COM1_IRQ);
	aml_isa_device(&a, "RTC_", EISA_PNP(0x0b, 0x00), MDVM_RTC_PORT, 2, MDVM_RTC_IRQ);
	for (int i = 0; i < nr_virtio; i++) {
		char name[5];

		snprintf(name, sizeof(name), "VR%02X", i);
		aml_byte(&a, 0x5b);
		aml_byte(&a, 0x82);          /* DeviceOp */
		dev = aml_begin(&a);
		aml_bytes(&a, name, 4);
		aml_name(&a, "_HID");
		aml_string(&a, "LNRO0005");
		aml_name(&a, "_UID");
		aml_integer(&a, i);
		aml_name(&a, "_CCA");        /* DMA is cache coherent */
		aml_integer(&a, 1);
		aml_name(&a, "_CRS");
		aml_byte(&a, 0x11);          /* BufferOp */
		b = aml_begin(&a);
		aml_integer(&a, 12 + 9 + 2);
		/* Memory32Fixed (ReadWrite, gpa, size) */
		aml_bytes(&a, "\x86\x09\x00\x01", 4);
		aml_le(&a, virtio_devs[i].gpa, 4);
		aml_le(&a, virtio_devs[i].size, 4);
		/* Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { irq } */
		aml_bytes(&a, "\x89\x06\x00\x03\x01", 5);
		aml_le(&a, virtio_devs[i].irq, 4);
		aml_bytes(&a, "\x79\x00", 2);   /* EndTag */
		aml_end(&a, b);
		aml_end(&a, dev);
	}
	aml_end(&a, scope);
	return a.overflow ? 0 : a.len;
}

/* ---- tables */
struct acpi_header {
	char signature[4];
	uint32_t length;
	uint8_t revision, checksum;
	char oem_id[6], oem_table_id[8];
	uint32_t oem_revision;
	char creator_id[4];
	uint32_t creator_revision;
} __attribute__((packed));

struct acpi_gas {
	uint8_t space_id, bit_width, bit_offset, access_size;
	uint64_t address;
} __attribute__((packed));

static uint8_t acpi_sum(const void *p, size_t n)
{
	uint8_t s = 0;
	for (size_t i = 0; i < n; i++)
		s += ((const uint8_t *)p)[i];
	return s;
}

static void acpi_header(void *table, const char *sig, uint32_t len, uint8_t rev)
{
	struct acpi_header *h = table;

	memcpy(h->signature, sig, 4);
	h->length = len;
	h->revision = rev;
	memcpy(h->oem_id, "MDVM  ", 6);
	memcpy(h->oem_table_id, "MDVMTBL ", 8);
	h->oem_revision = 1;
	memcpy(h->creator_id, "MDVM", 4);
	h->creator_revision = 1;
	h->checksum = 0;
	h->checksum = -acpi_sum(table, len);
}

#define IO_GAS(port) ((struct acpi_gas){ .space_id = 1, .bit_width = 8, .access_size = 1, .address = (port) })

uint64_t acpi_build(struct guest_mem *gm, int ncpus, char *err, size_t errlen)
{
	static uint8_t t[MDVM_ACPI_SIZE];
	const uint64_t base = MDVM_ACPI_GPA;
	size_t off_xsdt = 0x40, off_fadt = 0x80, off_madt = 0x200, off_dsdt, len;
	uint8_t *p;

	memset(t, 0, sizeof(t));

	/* MADT: local APIC per vCPU (ID = index), LINT1 as NMI, the IOAPIC. */
	p = t + off_madt;
	len = 44;
	memcpy(p + 36, &(uint32_t){ (uint32_t)MDVM_LAPIC_GPA }, 4);
	memcpy(p + 40, &(uint32_t){ 0 }, 4);          /* no dual 8259 to mask */
	for (int i = 0; i < ncpus; i++) {
		uint8_t *e = p + len;
		e[0] = 0; e[1] = 8; e[2] = i; e[3] = i;
		memcpy(e + 4, &(uint32_t){ 1 }, 4);      /* enabled */
		len += 8;
	}
	{
		uint8_t *e = p + len;                     /* IOAPIC, id 0, GSI base 0 */
		e[0] = 1; e[1] = 12; e[2] = 0; e[3] = 0;
		memcpy(e + 4, &(uint32_t){ (uint32_t)MDVM_IOAPIC_GPA }, 4);
		memcpy(e + 8, &(uint32_t){ 0 }, 4);
		len += 12;
		e = p + len;                              /* local APIC NMI: all CPUs, LINT1 */
		e[0] = 4; e[1] = 6; e[2] = 0xff; e[3] = 0; e[4] = 0; e[5] = 1;
		len += 6;
	}
	acpi_header(p, "APIC", len, 5);
	off_dsdt = (off_madt + len + 63) & ~63UL;

	/* DSDT */
	len = acpi_dsdt_aml(t + off_dsdt + 36, sizeof(t) - off_dsdt - 36);
	if (!len) {
		snprintf(err, errlen, "ACPI tables do not fit in %llu KiB", MDVM_ACPI_SIZE >> 10);
		return 0;
	}
	acpi_header(t + off_dsdt, "DSDT", 36 + len, 2);

	/* FADT, revision 6 (ACPI 6.0), hardware-reduced. */
	p = t + off_fadt;
	memcpy(p + 40, &(uint32_t){ (uint32_t)(base + off_dsdt) }, 4);       /* DSDT */
	memcpy(p + 109, &(uint16_t){ 1u << 2 }, 2);                            /* IAPC: no VGA */
	memcpy(p + 112, &(uint32_t){ (1u << 0) | (1u << 4) | (1u << 5) | (1u << 10) | (1u << 20) }, 4);
	memcpy(p + 116, &IO_GAS(MDVM_RESET_PORT), 12);                        /* RESET_REG */
	p[128] = 0x06;                                                         /* RESET_VALUE */
	memcpy(p + 140, &(uint64_t){ base + off_dsdt }, 8);                   /* X_DSDT */
	memcpy(p + 244, &IO_GAS(MDVM_ACPI_SLEEP_PORT), 12);                   /* SLEEP_CONTROL */
	memcpy(p + 256, &IO_GAS(MDVM_ACPI_SLEEP_PORT + 1), 12);               /* SLEEP_STATUS */
	memcpy(p + 268, "mdvm\0\0\0\0", 8);                                   /* hypervisor id */
	acpi_header(p, "FACP", 276, 6);

	/* XSDT -> FADT, MADT */
	p = t + off_xsdt;
	memcpy(p + 36, &(uint64_t){ base + off_fadt }, 8);
	memcpy(p + 44, &(uint64_t){ base + off_madt }, 8);
	acpi_header(p, "XSDT", 52, 1);

	/* RSDP (ACPI 2.0+): checksum over the first 20 bytes, then all 36. */
	p = t;
	memcpy(p, "RSD PTR ", 8);
	memcpy(p + 9, "MDVM  ", 6);
	p[15] = 2;
	memcpy(p + 20, &(uint32_t){ 36 }, 4);
	memcpy(p + 24, &(uint64_t){ base + off_xsdt }, 8);
	p[8] = -acpi_sum(p, 20);
	p[32] = -acpi_sum(p, 36);

	mm_mark_reserved(gm, base, MDVM_ACPI_SIZE);
	if (mm_write(gm, base, t, off_dsdt + 36 + len) < 0) {
		snprintf(err, errlen, "cannot write the ACPI tables into guest RAM");
		return 0;
	}
	return base;
}
