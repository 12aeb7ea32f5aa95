# mdvm — see README.md. `make run` and `make test` install what they need.
CC      ?= gcc
CFLAGS  ?= -O2 -g
CFLAGS  += -std=gnu11 -Wall -Wextra -Wno-unused-parameter -Werror=implicit-function-declaration \
           -D_GNU_SOURCE -pthread -MMD -MP
PKGS     = jansson libxml-2.0 liburing
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)
CHECK_LIBS := $(shell pkg-config --libs check 2>/dev/null)

B        = build
MDVM     = $(B)/mdvm
GUEST    = guest/mdvm-guest.elf

MM_SRCS   = $(wildcard mm/*.c)
VMM_SRCS  = $(wildcard vmm/*.c) $(wildcard devices/*.c)
# Sources the unit tests link against (no KVM, no main()).
UNIT_LIB_SRCS = $(MM_SRCS) vmm/config.c vmm/util.c
UNIT_SRCS = $(wildcard tests/unit/*.c)
# Included by unit tests themselves (not linked separately), listed for rebuilds.
UNIT_INCLUDED_SRCS = vmm/loop.c vmm/qmp.c vmm/boot_pvh.c

OBJS      = $(patsubst %.c,$(B)/%.o,$(VMM_SRCS) $(MM_SRCS))

.PHONY: all deps run test unit unit-asan integration bench clean
all: $(MDVM) $(GUEST)

# Feature fragments (mk/*.mk) add targets and append to these.
TEST_EXTRA =
BENCH_TARGETS =

# Debian 12 packages needed to build, test and benchmark.
DEB_PKGS = build-essential pkg-config libjansson-dev libxml2-dev liburing-dev check \
           libxml2-utils libvirt-clients qemu-system-x86 python3 python3-pytest
deps:
	@scripts/install-deps.sh $(DEB_PKGS)

$(B)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(PKG_CFLAGS) -c $< -o $@

$(MDVM): $(OBJS)
	$(CC) $(CFLAGS) -o $@ $^ $(PKG_LIBS)

# ---- test guest: freestanding, general registers only (KVM emulates it here)
GUEST_CFLAGS = -std=gnu11 -O2 -g -ffreestanding -fno-builtin -nostdlib -fno-pic -fno-pie \
               -mno-red-zone -mgeneral-regs-only -mcmodel=kernel -fno-stack-protector \
               -fno-asynchronous-unwind-tables -fcf-protection=none -Wall -Wextra -Wno-unused-parameter \
               -I. -MMD -MP
GUEST_SRCS = $(wildcard guest/*.c) $(wildcard guest/*.S)
GUEST_OBJS = $(patsubst %,$(B)/%.o,$(GUEST_SRCS))
$(B)/guest/%.c.o: guest/%.c
	@mkdir -p $(dir $@)
	$(CC) $(GUEST_CFLAGS) -c $< -o $@
$(B)/guest/%.S.o: guest/%.S
	@mkdir -p $(dir $@)
	$(CC) $(GUEST_CFLAGS) -c $< -o $@
$(GUEST): $(GUEST_OBJS) guest/guest.ld
	$(LD) -nostdlib -static -no-pie -T guest/guest.ld -z noexecstack -z max-page-size=4096 -o $@ $(GUEST_OBJS)

# ---- unit tests (Check), plain and under ASan+UBSan
$(B)/unit/suites.h: $(UNIT_SRCS)
	@mkdir -p $(dir $@)
	@grep -ho '^Suite \*[a-z0-9_]*_suite(void)' $(UNIT_SRCS) | sed 's/^Suite \*\(.*\)(void)/SUITE(\1)/' > $@.tmp
	@cmp -s $@.tmp $@ || mv $@.tmp $@; rm -f $@.tmp
$(B)/unit-tests: $(UNIT_SRCS) $(UNIT_LIB_SRCS) $(UNIT_INCLUDED_SRCS) $(B)/unit/suites.h
	$(CC) $(CFLAGS) $(PKG_CFLAGS) -I$(B)/unit -o $@ $(UNIT_SRCS) $(UNIT_LIB_SRCS) $(PKG_LIBS) $(CHECK_LIBS)
$(B)/unit-tests-asan: $(UNIT_SRCS) $(UNIT_LIB_SRCS) $(UNIT_INCLUDED_SRCS) $(B)/unit/suites.h
	$(CC) $(CFLAGS) -O1 -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all \
	  $(PKG_CFLAGS) -I$(B)/unit -o $@ $(UNIT_SRCS) $(UNIT_LIB_SRCS) $(PKG_LIBS) $(CHECK_LIBS)

unit: $(B)/unit-tests
	$(B)/unit-tests
unit-asan: $(B)/unit-tests-asan
	CK_FORK=no ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 $(B)/unit-tests-asan

integration: $(MDVM) $(GUEST)
	/usr/bin/python3 -m pytest -q -rs tests/integration

# Stages run in order and stop at the first failure; their wall times are
# printed at the end (after a failure too), for information only.
TEST_STAGES = all unit unit-asan integration $(TEST_EXTRA)
test: deps
	@times=""; rc=0; \
	for s in $(TEST_STAGES); do \
		echo "$(MAKE) $$s"; t0=$$(date +%s); \
		$(MAKE) $$s || rc=$$?; \
		times="$$times$$(printf '  %-14s %5d s' $$s $$(($$(date +%s) - t0)))\n"; \
		[ $$rc -eq 0 ] || break; \
	done; \
	printf 'make test: stage wall times\n%b' "$$times"; exit $$rc

bench: deps
	$(MAKE) all
	$(if $(strip $(BENCH_TARGETS)),$(MAKE) $(BENCH_TARGETS),@echo "no benchmarks yet")

run: deps
	$(MAKE) all
	$(MDVM) run --config configs/default.xml

clean:
	rm -rf $(B) $(GUEST)

include $(wildcard mk/*.mk)

-include $(shell find $(B) -name '*.d' -type f 2>/dev/null)
