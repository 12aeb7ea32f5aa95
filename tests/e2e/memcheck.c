/* L2 memory checker: sweeps MiB of its own memory, writing (sweep, page)
 * into every 4 KiB page after checking the page still holds what the last
 * sweep wrote. Any lost or stale write is reported with its page. Runs for
 * `seconds` (0: until killed by SIGTERM/SIGINT), then prints its verdict.
 * Usage: memcheck MiB seconds */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_signal(int s) { (void)s; stop = 1; }

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 0) : 16, pages = mib * 256, bad = 0;
	unsigned seconds = argc > 2 ? strtoul(argv[2], NULL, 0) : 0;
	uint64_t sweep = 0;
	time_t start = time(NULL), last = start;
	uint64_t *mem = malloc(pages * 4096);

	if (!mem) {
		printf("memcheck: FAIL cannot allocate %zu MiB\n", mib);
		return 1;
	}
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	printf("memcheck: start %zu MiB\n", mib);
	fflush(stdout);
	for (;;) {
		for (size_t p = 0; p < pages; p++) {
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
		if (time(NULL) != last) {
			last = time(NULL);
			printf("memcheck: sweep %llu bad %zu\n", (unsigned long long)sweep, bad);
			fflush(stdout);
		}
		if (stop || (seconds && time(NULL) - start >= seconds))
			break;
	}
	/* Final check of the last sweep. */
	for (size_t p = 0; p < pages; p++) {
		uint64_t want = ((sweep - 1) << 32) | p;
		if (mem[p * 512] != want || mem[p * 512 + 511] != ~want)
			bad++;
	}
	printf("memcheck: %s sweeps=%llu bad=%zu\n", bad ? "FAIL" : "PASS", (unsigned long long)sweep, bad);
	return bad != 0;
}
