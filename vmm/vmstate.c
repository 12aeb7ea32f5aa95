/* KVM vCPU and VM state for migration (vmstate.h). The restore order is
 * QEMU's (kvm_arch_put_registers): regs, xsave, xcrs, sregs, MSRs,
 * mp_state, LAPIC, events, debug registers; sregs carry the APIC base that
 * the LAPIC state needs. */
#include <errno.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "util.h"
#include "vm.h"
#include "vmstate.h"

enum {
	VS_REGS = 1, VS_SREGS, VS_XSAVE, VS_XCRS, VS_MSRS, VS_MPSTATE, VS_LAPIC, VS_EVENTS,
	VS_DEBUGREGS, VS_FPU, VS_NR_VCPU,
	VS_CLOCK = 32, VS_PIC_MASTER, VS_PIC_SLAVE, VS_IOAPIC, VS_PIT2, VS_NR_VM,
};

void blob_put(struct blob *b, uint32_t id, const void *data, size_t len)
{
	size_t need = b->len + 8 + len;
	uint32_t h[2] = { id, (uint32_t)len };

	if (need > b->cap) {
		b->cap = need * 2 + 4096;
		b->p = xrealloc(b->p, b->cap);
	}
	memcpy(b->p + b->len, h, 8);
	memcpy(b->p + b->len + 8, data, len);
	b->len = need;
}

int blob_next(const uint8_t *p, size_t len, size_t *off, uint32_t *id, const void **data,
	      uint32_t *dlen)
{
	uint32_t h[2];

	if (*off == len)
		return 0;
	if (len - *off < 8)
		return -1;
	memcpy(h, p + *off, 8);
	if (h[1] > len - *off - 8)
		return -1;
	*id = h[0];
	*dlen = h[1];
	*data = p + *off + 8;
	*off += 8 + h[1];
	return 1;
}

#define VERR(...) ({ snprintf(err, errlen, __VA_ARGS__); -1; })

/* ---- MSRs: the list KVM reports, minus those this host cannot read. */
static pthread_mutex_t msr_lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t *msr_list;
static uint32_t msr_count;

static int msr_list_init(struct vm *vm, int vcpu_fd, char *err, size_t errlen)
{
	struct kvm_msr_list probe = { .nmsrs = 0 }, *l;
	int rc = 0;

	pthread_mutex_lock(&msr_lock);
	if (msr_list)
		goto out;
	ioctl(vm_kvm_fd(vm), KVM_GET_MSR_INDEX_LIST, &probe);   /* E2BIG, sets nmsrs */
	l = xcalloc(1, sizeof(*l) + probe.nmsrs * sizeof(uint32_t));
	l->nmsrs = probe.nmsrs;
	if (ioctl(vm_kvm_fd(vm), KVM_GET_MSR_INDEX_LIST, l) < 0) {
		free(l);
		rc = VERR("KVM_GET_MSR_INDEX_LIST: %s", strerror(errno));
		goto out;
	}
	msr_list = xcalloc(l->nmsrs + 1, sizeof(uint32_t));
	/* KVM_GET_MSRS reads up to the first MSR it cannot: one ioctl per
	 * unreadable MSR, not per MSR. Each waits for the running vCPU to
	 * leave KVM_RUN (vcpu->mutex): with a busy nested guest, ~0.1 s. */
	struct kvm_msrs *m = xcalloc(1, sizeof(*m) + l->nmsrs * sizeof(struct kvm_msr_entry));
	for (uint32_t i = 0; i < l->nmsrs;) {
		m->nmsrs = l->nmsrs - i;
		for (uint32_t k = 0; k < m->nmsrs; k++)
			m->entries[k] = (struct kvm_msr_entry){ .index = l->indices[i + k] };
		int got = ioctl(vcpu_fd, KVM_GET_MSRS, m);
		if (got < 0)
			got = 0;
		for (int k = 0; k < got; k++)
			msr_list[msr_count++] = l->indices[i + k];
		i += (uint32_t)got + 1;   /* skip the one it stopped at */
	}
	free(m);
	free(l);
out:
	pthread_mutex_unlock(&msr_lock);
	return rc;
}

int vmstate_prepare(struct vm *vm, char *err, size_t errlen)
{
	return msr_list_init(vm, vm_vcpu_fd(vm, 0), err, errlen);
}

