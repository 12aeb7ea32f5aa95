/* The MCA register model (vmm/mca.c, included: it is not in the unit-test
 * library) and the --inject-memory-error-at parser. No KVM. */
#include <check.h>
#include <string.h>

#include "../../vmm/config.h"
#include "../../vmm/mca.c"

static struct mca m;

static void setup(void)
{
	ck_assert_int_eq(mca_init(&m, MCG_CTL_P | MCG_SER_P | MCA_BANKS), 0);
}

static uint64_t rd(uint32_t msr)
{
	uint64_t v = 0xdead;
	ck_assert_msg(mca_rdmsr(&m, msr, &v) == 0, "rdmsr 0x%x faulted", msr);
	return v;
}

START_TEST(power_on_state)
{
	ck_assert_uint_eq(rd(MSR_MCG_CAP), MCG_CTL_P | MCG_SER_P | 10);
	ck_assert_uint_eq(rd(MSR_MCG_STATUS), 0);
	ck_assert_uint_eq(rd(MSR_MCG_CTL), ~0ULL);
	for (unsigned b = 0; b < 10; b++) {
		ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * b), ~0ULL);
		ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * b + 1), 0);
		ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * b + 2), 0);
		ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * b + 3), 0);
	}
	ck_assert(mca_msr_handled(&m, 0x179));
	ck_assert(mca_msr_handled(&m, 0x400 + 4 * 10 - 1));
	ck_assert(!mca_msr_handled(&m, 0x400 + 4 * 10));
	ck_assert(!mca_msr_handled(&m, 0x178));
	ck_assert_int_eq(mca_init(&m, MCG_CTL_P), -1);          /* no banks */
	ck_assert_int_eq(mca_init(&m, MCG_CTL_P | 33), -1);     /* too many */
}
END_TEST

START_TEST(msr_write_rules)
{
	uint64_t v;

	ck_assert_int_eq(mca_wrmsr(&m, MSR_MCG_CAP, 0), -1);              /* read-only */
	ck_assert_int_eq(mca_wrmsr(&m, MSR_MCG_CTL, 0x5), -1);            /* 0 or ~0 only */
	ck_assert_int_eq(mca_wrmsr(&m, MSR_MCG_CTL, 0), 0);
	ck_assert_uint_eq(rd(MSR_MCG_CTL), 0);
	ck_assert_int_eq(mca_wrmsr(&m, MSR_MC0_CTL + 4 * 4, ~0ULL & ~(1ULL << 10)), 0); /* Linux's K8 quirk */
	ck_assert_int_eq(mca_wrmsr(&m, MSR_MC0_CTL + 4 * 3, 0x1234), -1);
	ck_assert_int_eq(mca_wrmsr(&m, MSR_MC0_CTL + 4 * 3 + 1, 1), -1);  /* STATUS: only 0 */
	ck_assert_int_eq(mca_wrmsr(&m, MSR_MC0_CTL + 4 * 3 + 1, 0), 0);
	ck_assert_int_eq(mca_wrmsr(&m, MSR_MC0_CTL + 4 * 3 + 2, 0xabc000), 0);
	ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * 3 + 2), 0xabc000);
	ck_assert_int_eq(mca_wrmsr(&m, MSR_MCG_STATUS, 0), 0);
	ck_assert_int_eq(mca_rdmsr(&m, 0x400 + 40, &v), -1);              /* beyond the banks */
	ck_assert_int_eq(mca_wrmsr(&m, 0x400 + 40, 0), -1);
	/* Without MCG_CTL_P, MCG_CTL does not exist. */
	ck_assert_int_eq(mca_init(&m, MCG_SER_P | 2), 0);
	ck_assert_int_eq(mca_rdmsr(&m, MSR_MCG_CTL, &v), -1);
	ck_assert_int_eq(mca_wrmsr(&m, MSR_MCG_CTL, ~0ULL), -1);
}
END_TEST

START_TEST(srao_then_handler_then_srar)
{
	uint64_t st = mca_status_srao();

	/* SDM SRAO memory scrubbing: VAL UC EN MISCV ADDRV S, AR clear, MCACOD 0xC0. */
	ck_assert_uint_eq(st, 0xBD000000000000C0ULL);
	/* SRAR data load: the same plus AR, MCACOD 0x134. */
	ck_assert_uint_eq(mca_status_srar(), 0xBD80000000000134ULL);
	ck_assert_uint_eq(mca_mcg_status_srar() & (MCG_STATUS_RIPV | MCG_STATUS_EIPV), MCG_STATUS_EIPV);
	ck_assert_uint_eq(mca_mcg_status_srao() & (MCG_STATUS_RIPV | MCG_STATUS_EIPV), MCG_STATUS_RIPV);

	ck_assert_int_eq(mca_inject(&m, 9, st, 0x500000, MCI_MISC_PHYS_4K, mca_mcg_status_srao(), true),
			 MCA_INJECT_RAISE);
	ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * 9 + 1), st);
	ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * 9 + 2), 0x500000);
	ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * 9 + 3), 0x8c);
	ck_assert_uint_eq(rd(MSR_MCG_STATUS), MCG_STATUS_MCIP | MCG_STATUS_RIPV);
	/* The guest handler: clear the bank, then MCIP. */
	ck_assert_int_eq(mca_wrmsr(&m, MSR_MC0_CTL + 4 * 9 + 1, 0), 0);
	ck_assert_int_eq(mca_wrmsr(&m, MSR_MCG_STATUS, 0), 0);
	ck_assert_int_eq(mca_inject(&m, 9, mca_status_srar(), 0x501000, MCI_MISC_PHYS_4K,
				    mca_mcg_status_srar(), true), MCA_INJECT_RAISE);
	ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * 9 + 1), mca_status_srar());   /* no OVER */
	ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * 9 + 2), 0x501000);
	ck_assert_uint_eq(rd(MSR_MCG_STATUS), MCG_STATUS_MCIP | MCG_STATUS_EIPV);
}
END_TEST

