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

/* Test device mailbox (devices/testdev_regs.h). */
struct testdev;
typedef void (*testdev_done_fn)(void *opaque, int status, const char *resp);
struct testdev *testdev_create(struct vm *vm, uint64_t gpa);
void testdev_reset(struct testdev *t);
int  testdev_post(struct testdev *t, const char *cmd, unsigned timeout_ms,
		  testdev_done_fn done, void *opaque);
uint32_t testdev_sweeps(struct testdev *t);
#endif
