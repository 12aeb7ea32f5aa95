/* Machine-check architecture register model (see mca.h). The rules follow
 * the Intel SDM and KVM's kvm_vcpu_ioctl_x86_set_mce()/set_msr_mce(), so a
 * guest sees the same behaviour from either MCE back end. */
#include <string.h>
#include "mca.h"

int mca_init(struct mca *m, uint64_t mcg_cap)
{
	unsigned n = mcg_cap & 0xff;

	memset(m, 0, sizeof(*m));
	if (n == 0 || n > MCA_BANKS_MAX)
		return -1;
	m->mcg_cap = mcg_cap;
	mca_reset(m);
	return 0;
}

void mca_reset(struct mca *m)
{
	m->mcg_status = 0;
	m->mcg_ctl = (m->mcg_cap & MCG_CTL_P) ? ~0ULL : 0;
	for (unsigned i = 0; i < MCA_BANKS_MAX; i++)
		m->bank[i] = (struct mca_bank){ .ctl = ~0ULL };
}

unsigned mca_nbanks(const struct mca *m) { return m->mcg_cap & 0xff; }

bool mca_msr_handled(const struct mca *m, uint32_t msr)
{
	return (msr >= MSR_MCG_CAP && msr <= MSR_MCG_CTL) ||
	       (msr >= MSR_MC0_CTL && msr < MSR_MC0_CTL + 4 * mca_nbanks(m));
}

int mca_rdmsr(const struct mca *m, uint32_t msr, uint64_t *val)
{
	switch (msr) {
	case MSR_MCG_CAP:
		*val = m->mcg_cap;
		return 0;
	case MSR_MCG_STATUS:
		*val = m->mcg_status;
		return 0;
	case MSR_MCG_CTL:
		if (!(m->mcg_cap & MCG_CTL_P))
			return -1;
		*val = m->mcg_ctl;
		return 0;
	}
	if (!mca_msr_handled(m, msr))
		return -1;
	const struct mca_bank *b = &m->bank[(msr - MSR_MC0_CTL) / 4];
	const uint64_t regs[4] = { b->ctl, b->status, b->addr, b->misc };
	*val = regs[(msr - MSR_MC0_CTL) % 4];
	return 0;
}

int mca_wrmsr(struct mca *m, uint32_t msr, uint64_t val)
{
	switch (msr) {
	case MSR_MCG_CAP:
		return -1;                      /* read-only */
	case MSR_MCG_STATUS:
		m->mcg_status = val;            /* the handler clears MCIP here */
		return 0;
	case MSR_MCG_CTL:
		if (!(m->mcg_cap & MCG_CTL_P) || (val != 0 && val != ~0ULL))
			return -1;
		m->mcg_ctl = val;
		return 0;
	}
	if (!mca_msr_handled(m, msr))
		return -1;
	struct mca_bank *b = &m->bank[(msr - MSR_MC0_CTL) / 4];
	switch ((msr - MSR_MC0_CTL) % 4) {
	case 0:
		/* Only 0 or all 1s; Linux clears bit 10 of bank 4 on old AMD
		 * parts, which KVM tolerates too rather than #GP the guest. */
		if (val != 0 && (val | (1ULL << 10) | 1) != ~0ULL)
			return -1;
		b->ctl = val;
		return 0;
	case 1:
		if (val != 0)                   /* Intel: only 0 may be written */
			return -1;
		b->status = 0;
		return 0;
	case 2:
		b->addr = val;
		return 0;
	default:
		b->misc = val;
		return 0;
	}
}

enum mca_inject_result mca_inject(struct mca *m, unsigned bank, uint64_t status, uint64_t addr,
				  uint64_t misc, uint64_t mcg_status, bool cr4_mce)
{
	struct mca_bank *b;

	if (bank >= mca_nbanks(m) || !(status & MCI_STATUS_VAL))
		return MCA_INJECT_EINVAL;
	b = &m->bank[bank];
	if (status & MCI_STATUS_UC) {
		/* Uncorrected errors are only signalled when enabled in both. */
		if ((m->mcg_cap & MCG_CTL_P) && m->mcg_ctl != ~0ULL)
			return MCA_INJECT_IGNORED;
		if (b->ctl != ~0ULL)
			return MCA_INJECT_IGNORED;
		/* A machine check during a machine check, or with #MC disabled:
		 * the processor shuts down. Nothing is logged. */
		if ((m->mcg_status & MCG_STATUS_MCIP) || !cr4_mce)
			return MCA_INJECT_SHUTDOWN;
		if (b->status & MCI_STATUS_VAL)
			status |= MCI_STATUS_OVER;
		b->addr = addr;
		b->misc = misc;
		b->status = status;
		m->mcg_status = mcg_status;
		return MCA_INJECT_RAISE;
	}
	/* Corrected: never overwrite an uncorrected error still logged. */
	if (!(b->status & MCI_STATUS_VAL) || !(b->status & MCI_STATUS_UC)) {
		if (b->status & MCI_STATUS_VAL)
			status |= MCI_STATUS_OVER;
		b->addr = addr;
		b->misc = misc;
		b->status = status;
	} else {
		b->status |= MCI_STATUS_OVER;
	}
	return MCA_INJECT_LOGGED;
}

const char *mca_inject_result_name(enum mca_inject_result r)
{
	switch (r) {
	case MCA_INJECT_RAISE:    return "raise";
	case MCA_INJECT_LOGGED:   return "logged";
	case MCA_INJECT_IGNORED:  return "ignored";
	case MCA_INJECT_SHUTDOWN: return "shutdown";
	case MCA_INJECT_EINVAL:   return "invalid";
	}
	return "?";
}

static const uint64_t mem_error_common = MCI_STATUS_VAL | MCI_STATUS_UC | MCI_STATUS_EN |
					 MCI_STATUS_MISCV | MCI_STATUS_ADDRV | MCI_STATUS_S;

uint64_t mca_status_srao(void) { return mem_error_common | MCA_CODE_SCRUB; }
uint64_t mca_status_srar(void) { return mem_error_common | MCI_STATUS_AR | MCA_CODE_DATA_LOAD; }
uint64_t mca_mcg_status_srao(void) { return MCG_STATUS_MCIP | MCG_STATUS_RIPV; }
uint64_t mca_mcg_status_srar(void) { return MCG_STATUS_MCIP | MCG_STATUS_EIPV; }

static const uint64_t amd_common = MCI_STATUS_VAL | MCI_STATUS_EN | MCI_STATUS_MISCV |
				   MCI_STATUS_ADDRV | MCI_STATUS_POISON;

/* S as well: with MCG_SER_P Linux leaves banks without S to its poll. */
uint64_t mca_status_amd_consumed(void) { return amd_common | MCI_STATUS_UC | MCI_STATUS_S; }
uint64_t mca_status_amd_deferred(void) { return amd_common | MCI_STATUS_DEFERRED; }
