/* mdvm test guest: boot (memory map, ACPI CPU count, page tables above
 * 4 GiB), the command interpreter and the test-device mailbox protocol.
 * See docs/test-guest.md for the commands and the host-side contract. */
#include "guest.h"
#include "vmm/layout.h"
#include "devices/testdev_regs.h"

#define PAGE_SIZE ((uint64_t)4096)
#define GiB ((uint64_t)1 << 30)
#define MiB ((uint64_t)1 << 20)
#define STATUS_OK 0
#define STATUS_FAIL 1       /* verify mismatch */
#define STATUS_ERROR 2      /* bad command or argument */

/* ---- boot information, copied out of the loader's memory */
#define MEMMAP_MAX 128
static struct hvm_memmap_entry memmap[MEMMAP_MAX];
static unsigned memmap_n;
static uint64_t ram_total;
static uint64_t mapped_limit = 4 * GiB;     /* start.S maps 0-4 GiB */
static char boot_cmdline[MDVM_BOOT_CMDLINE_MAX];
static unsigned ncpus;

/* ---- page directories for RAM above 4 GiB (written in full before use, so
 * they live in .noinit and cost nothing at boot). 28 of them extend the map
 * to 32 GiB; beyond that 1 GiB pages are used when the CPU has them. */
#define PD_POOL 28
static uint64_t pd_pool[PD_POOL][512] __attribute__((section(".noinit"), aligned(4096)));

/* ---- test device */
static bool testdev;
static uint32_t last_seq;                   /* newest command seq taken */

/* ---- current command line being executed. Commands from the test device
 * collect their result lines as the response and ack when the line is done
 * (walk acks as soon as it starts, since it does not finish by itself). */
struct ctx {
	bool dev;               /* came from the test device */
	bool acked;
	bool abort;             /* stop running the rest of this line */
	bool any_resp;
	uint32_t seq;
	uint32_t status;        /* first non-zero status of the line */
};
static struct ctx *cur;

/* ---- walk state, for `status` and the SWEEPS register */
static bool walk_active;
static uint64_t walk_base, walk_size;
static uint32_t walk_sweeps;

static uint64_t tdreg(uint32_t off) { return MDVM_TESTDEV_GPA + off; }

void debug_exit(uint8_t code)
{
	outb(MDVM_DEBUG_EXIT_PORT, code);
}

static void resp_text(const char *s)
{
	while (*s)
		mmio_write8(tdreg(TESTDEV_RESP_CHAR), (uint8_t)*s++);
}

static void ack(struct ctx *c)
{
	if (!c->dev || c->acked)
		return;
	mmio_write32(tdreg(TESTDEV_STATUS), c->status);
	mmio_write32(tdreg(TESTDEV_ACK_SEQ), c->seq);
	c->acked = true;
}

void testdev_fail_inflight(const char *text, uint32_t status)
{
	if (!testdev || !cur || !cur->dev || cur->acked)
		return;
	mmio_write32(tdreg(TESTDEV_RESP_RESET), 0);
	resp_text(text);
	cur->status = status;
	ack(cur);
}

/* One result line: to the console, and to the response of an unacked
 * test-device command. */
void reply(uint32_t status, const char *fmt, ...)
{
	char line[512];
	va_list ap;

	va_start(ap, fmt);
	kvsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	kprintf("%s\n", line);
	if (!cur)
		return;
	if (status && !cur->status)
		cur->status = status;
	if (cur->dev && !cur->acked) {
		if (cur->any_resp)
			resp_text("\n");
		resp_text(line);
		cur->any_resp = true;
	}
}

/* ---- numbers: decimal or 0x-hex, optional K/M/G/T suffix (binary units) */
static bool parse_num(const char *s, uint64_t *out)
{
	uint64_t v = 0, base = 10;
	int digits = 0;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	for (;; s++) {
		unsigned d;
		if (*s >= '0' && *s <= '9')
			d = *s - '0';
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = *s - 'a' + 10;
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = *s - 'A' + 10;
		else
			break;
		if (v > (UINT64_MAX - d) / base)
			return false;
		v = v * base + d;
		digits++;
	}
	if (!digits)
		return false;
	unsigned shift = 0;
	switch (*s) {
	case 'k': case 'K': shift = 10; s++; break;
	case 'm': case 'M': shift = 20; s++; break;
	case 'g': case 'G': shift = 30; s++; break;
	case 't': case 'T': shift = 40; s++; break;
	}
	if (*s)
		return false;
	if (shift && v > (UINT64_MAX >> shift))
		return false;
	*out = v << shift;
	return true;
}

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static char *skip_space(char *s)
{
	while (is_space(*s))
		s++;
	return s;
}

