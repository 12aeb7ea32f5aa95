# memdesc metadata and lookup/update throughput (issue 3's bench rows).
BENCH_MM = $(B)/bench_mm
$(BENCH_MM): bench/bench_mm.c $(MM_SRCS) $(wildcard mm/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ bench/bench_mm.c $(MM_SRCS)
.PHONY: bench-mm
bench-mm: $(BENCH_MM)
	$(BENCH_MM)
