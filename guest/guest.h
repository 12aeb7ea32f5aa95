/* mdvm test guest: shared declarations. Freestanding; general-purpose
 * registers only, because KVM on our hosts emulates every guest instruction. */
#ifndef MDVM_GUEST_H
#define MDVM_GUEST_H
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* PVH boot: struct hvm_start_info as defined by Xen's arch-x86/hvm/start_info.h. */
#define HVM_START_MAGIC 0x336ec578U
struct hvm_start_info {
	uint32_t magic;
	uint32_t version;         /* 1 adds memmap_paddr/memmap_entries */
	uint32_t flags;
	uint32_t nr_modules;
	uint64_t modlist_paddr;
	uint64_t cmdline_paddr;
	uint64_t rsdp_paddr;
	uint64_t memmap_paddr;
	uint32_t memmap_entries;
	uint32_t reserved;
} __attribute__((packed));

struct hvm_memmap_entry {
	uint64_t addr;
	uint64_t size;
	uint32_t type;            /* E820 types: 1 = RAM */
	uint32_t reserved;
} __attribute__((packed));
#define E820_RAM 1

/* Port and MMIO helpers. MMIO goes through volatile pointers so that every
 * access is exactly one load/store of the given width. */
static inline void outb(uint16_t port, uint8_t v) { asm volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { asm volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t mmio_read32(uint64_t a) { return *(volatile uint32_t *)(uintptr_t)a; }
static inline uint64_t mmio_read64(uint64_t a) { return *(volatile uint64_t *)(uintptr_t)a; }
static inline void mmio_write32(uint64_t a, uint32_t v) { *(volatile uint32_t *)(uintptr_t)a = v; }
static inline void mmio_write8(uint64_t a, uint8_t v) { *(volatile uint8_t *)(uintptr_t)a = v; }
static inline void halt_forever(void) { for (;;) asm volatile("cli; hlt"); }

/* console.c */
void uart_init(void);
void uart_putc(char c);
void uart_puts(const char *s);
int  kvprintf(const char *fmt, va_list ap);
int  kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int  kvsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int  ksnprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int  memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int  strcmp(const char *a, const char *b);
int  strncmp(const char *a, const char *b, size_t n);

/* trap.c. Pushed by start.S: GPRs (r15 lowest), vector, error code, then the CPU frame. */
struct exc_frame {
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
	uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
	uint64_t vector, error;
	uint64_t rip, cs, rflags, rsp, ss;
};
void idt_init(void);

/* mce.c: machine checks. A workload arms a recovery point with mce_setjmp +
 * mce_arm; after an SRAR on page P, mce_setjmp returns 1 with mce_resume = P + 4 KiB. */
struct mce_jmp { uint64_t rbx, rbp, r12, r13, r14, r15, rsp, rip; };
int  mce_setjmp(struct mce_jmp *jb) __attribute__((returns_twice));
void mce_arm(struct mce_jmp *jb);
extern uint64_t mce_resume;
void mce_init(void);
void mce_handler(struct exc_frame *f);
bool mce_page_bad(uint64_t page);
uint64_t mce_next_bad(uint64_t p, uint64_t end);
void mce_set_hold(bool hold);
int  mce_status_text(char *buf, size_t size);
/* Report AMD deferred (and corrected) errors, which raise no #MC: the
 * workloads call it once per pass. Returns the errors found. */
unsigned mce_poll(void);
void mce_poll_periodic(void);   /* mce_poll at most every ~2^24 TSC cycles */
/* main.c: the last machine-check error to the test device (TESTDEV_MCE_*). */
void testdev_mce(uint64_t status, uint64_t addr, uint32_t errors, uint32_t bad);

/* main.c: used by the exception handler to fail an in-flight device command. */
void testdev_fail_inflight(const char *text, uint32_t status);
void debug_exit(uint8_t code);

/* main.c, for commands in other files */
struct arg {
	const char *key;
	uint64_t val;           /* preset to the default */
};
void reply(uint32_t status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
bool parse_args(const char *cmd, char *s, struct arg *args, int nargs);
bool check_range(const char *cmd, uint64_t base, uint64_t size);

/* balloon.c (virtio.c: virtio_take_cmdline) */
void virtio_take_cmdline(char *cmdline);
void balloon_boot(const struct hvm_memmap_entry *map, unsigned n);
bool balloon_command(const char *name, char *rest);   /* false: not a balloon command */
void balloon_poll(void);                 /* `balloon auto=1`: follow the target */
uint64_t balloon_clip(uint64_t base, uint64_t end);  /* end of [base,end) below the balloon */
bool balloon_overlaps(uint64_t base, uint64_t end);
/* virtio.c: `virtio-irq nmi=1` routes the device's interrupt as NMI; trap.c counts them. */
extern volatile uint32_t nmi_count;
extern bool nmi_counting;

/* Linker-script symbols (guest.ld). */
extern char __image_start[], __image_end[], __bss_start[], __bss_end[];
extern uint64_t boot_pml4[512], boot_pdpt[512], boot_pd[4][512];

#endif