/* Parse "key=value ..." against the allowed keys; values are numbers. */
bool parse_args(const char *cmd, char *s, struct arg *args, int nargs)
{
	for (;;) {
		s = skip_space(s);
		if (!*s)
			return true;
		char *tok = s;
		while (*s && !is_space(*s))
			s++;
		if (*s)
			*s++ = '\0';
		char *eq = tok;
		while (*eq && *eq != '=')
			eq++;
		if (!*eq) {
			reply(STATUS_ERROR, "mdvm-guest: error: %s: expected key=value, got '%s'", cmd, tok);
			return false;
		}
		*eq = '\0';
		int i;
		for (i = 0; i < nargs; i++)
			if (!strcmp(tok, args[i].key))
				break;
		if (i == nargs) {
			reply(STATUS_ERROR, "mdvm-guest: error: %s: unknown argument '%s'", cmd, tok);
			return false;
		}
		if (!parse_num(eq + 1, &args[i].val)) {
			reply(STATUS_ERROR, "mdvm-guest: error: %s: bad value '%s' for %s", cmd, eq + 1, tok);
			return false;
		}
	}
}

/* ---- memory ranges the workloads may touch */
static bool ram_covers(uint64_t start, uint64_t end)
{
	uint64_t a = start;

	while (a < end) {
		unsigned i;
		for (i = 0; i < memmap_n; i++) {
			const struct hvm_memmap_entry *e = &memmap[i];
			if (e->type == E820_RAM && e->addr <= a && a - e->addr < e->size)
				break;
		}
		if (i == memmap_n)
			return false;
		a = memmap[i].addr + memmap[i].size;
		if (a < memmap[i].addr)         /* wrapped */
			return true;
	}
	return true;
}

bool check_range(const char *cmd, uint64_t base, uint64_t size)
{
	uint64_t end = base + size;
	uint64_t img_lo = (uintptr_t)__image_start & ~(PAGE_SIZE - 1);
	uint64_t img_hi = ((uintptr_t)__image_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);

	if (!size || (base | size) & (PAGE_SIZE - 1) || end < base) {
		reply(STATUS_ERROR, "mdvm-guest: error: %s: base=0x%lx size=0x%lx must be page-aligned and non-empty",
		      cmd, base, size);
		return false;
	}
	if (!ram_covers(base, end)) {
		reply(STATUS_ERROR, "mdvm-guest: error: %s: range 0x%lx-0x%lx is not RAM", cmd, base, end - 1);
		return false;
	}
	if (end > mapped_limit) {
		reply(STATUS_ERROR, "mdvm-guest: error: %s: range 0x%lx-0x%lx is beyond the guest's page tables (0x%lx)",
		      cmd, base, end - 1, mapped_limit);
		return false;
	}
	if (base < img_hi && img_lo < end) {
		reply(STATUS_ERROR, "mdvm-guest: error: %s: range 0x%lx-0x%lx overlaps the guest image 0x%lx-0x%lx",
		      cmd, base, end - 1, img_lo, img_hi - 1);
		return false;
	}
	if (balloon_overlaps(base, end)) {
		reply(STATUS_ERROR, "mdvm-guest: error: %s: range 0x%lx-0x%lx overlaps pages given to the balloon",
		      cmd, base, end - 1);
		return false;
	}
	return true;
}

/* The fill/verify word for a page: docs/test-guest.md documents it for hosts. */
static uint64_t fill_pattern(uint64_t pfn, uint64_t gen)
{
	return (pfn * 0x9E3779B97F4A7C15ULL) ^ (gen * 0xD1B54A32D192ED03ULL) ^ 0x6d6476ULL;
}

/* ---- test-device command intake */
static void read_cmd(char *buf)
{
	unsigned off;

	for (off = 0; off < TESTDEV_CMD_MAX; off += 8) {
		uint64_t v = mmio_read64(tdreg(TESTDEV_CMD_BUF + off));
		bool end = false;
		for (int i = 0; i < 8; i++) {
			buf[off + i] = (char)(v >> (8 * i));
			if (!buf[off + i])
				end = true;
		}
		if (end)
			break;
	}
	buf[TESTDEV_CMD_MAX - 1] = '\0';
}