START_TEST(mcip_means_shutdown)
{
	ck_assert_int_eq(mca_inject(&m, 9, mca_status_srao(), 0x1000, 0x8c, mca_mcg_status_srao(), true),
			 MCA_INJECT_RAISE);
	/* Not handled yet: a second uncorrected error shuts the CPU down and
	 * logs nothing. */
	ck_assert_int_eq(mca_inject(&m, 9, mca_status_srar(), 0x2000, 0x8c, mca_mcg_status_srar(), true),
			 MCA_INJECT_SHUTDOWN);
	ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * 9 + 2), 0x1000);
	/* CR4.MCE clear: shutdown as well. */
	mca_reset(&m);
	ck_assert_int_eq(mca_inject(&m, 9, mca_status_srao(), 0x1000, 0x8c, mca_mcg_status_srao(), false),
			 MCA_INJECT_SHUTDOWN);
}
END_TEST

START_TEST(overflow_and_disabled_reporting)
{
	ck_assert_int_eq(mca_inject(&m, 9, mca_status_srao(), 0x1000, 0x8c, mca_mcg_status_srao(), true),
			 MCA_INJECT_RAISE);
	/* Handler clears only MCIP and leaves the bank valid: the next error overflows. */
	ck_assert_int_eq(mca_wrmsr(&m, MSR_MCG_STATUS, 0), 0);
	ck_assert_int_eq(mca_inject(&m, 9, mca_status_srao(), 0x2000, 0x8c, mca_mcg_status_srao(), true),
			 MCA_INJECT_RAISE);
	ck_assert(rd(MSR_MC0_CTL + 4 * 9 + 1) & MCI_STATUS_OVER);
	ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * 9 + 2), 0x2000);
	/* Corrected error into a bank holding an uncorrected one: only OVER. */
	ck_assert_int_eq(mca_wrmsr(&m, MSR_MCG_STATUS, 0), 0);
	ck_assert_int_eq(mca_inject(&m, 9, MCI_STATUS_VAL | MCI_STATUS_EN | 0x9f, 0x3000, 0, 0, true),
			 MCA_INJECT_LOGGED);
	ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * 9 + 2), 0x2000);
	/* Reporting disabled: MCi_CTL or MCG_CTL not all ones drops UC errors. */
	mca_reset(&m);
	ck_assert_int_eq(mca_wrmsr(&m, MSR_MC0_CTL + 4 * 9, 0), 0);
	ck_assert_int_eq(mca_inject(&m, 9, mca_status_srao(), 0x1000, 0x8c, mca_mcg_status_srao(), true),
			 MCA_INJECT_IGNORED);
	ck_assert_uint_eq(rd(MSR_MCG_STATUS), 0);
	mca_reset(&m);
	ck_assert_int_eq(mca_wrmsr(&m, MSR_MCG_CTL, 0), 0);
	ck_assert_int_eq(mca_inject(&m, 9, mca_status_srao(), 0x1000, 0x8c, mca_mcg_status_srao(), true),
			 MCA_INJECT_IGNORED);
	/* Bad requests. */
	ck_assert_int_eq(mca_inject(&m, 10, mca_status_srao(), 0, 0, 0, true), MCA_INJECT_EINVAL);
	ck_assert_int_eq(mca_inject(&m, 1, 0, 0, 0, 0, true), MCA_INJECT_EINVAL);
	ck_assert_str_eq(mca_inject_result_name(MCA_INJECT_SHUTDOWN), "shutdown");
}
END_TEST

/* AMD encoding: a deferred error is logged without #MC; a second one, or a
 * consumed error, over an unread one overflows (which is why vmm/mce.c holds
 * a deferred error until the guest has read the last one). */
