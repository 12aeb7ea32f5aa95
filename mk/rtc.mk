# tests/unit/test_rtc.c compiles devices/rtc.c into itself (its migration
# state, docs/migration.md), so the unit tests rebuild when it changes.
$(B)/unit-tests $(B)/unit-tests-asan: devices/rtc.c devices/devices.h