static void run_line(char *line);

static void handle_dev_command(uint32_t seq, char *text)
{
	struct ctx c = { .dev = true, .seq = seq };
	struct ctx *prev = cur;

	last_seq = seq;
	mmio_write32(tdreg(TESTDEV_RESP_RESET), 0);
	cur = &c;
	run_line(text);
	ack(&c);
	cur = prev;
}

/* Commands that may run in the middle of a walk without ending it. */
static bool walk_compatible(const char *text)
{
	const char *s = text;

	for (;;) {
		while (is_space(*s) || *s == ';')
			s++;
		if (!*s)
			return true;
		if (!(strncmp(s, "status", 6) == 0 && (!s[6] || is_space(s[6]) || s[6] == ';')) &&
		    !(strncmp(s, "echo", 4) == 0 && (!s[4] || is_space(s[4]) || s[4] == ';')) &&
		    !(strncmp(s, "mce", 3) == 0 && (!s[3] || is_space(s[3]) || s[3] == ';')))
			return false;
		while (*s && *s != ';')
			s++;
	}
}

/* ---- commands. Each gets its name and the mutable rest of its text. */

/* One sweep: add 1 to the first byte of every page, ascending, one
 * read-modify-write `incb` per page (8 pages per loop iteration). */
static void sweep(uint64_t p, uint64_t end)
{
	uint64_t end8 = p + (((end - p) >> 15) << 15);

	if (p < end8)
		asm volatile("1:\n\t"
			     "incb (%0)\n\t"
			     "incb 0x1000(%0)\n\t"
			     "incb 0x2000(%0)\n\t"
			     "incb 0x3000(%0)\n\t"
			     "incb 0x4000(%0)\n\t"
			     "incb 0x5000(%0)\n\t"
			     "incb 0x6000(%0)\n\t"
			     "incb 0x7000(%0)\n\t"
			     "add $0x8000, %0\n\t"
			     "cmp %1, %0\n\t"
			     "jb 1b"
			     : "+r"(p) : "r"(end8) : "memory", "cc");
	for (; p < end; p += PAGE_SIZE)
		asm volatile("incb (%0)" : : "r"(p) : "memory", "cc");
}

/* A sweep that skips pages dropped after machine checks, and survives an
 * SRAR on a page it touches: it continues after that page, so the sweep
 * stays one ascending pass over the good pages. */
static void sweep_checked(uint64_t base, uint64_t end)
{
	static struct mce_jmp jb;
	volatile uint64_t p = base;

	while (p < end) {
		uint64_t seg_end = mce_next_bad(p, end);
		if (seg_end > p) {
			if (mce_setjmp(&jb) == 0) {
				mce_arm(&jb);
				sweep(p, seg_end);
				mce_arm(NULL);
				p = seg_end;
			} else {
				p = mce_resume > p && mce_resume <= end ? mce_resume : seg_end;
				continue;
			}
		}
		if (p < end && mce_page_bad(p))
			p += PAGE_SIZE;
	}
}

/* fn(page) for every page of [base, end) not dropped after a machine
 * check; an SRAR inside fn drops that page too. Stops when fn returns
 * false. Returns the pages skipped. */
static uint64_t for_good_pages(uint64_t base, uint64_t end, bool (*fn)(uint64_t page, void *ctx),
			       void *ctx)
{
	static struct mce_jmp jb;
	volatile uint64_t p = base, skipped = 0;

	while (p < end) {
		if (mce_page_bad(p)) {
			p += PAGE_SIZE;
			skipped++;
			continue;
		}
		if (mce_setjmp(&jb)) {
			p = mce_resume > p ? mce_resume : p + PAGE_SIZE;
			skipped++;
			continue;
		}
		mce_arm(&jb);
		bool more = fn(p, ctx);
		mce_arm(NULL);
		if (!more)
			break;
		p += PAGE_SIZE;
	}
	return skipped;
}

