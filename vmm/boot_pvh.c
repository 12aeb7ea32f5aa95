/* PVH boot: load the PT_LOAD segments of an ELF kernel at their physical
 * addresses and describe memory and the command line in hvm_start_info
 * (xen/include/public/arch-x86/hvm/start_info.h). */
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include "boot.h"
#include "layout.h"
#include "../mm/mm.h"

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define HVM_START_MAGIC 0x336ec578

struct hvm_start_info {
	uint32_t magic, version, flags, nr_modules;
	uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
	uint32_t memmap_entries, reserved;
};

struct hvm_memmap_table_entry {
	uint64_t addr, size;
	uint32_t type, reserved;
};

#define BERR(...) ({ snprintf(err, errlen, __VA_ARGS__); -1; })

/* Find the PVH entry in the notes of [p, p+len). */
static int find_pvh_note(const uint8_t *p, size_t len, uint64_t *entry)
{
	size_t off = 0;

	while (off + sizeof(Elf64_Nhdr) <= len) {
		const Elf64_Nhdr *n = (const void *)(p + off);
		size_t name = off + sizeof(*n);
		size_t desc = name + ((n->n_namesz + 3) & ~3u);
		size_t next = desc + ((n->n_descsz + 3) & ~3u);

		if (next > len || next <= off)
			return -1;
		if (n->n_type == XEN_ELFNOTE_PHYS32_ENTRY && n->n_namesz == 4 &&
		    !memcmp(p + name, "Xen", 4)) {
			if (n->n_descsz == 4)
				*entry = *(const uint32_t *)(p + desc);
			else if (n->n_descsz == 8)
				*entry = *(const uint64_t *)(p + desc);
			else
				return -1;
			return 0;
		}
		off = next;
	}
	return -1;
}

struct hvm_modlist_entry {
	uint64_t paddr, size, cmdline_paddr, reserved;
};

/* The e820 map, read off the memdesc types: pages typed reserved (boot
 * structures, ACPI, the legacy BIOS range below 1 MiB) are E820 reserved, all
 * other guest RAM is E820 RAM. Loaders mark their areas reserved first, so
 * the guest's map and mdvm's own view cannot disagree. */
size_t boot_memmap(struct guest_mem *gm, struct boot_e820 *map, size_t max)
{
	struct mm_range ram[8];
	size_t nram = mm_ram_ranges(gm, ram, 8), n = 0;

	/* EBDA, VGA, BIOS; the ACPI tables live here too. */
	mm_mark_reserved(gm, MDVM_LEGACY_START, MDVM_LEGACY_END - MDVM_LEGACY_START);
	for (size_t i = 0; i < nram && i < 8; i++) {
		uint64_t g = ram[i].gpa >> MM_PAGE_SHIFT, end = (ram[i].gpa + ram[i].size) >> MM_PAGE_SHIFT;
		uint64_t run = g;
		bool run_resv = false;
		while (g < end) {
			memdesc_t md;
			uint64_t next;
			bool resv;
			if (memdesc_region_uniform(gm, g, &md)) {
				next = (g | (MM_REGION_PAGES - 1)) + 1;
			} else {
				md = memdesc_lookup(gm, g);
				next = g + 1;
			}
			if (next > end)
				next = end;
			resv = memdesc_type(md) == MEMDESC_RESERVED;
			if (resv != run_resv && g > run) {
				if (n < max)
					map[n++] = (struct boot_e820){ run << MM_PAGE_SHIFT, (g - run) << MM_PAGE_SHIFT,
								       run_resv ? BOOT_E820_RESERVED : BOOT_E820_RAM };
				run = g;
			}
			run_resv = resv;
			g = next;
		}
		if (end > run && n < max)
			map[n++] = (struct boot_e820){ run << MM_PAGE_SHIFT, (end - run) << MM_PAGE_SHIFT,
						       run_resv ? BOOT_E820_RESERVED : BOOT_E820_RAM };
	}
	return n;
}

