/* mdvm test guest: machine-check handling. Enables MCA at boot, and on #MC
 * reads every bank, reports each logged error on the console and to the test
 * device, drops the page from the workloads (a blacklist the walk/fill/verify
 * loops skip), clears the banks and MCG_STATUS.MCIP, and continues. A
 * consumed error (Intel SRAR; AMD UC + POISON) cannot resume the faulting
 * instruction: the handler jumps to the recovery point the workload armed
 * (mce_setjmp), which continues after the page. AMD deferred errors raise no
 * #MC: mce_poll() finds them in the banks, as Linux's periodic poll does. */
#include "guest.h"

#define MSR_MCG_CAP     0x179
#define MSR_MCG_STATUS  0x17a
#define MSR_MCG_CTL     0x17b
#define MSR_MC_CTL(b)    (0x400 + 4 * (b))
#define MSR_MC_STATUS(b) (0x401 + 4 * (b))
#define MSR_MC_ADDR(b)   (0x402 + 4 * (b))
#define MCG_CTL_P       (1ULL << 8)
#define MCG_STATUS_RIPV (1ULL << 0)
#define MCG_STATUS_EIPV (1ULL << 1)
#define MCI_STATUS_VAL  (1ULL << 63)
#define MCI_STATUS_UC   (1ULL << 61)
#define MCI_STATUS_ADDRV (1ULL << 58)
#define MCI_STATUS_S    (1ULL << 56)
#define MCI_STATUS_AR   (1ULL << 55)
#define MCI_STATUS_DEFERRED (1ULL << 44)   /* AMD */
#define MCI_STATUS_POISON (1ULL << 43)     /* AMD */
#define CR4_MCE         (1ULL << 6)
#define BAD_MAX         256

static bool enabled;
static bool amd;                   /* CPU vendor AMD/Hygon: bits 43/44 are DEFERRED/POISON */
static unsigned banks;
static unsigned nerrors;
static bool hold_mcip;
static uint64_t bad[BAD_MAX];      /* pages dropped after a machine check */
static unsigned nbad;
static struct mce_jmp *recover;    /* armed by a workload */
uint64_t mce_resume;               /* set before jumping to `recover` */

static uint64_t rdmsr(uint32_t msr)
{
	uint32_t lo, hi;
	asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((uint64_t)hi << 32) | lo;
}

static void wrmsr(uint32_t msr, uint64_t v)
{
	asm volatile("wrmsr" : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)) : "memory");
}

/* mce_setjmp(jb): returns 0; returns 1 again when the #MC handler resumes
 * there. Saves what the SysV ABI says a callee keeps. */
asm(".text\n"
    ".globl mce_setjmp\n"
    "mce_setjmp:\n"
    "\tmovq %rbx, 0(%rdi)\n"
    "\tmovq %rbp, 8(%rdi)\n"
    "\tmovq %r12, 16(%rdi)\n"
    "\tmovq %r13, 24(%rdi)\n"
    "\tmovq %r14, 32(%rdi)\n"
    "\tmovq %r15, 40(%rdi)\n"
    "\tleaq 8(%rsp), %rax\n"
    "\tmovq %rax, 48(%rdi)\n"
    "\tmovq (%rsp), %rax\n"
    "\tmovq %rax, 56(%rdi)\n"
    "\txorl %eax, %eax\n"
    "\tret\n");

void mce_init(void)
{
	uint32_t a, b, c, d;
	uint64_t cap, cr4;

	asm volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0), "c"(0));
	amd = (b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163) ||   /* AuthenticAMD */
	      (b == 0x6f677948 && d == 0x6e65476e && c == 0x656e6975);      /* HygonGenuine */
	asm volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
	if (!(d & (1u << 7)) || !(d & (1u << 14))) {
		kprintf("mce: no machine-check architecture (CPUID.1:EDX MCE/MCA clear)\n");
		return;
	}
	cap = rdmsr(MSR_MCG_CAP);
	banks = cap & 0xff;
	/* As Linux at boot: enable every bank, forget what the BIOS left. */
	if (cap & MCG_CTL_P)
		wrmsr(MSR_MCG_CTL, ~0ULL);
	for (unsigned i = 0; i < banks; i++) {
		wrmsr(MSR_MC_CTL(i), ~0ULL);
		wrmsr(MSR_MC_STATUS(i), 0);
	}
	asm volatile("mov %%cr4, %0" : "=r"(cr4));
	asm volatile("mov %0, %%cr4" : : "r"(cr4 | CR4_MCE));
	enabled = true;
	/* SUCCOR: AMD's "software may recover from uncorrected errors". */
	unsigned succor = 0;
	asm volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x80000000), "c"(0));
	if (a >= 0x80000007) {
		asm volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x80000007), "c"(0));
		succor = b & 1;
	}
	kprintf("mce: enabled banks=%u cap=0x%lx vendor=%s succor=%u\n", banks, cap,
		amd ? "amd" : "intel", succor);
}

bool mce_page_bad(uint64_t page)
{
	for (unsigned i = 0; i < nbad; i++)
		if (bad[i] == page)
			return true;
	return false;
}

/* The first bad page in [p, end), or end. */
uint64_t mce_next_bad(uint64_t p, uint64_t end)
{
	uint64_t n = end;

	for (unsigned i = 0; i < nbad; i++)
		if (bad[i] >= p && bad[i] < n)
			n = bad[i];
	return n;
}

static void add_bad(uint64_t page)
{
	if (!mce_page_bad(page) && nbad < BAD_MAX)
		bad[nbad++] = page;
}

void mce_arm(struct mce_jmp *jb) { recover = jb; }
void mce_set_hold(bool hold) { hold_mcip = hold; }

