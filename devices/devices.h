/* Emulated devices. Each registers itself on the bus (vmm/bus.h) and reaches
 * guest memory only through mm/, interrupts only through vm_irq_line(). */
#ifndef MDVM_DEVICES_H
#define MDVM_DEVICES_H
#include <stdint.h>

struct vm;

/* 16550A UART; guest output goes to out_fd (-1: discarded). */
struct serial;
struct serial *serial_create(struct vm *vm, uint16_t port, int irq, int out_fd);
void serial_reset(struct serial *s);
/* Feed host input bytes to the receiver (main loop thread). */
void serial_receive(struct serial *s, const uint8_t *buf, size_t len);

/* Debug-exit, power-off and reset ports. */
int power_create(struct vm *vm);
/* CMOS RTC at ports 0x70/0x71; NULL with errno on failure. */
struct rtc;
struct rtc *rtc_create(struct vm *vm);
/* ACPI hardware-reduced sleep control/status registers (power-off). */
int acpi_pm_create(struct vm *vm);

/* Test device mailbox (devices/testdev_regs.h). */
struct testdev;
typedef void (*testdev_done_fn)(void *opaque, int status, const char *resp);
struct testdev *testdev_create(struct vm *vm, uint64_t gpa);
void testdev_reset(struct testdev *t);
int  testdev_post(struct testdev *t, const char *cmd, unsigned timeout_ms,
		  testdev_done_fn done, void *opaque);
uint32_t testdev_sweeps(struct testdev *t);
/* The test guest's last machine-check report (TESTDEV_MCE_*). */
struct testdev_mce { uint64_t status, addr; uint32_t errors, bad; };
void testdev_mce_info(struct testdev *t, struct testdev_mce *out);
/* A vCPU is wanted back (pause): end a guest's TESTDEV_WAIT now. */
void testdev_kick(struct testdev *t);

/* Migration: each device's state as a blob of its own format (starting
 * with a version word). save: bytes written (<= cap) or 0 if cap is too
 * small; load: 0, or -1 for a blob this build cannot take. */
#define DEVICE_STATE_MAX 8192
size_t serial_save(struct serial *s, void *buf, size_t cap);
int    serial_load(struct serial *s, const void *buf, size_t len);
size_t testdev_save(struct testdev *t, void *buf, size_t cap);
int    testdev_load(struct testdev *t, const void *buf, size_t len);
size_t rtc_save(struct rtc *r, void *buf, size_t cap);
int    rtc_load(struct rtc *r, const void *buf, size_t len);
#endif
