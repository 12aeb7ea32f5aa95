/* Linux bzImage through the x86 64-bit boot protocol
 * (Documentation/arch/x86/boot.rst): the protected-mode kernel at its
 * preferred address, a zero page (struct boot_params) with the setup header,
 * e820 map, command line and initrd, and the vCPU in long mode on an identity
 * map at load address + 0x200 with RSI = zero page. */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include "boot.h"
#include "layout.h"
#include "../mm/mm.h"

/* Setup header fields: offsets in the file and in the zero page alike. */
#define HDR_SETUP_SECTS    0x1f1
#define HDR_SYSSIZE        0x1f4   /* protected-mode code, 16-byte units */
#define HDR_BOOT_FLAG      0x1fe
#define HDR_JUMP           0x200
#define HDR_HEADER         0x202
#define HDR_VERSION        0x206
#define HDR_TYPE_OF_LOADER 0x210
#define HDR_LOADFLAGS      0x211
#define HDR_RAMDISK_IMAGE  0x218
#define HDR_RAMDISK_SIZE   0x21c
#define HDR_CMD_LINE_PTR   0x228
#define HDR_INITRD_MAX     0x22c
#define HDR_KERNEL_ALIGN   0x230
#define HDR_RELOCATABLE    0x234
#define HDR_XLOADFLAGS     0x236
#define HDR_CMDLINE_SIZE   0x238
#define HDR_PREF_ADDRESS   0x258
#define HDR_INIT_SIZE      0x260
/* Zero page only */
#define BP_ACPI_RSDP       0x070
#define BP_EXT_RAMDISK_IMAGE 0x0c0
#define BP_EXT_RAMDISK_SIZE  0x0c4
#define BP_EXT_CMD_LINE_PTR  0x0c8
#define BP_E820_ENTRIES    0x1e8
#define BP_E820_TABLE      0x2d0
#define BP_E820_MAX        128

#define LOADED_HIGH        0x01
#define XLF_KERNEL_64      0x01
#define BOOT_FLAG_MAGIC    0xaa55
#define HDRS_MAGIC         0x53726448   /* "HdrS" */

#define BERR(...) ({ snprintf(err, errlen, __VA_ARGS__); -1; })

static uint16_t get16(const uint8_t *p, size_t off) { uint16_t v; memcpy(&v, p + off, 2); return v; }
static uint32_t get32(const uint8_t *p, size_t off) { uint32_t v; memcpy(&v, p + off, 4); return v; }
static uint64_t get64(const uint8_t *p, size_t off) { uint64_t v; memcpy(&v, p + off, 8); return v; }
static void put32(uint8_t *p, size_t off, uint32_t v) { memcpy(p + off, &v, 4); }
static void put64(uint8_t *p, size_t off, uint64_t v) { memcpy(p + off, &v, 8); }

static bool is_bzimage(const uint8_t *p, size_t len)
{
	return len >= 0x300 && get16(p, HDR_BOOT_FLAG) == BOOT_FLAG_MAGIC &&
	       get32(p, HDR_HEADER) == HDRS_MAGIC;
}

/* End of the RAM range that starts at 0 (low memory, below the MMIO hole). */
static uint64_t low_ram_end(struct guest_mem *gm)
{
	struct mm_range ram[8];
	size_t n = mm_ram_ranges(gm, ram, 8);

	return n && ram[0].gpa == 0 ? ram[0].size : 0;
}

/* Identity map of 0-4 GiB with 2 MiB pages; GDT with the boot protocol's
 * __BOOT_CS (0x10, 64-bit) and __BOOT_DS (0x18). */
static int write_paging(struct guest_mem *gm)
{
	static uint64_t pt[6][512];
	static const uint64_t gdt[5] = {
		0, 0, 0x00af9b000000ffffULL, 0x00cf93000000ffffULL, 0x00008b0000000067ULL,
	};

	memset(pt, 0, sizeof(pt));
	pt[0][0] = (MDVM_LINUX_PML4 + 0x1000) | 0x3;
	for (int i = 0; i < 4; i++)
		pt[1][i] = (MDVM_LINUX_PML4 + 0x2000 + i * 0x1000ULL) | 0x3;
	for (int i = 0; i < 4 * 512; i++)
		pt[2 + i / 512][i % 512] = ((uint64_t)i << 21) | 0x83;   /* P, RW, PS */
	if (mm_write(gm, MDVM_LINUX_PML4, pt, sizeof(pt)) < 0 ||
	    mm_write(gm, MDVM_LINUX_GDT, gdt, sizeof(gdt)) < 0)
		return -1;
	return 0;
}

