/* L2 memory checker: sweeps MiB of its own memory, writing (sweep, page)
 * into every 4 KiB page after checking the page still holds what the last
 * sweep wrote. Any lost or stale write is reported with its page. Runs for
 * `seconds` (0: until killed by SIGTERM/SIGINT), then prints its verdict.
 * With "holes", after the first sweep it frees every odd page (4 KiB holes
 * all over its memory, for the balloon to take) and sweeps the even ones;
 * SIGUSR1 writes the odd pages again and it sweeps all of them from then on.
 * Usage: memcheck MiB seconds [holes] */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop, refill;
static void on_signal(int s) { (void)s; stop = 1; }
static void on_usr1(int s) { (void)s; refill = 1; }

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 0) : 16, pages = mib * 256, bad = 0;
	unsigned seconds = argc > 2 ? strtoul(argv[2], NULL, 0) : 0;
	uint64_t sweep = 0;
	time_t start = time(NULL), last = start;
	int holes = argc > 3 && !strcmp(argv[3], "holes");
	size_t step = 1;
	/* Guest THP would keep a freed 4 KiB page inside a 2 MiB folio. */
	uint64_t *mem = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (mem == MAP_FAILED || madvise(mem, pages * 4096, MADV_NOHUGEPAGE)) {
		printf("memcheck: FAIL cannot allocate %zu MiB\n", mib);
		return 1;
	}
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	signal(SIGUSR1, on_usr1);
	printf("memcheck: start %zu MiB\n", mib);
	fflush(stdout);
	for (;;) {
		if (refill && step == 2) {
			/* the odd pages again, holding what this sweep checks */
			for (size_t p = 1; p < pages; p += 2) {
				mem[p * 512] = ((sweep - 1) << 32) | p;
				mem[p * 512 + 511] = ~mem[p * 512];
			}
			step = 1;
			printf("memcheck: refilled %zu KiB at sweep %llu\n", pages / 2 * 4, (unsigned long long)sweep);
			fflush(stdout);
		}
		for (size_t p = 0; p < pages; p += step) {
			uint64_t *w = mem + p * 512;
			uint64_t want = sweep ? ((sweep - 1) << 32) | p : 0;
			if (sweep && (w[0] != want || w[511] != ~want)) {
				if (bad++ < 10)
					printf("memcheck: FAIL page %zu sweep %llu: got %#llx/%#llx want %#llx\n", p,
					       (unsigned long long)sweep, (unsigned long long)w[0],
					       (unsigned long long)w[511], (unsigned long long)want);
			}
			w[0] = (sweep << 32) | p;
			w[511] = ~w[0];
		}
		sweep++;
		if (holes && sweep == 1) {
			for (size_t p = 1; p < pages; p += 2)
				if (madvise((char *)mem + p * 4096, 4096, MADV_DONTNEED))
					break;
			step = 2;
			printf("memcheck: holes %zu KiB freed\n", pages / 2 * 4);
			fflush(stdout);
		}
		if (time(NULL) != last) {
			last = time(NULL);
			printf("memcheck: sweep %llu bad %zu\n", (unsigned long long)sweep, bad);
			fflush(stdout);
		}
		if (stop || (seconds && time(NULL) - start >= seconds))
			break;
	}
	/* Final check of the last sweep. */
	for (size_t p = 0; p < pages; p += step) {
		uint64_t want = ((sweep - 1) << 32) | p;
		if (mem[p * 512] != want || mem[p * 512 + 511] != ~want)
			bad++;
	}
	printf("memcheck: %s sweeps=%llu bad=%zu pages=%zu\n", bad ? "FAIL" : "PASS", (unsigned long long)sweep, bad,
	       (pages + step - 1) / step);
	return bad != 0;
}