int boot_load_initrd(struct guest_mem *gm, const char *path, uint64_t min, uint64_t max_end,
		     uint64_t *gpa, uint64_t *size, char *err, size_t errlen)
{
	struct mm_range ram[8];
	size_t nram = mm_ram_ranges(gm, ram, 8);
	uint64_t top = 0, start;
	struct stat st;
	void *p;
	int fd;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return BERR("initrd '%s': %s", path, strerror(errno));
	if (fstat(fd, &st) < 0) {
		close(fd);
		return BERR("initrd '%s': %s", path, strerror(errno));
	}
	/* The RAM range holding min (low memory) bounds where the initrd may go. */
	for (size_t i = 0; i < nram; i++)
		if (ram[i].gpa <= min && min < ram[i].gpa + ram[i].size)
			top = ram[i].gpa + ram[i].size;
	if (top > max_end)
		top = max_end;
	start = ((top > (uint64_t)st.st_size ? top - st.st_size : 0)) & ~(MDVM_PAGE_SIZE - 1);
	if (top == 0 || (uint64_t)st.st_size > top || start < min) {
		close(fd);
		return BERR("initrd '%s' (%llu KiB) does not fit in guest RAM between the kernel's end "
			    "(0x%llx) and 0x%llx; give more --memory (at least %llu MiB)", path,
			    (unsigned long long)(st.st_size >> 10), (unsigned long long)min,
			    (unsigned long long)top,
			    (unsigned long long)((min + st.st_size + (4 << 20) + (1 << 20) - 1) >> 20));
	}
	*gpa = start;
	*size = st.st_size;
	if (st.st_size == 0) {
		close(fd);
		return 0;
	}
	p = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	close(fd);
	if (p == MAP_FAILED)
		return BERR("initrd '%s': %s", path, strerror(errno));
	if (mm_write(gm, start, p, st.st_size) < 0) {
		munmap(p, st.st_size);
		return BERR("initrd '%s': cannot write it into guest RAM at 0x%llx", path,
			    (unsigned long long)start);
	}
	munmap(p, st.st_size);
	return 0;
}

static int write_start_info(struct guest_mem *gm, const struct boot_args *a, struct boot_image *img,
			    char *err, size_t errlen)
{
	struct boot_e820 e820[MDVM_BOOT_MEMMAP_MAX];
	struct hvm_memmap_table_entry map[MDVM_BOOT_MEMMAP_MAX];
	mm_mark_reserved(gm, MDVM_BOOT_AREA_START, MDVM_BOOT_AREA_END - MDVM_BOOT_AREA_START);
	size_t n = boot_memmap(gm, e820, MDVM_BOOT_MEMMAP_MAX);
	struct hvm_start_info si = { .magic = HVM_START_MAGIC, .version = 1, .rsdp_paddr = a->rsdp };
	struct hvm_modlist_entry mod = { 0 };
	const char *cmdline = a->cmdline;
	size_t clen = cmdline ? strlen(cmdline) : 0;

	for (size_t i = 0; i < n; i++)
		map[i] = (struct hvm_memmap_table_entry){ e820[i].addr, e820[i].size, e820[i].type, 0 };
	if (clen >= MDVM_BOOT_CMDLINE_MAX)
		return BERR("command line too long (%zu bytes, max %d)", clen, MDVM_BOOT_CMDLINE_MAX - 1);
	if (a->initrd) {
		if (boot_load_initrd(gm, a->initrd, (img->load_end + MDVM_PAGE_SIZE - 1) & ~(MDVM_PAGE_SIZE - 1),
				     MDVM_MMIO_HOLE_START, &img->initrd_gpa, &img->initrd_size, err, errlen) < 0)
			return -1;
		mod.paddr = img->initrd_gpa;
		mod.size = img->initrd_size;
		si.nr_modules = 1;
		si.modlist_paddr = MDVM_BOOT_MODLIST_GPA;
	}
	si.cmdline_paddr = clen ? MDVM_BOOT_CMDLINE_GPA : 0;
	si.memmap_paddr = MDVM_BOOT_MEMMAP_GPA;
	si.memmap_entries = n;
	if (mm_write(gm, MDVM_BOOT_INFO_GPA, &si, sizeof(si)) < 0 ||
	    mm_write(gm, MDVM_BOOT_MEMMAP_GPA, map, n * sizeof(map[0])) < 0 ||
	    mm_write(gm, MDVM_BOOT_MODLIST_GPA, &mod, sizeof(mod)) < 0 ||
	    (clen && mm_write(gm, MDVM_BOOT_CMDLINE_GPA, cmdline, clen + 1) < 0))
		return BERR("cannot write boot information into guest memory");
	return 0;
}

