/* mdvm test guest: IDT for the 32 CPU exceptions. Any exception but #MC
 * (guest/mce.c) and NMIs asked for (virtio-irq nmi=1) is a test failure: report it on the console (and to an in-flight test-device
 * command), then exit through the debug-exit port with status 3. */
#include "guest.h"

#define GDT_CODE64 0x10
#define EXC_EXIT_STATUS 3

struct idt_entry {
	uint16_t off_lo;
	uint16_t sel;
	uint8_t ist;
	uint8_t type;           /* 0x8e: present, DPL 0, 64-bit interrupt gate */
	uint16_t off_mid;
	uint32_t off_hi;
	uint32_t zero;
} __attribute__((packed));

extern const uint64_t exc_stub_table[32];
static struct idt_entry idt[32] __attribute__((aligned(16)));

static const char *const exc_names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM",
	"#DF", "CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "#15",
	"#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23",
	"#24", "#25", "#26", "#27", "#HV", "#VC", "#SX", "#31",
};

void idt_init(void)
{
	for (int i = 0; i < 32; i++) {
		uint64_t a = exc_stub_table[i];
		idt[i].off_lo = a & 0xffff;
		idt[i].sel = GDT_CODE64;
		idt[i].ist = 0;
		idt[i].type = 0x8e;
		idt[i].off_mid = (a >> 16) & 0xffff;
		idt[i].off_hi = a >> 32;
		idt[i].zero = 0;
	}
	struct {
		uint16_t limit;
		uint64_t base;
	} __attribute__((packed)) desc = { sizeof(idt) - 1, (uint64_t)(uintptr_t)idt };
	asm volatile("lidt %0" : : "m"(desc));
}

void exc_handler(struct exc_frame *f);
void exc_handler(struct exc_frame *f)
{
	uint64_t cr2;
	char line[192];
	unsigned v = f->vector & 31;

	if (v == 2 && nmi_counting) {   /* the virtio device's interrupt, routed as NMI */
		nmi_count++;
		return;
	}
	if (v == 18) {          /* #MC: handled, returns through start.S */
		mce_handler(f);
		return;
	}
	asm volatile("mov %%cr2, %0" : "=r"(cr2));
	if (v == 14)
		ksnprintf(line, sizeof(line),
			  "mdvm-guest: exception %u %s err=0x%lx rip=0x%lx cr2=0x%lx rsp=0x%lx",
			  v, exc_names[v], f->error, f->rip, cr2, f->rsp);
	else
		ksnprintf(line, sizeof(line),
			  "mdvm-guest: exception %u %s err=0x%lx rip=0x%lx rsp=0x%lx",
			  v, exc_names[v], f->error, f->rip, f->rsp);
	kprintf("%s\n", line);
	kprintf("mdvm-guest: rax=%016lx rbx=%016lx rcx=%016lx rdx=%016lx\n", f->rax, f->rbx, f->rcx, f->rdx);
	kprintf("mdvm-guest: rsi=%016lx rdi=%016lx rbp=%016lx rflags=%lx cs=%lx\n",
		f->rsi, f->rdi, f->rbp, f->rflags, f->cs);
	testdev_fail_inflight(line, EXC_EXIT_STATUS);
	debug_exit(EXC_EXIT_STATUS);
	halt_forever();
}
