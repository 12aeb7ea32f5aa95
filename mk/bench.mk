# Benchmarks (bench/README.md). `make bench` runs bench-all: every area in
# bench/areas/, mdvm and QEMU side by side, into bench/results.md and
# docs/benchmarks.md. `make test` runs bench-quick: each area once on tiny
# sizes; it fails unless every mdvm cell holds a number.
DEB_PKGS += gnuplot-nox qemu-system-x86
BENCH_TARGETS += bench-all
TEST_EXTRA += bench-quick

.PHONY: bench-all bench-quick
bench-all: $(MDVM) $(GUEST)
	/usr/bin/python3 bench/bench.py --out bench/results.md --docs docs/benchmarks.md
bench-quick: $(MDVM) $(GUEST)
	/usr/bin/python3 bench/bench.py --self-test
	/usr/bin/python3 bench/bench.py --quick --check --out $(B)/bench-quick/results.md
