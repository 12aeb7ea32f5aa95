/* L2 memory-error target: owns two pages, prints their guest physical
 * addresses (from /proc/self/pagemap, needs root) so the harness can poison
 * them, then on SIGUSR1 reads the second one. The harness injects
 * action-optional on the first and action-required on the second; the read
 * must end in SIGBUS BUS_MCEERR_AR at that page (the guest kernel's
 * memory-failure handling), not in the data.
 * Output: "poison: ao=0x<gpa> ar=0x<gpa>", then "poison: sigbus code=N
 * addr=ok|bad" or "poison: FAIL read ...". Exit 0 only for the right SIGBUS. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static volatile uint8_t *page[2];
static volatile sig_atomic_t go;

static void on_usr1(int s) { (void)s; go = 1; }

static void on_bus(int s, siginfo_t *si, void *uc)
{
	(void)s; (void)uc;
	char buf[96];
	int ok = si->si_addr == (void *)page[1] && si->si_code == BUS_MCEERR_AR;
	int n = snprintf(buf, sizeof(buf), "poison: sigbus code=%d addr=%s lsb=%d\n", si->si_code,
			 si->si_addr == (void *)page[1] ? "ok" : "bad", (int)si->si_addr_lsb);
	write(1, buf, n);
	_exit(ok ? 0 : 2);
}

static uint64_t gpa_of(volatile void *p)
{
	uint64_t e = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0 || pread(fd, &e, 8, (uintptr_t)p / 4096 * 8) != 8)
		return 0;
	close(fd);
	if (!(e >> 63) || !(e & ((1ULL << 55) - 1)))
		return 0;   /* not present, or PFN hidden (not root) */
	return (e & ((1ULL << 55) - 1)) << 12;
}

int main(void)
{
	uint8_t *m = mmap(NULL, 2 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		return 1;
	for (int i = 0; i < 2; i++) {
		page[i] = m + i * 4096;
		memset((void *)page[i], 0x5a + i, 4096);
	}
	struct sigaction sa = { .sa_sigaction = on_bus, .sa_flags = SA_SIGINFO };
	sigaction(SIGBUS, &sa, NULL);
	signal(SIGUSR1, on_usr1);
	uint64_t ao = gpa_of(page[0]), ar = gpa_of(page[1]);
	if (!ao || !ar) {
		printf("poison: FAIL no physical address in /proc/self/pagemap\n");
		return 1;
	}
	printf("poison: ao=0x%llx ar=0x%llx\n", (unsigned long long)ao, (unsigned long long)ar);
	fflush(stdout);
	while (!go)
		pause();
	uint8_t v = page[1][123];
	printf("poison: FAIL read 0x%02x from the poisoned page without SIGBUS\n", v);
	return 1;
}