int boot_load_linux(struct guest_mem *gm, const struct boot_args *a, struct boot_image *img,
		    char *err, size_t errlen)
{
	static uint8_t zp[4096];
	struct boot_e820 e820[BP_E820_MAX];
	const char *path = a->kernel;
	struct stat st;
	uint8_t *p;
	int fd, ret = -1;
	size_t clen = a->cmdline ? strlen(a->cmdline) : 0, n, hdr_end;
	uint64_t ksize, koff, load, init_size, ram_end, initrd_max;
	unsigned setup_sects, version;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return BERR("kernel '%s': %s", path, strerror(errno));
	if (fstat(fd, &st) < 0) {
		close(fd);
		return BERR("kernel '%s': %s", path, strerror(errno));
	}
	p = st.st_size ? mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
	close(fd);
	if (p == MAP_FAILED)
		return BERR("kernel '%s': %s", path, st.st_size ? strerror(errno) : "empty file");
	if (!is_bzimage(p, st.st_size)) {
		BERR("kernel '%s': not an ELF file or a Linux bzImage", path);
		goto out;
	}
	version = get16(p, HDR_VERSION);
	if (version < 0x20c) {
		BERR("kernel '%s': Linux boot protocol %u.%02u is too old; mdvm needs 2.12 or later "
		     "(64-bit entry)", path, version >> 8, version & 0xff);
		goto out;
	}
	if (!(get16(p, HDR_XLOADFLAGS) & XLF_KERNEL_64)) {
		BERR("kernel '%s': bzImage has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)", path);
		goto out;
	}
	if (!(p[HDR_LOADFLAGS] & LOADED_HIGH)) {
		BERR("kernel '%s': a zImage (loaded low) is not supported; use a bzImage", path);
		goto out;
	}
	setup_sects = p[HDR_SETUP_SECTS] ? p[HDR_SETUP_SECTS] : 4;
	koff = (setup_sects + 1) * 512ULL;
	if (koff >= (uint64_t)st.st_size) {
		BERR("kernel '%s': truncated bzImage (setup is %llu bytes, file %lld)", path,
		     (unsigned long long)koff, (long long)st.st_size);
		goto out;
	}
	ksize = st.st_size - koff;
	if (get32(p, HDR_SYSSIZE) * 16ULL > ksize) {
		BERR("kernel '%s': truncated bzImage (the header says %llu bytes of kernel after the "
		     "setup, the file has %llu)", path, get32(p, HDR_SYSSIZE) * 16ULL,
		     (unsigned long long)ksize);
		goto out;
	}
	load = get64(p, HDR_PREF_ADDRESS);
	if (load < 0x100000)
		load = 0x100000;
	init_size = get32(p, HDR_INIT_SIZE);
	if (init_size < ksize)
		init_size = ksize;
	ram_end = low_ram_end(gm);
	if (load + init_size > ram_end) {
		BERR("kernel '%s': guest memory too small: the kernel needs [0x%llx-0x%llx) to "
		     "decompress and run, RAM ends at 0x%llx; give --memory of at least %llu MiB", path,
		     (unsigned long long)load, (unsigned long long)(load + init_size),
		     (unsigned long long)ram_end,
		     (unsigned long long)((load + init_size + (64 << 20)) >> 20));
		goto out;
	}
	if (clen >= MDVM_BOOT_CMDLINE_MAX || clen >= get32(p, HDR_CMDLINE_SIZE) + 1ULL) {
		BERR("command line is %zu bytes; this kernel accepts at most %u", clen,
		     get32(p, HDR_CMDLINE_SIZE));
		goto out;
	}
	if (mm_write(gm, load, p + koff, ksize) < 0) {
		BERR("kernel '%s': cannot write it into guest RAM at 0x%llx", path, (unsigned long long)load);
		goto out;
	}
	img->mode = BOOT_MODE_LINUX64;
	img->entry = load + 0x200;
	img->load_start = load;
	img->load_end = load + init_size;
	img->initrd_gpa = img->initrd_size = 0;

	/* Zero page: the setup header as the file has it (up to the end the
	 * jump at 0x200 gives), then what the boot loader fills in. */
	memset(zp, 0, sizeof(zp));
	hdr_end = HDR_JUMP + 2 + p[HDR_JUMP + 1];
	if (hdr_end > sizeof(zp))
		hdr_end = sizeof(zp);
	memcpy(zp + HDR_SETUP_SECTS, p + HDR_SETUP_SECTS, hdr_end - HDR_SETUP_SECTS);
	zp[HDR_TYPE_OF_LOADER] = 0xff;        /* undefined boot loader */
	put32(zp, HDR_CMD_LINE_PTR, (uint32_t)MDVM_LINUX_CMDLINE);
	put32(zp, BP_EXT_CMD_LINE_PTR, 0);
	put64(zp, BP_ACPI_RSDP, a->rsdp);
	if (a->initrd) {
		initrd_max = (uint64_t)get32(p, HDR_INITRD_MAX) + 1;
		if (boot_load_initrd(gm, a->initrd, img->load_end, initrd_max < MDVM_MMIO_HOLE_START ?
				     initrd_max : MDVM_MMIO_HOLE_START, &img->initrd_gpa,
				     &img->initrd_size, err, errlen) < 0)
			goto out;
		put32(zp, HDR_RAMDISK_IMAGE, (uint32_t)img->initrd_gpa);
		put32(zp, HDR_RAMDISK_SIZE, (uint32_t)img->initrd_size);
		put32(zp, BP_EXT_RAMDISK_IMAGE, (uint32_t)(img->initrd_gpa >> 32));
		put32(zp, BP_EXT_RAMDISK_SIZE, (uint32_t)(img->initrd_size >> 32));
	}
	mm_mark_reserved(gm, MDVM_LINUX_AREA_START, MDVM_LINUX_AREA_END - MDVM_LINUX_AREA_START);
	n = boot_memmap(gm, e820, BP_E820_MAX);
	zp[BP_E820_ENTRIES] = (uint8_t)n;
	for (size_t i = 0; i < n; i++) {
		uint8_t *e = zp + BP_E820_TABLE + 20 * i;
		put64(e, 0, e820[i].addr);
		put64(e, 8, e820[i].size);
		put32(e, 16, e820[i].type);
	}
	if (mm_write(gm, MDVM_LINUX_ZERO_PAGE, zp, sizeof(zp)) < 0 ||
	    mm_write(gm, MDVM_LINUX_CMDLINE, a->cmdline ? a->cmdline : "", clen + 1) < 0 ||
	    write_paging(gm) < 0) {
		BERR("cannot write boot information into guest memory");
		goto out;
	}
	ret = 0;
out:
	munmap(p, st.st_size);
	return ret;
}

