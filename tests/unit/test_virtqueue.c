/* The split-virtqueue parser (devices/virtqueue.c) against a fake guest
 * memory: good chains, and every kind of garbage a driver can write. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../devices/virtqueue.c"

#define RAM_SIZE (1u << 20)    /* fake guest RAM: GPA [0, 1 MiB) */
#define DESC  0x1000
#define AVAIL 0x2000
#define USED  0x3000
#define NUM   8

static uint8_t *ram;
static unsigned reads, writes;

static int f_read(void *o, uint64_t gpa, void *buf, size_t len)
{
	reads++;
	if (gpa >= RAM_SIZE || len > RAM_SIZE - gpa)
		return -1;
	memcpy(buf, ram + gpa, len);
	return 0;
}

static int f_write(void *o, uint64_t gpa, const void *buf, size_t len)
{
	writes++;
	if (gpa >= RAM_SIZE || len > RAM_SIZE - gpa)
		return -1;
	memcpy(ram + gpa, buf, len);
	return 0;
}

static bool f_is_ram(void *o, uint64_t gpa, uint64_t len)
{
	return gpa < RAM_SIZE && len <= RAM_SIZE - gpa;
}

static const struct vq_mem fake = { f_read, f_write, f_is_ram, NULL };
static struct virtqueue vq;
static struct vq_elem el;
static char err[256];

static void desc(unsigned i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
	struct vq_desc d = { addr, len, flags, next };
	memcpy(ram + DESC + 16 * i, &d, sizeof(d));
}

static void avail_add(uint16_t head)
{
	uint16_t idx;
	memcpy(&idx, ram + AVAIL + 2, 2);
	memcpy(ram + AVAIL + 4 + 2 * (idx % NUM), &head, 2);
	idx++;
	memcpy(ram + AVAIL + 2, &idx, 2);
}

static void setup(void)
{
	free(ram);   /* tests call setup() again to start over */
	ram = calloc(1, RAM_SIZE);
	vq_init(&vq, &fake);
	vq.num = NUM;
	vq.desc = DESC;
	vq.avail = AVAIL;
	vq.used = USED;
	ck_assert_int_eq(vq_check(&vq, err, sizeof(err)), 0);
	vq.ready = true;
	err[0] = 0;
}

static void teardown(void)
{
	free(ram);
	ram = NULL;
}

static void expect_error(const char *want)
{
	ck_assert_int_eq(vq_pop(&vq, &el, err, sizeof(err)), -1);
	ck_assert_msg(strstr(err, want) != NULL, "error '%s' lacks '%s'", err, want);
}

START_TEST(chain_and_used_ring)
{
	uint16_t idx;
	uint32_t u[2];

	ck_assert_int_eq(vq_pop(&vq, &el, err, sizeof(err)), 0);   /* empty */
	desc(3, 0x8000, 100, VIRTQ_DESC_F_NEXT, 5);
	desc(5, 0x9000, 200, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 6);
	desc(6, 0xa000, 300, VIRTQ_DESC_F_WRITE, 0);
	avail_add(3);
	ck_assert_int_eq(vq_pending(&vq), 1);
	ck_assert_int_eq(vq_pop(&vq, &el, err, sizeof(err)), 1);
	ck_assert_uint_eq(el.head, 3);
	ck_assert_uint_eq(el.n_out, 1);
	ck_assert_uint_eq(el.n_in, 2);
	ck_assert_uint_eq(el.buf[0].gpa, 0x8000);
	ck_assert_uint_eq(el.buf[2].len, 300);
	ck_assert(el.buf[1].write && !el.buf[0].write);
	ck_assert_int_eq(vq_pop(&vq, &el, err, sizeof(err)), 0);
	ck_assert_int_eq(vq_push(&vq, 3, 500), 0);
	memcpy(&idx, ram + USED + 2, 2);
	memcpy(u, ram + USED + 4, 8);
	ck_assert_uint_eq(idx, 1);
	ck_assert_uint_eq(u[0], 3);
	ck_assert_uint_eq(u[1], 500);
	/* Index wrap-around past 65535 works like any other step. */
	vq.last_avail = 0xffff;
	memcpy(ram + AVAIL + 2, &(uint16_t){ 0xffff }, 2);
	desc(0, 0x8000, 4, 0, 0);
	avail_add(0);
	ck_assert_int_eq(vq_pop(&vq, &el, err, sizeof(err)), 1);
	ck_assert_uint_eq(vq.last_avail, 0);
}
END_TEST

START_TEST(full_length_chain_is_not_a_loop)
{
	for (unsigned i = 0; i < NUM; i++)
		desc(i, 0x8000 + i * 16, 16, i + 1 < NUM ? VIRTQ_DESC_F_NEXT : 0, i + 1);
	avail_add(0);
	ck_assert_int_eq(vq_pop(&vq, &el, err, sizeof(err)), 1);
	ck_assert_uint_eq(el.n_out, NUM);
}
END_TEST

START_TEST(loops)
{
	desc(0, 0x8000, 4, VIRTQ_DESC_F_NEXT, 1);
	desc(1, 0x8000, 4, VIRTQ_DESC_F_NEXT, 0);
	avail_add(0);
	expect_error("a loop");
	setup();
	desc(2, 0x8000, 4, VIRTQ_DESC_F_NEXT, 2);   /* self-loop */
	avail_add(2);
	expect_error("a loop");
}
END_TEST

