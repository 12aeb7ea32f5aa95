/* Unit tests for devices/rtc.c's migration state (rtc_save / rtc_load): the
 * index register, the NVRAM and the guest's clock offset round-trip, and a
 * blob this build cannot take is refused without touching the device.
 *
 * rtc.c is not in the Makefile's UNIT_LIB_SRCS (it registers on the vmm
 * bus), so it is compiled into this file with a bus stub that keeps the
 * port handler; mk/rtc.mk makes the unit tests rebuild when it changes. */
#include "../../devices/rtc.c"

#include <check.h>

static bus_io_fn last_fn;
static void *last_opaque;

int bus_register_pio(uint16_t base, uint16_t len, bus_io_fn fn, void *opaque)
{
	ck_assert_uint_eq(base, MDVM_RTC_PORT);
	ck_assert_uint_eq(len, 2);
	last_fn = fn;
	last_opaque = opaque;
	return 0;
}

static struct rtc *new_rtc(void)
{
	struct rtc *r = rtc_create(NULL);
	ck_assert_ptr_nonnull(r);
	ck_assert_ptr_eq(last_opaque, r);
	return r;
}

static void out(struct rtc *r, uint8_t off, uint8_t v) { last_fn(r, NULL, off, &v, 1, true); }
static uint8_t in(struct rtc *r, uint8_t off) { uint8_t v; last_fn(r, NULL, off, &v, 1, false); return v; }
static uint8_t cmos_read(struct rtc *r, uint8_t i) { out(r, 0, i); return in(r, 1); }
static void cmos_write(struct rtc *r, uint8_t i, uint8_t v) { out(r, 0, i); out(r, 1, v); }

START_TEST(state_round_trips)
{
	struct rtc *a = new_rtc(), *b = new_rtc();
	uint8_t buf[DEVICE_STATE_MAX];

	cmos_write(a, 0x40, 0xa5);          /* NVRAM */
	cmos_write(a, 0x7f, 0x3c);
	/* The guest sets the clock to 2042 (BCD): an offset from host time. */
	cmos_write(a, REG_B, B_24H | B_SET);
	cmos_write(a, YEAR, 0x42);
	cmos_write(a, CENTURY, 0x20);
	cmos_write(a, REG_B, B_24H);
	ck_assert_uint_eq(cmos_read(a, YEAR), 0x42);
	out(a, 0, 0x41);                    /* index left pointing at 0x41 */
	cmos_write(b, 0x40, 0x11);

	size_t n = rtc_save(a, buf, sizeof(buf));
	ck_assert_uint_gt(n, 128);
	ck_assert_uint_eq(rtc_save(a, buf, 8), 0);   /* too small: nothing */
	ck_assert_int_eq(rtc_load(b, buf, n), 0);
	ck_assert_uint_eq(in(b, 1), 0);              /* index 0x41, never written */
	ck_assert_uint_eq(cmos_read(b, 0x40), 0xa5);
	ck_assert_uint_eq(cmos_read(b, 0x7f), 0x3c);
	ck_assert_uint_eq(cmos_read(b, YEAR), 0x42);
	ck_assert_uint_eq(cmos_read(b, CENTURY), 0x20);
	ck_assert_uint_eq(cmos_read(b, REG_D), D_VRT);
	free(a);
	free(b);
}
END_TEST

START_TEST(bad_state_refused)
{
	struct rtc *a = new_rtc(), *b = new_rtc();
	uint8_t buf[DEVICE_STATE_MAX];

	cmos_write(a, 0x40, 0xa5);
	cmos_write(b, 0x40, 0x11);
	size_t n = rtc_save(a, buf, sizeof(buf));
	ck_assert_int_eq(rtc_load(b, buf, n - 1), -1);       /* length */
	buf[0] ^= 0xff;                                       /* version */
	ck_assert_int_eq(rtc_load(b, buf, n), -1);
	buf[0] ^= 0xff;
	buf[4] = 0x80;                                        /* index out of range */
	ck_assert_int_eq(rtc_load(b, buf, n), -1);
	ck_assert_uint_eq(cmos_read(b, 0x40), 0x11);          /* untouched */
	free(a);
	free(b);
}
END_TEST

Suite *rtc_suite(void)
{
	Suite *s = suite_create("rtc");
	TCase *tc = tcase_create("rtc");

	tcase_add_test(tc, state_round_trips);
	tcase_add_test(tc, bad_state_refused);
	suite_add_tcase(s, tc);
	return s;
}