void testdev_mce(uint64_t status, uint64_t addr, uint32_t errors, uint32_t bad)
{
	if (!testdev)
		return;
	mmio_write32(tdreg(TESTDEV_MCE_STATUS), (uint32_t)status);
	mmio_write32(tdreg(TESTDEV_MCE_STATUS + 4), (uint32_t)(status >> 32));
	mmio_write32(tdreg(TESTDEV_MCE_ADDR), (uint32_t)addr);
	mmio_write32(tdreg(TESTDEV_MCE_ADDR + 4), (uint32_t)(addr >> 32));
	mmio_write32(tdreg(TESTDEV_MCE_BAD), bad);
	mmio_write32(tdreg(TESTDEV_MCE_ERRORS), errors);   /* last: the others are current */
}

static void cmd_walk(const char *name, char *rest)
{
	/* quiet=N: talk to the test device (an exit to mdvm) only every Nth
	 * sweep, a guest that rarely leaves KVM_RUN (auto-converge test). */
	struct arg a[] = { { "base", 4 * MiB }, { "size", 4 * MiB }, { "sweeps", 0 }, { "quiet", 1 } };
	char text[TESTDEV_CMD_MAX];

	if (!parse_args(name, rest, a, 4) || !check_range(name, a[0].val, a[1].val))
		return;
	if (a[3].val == 0)
		a[3].val = 1;
	walk_base = a[0].val;
	walk_size = a[1].val;
	walk_sweeps = 0;
	walk_active = true;
	reply(STATUS_OK, "walk: started base=0x%lx size=0x%lx", walk_base, walk_size);
	ack(cur);
	if (testdev)
		mmio_write32(tdreg(TESTDEV_SWEEPS), 0);

	for (;;) {
		sweep_checked(walk_base, balloon_clip(walk_base, walk_base + walk_size));
		walk_sweeps++;
		if (walk_sweeps % a[3].val && !(a[2].val && walk_sweeps >= a[2].val))
			continue;
		mce_poll_periodic();   /* AMD deferred errors: dropped from the next sweeps */
		balloon_poll();   /* `balloon auto=1`; the balloon's pages are never swept */
		if (testdev) {
			mmio_write32(tdreg(TESTDEV_SWEEPS), walk_sweeps);
			uint32_t seq = mmio_read32(tdreg(TESTDEV_CMD_SEQ));
			if (seq != last_seq) {
				read_cmd(text);
				if (!walk_compatible(text)) {
					/* Leave it pending: the main loop runs it. */
					cur->abort = true;
					break;
				}
				handle_dev_command(seq, text);
			}
		}
		if (a[2].val && walk_sweeps >= a[2].val)
			break;
	}
	walk_active = false;
	kprintf("walk: stopped sweeps=%u\n", walk_sweeps);
}

struct fill_ctx {
	uint64_t gen, pages;
	bool fail;
};

static bool fill_page(uint64_t p, void *ctx)
{
	struct fill_ctx *c = ctx;
	volatile uint64_t *w = (volatile uint64_t *)(uintptr_t)p;
	uint64_t v = fill_pattern(p >> 12, c->gen);

	w[0] = v;               /* offset 0 */
	w[1] = v;               /* offset 8 */
	w[256] = v;             /* offset 2048 */
	w[511] = v;             /* offset 4088 */
	c->pages++;
	return true;
}

static bool verify_page(uint64_t p, void *ctx)
{
	static const unsigned idx[4] = { 0, 1, 256, 511 };
	struct fill_ctx *c = ctx;
	volatile uint64_t *w = (volatile uint64_t *)(uintptr_t)p;
	uint64_t want = fill_pattern(p >> 12, c->gen);

	for (int i = 0; i < 4; i++) {
		uint64_t got = w[idx[i]];
		if (got != want) {
			reply(STATUS_FAIL, "verify: FAIL page=0x%lx got=0x%lx want=0x%lx off=%u",
			      p, got, want, idx[i] * 8);
			c->fail = true;
			return false;
		}
	}
	c->pages++;
	return true;
}

static void cmd_fill(const char *name, char *rest)
{
	struct arg a[] = { { "base", 4 * MiB }, { "size", 2 * MiB }, { "gen", 1 } };

	if (!parse_args(name, rest, a, 3) || !check_range(name, a[0].val, a[1].val))
		return;
	struct fill_ctx c = { .gen = a[2].val };
	mce_poll();
	uint64_t skipped = for_good_pages(a[0].val, a[0].val + a[1].val, fill_page, &c);
	if (skipped)
		reply(STATUS_OK, "fill: done pages=%lu gen=%lu poisoned=%lu", c.pages, a[2].val, skipped);
	else
		reply(STATUS_OK, "fill: done pages=%lu gen=%lu", c.pages, a[2].val);
}