int mce_status_text(char *buf, size_t size)
{
	int n = ksnprintf(buf, size, "mce: %s banks=%u errors=%u bad=%u", enabled ? "enabled" : "off",
			  banks, nerrors, nbad);
	for (unsigned i = 0; i < nbad && n < (int)size - 24; i++)
		n += ksnprintf(buf + n, size - n, "%s0x%lx", i ? "," : " pages=", bad[i]);
	return n;
}

/* What a bank's status says, by the vendor's rules. *consumed: the error
 * hit data an instruction was using (Intel SRAR, AMD UC + POISON), so that
 * instruction cannot be restarted. */
static const char *classify(uint64_t st, bool *consumed)
{
	*consumed = false;
	if (amd && (st & MCI_STATUS_DEFERRED) && !(st & MCI_STATUS_UC))
		return "DEFERRED";
	if (amd && (st & MCI_STATUS_UC) && (st & MCI_STATUS_POISON) && !(st & MCI_STATUS_AR)) {
		*consumed = true;
		return "CONSUMED";
	}
	if (st & MCI_STATUS_AR) {
		*consumed = true;
		return "SRAR";
	}
	return (st & MCI_STATUS_S) && (st & MCI_STATUS_UC) ? "SRAO" : (st & MCI_STATUS_UC) ? "UCNA" : "CE";
}

/* Report one logged error (console and test device), drop its page, clear
 * the bank. `where`: "rip=0x..." in the #MC handler, "found=poll" else. */
static void take_error(unsigned b, uint64_t st, uint64_t mcg, const char *kind, const char *where,
		       uint64_t *addrp)
{
	uint64_t addr = 0;
	char line[160];

	if (st & MCI_STATUS_ADDRV)
		addr = rdmsr(MSR_MC_ADDR(b));
	if ((st & MCI_STATUS_ADDRV) && (st & (MCI_STATUS_UC | MCI_STATUS_DEFERRED)))
		add_bad(addr & ~0xfffULL);
	nerrors++;
	testdev_mce(st, addr, nerrors, nbad);   /* before the console line tests wait for */
	ksnprintf(line, sizeof(line), "mce: bank=%u status=0x%lx addr=0x%lx kind=%s mcg=0x%lx %s",
		  b, st, addr, kind, mcg, where);
	kprintf("%s\n", line);
	wrmsr(MSR_MC_STATUS(b), 0);
	*addrp = addr;
}

unsigned mce_poll(void)
{
	unsigned n = 0;

	if (!enabled)
		return 0;
	for (unsigned b = 0; b < banks; b++) {
		uint64_t st = rdmsr(MSR_MC_STATUS(b)), addr;
		bool consumed;

		/* Uncorrected errors come with an #MC: the handler's. */
		if (!(st & MCI_STATUS_VAL) || (st & MCI_STATUS_UC))
			continue;
		take_error(b, st, rdmsr(MSR_MCG_STATUS), classify(st, &consumed), "found=poll", &addr);
		n++;
	}
	return n;
}

/* Each bank read is an exit to the hypervisor (~20 us here): a walk of a
 * few pages per sweep would spend most of its time polling. About every
 * 5 ms at 3 GHz is prompt enough for an error that raised no #MC. */
#define MCE_POLL_TSC (1ULL << 24)

void mce_poll_periodic(void)
{
	static uint64_t last;
	uint32_t lo, hi;

	asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
	uint64_t now = ((uint64_t)hi << 32) | lo;

	if (now - last < MCE_POLL_TSC)
		return;
	last = now;
	mce_poll();
}

void mce_handler(struct exc_frame *f)
{
	uint64_t mcg = rdmsr(MSR_MCG_STATUS), bad_page = 0;
	bool consumed_page = false, consumed_any = false;
	char where[32], line[160];

	ksnprintf(where, sizeof(where), "rip=0x%lx", f->rip);
	for (unsigned b = 0; b < banks; b++) {
		uint64_t st = rdmsr(MSR_MC_STATUS(b)), addr;
		bool consumed;

		if (!(st & MCI_STATUS_VAL))
			continue;
		const char *kind = classify(st, &consumed);
		take_error(b, st, mcg, kind, where, &addr);
		consumed_any |= consumed;
		if (consumed && (st & MCI_STATUS_UC) && (st & MCI_STATUS_ADDRV)) {
			consumed_page = true;
			bad_page = addr & ~0xfffULL;
		}
	}
	if (consumed_page && recover) {
		/* The interrupted instruction cannot be restarted: it would
		 * consume the poison again. Resume at the workload's recovery
		 * point, after the page. */
		mce_resume = bad_page + 4096;
		f->rbx = recover->rbx;
		f->rbp = recover->rbp;
		f->r12 = recover->r12;
		f->r13 = recover->r13;
		f->r14 = recover->r14;
		f->r15 = recover->r15;
		f->rsp = recover->rsp;
		f->rip = recover->rip;
		f->rax = 1;
		recover = NULL;
	} else if (consumed_any || !(mcg & MCG_STATUS_RIPV)) {
		/* Poison consumed outside any recovery point, or no valid
		 * restart IP: fatal, as for a kernel outside any fixup. */
		ksnprintf(line, sizeof(line), "mce: fatal: unrecoverable machine check at rip=0x%lx",
			  f->rip);
		kprintf("%s\n", line);
		testdev_fail_inflight(line, 3);
		debug_exit(3);
		halt_forever();
	}
	if (hold_mcip) {
		kprintf("mce: holding MCG_STATUS.MCIP (test)\n");
		return;
	}
	wrmsr(MSR_MCG_STATUS, 0);
}
