/* MC146818 CMOS RTC at ports 0x70/0x71: the host's UTC time in BCD, 24-hour
 * (or binary/12-hour if the guest changes status register B), UIP never set
 * so a guest's probe and read loops finish at once, and 128 bytes of NVRAM.
 * Setting the time moves an offset from host time. No alarm, periodic or
 * update interrupts: Linux uses kvm-clock and reads the RTC only at boot. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "devices.h"
#include "../vmm/bus.h"
#include "../vmm/layout.h"
#include "../vmm/util.h"
#include "../vmm/vm.h"

enum { SEC = 0, MIN = 2, HOUR = 4, WDAY = 6, MDAY = 7, MON = 8, YEAR = 9,
       REG_A = 0x0a, REG_B = 0x0b, REG_C = 0x0c, REG_D = 0x0d, CENTURY = 0x32 };
#define B_SET   0x80
#define B_DM    0x04    /* binary, not BCD */
#define B_24H   0x02
#define D_VRT   0x80    /* RAM and time valid */

struct rtc {
	pthread_mutex_t lock;
	uint8_t index;
	uint8_t ram[128];
	time_t offset;      /* guest time - host time */
};

static uint8_t to_reg(struct rtc *r, int v)
{
	return (r->ram[REG_B] & B_DM) ? v : ((v / 10) << 4) | (v % 10);
}

static int from_reg(struct rtc *r, uint8_t v)
{
	return (r->ram[REG_B] & B_DM) ? v : (v >> 4) * 10 + (v & 0xf);
}

static void rtc_fill_time(struct rtc *r)
{
	time_t now = time(NULL) + r->offset;
	struct tm tm;
	int hour;

	gmtime_r(&now, &tm);
	r->ram[SEC] = to_reg(r, tm.tm_sec);
	r->ram[MIN] = to_reg(r, tm.tm_min);
	hour = tm.tm_hour;
	if (r->ram[REG_B] & B_24H) {
		r->ram[HOUR] = to_reg(r, hour);
	} else {
		int h12 = hour % 12 ? hour % 12 : 12;
		r->ram[HOUR] = to_reg(r, h12) | (hour >= 12 ? 0x80 : 0);
	}
	r->ram[WDAY] = to_reg(r, tm.tm_wday + 1);
	r->ram[MDAY] = to_reg(r, tm.tm_mday);
	r->ram[MON] = to_reg(r, tm.tm_mon + 1);
	r->ram[YEAR] = to_reg(r, tm.tm_year % 100);
	r->ram[CENTURY] = to_reg(r, 19 + tm.tm_year / 100);
}

/* The guest finished setting the clock (SET cleared): new offset. */
static void rtc_take_time(struct rtc *r)
{
	struct tm tm = { 0 };
	int hour = from_reg(r, r->ram[HOUR] & 0x7f);

	if (!(r->ram[REG_B] & B_24H))
		hour = hour % 12 + ((r->ram[HOUR] & 0x80) ? 12 : 0);
	tm.tm_sec = from_reg(r, r->ram[SEC]);
	tm.tm_min = from_reg(r, r->ram[MIN]);
	tm.tm_hour = hour;
	tm.tm_mday = from_reg(r, r->ram[MDAY]);
	tm.tm_mon = from_reg(r, r->ram[MON]) - 1;
	tm.tm_year = from_reg(r, r->ram[CENTURY]) * 100 + from_reg(r, r->ram[YEAR]) - 1900;
	r->offset = timegm(&tm) - time(NULL);
}

static void rtc_io(void *opaque, struct vcpu *vcpu, uint64_t off, uint8_t *data,
		   uint32_t len, bool is_write)
{
	struct rtc *r = opaque;

	pthread_mutex_lock(&r->lock);
	if (off == 0) {
		if (is_write)
			r->index = data[0] & 0x7f;   /* bit 7: NMI mask, ignored */
		else
			data[0] = 0xff;
	} else if (is_write) {
		uint8_t i = r->index, v = data[0];

		switch (i) {
		case REG_A:
			r->ram[i] = v & 0x7f;        /* UIP is read-only */
			break;
		case REG_B:
			if ((r->ram[REG_B] & B_SET) && !(v & B_SET)) {
				r->ram[REG_B] = v;
				rtc_take_time(r);
			} else {
				if (!(r->ram[REG_B] & B_SET) && (v & B_SET))
					rtc_fill_time(r);    /* freeze what the guest will edit */
				r->ram[REG_B] = v;
			}
			break;
		case REG_C:
		case REG_D:
			break;                       /* read-only */
		default:
			r->ram[i] = v;
		}
	} else {
		uint8_t i = r->index;

		if (i <= YEAR || i == CENTURY) {
			if (!(r->ram[REG_B] & B_SET))
				rtc_fill_time(r);
			data[0] = r->ram[i];
		} else if (i == REG_C) {
			data[0] = 0;                 /* no interrupt flags */
		} else if (i == REG_D) {
			data[0] = D_VRT;
		} else {
			data[0] = r->ram[i];
		}
	}
	if (len > 1)
		memset(data + 1, 0xff, len - 1);
	pthread_mutex_unlock(&r->lock);
}

/* Migration: the index register, the 128 bytes (time registers as last
 * filled: they matter while the guest holds SET) and the guest's offset
 * from host UTC, which carries over as is (hosts keep UTC in step). */
#define RTC_STATE_VERSION 1
struct rtc_state {
	uint32_t version;
	uint8_t index;
	uint8_t pad[3];
	int64_t offset;
	uint8_t ram[128];
};

size_t rtc_save(struct rtc *r, void *buf, size_t cap)
{
	struct rtc_state st = { .version = RTC_STATE_VERSION };

	if (cap < sizeof(st))
		return 0;
	pthread_mutex_lock(&r->lock);
	st.index = r->index;
	st.offset = (int64_t)r->offset;
	memcpy(st.ram, r->ram, sizeof(st.ram));
	pthread_mutex_unlock(&r->lock);
	memcpy(buf, &st, sizeof(st));
	return sizeof(st);
}

int rtc_load(struct rtc *r, const void *buf, size_t len)
{
	struct rtc_state st;

	if (len != sizeof(st))
		return -1;
	memcpy(&st, buf, sizeof(st));
	if (st.version != RTC_STATE_VERSION || st.index > 0x7f)
		return -1;
	pthread_mutex_lock(&r->lock);
	r->index = st.index;
	r->offset = (time_t)st.offset;
	memcpy(r->ram, st.ram, sizeof(r->ram));
	pthread_mutex_unlock(&r->lock);
	return 0;
}

struct rtc *rtc_create(struct vm *vm)
{
	struct rtc *r = xcalloc(1, sizeof(*r));

	pthread_mutex_init(&r->lock, NULL);
	r->ram[REG_A] = 0x26;          /* 32.768 kHz divider, 1024 Hz rate */
	r->ram[REG_B] = B_24H;         /* BCD, 24-hour, no interrupts */
	r->ram[REG_D] = D_VRT;
	if (bus_register_pio(MDVM_RTC_PORT, 2, rtc_io, r) < 0) {
		free(r);
		return NULL;
	}
	return r;
}
