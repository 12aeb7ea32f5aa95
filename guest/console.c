/* mdvm test guest: 16550 console on COM1, a small printf, string functions.
 * Everything polls: the guest runs with interrupts disabled. */
#include "guest.h"
#include "vmm/layout.h"

#define UART_THR 0   /* transmit holding (DLAB=0) */
#define UART_DLL 0   /* divisor low (DLAB=1) */
#define UART_IER 1
#define UART_DLM 1
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define LSR_THRE 0x20

void uart_init(void)
{
	uint16_t p = MDVM_COM1_PORT;

	outb(p + UART_IER, 0x00);   /* no interrupts: we poll LSR */
	outb(p + UART_LCR, 0x80);   /* DLAB on */
	outb(p + UART_DLL, 0x01);   /* 115200 baud */
	outb(p + UART_DLM, 0x00);
	outb(p + UART_LCR, 0x03);   /* 8N1, DLAB off */
	outb(p + UART_FCR, 0xc7);   /* FIFO on, clear both, 14-byte trigger */
	outb(p + UART_MCR, 0x03);   /* DTR, RTS; OUT2 off since IRQs are unused */
}

static void uart_raw(char c)
{
	/* Bounded wait: a VMM whose LSR never reports THRE must not hang us. */
	for (int i = 0; i < 100000; i++)
		if (inb(MDVM_COM1_PORT + UART_LSR) & LSR_THRE)
			break;
	outb(MDVM_COM1_PORT + UART_THR, (uint8_t)c);
}

void uart_putc(char c)
{
	if (c == '\n')
		uart_raw('\r');
	uart_raw(c);
}

void uart_puts(const char *s)
{
	while (*s)
		uart_putc(*s++);
}

/* ---- formatting: one engine, two sinks (console, buffer) */
struct sink {
	void (*put)(struct sink *s, char c);
	char *buf;
	size_t size, len;
};

static void put_console(struct sink *s, char c) { uart_putc(c); s->len++; }
static void put_buffer(struct sink *s, char c)
{
	if (s->len + 1 < s->size)
		s->buf[s->len] = c;
	s->len++;
}

static void emit_num(struct sink *s, uint64_t v, unsigned base, bool neg, int width,
		     bool zero, bool left, bool upper)
{
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	char tmp[24];
	int n = 0, len;

	do {
		tmp[n++] = digits[v % base];
		v /= base;
	} while (v);
	len = n + (neg ? 1 : 0);
	if (neg && zero)
		s->put(s, '-');
	if (!left)
		for (; len < width; width--)
			s->put(s, zero ? '0' : ' ');
	if (neg && !zero)
		s->put(s, '-');
	while (n)
		s->put(s, tmp[--n]);
	if (left)
		for (; len < width; width--)
			s->put(s, ' ');
}

static int vformat(struct sink *s, const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			s->put(s, *fmt);
			continue;
		}
		fmt++;
		bool zero = false, left = false;
		int width = 0, lng = 0;
		for (;; fmt++) {
			if (*fmt == '0')
				zero = true;
			else if (*fmt == '-')
				left = true;
			else
				break;
		}
		if (*fmt == '*') {
			width = va_arg(ap, int);
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l' || *fmt == 'z') {
			lng++;
			fmt++;
		}
		if (left)
			zero = false;
		switch (*fmt) {
		case 'd':
		case 'i': {
			int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
			emit_num(s, v < 0 ? -(uint64_t)v : (uint64_t)v, 10, v < 0, width, zero, left, false);
			break;
		}
		case 'u':
		case 'x':
		case 'X': {
			uint64_t v = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned int);
			emit_num(s, v, *fmt == 'u' ? 10 : 16, false, width, zero, left, *fmt == 'X');
			break;
		}
		case 'p':
			s->put(s, '0');
			s->put(s, 'x');
			emit_num(s, (uintptr_t)va_arg(ap, void *), 16, false, width, zero, left, false);
			break;
		case 'c': {
			char c = (char)va_arg(ap, int);
			int pad = width > 1 ? width - 1 : 0;
			while (!left && pad-- > 0)
				s->put(s, ' ');
			s->put(s, c);
			while (left && pad-- > 0)
				s->put(s, ' ');
			break;
		}
		case 's': {
			const char *str = va_arg(ap, const char *);
			if (!str)
				str = "(null)";
			int pad = width - (int)strlen(str);
			while (!left && pad-- > 0)
				s->put(s, ' ');
			while (*str)
				s->put(s, *str++);
			while (left && pad-- > 0)
				s->put(s, ' ');
			break;
		}
		case '%':
			s->put(s, '%');
			break;
		case '\0':
			return (int)s->len;
		default:                /* unknown: print it verbatim */
			s->put(s, '%');
			s->put(s, *fmt);
			break;
		}
	}
	return (int)s->len;
}

int kvprintf(const char *fmt, va_list ap)
{
	struct sink s = { .put = put_console };
	return vformat(&s, fmt, ap);
}

int kprintf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = kvprintf(fmt, ap);
	va_end(ap);
	return n;
}

int kvsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct sink s = { .put = put_buffer, .buf = buf, .size = size };
	int n = vformat(&s, fmt, ap);
	if (size)
		buf[s.len < size ? s.len : size - 1] = '\0';
	return n;
}

int ksnprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = kvsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}

/* ---- string functions. GCC may emit calls to mem* itself; stop it from
 * turning these very loops back into calls to themselves. */
#define NO_LIBCALL __attribute__((optimize("no-tree-loop-distribute-patterns")))

NO_LIBCALL void *memset(void *d, int c, size_t n)
{
	unsigned char *p = d;
	while (n--)
		*p++ = (unsigned char)c;
	return d;
}

NO_LIBCALL void *memcpy(void *d, const void *s, size_t n)
{
	unsigned char *dp = d;
	const unsigned char *sp = s;
	while (n--)
		*dp++ = *sp++;
	return d;
}

NO_LIBCALL void *memmove(void *d, const void *s, size_t n)
{
	unsigned char *dp = d;
	const unsigned char *sp = s;
	if (dp < sp) {
		while (n--)
			*dp++ = *sp++;
	} else {
		while (n--)
			dp[n] = sp[n];
	}
	return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

int strcmp(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return (unsigned char)*a - (unsigned char)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
	for (; n; n--, a++, b++) {
		if (*a != *b)
			return (unsigned char)*a - (unsigned char)*b;
		if (!*a)
			return 0;
	}
	return 0;
}