int boot_load_pvh(struct guest_mem *gm, const struct boot_args *a, struct boot_image *img,
		  char *err, size_t errlen)
{
	const char *path = a->kernel;
	struct stat st;
	uint8_t *p;
	const Elf64_Ehdr *eh;
	int fd, ret = -1;
	bool have_entry = false;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return BERR("kernel '%s': %s", path, strerror(errno));
	if (fstat(fd, &st) < 0 || st.st_size < (off_t)sizeof(Elf64_Ehdr)) {
		close(fd);
		return BERR("kernel '%s': not an ELF file or a Linux bzImage (too small)", path);
	}
	p = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	close(fd);
	if (p == MAP_FAILED)
		return BERR("kernel '%s': %s", path, strerror(errno));
	eh = (const void *)p;
	if (memcmp(eh->e_ident, ELFMAG, SELFMAG)) {
		BERR("kernel '%s': not an ELF file or a Linux bzImage", path);
		goto out;
	}
	if (eh->e_ident[EI_CLASS] != ELFCLASS64 || eh->e_machine != EM_X86_64) {
		BERR("kernel '%s': not a 64-bit x86 ELF", path);
		goto out;
	}
	if (eh->e_phoff > (uint64_t)st.st_size ||
	    eh->e_phentsize != sizeof(Elf64_Phdr) ||
	    eh->e_phnum > ((uint64_t)st.st_size - eh->e_phoff) / sizeof(Elf64_Phdr)) {
		BERR("kernel '%s': corrupt program headers", path);
		goto out;
	}
	for (int i = 0; i < eh->e_phnum && !have_entry; i++) {
		const Elf64_Phdr *ph = (const void *)(p + eh->e_phoff + i * sizeof(Elf64_Phdr));
		if (ph->p_type == PT_NOTE && ph->p_offset <= (uint64_t)st.st_size &&
		    ph->p_filesz <= (uint64_t)st.st_size - ph->p_offset)
			have_entry = !find_pvh_note(p + ph->p_offset, ph->p_filesz, &img->entry);
	}
	if (!have_entry) {
		BERR("kernel '%s': no PVH entry point (ELF note XEN_ELFNOTE_PHYS32_ENTRY)", path);
		goto out;
	}
	img->load_start = UINT64_MAX;
	img->load_end = 0;
	for (int i = 0; i < eh->e_phnum; i++) {
		const Elf64_Phdr *ph = (const void *)(p + eh->e_phoff + i * sizeof(Elf64_Phdr));

		if (ph->p_offset > (uint64_t)st.st_size || ph->p_filesz > (uint64_t)st.st_size - ph->p_offset) {
			BERR("kernel '%s': segment %d extends past the end of the file", path, i);
			goto out;
		}
		if (ph->p_type != PT_LOAD || ph->p_memsz == 0)
			continue;
		uint64_t seg_end = ph->p_paddr + ph->p_memsz;
		if (ph->p_filesz <= ph->p_memsz && seg_end > ph->p_paddr && seg_end <= MDVM_MMIO_HOLE_START &&
		    !mm_gpa_to_hva(gm, ph->p_paddr, ph->p_memsz)) {
			/* Fits below the hole, just not in this much RAM. */
			BERR("kernel '%s': guest memory too small: segment %d needs [0x%llx-0x%llx), RAM "
			     "ends at 0x%llx; give --memory of at least %llu MiB", path, i,
			     (unsigned long long)ph->p_paddr, (unsigned long long)seg_end,
			     (unsigned long long)mm_ram_size(gm),
			     (unsigned long long)((seg_end + (64 << 20)) >> 20));
			goto out;
		}
		if (ph->p_filesz > ph->p_memsz || ph->p_paddr + ph->p_memsz < ph->p_paddr ||
		    !mm_gpa_to_hva(gm, ph->p_paddr, ph->p_memsz)) {
			BERR("kernel '%s': segment %d [0x%llx-0x%llx) is not in guest RAM", path, i,
			     (unsigned long long)ph->p_paddr, (unsigned long long)(ph->p_paddr + ph->p_memsz));
			goto out;
		}
		if (ph->p_paddr < MDVM_BOOT_AREA_END && ph->p_paddr + ph->p_memsz > MDVM_BOOT_AREA_START) {
			BERR("kernel '%s': segment %d overlaps the boot area [0x%llx-0x%llx)", path, i,
			     MDVM_BOOT_AREA_START, MDVM_BOOT_AREA_END);
			goto out;
		}
		if (mm_write(gm, ph->p_paddr, p + ph->p_offset, ph->p_filesz) < 0) {
			BERR("kernel '%s': cannot write segment %d", path, i);
			goto out;
		}
		/* .bss: guest RAM may hold an earlier run's data (reset). */
		if (ph->p_memsz > ph->p_filesz) {
			uint64_t gpa = ph->p_paddr + ph->p_filesz, left = ph->p_memsz - ph->p_filesz;
			static const uint8_t zero[4096];
			while (left) {
				uint64_t n = left < sizeof(zero) ? left : sizeof(zero);
				mm_write(gm, gpa, zero, n);
				gpa += n;
				left -= n;
			}
		}
		if (ph->p_paddr < img->load_start)
			img->load_start = ph->p_paddr;
		if (ph->p_paddr + ph->p_memsz > img->load_end)
			img->load_end = ph->p_paddr + ph->p_memsz;
	}
	if (img->load_end == 0) {
		BERR("kernel '%s': no loadable segments", path);
		goto out;
	}
	img->mode = BOOT_MODE_PVH;
	ret = write_start_info(gm, a, img, err, errlen);
out:
	munmap(p, st.st_size);
	return ret;
}
