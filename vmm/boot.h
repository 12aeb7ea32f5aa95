/* Guest kernel loading. */
#ifndef MDVM_BOOT_H
#define MDVM_BOOT_H
#include <stddef.h>
#include <stdint.h>

struct guest_mem;

struct boot_image {
	uint64_t entry;        /* 32-bit PVH entry point (guest physical) */
	uint64_t load_start, load_end;
};

/* Load an ELF kernel with a XEN_ELFNOTE_PHYS32_ENTRY note into guest RAM and
 * write the PVH hvm_start_info, memory map and command line. */
int boot_load_pvh(struct guest_mem *gm, const char *path, const char *cmdline,
		  struct boot_image *img, char *err, size_t errlen);
#endif