static void cmd_verify(const char *name, char *rest)
{
	struct arg a[] = { { "base", 4 * MiB }, { "size", 2 * MiB }, { "gen", 1 } };

	if (!parse_args(name, rest, a, 3) || !check_range(name, a[0].val, a[1].val))
		return;
	struct fill_ctx c = { .gen = a[2].val };
	mce_poll();
	uint64_t skipped = for_good_pages(a[0].val, a[0].val + a[1].val, verify_page, &c);
	if (c.fail)
		return;
	if (skipped)
		reply(STATUS_OK, "verify: ok pages=%lu poisoned=%lu", c.pages, skipped);
	else
		reply(STATUS_OK, "verify: ok pages=%lu", c.pages);
}

static void cmd_idle(const char *name, char *rest)
{
	if (*skip_space(rest)) {
		reply(STATUS_ERROR, "mdvm-guest: error: idle: takes no arguments");
		return;
	}
	reply(STATUS_OK, testdev ? "idle: waiting" : "idle: no test device, halting");
	cur->abort = true;      /* the rest of the line is dropped; main loop waits */
}

static uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

/* Roughly 0.1 s at common TSC rates; only used before giving up. */
static void tsc_delay(uint64_t cycles)
{
	uint64_t t0 = rdtsc();
	while (rdtsc() - t0 < cycles)
		asm volatile("pause");
}

static void cmd_poweroff(const char *name, char *rest)
{
	reply(STATUS_OK, "poweroff: ok");
	ack(cur);
	outw(MDVM_POWEROFF_PORT, 0x2000);   /* PIIX4 PM1a_CNT: SLP_EN, S5 */
	/* QEMU acts on the request asynchronously: give it time before
	 * concluding the port did nothing. */
	tsc_delay(1ULL << 28);
	debug_exit(0);
	kprintf("poweroff: still running, halting\n");
	halt_forever();
}

static void cmd_exit(const char *name, char *rest)
{
	struct arg a[] = { { "code", 0 } };

	if (!parse_args(name, rest, a, 1))
		return;
	reply(STATUS_OK, "exit: code=%lu", a[0].val & 0xff);
	ack(cur);
	debug_exit((uint8_t)a[0].val);
	kprintf("exit: debug-exit port had no effect, halting\n");
	halt_forever();
}

/* `reset`: the reset control register (SYS_RST|RST_CPU, as on QEMU's PIIX). */
static void cmd_reset(const char *name, char *rest)
{
	if (!parse_args(name, rest, NULL, 0))
		return;
	reply(STATUS_OK, "reset: ok");
	ack(cur);
	outb(MDVM_RESET_PORT, 0x06);
	tsc_delay(1ULL << 28);   /* QEMU resets asynchronously */
	kprintf("reset: still running, halting\n");
	halt_forever();
}

static void cmd_echo(const char *name, char *rest)
{
	reply(STATUS_OK, "%s", skip_space(rest));
}

static void cmd_status(const char *name, char *rest)
{
	if (walk_active)
		reply(STATUS_OK, "status: workload=walk sweeps=%u base=0x%lx size=0x%lx",
		      walk_sweeps, walk_base, walk_size);
	else
		reply(STATUS_OK, "status: workload=idle sweeps=%u", walk_sweeps);
}

/* `fault`: #UD. `fault addr=A`: read the byte at A, a #PF when A is not
 * mapped (e.g. at or above the mapped limit). Either way exits with 3. */
static void cmd_fault(const char *name, char *rest)
{
	struct arg a[] = { { "addr", 0 } };
	bool read = *skip_space(rest) != '\0';

	if (!parse_args(name, rest, a, 1))
		return;
	if (read) {
		kprintf("fault: reading 0x%lx\n", a[0].val);
		(void)*(volatile uint8_t *)(uintptr_t)a[0].val;
		reply(STATUS_OK, "fault: read 0x%lx did not fault", a[0].val);
		return;
	}
	kprintf("fault: executing ud2\n");
	asm volatile("ud2");
}

/* `mce`: machine-check state and the dropped pages. `mce hold=1`: the
 * handler leaves MCG_STATUS.MCIP set (a handler that never finishes), so the
 * next machine check finds one in progress. */
