/* 16550A UART (COM1). Transmit is immediate, so THRE/TEMT are always set; an
 * enabled THRE interrupt is raised after every write, as Linux's driver needs
 * it to drain user-space console writes. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "devices.h"
#include "../vmm/bus.h"
#include "../vmm/vm.h"
#include "../vmm/util.h"

#define UART_RX_FIFO 16

enum { RBR_THR = 0, IER = 1, IIR_FCR = 2, LCR = 3, MCR = 4, LSR = 5, MSR = 6, SCR = 7 };
#define IER_RDI   0x01
#define IER_THRI  0x02
#define IIR_NONE  0x01
#define IIR_THRI  0x02
#define IIR_RDI   0x04
#define IIR_FIFO  0xc0
#define LCR_DLAB  0x80
#define LSR_DR    0x01
#define LSR_THRE  0x20
#define LSR_TEMT  0x40
#define MCR_LOOP  0x10
#define MSR_DEFAULT 0xb0   /* DCD, DSR, CTS */

struct serial {
	struct vm *vm;
	int irq, out_fd;
	pthread_mutex_t lock;
	uint8_t ier, lcr, mcr, scr, fcr, dll, dlm;
	bool thri_pending;    /* THRE interrupt latched until IIR is read */
	uint8_t rx[UART_RX_FIFO];
	unsigned rx_head, rx_len;
	int line;             /* last level driven on the IRQ line */
};

static uint8_t serial_iir(struct serial *s)
{
	uint8_t fifo = (s->fcr & 1) ? IIR_FIFO : 0;
	if ((s->ier & IER_RDI) && s->rx_len)
		return IIR_RDI | fifo;
	if ((s->ier & IER_THRI) && s->thri_pending)
		return IIR_THRI | fifo;
	return IIR_NONE | fifo;
}

static void serial_update_irq(struct serial *s)
{
	int level = !(serial_iir(s) & IIR_NONE);
	if (level != s->line) {
		s->line = level;
		vm_irq_line(s->vm, s->irq, level);
	}
}

static void serial_out(struct serial *s, uint8_t c)
{
	if (s->mcr & MCR_LOOP) {
		if (s->rx_len < UART_RX_FIFO)
			s->rx[(s->rx_head + s->rx_len++) % UART_RX_FIFO] = c;
		return;
	}
	if (s->out_fd >= 0 && write(s->out_fd, &c, 1) < 0)
		s->out_fd = -1;   /* console gone: keep the guest running */
}

static void serial_io(void *opaque, struct vcpu *vcpu, uint64_t off, uint8_t *data,
		      uint32_t len, bool is_write)
{
	struct serial *s = opaque;
	bool dlab;

	pthread_mutex_lock(&s->lock);
	dlab = s->lcr & LCR_DLAB;
	if (is_write) {
		uint8_t v = data[0];
		switch (off) {
		case RBR_THR:
			if (dlab) { s->dll = v; break; }
			serial_out(s, v);
			s->thri_pending = true;
			break;
		case IER:
			if (dlab) { s->dlm = v; break; }
			/* Enabling THRI with an empty THR raises it at once. */
			if ((v & IER_THRI) && !(s->ier & IER_THRI))
				s->thri_pending = true;
			s->ier = v & 0x0f;
			break;
		case IIR_FCR:
			s->fcr = v & 0xc9;
			if (v & 0x02)
				s->rx_len = 0;
			break;
		case LCR: s->lcr = v; break;
		case MCR: s->mcr = v & 0x1f; break;
		case SCR: s->scr = v; break;
		default: break;
		}
	} else {
		uint8_t v = 0xff;
		switch (off) {
		case RBR_THR:
			if (dlab) { v = s->dll; break; }
			v = 0;
			if (s->rx_len) {
				v = s->rx[s->rx_head];
				s->rx_head = (s->rx_head + 1) % UART_RX_FIFO;
				s->rx_len--;
			}
			break;
		case IER: v = dlab ? s->dlm : s->ier; break;
		case IIR_FCR:
			v = serial_iir(s);
			if ((v & 0x0f) == IIR_THRI)
				s->thri_pending = false;
			break;
		case LCR: v = s->lcr; break;
		case MCR: v = s->mcr; break;
		case LSR: v = LSR_THRE | LSR_TEMT | (s->rx_len ? LSR_DR : 0); break;
		case MSR: v = (s->mcr & MCR_LOOP) ? (uint8_t)((s->mcr & 0x0f) << 4) : MSR_DEFAULT; break;
		case SCR: v = s->scr; break;
		}
		memset(data, 0, len);
		data[0] = v;
	}
	serial_update_irq(s);
	pthread_mutex_unlock(&s->lock);
}