int vmstate_save_vcpu(struct vm *vm, int index, struct blob *b, char *err, size_t errlen)
{
	int fd = vm_vcpu_fd(vm, index);
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	struct kvm_mp_state mp;
	struct kvm_lapic_state lapic;
	struct kvm_vcpu_events ev;
	struct kvm_debugregs dbg;
	struct kvm_xcrs xcrs;
	int xsize;

	if (ioctl(fd, KVM_GET_REGS, &regs) < 0)
		return VERR("vcpu %d: KVM_GET_REGS: %s", index, strerror(errno));
	blob_put(b, VS_REGS, &regs, sizeof(regs));
	if (ioctl(fd, KVM_GET_SREGS, &sregs) < 0)
		return VERR("vcpu %d: KVM_GET_SREGS: %s", index, strerror(errno));
	blob_put(b, VS_SREGS, &sregs, sizeof(sregs));

	xsize = ioctl(vm_fd(vm), KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
	if (xsize < (int)sizeof(struct kvm_xsave))
		xsize = sizeof(struct kvm_xsave);
	struct kvm_xsave *xs = xcalloc(1, (size_t)xsize);
	if (ioctl(fd, (size_t)xsize > sizeof(struct kvm_xsave) ? KVM_GET_XSAVE2 : KVM_GET_XSAVE, xs) == 0) {
		blob_put(b, VS_XSAVE, xs, (size_t)xsize);
	} else {
		struct kvm_fpu fpu;
		if (ioctl(fd, KVM_GET_FPU, &fpu) < 0) {
			free(xs);
			return VERR("vcpu %d: KVM_GET_XSAVE/KVM_GET_FPU: %s", index, strerror(errno));
		}
		blob_put(b, VS_FPU, &fpu, sizeof(fpu));
	}
	free(xs);
	if (ioctl(fd, KVM_GET_XCRS, &xcrs) == 0)
		blob_put(b, VS_XCRS, &xcrs, sizeof(xcrs));

	if (msr_list_init(vm, fd, err, errlen) < 0)
		return -1;
	struct kvm_msrs *msrs = xcalloc(1, sizeof(*msrs) + msr_count * sizeof(struct kvm_msr_entry));
	msrs->nmsrs = msr_count;
	for (uint32_t i = 0; i < msr_count; i++)
		msrs->entries[i].index = msr_list[i];
	int got = ioctl(fd, KVM_GET_MSRS, msrs);
	if (got != (int)msr_count) {
		free(msrs);
		return VERR("vcpu %d: KVM_GET_MSRS read %d of %u", index, got, msr_count);
	}
	blob_put(b, VS_MSRS, msrs, sizeof(*msrs) + msr_count * sizeof(struct kvm_msr_entry));
	free(msrs);

	if (ioctl(fd, KVM_GET_MP_STATE, &mp) < 0)
		return VERR("vcpu %d: KVM_GET_MP_STATE: %s", index, strerror(errno));
	blob_put(b, VS_MPSTATE, &mp, sizeof(mp));
	if (ioctl(fd, KVM_GET_LAPIC, &lapic) < 0)
		return VERR("vcpu %d: KVM_GET_LAPIC: %s", index, strerror(errno));
	blob_put(b, VS_LAPIC, &lapic, sizeof(lapic));
	if (ioctl(fd, KVM_GET_VCPU_EVENTS, &ev) < 0)
		return VERR("vcpu %d: KVM_GET_VCPU_EVENTS: %s", index, strerror(errno));
	blob_put(b, VS_EVENTS, &ev, sizeof(ev));
	if (ioctl(fd, KVM_GET_DEBUGREGS, &dbg) == 0)
		blob_put(b, VS_DEBUGREGS, &dbg, sizeof(dbg));
	return 0;
}

int vmstate_load_vcpu(struct vm *vm, int index, const void *p, size_t len, char *err, size_t errlen)
{
	const void *item[VS_NR_VCPU] = { 0 };
	uint32_t ilen[VS_NR_VCPU] = { 0 }, id, dlen;
	const void *data;
	size_t off = 0;
	int fd = vm_vcpu_fd(vm, index), r;

	while ((r = blob_next(p, len, &off, &id, &data, &dlen)) == 1) {
		if (id == 0 || id >= VS_NR_VCPU)
			return VERR("vcpu %d: unknown state item %u", index, id);
		item[id] = data;
		ilen[id] = dlen;
	}
	if (r < 0)
		return VERR("vcpu %d: malformed state", index);
#define NEED(id, type) \
	if (!item[id] || ilen[id] != sizeof(type)) \
		return VERR("vcpu %d: state item " #id " missing or of the wrong size", index)
	NEED(VS_REGS, struct kvm_regs);
	NEED(VS_SREGS, struct kvm_sregs);
	NEED(VS_MPSTATE, struct kvm_mp_state);
	NEED(VS_LAPIC, struct kvm_lapic_state);
	NEED(VS_EVENTS, struct kvm_vcpu_events);
	if (!item[VS_MSRS] || ilen[VS_MSRS] < sizeof(struct kvm_msrs))
		return VERR("vcpu %d: MSRs missing", index);
	if (ioctl(fd, KVM_SET_REGS, item[VS_REGS]) < 0)
		return VERR("vcpu %d: KVM_SET_REGS: %s", index, strerror(errno));
	if (item[VS_XSAVE]) {
		int xsize = ioctl(vm_fd(vm), KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
		if (xsize < (int)sizeof(struct kvm_xsave))
			xsize = sizeof(struct kvm_xsave);
		if (ilen[VS_XSAVE] != (uint32_t)xsize)
			return VERR("vcpu %d: XSAVE area is %u bytes, this host's is %d", index,
				    ilen[VS_XSAVE], xsize);
		void *xs = xmalloc((size_t)xsize);
		memcpy(xs, item[VS_XSAVE], (size_t)xsize);
		int rc = ioctl(fd, KVM_SET_XSAVE, xs);
		free(xs);
		if (rc < 0)
			return VERR("vcpu %d: KVM_SET_XSAVE: %s", index, strerror(errno));
	} else if (item[VS_FPU] && ilen[VS_FPU] == sizeof(struct kvm_fpu)) {
		if (ioctl(fd, KVM_SET_FPU, item[VS_FPU]) < 0)
			return VERR("vcpu %d: KVM_SET_FPU: %s", index, strerror(errno));
	}
	if (item[VS_XCRS] && ilen[VS_XCRS] == sizeof(struct kvm_xcrs) &&
	    ioctl(fd, KVM_SET_XCRS, item[VS_XCRS]) < 0)
		return VERR("vcpu %d: KVM_SET_XCRS: %s", index, strerror(errno));
	if (ioctl(fd, KVM_SET_SREGS, item[VS_SREGS]) < 0)
		return VERR("vcpu %d: KVM_SET_SREGS: %s", index, strerror(errno));

	/* MSRs: copy (alignment), check the count matches the length. */
	struct kvm_msrs *msrs = xmalloc(ilen[VS_MSRS]);
	memcpy(msrs, item[VS_MSRS], ilen[VS_MSRS]);
	if (sizeof(*msrs) + (size_t)msrs->nmsrs * sizeof(struct kvm_msr_entry) != ilen[VS_MSRS]) {
		free(msrs);
		return VERR("vcpu %d: MSR list length mismatch", index);
	}
	uint32_t done = 0;
	while (done < msrs->nmsrs) {
		struct kvm_msrs *rest = xcalloc(1, sizeof(*rest) +
					       (msrs->nmsrs - done) * sizeof(struct kvm_msr_entry));
		rest->nmsrs = msrs->nmsrs - done;
		memcpy(rest->entries, msrs->entries + done, rest->nmsrs * sizeof(struct kvm_msr_entry));
		int set = ioctl(fd, KVM_SET_MSRS, rest);
		free(rest);
		if (set < 0) {
			free(msrs);
			return VERR("vcpu %d: KVM_SET_MSRS: %s", index, strerror(errno));
		}
		done += (uint32_t)set;
		if (done < msrs->nmsrs) {
			/* The source's KVM saved an MSR this one refuses: say which. */
			pr_warn("vcpu %d: MSR 0x%x not accepted by this host; skipped", index,
				msrs->entries[done].index);
			done++;
		}
	}
	/* KVM drops a TSC-deadline write unless the LAPIC timer is already in
	 * TSC-deadline mode: write it again once the LAPIC is loaded, or a
	 * Linux guest never gets its next timer interrupt. */
	struct { struct kvm_msrs h; struct kvm_msr_entry e; } deadline = { .h.nmsrs = 0 };
	for (uint32_t i = 0; i < msrs->nmsrs; i++)
		if (msrs->entries[i].index == 0x6e0 /* MSR_IA32_TSC_DEADLINE */) {
			deadline.e = msrs->entries[i];
			deadline.h.nmsrs = 1;
		}
	free(msrs);
	if (ioctl(fd, KVM_SET_MP_STATE, item[VS_MPSTATE]) < 0)
		return VERR("vcpu %d: KVM_SET_MP_STATE: %s", index, strerror(errno));
	if (ioctl(fd, KVM_SET_LAPIC, item[VS_LAPIC]) < 0)
		return VERR("vcpu %d: KVM_SET_LAPIC: %s", index, strerror(errno));
	if (deadline.h.nmsrs && ioctl(fd, KVM_SET_MSRS, &deadline) != 1)
		return VERR("vcpu %d: KVM_SET_MSRS (TSC deadline): %s", index, strerror(errno));
	if (ioctl(fd, KVM_SET_VCPU_EVENTS, item[VS_EVENTS]) < 0)
		return VERR("vcpu %d: KVM_SET_VCPU_EVENTS: %s", index, strerror(errno));
	if (item[VS_DEBUGREGS] && ilen[VS_DEBUGREGS] == sizeof(struct kvm_debugregs) &&
	    ioctl(fd, KVM_SET_DEBUGREGS, item[VS_DEBUGREGS]) < 0)
		return VERR("vcpu %d: KVM_SET_DEBUGREGS: %s", index, strerror(errno));
	return 0;
#undef NEED
}

int vmstate_save_vm(struct vm *vm, struct blob *b, char *err, size_t errlen)
{
	int fd = vm_fd(vm);
	struct kvm_clock_data clk = { 0 };
	struct kvm_pit_state2 pit;

	if (ioctl(fd, KVM_GET_CLOCK, &clk) < 0)
		return VERR("KVM_GET_CLOCK: %s", strerror(errno));
	blob_put(b, VS_CLOCK, &clk, sizeof(clk));
	for (uint32_t chip = 0; chip < 3; chip++) {
		struct kvm_irqchip ic = { .chip_id = chip };
		if (ioctl(fd, KVM_GET_IRQCHIP, &ic) < 0)
			return VERR("KVM_GET_IRQCHIP %u: %s", chip, strerror(errno));
		blob_put(b, VS_PIC_MASTER + chip, &ic, sizeof(ic));
	}
	if (ioctl(fd, KVM_GET_PIT2, &pit) < 0)
		return VERR("KVM_GET_PIT2: %s", strerror(errno));
	blob_put(b, VS_PIT2, &pit, sizeof(pit));
	return 0;
}

int vmstate_load_vm(struct vm *vm, const void *p, size_t len, char *err, size_t errlen)
{
	int fd = vm_fd(vm), r, n = 0;
	uint32_t id, dlen;
	const void *data;
	size_t off = 0;

	while ((r = blob_next(p, len, &off, &id, &data, &dlen)) == 1) {
		n++;
		switch (id) {
		case VS_CLOCK: {
			struct kvm_clock_data clk = { 0 };
			if (dlen != sizeof(clk))
				return VERR("VM state: bad clock item");
			memcpy(&clk, data, dlen);
			/* Only the value: the flags describe the source host. */
			struct kvm_clock_data set = { .clock = clk.clock };
			if (ioctl(fd, KVM_SET_CLOCK, &set) < 0)
				return VERR("KVM_SET_CLOCK: %s", strerror(errno));
			break;
		}
		case VS_PIC_MASTER:
		case VS_PIC_SLAVE:
		case VS_IOAPIC: {
			struct kvm_irqchip ic;
			if (dlen != sizeof(ic))
				return VERR("VM state: bad irqchip item");
			memcpy(&ic, data, dlen);
			if (ic.chip_id != id - VS_PIC_MASTER)
				return VERR("VM state: irqchip id mismatch");
			if (ioctl(fd, KVM_SET_IRQCHIP, &ic) < 0)
				return VERR("KVM_SET_IRQCHIP %u: %s", ic.chip_id, strerror(errno));
			break;
		}
		case VS_PIT2: {
			struct kvm_pit_state2 pit;
			if (dlen != sizeof(pit))
				return VERR("VM state: bad PIT item");
			memcpy(&pit, data, dlen);
			if (ioctl(fd, KVM_SET_PIT2, &pit) < 0)
				return VERR("KVM_SET_PIT2: %s", strerror(errno));
			break;
		}
		default:
			return VERR("VM state: unknown item %u", id);
		}
	}
	if (r < 0)
		return VERR("VM state: malformed");
	if (n != 5)
		return VERR("VM state: %d of 5 items", n);
	return 0;
}