static void cmd_mce(const char *name, char *rest)
{
	struct arg a[] = { { "hold", 2 } };
	char text[384];

	if (!parse_args(name, rest, a, 1))
		return;
	if (a[0].val != 2)
		mce_set_hold(a[0].val != 0);
	mce_poll();
	mce_status_text(text, sizeof(text));
	reply(STATUS_OK, "%s", text);
}

static const struct {
	const char *name;
	void (*fn)(const char *name, char *rest);
} commands[] = {
	{ "mce", cmd_mce },
	{ "walk", cmd_walk },
	{ "fill", cmd_fill },
	{ "verify", cmd_verify },
	{ "idle", cmd_idle },
	{ "poweroff", cmd_poweroff },
	{ "exit", cmd_exit },
	{ "reset", cmd_reset },
	{ "echo", cmd_echo },
	{ "status", cmd_status },
	{ "fault", cmd_fault },
};

static void run_cmd(char *s)
{
	char *name = skip_space(s), *rest = name;

	while (*rest && !is_space(*rest))
		rest++;
	if (*rest)
		*rest++ = '\0';
	/* Trim trailing blanks so `echo` prints exactly its text. */
	char *e = rest + strlen(rest);
	while (e > rest && is_space(e[-1]))
		*--e = '\0';
	for (unsigned i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		if (!strcmp(name, commands[i].name)) {
			commands[i].fn(name, rest);
			return;
		}
	}
	if (balloon_command(name, rest))
		return;
	reply(STATUS_ERROR, "mdvm-guest: error: unknown command '%s'", name);
}

/* Run "cmd [args]; cmd [args]; ..." (modified in place). */
static void run_line(char *line)
{
	char *s = line;

	while (*s && !cur->abort) {
		char *end = s;
		while (*end && *end != ';')
			end++;
		char *next = *end ? end + 1 : end;
		*end = '\0';
		if (*skip_space(s))
			run_cmd(s);
		s = next;
	}
}

/* ---- boot */
static unsigned cpuid_count(void)
{
	uint32_t a, b, c, d;

	asm volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
	if ((d & (1u << 28)) && ((b >> 16) & 0xff))
		return (b >> 16) & 0xff;
	return 1;
}

static bool has_1g_pages(void)
{
	uint32_t a, b, c, d;

	asm volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x80000000), "c"(0));
	if (a < 0x80000001)
		return false;
	asm volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x80000001), "c"(0));
	return d & (1u << 26);
}

/* Enabled processors in the ACPI MADT, or 0 when there is no usable ACPI. */
static unsigned acpi_count_cpus(uint64_t rsdp)
{
	if (!rsdp || rsdp >= 4 * GiB - 64 || memcmp((void *)(uintptr_t)rsdp, "RSD PTR ", 8))
		return 0;
	const uint8_t *r = (const uint8_t *)(uintptr_t)rsdp;
	uint64_t sdt;
	unsigned esize;
	if (r[15] >= 2 && *(const uint64_t *)(r + 24)) {
		sdt = *(const uint64_t *)(r + 24);     /* XSDT */
		esize = 8;
	} else {
		sdt = *(const uint32_t *)(r + 16);     /* RSDT */
		esize = 4;
	}
	if (!sdt || sdt >= 4 * GiB - 36)
		return 0;
	uint32_t len = *(const uint32_t *)(uintptr_t)(sdt + 4);
	for (uint64_t p = sdt + 36; p + esize <= sdt + len; p += esize) {
		uint64_t t = esize == 8 ? *(const uint64_t *)(uintptr_t)p : *(const uint32_t *)(uintptr_t)p;
		if (!t || t >= 4 * GiB - 44 || memcmp((void *)(uintptr_t)t, "APIC", 4))
			continue;
		uint32_t tlen = *(const uint32_t *)(uintptr_t)(t + 4);
		unsigned n = 0;
		for (uint64_t e = t + 44; e + 2 <= t + tlen;) {
			const uint8_t *m = (const uint8_t *)(uintptr_t)e;
			if (m[1] < 2)
				break;
			if (m[0] == 0 && m[1] >= 8 && (*(const uint32_t *)(m + 4) & 1))
				n++;            /* processor local APIC, enabled */
			if (m[0] == 9 && m[1] >= 16 && (*(const uint32_t *)(m + 8) & 1))
				n++;            /* processor local x2APIC, enabled */
			e += m[1];
		}
		return n;
	}
	return 0;
}