START_TEST(amd_deferred_then_consumed)
{
	uint64_t def = mca_status_amd_deferred(), con = mca_status_amd_consumed();

	ck_assert_uint_eq(def, 0x9c00180000000000ULL);
	ck_assert_uint_eq(con, 0xbd00080000000000ULL);
	ck_assert_int_eq(mca_inject(&m, MCA_MEM_BANK, def, 0x5000, MCI_MISC_PHYS_4K, 0, true),
			 MCA_INJECT_LOGGED);
	ck_assert_uint_eq(rd(MSR_MCG_STATUS), 0);                 /* no #MC in progress */
	ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * MCA_MEM_BANK + 1), def);
	ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * MCA_MEM_BANK + 2), 0x5000);
	ck_assert_int_eq(mca_inject(&m, MCA_MEM_BANK, def, 0x6000, MCI_MISC_PHYS_4K, 0, true),
			 MCA_INJECT_LOGGED);
	ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * MCA_MEM_BANK + 1), def | MCI_STATUS_OVER);
	ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * MCA_MEM_BANK + 2), 0x6000);   /* the first is lost */
	uint64_t mcg = MCG_STATUS_MCIP | MCG_STATUS_EIPV | MCG_STATUS_RIPV;
	ck_assert_int_eq(mca_inject(&m, MCA_MEM_BANK, con, 0x7000, MCI_MISC_PHYS_4K, mcg, true),
			 MCA_INJECT_RAISE);
	ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * MCA_MEM_BANK + 1), con | MCI_STATUS_OVER);
	ck_assert_uint_eq(rd(MSR_MCG_STATUS), mcg);
	/* A deferred error while the consumed one is unread: it stays. */
	ck_assert_int_eq(mca_inject(&m, MCA_MEM_BANK, def, 0x8000, MCI_MISC_PHYS_4K, 0, true),
			 MCA_INJECT_LOGGED);
	ck_assert_uint_eq(rd(MSR_MC0_CTL + 4 * MCA_MEM_BANK + 2), 0x7000);
}
END_TEST

START_TEST(inject_at_parse)
{
	struct mce_inject_at a;
	char err[256];

	ck_assert_int_eq(config_parse_inject_at("0x12345000", &a, err, sizeof(err)), 0);
	ck_assert_uint_eq(a.gpa, 0x12345000);
	ck_assert_int_eq(a.kind, 0);
	ck_assert_uint_eq(a.delay_ms, 0);
	ck_assert_int_eq(config_parse_inject_at("0x500000:action-required@250", &a, err, sizeof(err)), 0);
	ck_assert_uint_eq(a.gpa, 0x500000);
	ck_assert_int_eq(a.kind, 1);
	ck_assert_uint_eq(a.delay_ms, 250);
	ck_assert_int_eq(config_parse_inject_at("8M:ao@0", &a, err, sizeof(err)), 0);
	ck_assert_uint_eq(a.gpa, 8 << 20);
	ck_assert_int_eq(a.kind, 0);
	ck_assert_int_eq(config_parse_inject_at("4096@10", &a, err, sizeof(err)), 0);
	ck_assert_uint_eq(a.gpa, 4096);
	ck_assert_uint_eq(a.delay_ms, 10);
	ck_assert_int_eq(config_parse_inject_at("0x2000:ar", &a, err, sizeof(err)), 0);
	ck_assert_int_eq(a.kind, 1);

	ck_assert_int_eq(config_parse_inject_at("0x12345", &a, err, sizeof(err)), -1);
	ck_assert_str_eq(err, "GPA 0x12345 is not 4 KiB aligned");
	ck_assert_int_eq(config_parse_inject_at("0x1000:maybe", &a, err, sizeof(err)), -1);
	ck_assert_str_eq(err, "invalid kind 'maybe': expected action-optional (ao) or action-required (ar)");
	ck_assert_int_eq(config_parse_inject_at("0x1000@soon", &a, err, sizeof(err)), -1);
	ck_assert_str_eq(err, "invalid delay 'soon': expected milliseconds (at most a day)");
	ck_assert_int_eq(config_parse_inject_at("0x1000@-5", &a, err, sizeof(err)), -1);
	ck_assert_int_eq(config_parse_inject_at("", &a, err, sizeof(err)), -1);
	ck_assert_int_eq(config_parse_inject_at("zz", &a, err, sizeof(err)), -1);
	ck_assert_str_eq(err, "invalid GPA 'zz' in 'zz': expected a number (0x-hex, decimal, K/M/G suffix)");
	ck_assert_int_eq(config_parse_inject_at("0x99999999999999999999", &a, err, sizeof(err)), -1);
	ck_assert_int_eq(config_parse_inject_at("1Q", &a, err, sizeof(err)), -1);
}
END_TEST

Suite *mce_suite(void)
{
	Suite *s = suite_create("mce");
	TCase *tc = tcase_create("mca");

	tcase_add_checked_fixture(tc, setup, NULL);
	tcase_add_test(tc, power_on_state);
	tcase_add_test(tc, msr_write_rules);
	tcase_add_test(tc, srao_then_handler_then_srar);
	tcase_add_test(tc, mcip_means_shutdown);
	tcase_add_test(tc, overflow_and_disabled_reporting);
	tcase_add_test(tc, amd_deferred_then_consumed);
	suite_add_tcase(s, tc);
	tc = tcase_create("config");
	tcase_add_test(tc, inject_at_parse);
	suite_add_tcase(s, tc);
	return s;
}