START_TEST(bad_addresses_and_lengths)
{
	desc(0, RAM_SIZE, 4, 0, 0);
	avail_add(0);
	expect_error("not guest RAM");
	setup();
	desc(0, RAM_SIZE - 4, 8, 0, 0);             /* straddles the end */
	avail_add(0);
	expect_error("not guest RAM");
	setup();
	desc(0, ~0ULL - 2, 16, 0, 0);              /* wraps around */
	avail_add(0);
	expect_error("not guest RAM");
	setup();
	desc(0, 0x8000, 0xffffffffu, 0, 0);        /* 4 GiB buffer */
	avail_add(0);
	expect_error("not guest RAM");
}
END_TEST

START_TEST(bad_indices_and_flags)
{
	avail_add(NUM);                            /* head out of range */
	expect_error("chain head 8 is out of range");
	setup();
	desc(0, 0x8000, 4, VIRTQ_DESC_F_NEXT, 200);
	avail_add(0);
	expect_error("links to 200");
	setup();
	memcpy(ram + AVAIL + 2, &(uint16_t){ NUM + 1 }, 2);
	expect_error("more than 8 ahead");
	ck_assert_int_eq(vq_pending(&vq), -1);
	setup();
	desc(0, 0x8000, 16, VIRTQ_DESC_F_INDIRECT, 0);
	avail_add(0);
	expect_error("indirect");
	setup();
	desc(0, 0x8000, 16, 0x80, 0);
	avail_add(0);
	expect_error("unknown flags");
	setup();
	desc(0, 0x8000, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1);
	desc(1, 0x9000, 16, 0, 0);
	avail_add(0);
	expect_error("device-readable after a device-writable");
}
END_TEST

START_TEST(layout_checks)
{
	vq.ready = false;
	vq.num = 6;
	ck_assert_int_eq(vq_check(&vq, err, sizeof(err)), -1);
	ck_assert_ptr_nonnull(strstr(err, "power of 2"));
	vq.num = 0;
	ck_assert_int_eq(vq_check(&vq, err, sizeof(err)), -1);
	vq.num = 512;
	ck_assert_int_eq(vq_check(&vq, err, sizeof(err)), -1);
	vq.num = NUM;
	vq.desc = DESC + 8;
	ck_assert_int_eq(vq_check(&vq, err, sizeof(err)), -1);
	ck_assert_ptr_nonnull(strstr(err, "misaligned"));
	vq.desc = RAM_SIZE - 64;                   /* table runs off the end of RAM */
	ck_assert_int_eq(vq_check(&vq, err, sizeof(err)), -1);
	ck_assert_ptr_nonnull(strstr(err, "descriptor table"));
	vq.desc = DESC;
	vq.used = RAM_SIZE - 8;
	ck_assert_int_eq(vq_check(&vq, err, sizeof(err)), -1);
	ck_assert_ptr_nonnull(strstr(err, "device ring"));
	/* A queue that is not ready yields nothing and reads nothing. */
	reads = 0;
	ck_assert_int_eq(vq_pop(&vq, &el, err, sizeof(err)), 0);
	ck_assert_uint_eq(reads, 0);
}
END_TEST

START_TEST(no_interrupt_flag)
{
	ck_assert(vq_want_interrupt(&vq));
	memcpy(ram + AVAIL, &(uint16_t){ VIRTQ_AVAIL_F_NO_INTERRUPT }, 2);
	ck_assert(!vq_want_interrupt(&vq));
}
END_TEST

/* Random rings: whatever the driver wrote, pop terminates, never reads
 * outside the fake RAM and every buffer it returns is inside RAM. */
START_TEST(random_rings)
{
	srand(6);
	for (int round = 0; round < 2000; round++) {
		setup();
		for (unsigned i = 0; i < NUM; i++) {
			uint64_t addr = rand() % 4 ? (uint64_t)(rand() % RAM_SIZE) : ((uint64_t)rand() << 33);
			desc(i, addr, (uint32_t)rand() % 8192, (uint16_t)(rand() % 8), (uint16_t)(rand() % 12));
		}
		memcpy(ram + AVAIL + 2, &(uint16_t){ (uint16_t)(rand() % 12) }, 2);
		for (unsigned i = 0; i < NUM; i++)
			memcpy(ram + AVAIL + 4 + 2 * i, &(uint16_t){ (uint16_t)(rand() % 10) }, 2);
		for (int k = 0; k < NUM + 2; k++) {
			int r = vq_pop(&vq, &el, err, sizeof(err));
			if (r <= 0)
				break;
			for (unsigned b = 0; b < el.n_out + el.n_in; b++)
				ck_assert(f_is_ram(NULL, el.buf[b].gpa, el.buf[b].len));
		}
		teardown();
	}
	setup();
}
END_TEST

Suite *virtqueue_suite(void)
{
	Suite *s = suite_create("virtqueue");
	TCase *tc = tcase_create("virtqueue");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, chain_and_used_ring);
	tcase_add_test(tc, full_length_chain_is_not_a_loop);
	tcase_add_test(tc, loops);
	tcase_add_test(tc, bad_addresses_and_lengths);
	tcase_add_test(tc, bad_indices_and_flags);
	tcase_add_test(tc, layout_checks);
	tcase_add_test(tc, no_interrupt_flag);
	tcase_add_test(tc, random_rings);
	suite_add_tcase(s, tc);
	return s;
}