/* Identity-map RAM above 4 GiB (start.S mapped only 0-4 GiB). */
static void map_high_ram(uint64_t ram_end)
{
	uint64_t gib = (ram_end + GiB - 1) / GiB;
	bool big = has_1g_pages();

	if (gib > 512)
		gib = 512;              /* one PDPT: 512 GiB */
	for (uint64_t i = 4; i < gib; i++) {
		if (i - 4 < PD_POOL) {
			uint64_t *pd = pd_pool[i - 4];
			for (uint64_t j = 0; j < 512; j++)
				pd[j] = (i * GiB + j * (2 * MiB)) | 0x83;   /* P, W, PS */
			boot_pdpt[i] = (uintptr_t)pd | 0x3;
		} else if (big) {
			boot_pdpt[i] = (i * GiB) | 0x83;
		} else {
			break;
		}
		mapped_limit = (i + 1) * GiB;
	}
	uint64_t cr3;
	asm volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
}

static void read_boot_info(struct hvm_start_info *si)
{
	if (!si || si->magic != HVM_START_MAGIC) {
		kprintf("mdvm-guest: error: bad hvm_start_info at %p (magic 0x%x)\n", si, si ? si->magic : 0);
		return;
	}
	if (si->cmdline_paddr && si->cmdline_paddr < 4 * GiB) {
		const char *c = (const char *)(uintptr_t)si->cmdline_paddr;
		unsigned i;
		for (i = 0; i < sizeof(boot_cmdline) - 1 && c[i]; i++)
			boot_cmdline[i] = c[i];
		boot_cmdline[i] = '\0';
	}
	if (si->version >= 1 && si->memmap_paddr && si->memmap_paddr < 4 * GiB) {
		const struct hvm_memmap_entry *m = (const void *)(uintptr_t)si->memmap_paddr;
		memmap_n = si->memmap_entries < MEMMAP_MAX ? si->memmap_entries : MEMMAP_MAX;
		for (unsigned i = 0; i < memmap_n; i++)
			memmap[i] = m[i];
	} else {
		kprintf("mdvm-guest: error: no memory map in hvm_start_info (version %u)\n", si->version);
	}
	ncpus = acpi_count_cpus(si->rsdp_paddr);
}

void guest_main(struct hvm_start_info *si);
void guest_main(struct hvm_start_info *si)
{
	struct ctx boot = { 0 };
	uint64_t ram_end = 0;
	char text[TESTDEV_CMD_MAX];

	uart_init();
	idt_init();
	mce_init();
	read_boot_info(si);
	virtio_take_cmdline(boot_cmdline);
	if (!ncpus)
		ncpus = cpuid_count();

	for (unsigned i = 0; i < memmap_n; i++) {
		const struct hvm_memmap_entry *e = &memmap[i];
		kprintf("mdvm-guest: mem 0x%012lx-0x%012lx type %u\n", e->addr, e->addr + e->size - 1, e->type);
		if (e->type != E820_RAM)
			continue;
		ram_total += e->size;
		if (e->addr + e->size > ram_end)
			ram_end = e->addr + e->size;
	}
	if (ram_end > 4 * GiB)
		map_high_ram(ram_end);
	balloon_boot(memmap, memmap_n);

	testdev = mmio_read32(tdreg(TESTDEV_MAGIC)) == TESTDEV_MAGIC_VALUE;

	/* Tests grep for "mdvm-guest: ready". */
	kprintf("mdvm-guest: ready ram=%luM cpus=%u testdev=%s cmdline=\"%s\"\n",
		(ram_total + MiB - 1) / MiB, ncpus, testdev ? "yes" : "no", boot_cmdline);

	cur = &boot;
	run_line(boot_cmdline);
	cur = NULL;

	if (!testdev) {
		if (!boot.abort)        /* `idle` already said so */
			kprintf("idle: no test device, halting\n");
		halt_forever();
	}
	for (;;) {
		uint32_t seq = mmio_read32(tdreg(TESTDEV_WAIT));   /* blocks up to ~50 ms */
		if (seq == last_seq) {
			balloon_poll();
			mce_poll();       /* as Linux's periodic bank poll, every ~50 ms */
			continue;
		}
		read_cmd(text);
		handle_dev_command(seq, text);
	}
}