int boot_linux_set_vcpu(int fd, const struct boot_image *img, char *err, size_t errlen)
{
	struct kvm_sregs sr;
	struct kvm_regs r = { .rflags = 2, .rip = img->entry, .rsi = MDVM_LINUX_ZERO_PAGE };
	struct kvm_fpu fpu = { .fcw = 0x37f, .mxcsr = 0x1f80 };
	struct kvm_segment code = { .base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 0xb,
				    .present = 1, .s = 1, .l = 1, .g = 1 };
	struct kvm_segment data = { .base = 0, .limit = 0xffffffff, .selector = 0x18, .type = 0x3,
				    .present = 1, .s = 1, .db = 1, .g = 1 };

	if (ioctl(fd, KVM_GET_SREGS, &sr) < 0)
		return BERR("KVM_GET_SREGS failed: %s", strerror(errno));
	sr.cs = code;
	sr.ds = sr.es = sr.fs = sr.gs = sr.ss = data;
	sr.tr = (struct kvm_segment){ .base = 0, .limit = 0x67, .selector = 0x20, .type = 0xb,
				      .present = 1 };
	sr.ldt = (struct kvm_segment){ .selector = 0, .type = 0x2, .present = 1, .limit = 0xffff };
	sr.gdt.base = MDVM_LINUX_GDT;
	sr.gdt.limit = 5 * 8 - 1;
	sr.idt.base = 0;
	sr.idt.limit = 0;
	sr.cr0 = 0x80000011;      /* PG | ET | PE */
	sr.cr3 = MDVM_LINUX_PML4;
	sr.cr4 = 0x20;            /* PAE */
	sr.efer = 0x500;          /* LME | LMA */
	if (ioctl(fd, KVM_SET_SREGS, &sr) < 0)
		return BERR("KVM_SET_SREGS failed: %s", strerror(errno));
	if (ioctl(fd, KVM_SET_REGS, &r) < 0)
		return BERR("KVM_SET_REGS failed: %s", strerror(errno));
	if (ioctl(fd, KVM_SET_FPU, &fpu) < 0)
		return BERR("KVM_SET_FPU failed: %s", strerror(errno));
	return 0;
}

int boot_load(struct guest_mem *gm, const struct boot_args *a, struct boot_image *img,
	      char *err, size_t errlen)
{
	uint8_t head[0x300];
	ssize_t n;
	int fd = open(a->kernel, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return BERR("kernel '%s': %s", a->kernel, strerror(errno));
	n = pread(fd, head, sizeof(head), 0);
	close(fd);
	if (n > 0 && is_bzimage(head, n))
		return boot_load_linux(gm, a, img, err, errlen);
	return boot_load_pvh(gm, a, img, err, errlen);
}
