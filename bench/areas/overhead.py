"""VMM memory overhead: host memory of the VMM process beyond guest RAM, for
guests that barely touch their memory (the test guest's `idle`), mdvm vs QEMU.

Counted from /proc/PID/smaps once the guest is idle: every VMA that backs
guest RAM is set aside (mdvm: inside the guest RAM window its startup trace
prints; QEMU: the anonymous VMA of exactly the -m size, its RAM block), and
the rest is the VMM's: Rss (+ hugetlb pages) and, of it, the pages the
process wrote itself (Private_Dirty). Kernel memory KVM allocates for the VM (page
tables, memslot arrays) is not in smaps and not counted, for either VMM.
"""
import time

from benchlib import MiB, Mdvm, Qemu, NotMeasured, parse_size, size_label

TITLE = "VMM memory overhead"
ORDER = 20
BUDGET = 120
QUICK_BUDGET = 30

QEMU_MACHINES = ("microvm", "pc")


def measure(vmm, idle_line, settle):
    vmm.wait_console("mdvm-guest: ready", 60)
    vmm.wait_console(idle_line, 60)
    time.sleep(settle)           # let the VMM finish what it does after boot
    mem = vmm.memory()
    if mem["guest_vmas"] == 0:
        raise NotMeasured("no guest RAM mapping found in /proc/%d/smaps" % vmm.pid)
    rc = vmm.quit()
    if rc != 0:
        raise RuntimeError("%s exited with %s after quit: %s" % (vmm.name, rc, vmm.describe()))
    return mem


def run(b):
    sizes = b.pick(["256M", "4G"], ["64M", "1G"])
    n = b.pick(3, 1)
    settle = b.pick(0.5, 0.2)
    t = b.table(TITLE, intro=(
        "Host memory of the VMM process beyond guest RAM, with the test guest booted and idle "
        "(`--cmdline idle`; it touches well under 1 MiB of its RAM). %d run(s) per VMM and size; "
        "each run ends with QMP `quit`." % n))
    rows = {}
    for s in sizes:
        lab = size_label(parse_size(s)) + " guest"
        for m in QEMU_MACHINES:
            rows[s, m] = dict(
                rss=t.row("%s: VMM memory beyond guest RAM (Rss)" % lab, "MiB", "QEMU -M %s" % m),
                priv=t.row("%s: of it, written by the VMM (Private_Dirty)" % lab, "MiB", "QEMU -M %s" % m),
                guest=t.row("%s: guest RAM resident (set aside)" % lab, "MiB", "QEMU -M %s" % m))
    t.rows = [rows[s, m][k] for s in sizes for k in ("rss", "priv", "guest") for m in QEMU_MACHINES]

    for s in sizes:
        for i in range(n):
            mrows = [r for m in QEMU_MACHINES for r in rows[s, m].values()]
            with t.guard("mdvm", *mrows):
                vm = Mdvm(b, memory=s, cmdline="idle", trace=True)
                mem = measure(vm, "idle: waiting", settle)
                for m in QEMU_MACHINES:
                    rows[s, m]["rss"].add("mdvm", mem["vmm_rss"] / MiB)
                    rows[s, m]["priv"].add("mdvm", mem["vmm_dirty"] / MiB)
                    rows[s, m]["guest"].add("mdvm", mem["guest_rss"] / MiB)
            for m in QEMU_MACHINES:
                r = rows[s, m]
                with t.guard("qemu", *r.values()):
                    q = Qemu(b, memory=s, cmdline="idle", machine=m)
                    mem = measure(q, "idle: no test device, halting", settle)
                    r["rss"].add("qemu", mem["vmm_rss"] / MiB)
                    r["priv"].add("qemu", mem["vmm_dirty"] / MiB)
                    r["guest"].add("qemu", mem["guest_rss"] / MiB)
    t.note("What is counted: /proc/PID/smaps of the VMM process, all VMAs except guest RAM; Rss plus "
           "Shared_Hugetlb/Private_Hugetlb (Rss leaves hugetlb pages out). Shared library pages are in "
           "Rss (as Firecracker counts its overhead); 'written' is Private_Dirty + Private_Hugetlb: heap, "
           "stacks, tables, the memory this process alone costs whatever else runs (Private_Clean is left "
           "out: library pages count there only while no other process maps the library). Device memory (QEMU's BIOS, VGA RAM, "
           "option ROMs) is not guest RAM and counts as overhead.")
    t.note("Guest RAM: mdvm's window `[base, base + end of RAM)` from its startup trace "
           "(`MDVM_TRACE_STARTUP=1`, event `memory`); QEMU's RAM block is the anonymous VMA whose size equals "
           "`-m`. The guest-resident row shows what was set aside (QEMU: includes what its firmware wrote "
           "into guest RAM; transparent hugepages make either grow in 2 MiB steps).")
    t.note("mdvm: `build/mdvm run --memory SIZE --cmdline idle --control SOCK --console stdio` (defaults: "
           "memory backing auto, balloon on). QEMU: `-accel tcg -M microvm|pc -m SIZE -nographic -qmp unix:SOCK "
           "-kernel guest/mdvm-guest.elf -append idle`.")