void serial_reset(struct serial *s)
{
	pthread_mutex_lock(&s->lock);
	s->ier = s->lcr = s->mcr = s->scr = s->fcr = s->dlm = 0;
	s->dll = 12;   /* 9600 baud */
	s->thri_pending = false;
	s->rx_head = s->rx_len = 0;
	serial_update_irq(s);
	pthread_mutex_unlock(&s->lock);
}

void serial_receive(struct serial *s, const uint8_t *buf, size_t len)
{
	pthread_mutex_lock(&s->lock);
	for (size_t i = 0; i < len && s->rx_len < UART_RX_FIFO; i++)
		s->rx[(s->rx_head + s->rx_len++) % UART_RX_FIFO] = buf[i];
	serial_update_irq(s);
	pthread_mutex_unlock(&s->lock);
}

struct serial *serial_create(struct vm *vm, uint16_t port, int irq, int out_fd)
{
	struct serial *s = xcalloc(1, sizeof(*s));

	s->vm = vm;
	s->irq = irq;
	s->out_fd = out_fd;
	pthread_mutex_init(&s->lock, NULL);
	s->dll = 12;
	if (bus_register_pio(port, 8, serial_io, s) < 0) {
		free(s);
		return NULL;
	}
	return s;
}

/* ---- migration */
struct serial_state {
	uint32_t version;
	uint8_t ier, lcr, mcr, scr, fcr, dll, dlm, thri_pending;
	uint8_t rx[UART_RX_FIFO];
	uint32_t rx_head, rx_len;
	int32_t line;
};
#define SERIAL_STATE_VERSION 1

size_t serial_save(struct serial *s, void *buf, size_t cap)
{
	struct serial_state st = { .version = SERIAL_STATE_VERSION };

	if (cap < sizeof(st))
		return 0;
	pthread_mutex_lock(&s->lock);
	st.ier = s->ier; st.lcr = s->lcr; st.mcr = s->mcr; st.scr = s->scr;
	st.fcr = s->fcr; st.dll = s->dll; st.dlm = s->dlm; st.thri_pending = s->thri_pending;
	memcpy(st.rx, s->rx, sizeof(st.rx));
	st.rx_head = s->rx_head;
	st.rx_len = s->rx_len;
	st.line = s->line;
	pthread_mutex_unlock(&s->lock);
	memcpy(buf, &st, sizeof(st));
	return sizeof(st);
}

int serial_load(struct serial *s, const void *buf, size_t len)
{
	struct serial_state st;

	if (len != sizeof(st))
		return -1;
	memcpy(&st, buf, sizeof(st));
	if (st.version != SERIAL_STATE_VERSION || st.rx_head >= UART_RX_FIFO ||
	    st.rx_len > UART_RX_FIFO)
		return -1;
	pthread_mutex_lock(&s->lock);
	s->ier = st.ier; s->lcr = st.lcr; s->mcr = st.mcr; s->scr = st.scr;
	s->fcr = st.fcr; s->dll = st.dll; s->dlm = st.dlm; s->thri_pending = st.thri_pending;
	memcpy(s->rx, st.rx, sizeof(s->rx));
	s->rx_head = st.rx_head;
	s->rx_len = st.rx_len;
	/* Drive the line from scratch: the destination's irqchip state came
	 * with the stream, the cached level must match what we drive now. */
	s->line = -1;
	serial_update_irq(s);
	pthread_mutex_unlock(&s->lock);
	return 0;
}
