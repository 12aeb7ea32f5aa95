/* Guest kernel loading: an ELF with a PVH entry note (boot_pvh.c) or a Linux
 * bzImage through the x86 64-bit boot protocol (boot_linux.c). */
#ifndef MDVM_BOOT_H
#define MDVM_BOOT_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct guest_mem;

enum boot_mode {
	BOOT_MODE_PVH = 0,     /* 32-bit protected mode, EBX = hvm_start_info */
	BOOT_MODE_LINUX64,     /* 64-bit long mode, RSI = zero page (boot_params) */
};

struct boot_image {
	enum boot_mode mode;
	uint64_t entry;        /* guest-physical entry point */
	uint64_t load_start, load_end;
	uint64_t initrd_gpa, initrd_size;   /* 0 when there is none */
};

struct boot_args {
	const char *kernel, *initrd, *cmdline;  /* initrd, cmdline may be NULL */
	uint64_t rsdp;                          /* ACPI RSDP, 0 if none */
};

/* Load the kernel (format from its first bytes), the initrd, the command line
 * and the memory map into guest RAM. */
int boot_load(struct guest_mem *gm, const struct boot_args *a, struct boot_image *img,
	      char *err, size_t errlen);
int boot_load_pvh(struct guest_mem *gm, const struct boot_args *a, struct boot_image *img,
		  char *err, size_t errlen);
int boot_load_linux(struct guest_mem *gm, const struct boot_args *a, struct boot_image *img,
		    char *err, size_t errlen);
/* Register state of the boot vCPU for BOOT_MODE_LINUX64. */
int boot_linux_set_vcpu(int vcpu_fd, const struct boot_image *img, char *err, size_t errlen);

/* Memory map (e820 types): guest RAM minus the ranges mdvm reserves. */
#define BOOT_E820_RAM      1
#define BOOT_E820_RESERVED 2
struct boot_e820 { uint64_t addr, size; uint32_t type; };
size_t boot_memmap(struct guest_mem *gm, struct boot_e820 *map, size_t max);

/* Copy `path` into the top of low guest RAM: the highest page-aligned start
 * with [start, start+size) inside [min, max_end). */
int boot_load_initrd(struct guest_mem *gm, const char *path, uint64_t min, uint64_t max_end,
		     uint64_t *gpa, uint64_t *size, char *err, size_t errlen);
#endif
