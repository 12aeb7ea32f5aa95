/* Guest-physical layout and fixed I/O addresses shared by the VMM, devices
 * and (by copy in guest/) the test guest. Changing one means changing docs/. */
#ifndef MDVM_LAYOUT_H
#define MDVM_LAYOUT_H

#define MDVM_PAGE_SIZE          4096ULL

/* Boot structures written by the PVH loader; the page range is "reserved". */
#define MDVM_BOOT_INFO_GPA      0x6000ULL   /* struct hvm_start_info */
#define MDVM_BOOT_MEMMAP_GPA    0x6100ULL   /* hvm_memmap_table_entry[] */
#define MDVM_BOOT_MEMMAP_MAX    64
#define MDVM_BOOT_GDT_GPA       0x6f00ULL   /* flat 32-bit GDT for the PVH entry state */
#define MDVM_BOOT_CMDLINE_GPA   0x7000ULL
#define MDVM_BOOT_CMDLINE_MAX   4096        /* including the NUL */
#define MDVM_BOOT_AREA_START    0x6000ULL
#define MDVM_BOOT_AREA_END      0x8000ULL
#define MDVM_BOOT_MODLIST_GPA   0x6e00ULL   /* hvm_modlist_entry (the initrd) */

/* Linux 64-bit boot protocol (bzImage): zero page, GDT, identity page tables
 * (0-4 GiB, 2 MiB pages), command line. Reserved in the e820 map. */
#define MDVM_LINUX_AREA_START   0x10000ULL
#define MDVM_LINUX_ZERO_PAGE    0x10000ULL
#define MDVM_LINUX_GDT          0x11000ULL
#define MDVM_LINUX_PML4         0x12000ULL  /* PDPT at +0x1000, 4 PDs after it */
#define MDVM_LINUX_CMDLINE      0x18000ULL
#define MDVM_LINUX_AREA_END     0x19000ULL

/* Legacy firmware range (EBDA, VGA, BIOS), reserved in the e820 map. */
#define MDVM_LEGACY_START       0x9F000ULL
#define MDVM_LEGACY_END         0x100000ULL

/* ACPI tables (RSDP first, where Linux also scans for it), in the reserved
 * BIOS area below 1 MiB. */
#define MDVM_ACPI_GPA           0xE0000ULL
#define MDVM_ACPI_SIZE          0x10000ULL

/* 32-bit MMIO hole below 4 GiB: RAM above it is relocated to 4 GiB. */
#define MDVM_MMIO_HOLE_START    0xC0000000ULL
#define MDVM_MMIO_HOLE_END      0x100000000ULL

/* virtio-mmio transports (docs/virtio.md): device i at MDVM_VIRTIO_MMIO_GPA +
 * i * MDVM_VIRTIO_MMIO_SIZE, edge-triggered on IOAPIC pin MDVM_VIRTIO_IRQ + i.
 * Device 0 is the balloon. Passed to the guest as virtio_mmio.device=. */
#define MDVM_VIRTIO_MMIO_GPA    0xFEB01000ULL
#define MDVM_VIRTIO_MMIO_SIZE   0x1000ULL
#define MDVM_VIRTIO_IRQ         5

/* Paravirtual test device (MMIO mailbox), see docs/test-guest.md. */
#define MDVM_TESTDEV_GPA        0xFEB00000ULL
#define MDVM_TESTDEV_SIZE       0x1000ULL

/* Port I/O */
#define MDVM_COM1_PORT          0x3f8
#define MDVM_COM1_IRQ           4
#define MDVM_DEBUG_EXIT_PORT    0x501   /* out8/out32 v: mdvm exits with status v & 0xff */
#define MDVM_POWEROFF_PORT      0x604   /* out16 0x2000: power off (as QEMU's PIIX4 PM) */
#define MDVM_RESET_PORT         0xcf9   /* out8 0x06/0x0e: system reset */
#define MDVM_RTC_PORT           0x70    /* CMOS index, 0x71 data */
#define MDVM_RTC_IRQ            8
#define MDVM_ACPI_SLEEP_PORT    0x610   /* FADT SLEEP_CONTROL_REG (8 bit), +1 SLEEP_STATUS_REG */

/* In-kernel irqchip (KVM_CREATE_IRQCHIP) */
#define MDVM_IOAPIC_GPA         0xFEC00000ULL
#define MDVM_LAPIC_GPA          0xFEE00000ULL
#define MDVM_IOAPIC_PINS        24

#endif
