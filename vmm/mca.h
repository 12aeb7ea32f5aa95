/* The x86 machine-check architecture as a guest sees it: MCG_CAP,
 * MCG_STATUS, MCG_CTL and the MCi_CTL/STATUS/ADDR/MISC banks, with the rules
 * of the Intel SDM (vol. 3B ch. 15) and KVM's in-kernel model. Pure state, no
 * KVM: the user-space MCE back end (vmm/mce.c) runs guest RDMSR/WRMSR and
 * injections through it, and the unit tests drive it directly. */
#ifndef MDVM_MCA_H
#define MDVM_MCA_H
#include <stdbool.h>
#include <stdint.h>

#define MCA_BANKS_MAX    32
#define MCA_BANKS        10           /* what mdvm presents */

#define MSR_MCG_CAP      0x179
#define MSR_MCG_STATUS   0x17a
#define MSR_MCG_CTL      0x17b
#define MSR_MC0_CTL      0x400        /* MCi_CTL/STATUS/ADDR/MISC at 0x400 + 4i + 0..3 */

#define MCG_CTL_P        (1ULL << 8)
#define MCG_CMCI_P       (1ULL << 10)
#define MCG_SER_P        (1ULL << 24)
#define MCG_LMCE_P       (1ULL << 27)

#define MCG_STATUS_RIPV  (1ULL << 0)  /* restart IP valid: execution can resume */
#define MCG_STATUS_EIPV  (1ULL << 1)  /* error IP valid: RIP is the faulting instruction */
#define MCG_STATUS_MCIP  (1ULL << 2)  /* machine check in progress */

#define MCI_STATUS_VAL   (1ULL << 63)
#define MCI_STATUS_OVER  (1ULL << 62)
#define MCI_STATUS_UC    (1ULL << 61)
#define MCI_STATUS_EN    (1ULL << 60)
#define MCI_STATUS_MISCV (1ULL << 59)
#define MCI_STATUS_ADDRV (1ULL << 58)
#define MCI_STATUS_PCC   (1ULL << 57)
#define MCI_STATUS_S     (1ULL << 56)
#define MCI_STATUS_AR    (1ULL << 55)
#define MCI_STATUS_DEFERRED (1ULL << 44) /* AMD: uncorrected, not yet consumed (no #MC) */
#define MCI_STATUS_POISON (1ULL << 43) /* AMD: the address holds poisoned data */

/* MCA error codes (SDM table 15-9/15-20): SRAO memory scrubbing, SRAR data load. */
#define MCA_CODE_SCRUB   0x00c0
#define MCA_CODE_DATA_LOAD 0x0134
/* MCi_MISC: address mode physical (bits 8:6 = 2), recoverable address LSB 12. */
#define MCI_MISC_PHYS_4K ((2ULL << 6) | 12)

/* The bank mdvm reports memory errors in (QEMU uses 9 too). */
#define MCA_MEM_BANK     9

struct mca_bank {
	uint64_t ctl, status, addr, misc;
};

struct mca {
	uint64_t mcg_cap, mcg_status, mcg_ctl;
	struct mca_bank bank[MCA_BANKS_MAX];
};

/* mcg_cap: bank count in bits 7:0 (1..MCA_BANKS_MAX) plus capability bits.
 * Power-on state: every error reporting enabled (MCG_CTL, MCi_CTL all 1s),
 * nothing logged. -1 if mcg_cap is unusable. */
int  mca_init(struct mca *m, uint64_t mcg_cap);
void mca_reset(struct mca *m);
unsigned mca_nbanks(const struct mca *m);
/* True if msr is one of the MCA registers this model presents. */
bool mca_msr_handled(const struct mca *m, uint32_t msr);
/* Guest RDMSR/WRMSR: 0, or -1 when the CPU raises #GP. */
int  mca_rdmsr(const struct mca *m, uint32_t msr, uint64_t *val);
int  mca_wrmsr(struct mca *m, uint32_t msr, uint64_t val);

enum mca_inject_result {
	MCA_INJECT_RAISE = 0,   /* logged; raise #MC on this vCPU */
	MCA_INJECT_LOGGED,      /* logged (corrected / no signalling), no #MC */
	MCA_INJECT_IGNORED,     /* reporting disabled by MCG_CTL / MCi_CTL: dropped */
	MCA_INJECT_SHUTDOWN,    /* uncorrected while MCG_STATUS.MCIP (or CR4.MCE clear): shutdown */
	MCA_INJECT_EINVAL,      /* bad bank or status without VAL */
};
/* Log an error in `bank` as hardware (and KVM_X86_SET_MCE) does. cr4_mce is
 * the vCPU's CR4.MCE: an uncorrected error with it clear shuts down. */
enum mca_inject_result mca_inject(struct mca *m, unsigned bank, uint64_t status, uint64_t addr,
				  uint64_t misc, uint64_t mcg_status, bool cr4_mce);
const char *mca_inject_result_name(enum mca_inject_result r);

/* The MCi_STATUS/MCG_STATUS pair for a memory error at a page. */
uint64_t mca_status_srao(void);
uint64_t mca_status_srar(void);
uint64_t mca_mcg_status_srao(void);   /* MCIP | RIPV */
uint64_t mca_mcg_status_srar(void);   /* MCIP | EIPV, RIPV = 0 */
/* AMD has no SRAO/SRAR: a consumed error is UC + POISON (Linux grades any UC
 * error in user context as action required, given CPUID SUCCOR), a patrol
 * scrub error is a deferred error, logged without #MC and found by the OS's
 * poll of the banks. Encoded as QEMU does (MCACOD 0). */
uint64_t mca_status_amd_consumed(void);
uint64_t mca_status_amd_deferred(void);
#endif
