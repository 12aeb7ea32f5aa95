# Machine checks / memory errors (issue 7). vmm/mca.c is included by
# tests/unit/test_mce.c, so the unit tests rebuild when it changes.
$(B)/unit-tests $(B)/unit-tests-asan: vmm/mca.c vmm/mca.h
