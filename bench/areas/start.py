"""VM start: process start -> the guest's first console byte, mdvm vs QEMU,
and mdvm's own split of that time from its startup trace (MDVM_TRACE_STARTUP=1).

All three VMMs boot the same guest/mdvm-guest.elf through its PVH entry with a
256 MiB guest whose command line is `exit code=0`, console on a pipe.
"""
from benchlib import Mdvm, Qemu, NotMeasured, Proc, now_ns

TITLE = "VM start"
ORDER = 10
BUDGET = 120
QUICK_BUDGET = 30

MEMORY = "256M"
CMDLINE = "exit code=0"
# SeaBIOS's last words before it boots the -kernel option ROM (QEMU -M pc).
FIRMWARE_END = b"Booting from ROM.."

# mdvm's startup trace events in order, and the step each interval is.
PHASES = [
    (None, "main", "exec, ld.so", "process setup: exec, dynamic linking (spawn → main)"),
    ("main", "vm-create", "options, event loop", "process setup: options, event loop"),
    ("vm-create", "kvm", "KVM VM, irqchip, PIT", "KVM setup: /dev/kvm, VM, irqchip, PIT"),
    ("kvm", "memory", "guest memory", "KVM setup: guest memory (window, memdesc, pool, memslots)"),
    ("memory", "devices", "devices", "KVM setup: machine checks, console, devices"),
    ("devices", "load", "load ELF, ACPI", "load: ELF, ACPI tables, boot info"),
    ("load", "vcpus", "vCPUs", "KVM setup: vCPUs (create, CPUID, registers)"),
    ("vcpus", "run", "control socket", "control socket, signal handlers"),
    ("run", "kvm-run", "vCPU thread start", "first exit: vCPU thread start (→ first KVM_RUN)"),
    ("kvm-run", "first-exit", "first KVM_RUN → exit",
     "first exit: first KVM_RUN → first exit (guest boot code, emulated here)"),
    ("first-exit", None, "guest → first byte", "guest: first exit → first console byte"),
]


def guest_first_byte(vmm, timeout=30):
    """Arrival time of the guest's first console byte: the first byte, or for
    QEMU -M pc the first byte after SeaBIOS's text."""
    t = vmm.out.wait_any(timeout)
    if getattr(vmm, "machine", "") == "pc":
        off, _ = vmm.out.wait(FIRMWARE_END, timeout)
        t = vmm.out.wait_any(timeout, off + len(FIRMWARE_END))
    return t


def guest_bss_bytes():
    """Size of the guest's .bss from its symbols (0 if nm is missing)."""
    import subprocess
    from benchlib import GUEST
    try:
        out = subprocess.run(["nm", GUEST], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return 0
    sym = {l.split()[2]: int(l.split()[0], 16) for l in out.splitlines() if len(l.split()) == 3}
    return sym.get("__bss_end", 0) - sym.get("__bss_start", 0)


def one_run(vmm, want_rc, rows):
    """Times of one boot: first guest byte, banner, exit."""
    first = guest_first_byte(vmm)
    _, ready = vmm.wait_console("mdvm-guest: ready", 60)
    rc, t_exit = vmm.wait_exit(60)
    if rc != want_rc:
        raise RuntimeError("%s exited with %s, expected %s: %s" % (vmm.name, rc, want_rc, vmm.describe()))
    if "exit: code=0" not in vmm.out.text():
        raise RuntimeError("%s: the guest did not run its command line: %s" % (vmm.name, vmm.describe()))
    first_r, ready_r, exit_r = rows
    first_r.add(vmm.ms_since_start(first))
    ready_r.add(vmm.ms_since_start(ready))
    exit_r.add(vmm.ms_since_start(t_exit))
    return first


class _Adder:
    def __init__(self, row, who):
        self.row, self.who = row, who

    def add(self, v):
        self.row.add(self.who, v)


def run(b):
    n = b.pick(25, 1)
    t = b.table(TITLE, intro=(
        "Wall time from spawning the VMM to the guest's first console byte (read from the console pipe), "
        "to the guest's `mdvm-guest: ready` banner, and to process exit after the guest's `exit code=0`. "
        "%s guest, 1 vCPU, same guest ELF booted through PVH; runs of the three VMMs interleaved, %d each."
        % (MEMORY.replace("M", " MiB"), n)))
    QM = ("microvm", "pc")
    rows = {}
    for m in QM:
        suffix = "QEMU -M %s" % m
        rows[m] = (t.row("spawn → guest's first console byte", "ms", suffix),
                   t.row("spawn → guest ready banner", "ms", suffix),
                   t.row("spawn → process exit after guest `exit`", "ms", suffix))
    # Rows grouped by figure: reorder so the microvm and pc variants sit together.
    t.rows = [rows[m][i] for i in range(3) for m in QM]
    split = b.table("VM start: mdvm's own split", intro=(
        "The same mdvm runs, cut at the steps of mdvm's startup trace (`MDVM_TRACE_STARTUP=1`: "
        "CLOCK_MONOTONIC timestamps on stderr, read against the spawn time). Rows in the order they happen; "
        "they add up to the first row of the table above."))
    prows = [split.row(label, "ms") for _, _, _, label in PHASES]
    for r in prows:
        r.no_qemu("QEMU has no such trace")

    floor = []
    for i in range(n):
        order = ["mdvm"] + list(QM)
        order = order[i % 3:] + order[:i % 3]   # rotate: no VMM always runs first
        for who in order:
            if who == "mdvm":
                mrows = [rows[m][k] for m in QM for k in range(3)]
                with t.guard("mdvm", *(mrows + prows)):
                    vm = Mdvm(b, memory=MEMORY, cmdline=CMDLINE, qmp=False, trace=True)
                    adders = [_MultiAdd([rows[m][k] for m in QM], "mdvm") for k in range(3)]
                    first = one_run(vm, 0, adders)
                    ev = vm.trace()
                    missing = [e for a, z, _, _ in PHASES for e in (a, z) if e and e not in ev]
                    if missing:
                        raise NotMeasured("startup trace lacks event(s) %s" % ", ".join(sorted(set(missing))))
                    for (a, z, _, _), r in zip(PHASES, prows):
                        ta = ev[a][0] if a else vm.t0
                        tz = ev[z][0] if z else first
                        r.add("mdvm", (tz - ta) / 1e6)
            else:
                qrows = rows[who]
                with t.guard("qemu", *qrows):
                    q = Qemu(b, memory=MEMORY, cmdline=CMDLINE, machine=who, qmp=False)
                    one_run(q, 1, [_Adder(r, "qemu") for r in qrows])
        # The harness's own floor: spawn -> first byte of a trivial program.
        p = Proc(b, ["/bin/echo", "x"], name="echo")
        floor.append(p.ms_since_start(p.out.wait_any(10)))
        p.wait_exit(10)

    floor.sort()
    t.note("Harness floor (spawn → first byte of `/bin/echo`): %.2f ms median; it is inside every figure above."
           % floor[len(floor) // 2])
    t.note("QEMU: `qemu-system-x86_64 -accel tcg -M microvm|pc -m 256M -smp 1 -nographic -no-reboot "
           "-device isa-debug-exit,iobase=0x501,iosize=2 -kernel guest/mdvm-guest.elf -append 'exit code=0'`. "
           "`-M microvm` (qboot firmware, silent) is QEMU's fastest start and the fair comparison; with `-M pc` "
           "SeaBIOS and the iPXE option ROM run first and print their own text, which is not counted as the "
           "guest's first byte (timing starts after SeaBIOS's `Booting from ROM..`).")
    t.note("The guest ends with `exit code=0` (a write to port 0x501) rather than `poweroff`: `poweroff` "
           "waits ~0.1 s for an asynchronous power-off before falling back to that port, and `-M microvm` "
           "has no power-off port.")
    t.note("mdvm: `build/mdvm run --kernel guest/mdvm-guest.elf --memory 256M --cpus 1 --console stdio "
           "--cmdline 'exit code=0'` with defaults (memory backing auto, balloon on), no control socket; QEMU "
           "likewise has no QMP socket here.")
    bss = guest_bss_bytes()
    split.note("`first KVM_RUN → first exit` is guest code, not VMM work: the test guest's entry zeroes its "
               ".bss%s with `rep stosl` and builds its 4 GiB identity map before its first port access, and "
               "this host's KVM emulates those instructions (~2 M/s; `rep stos` ~7 MB/s). On hardware "
               "virtualization it takes microseconds." % (" (%d KiB)" % (bss // 1024) if bss else ""))
    if all(r.samples["mdvm"] for r in prows):
        med = [(short, r.median("mdvm")) for (_, _, short, _), r in zip(PHASES, prows)]
        b.plot(split, "start-split", "mdvm: spawn → first console byte, step by step (median)",
               "", "ms", [("mdvm", med)], kind="hbars")
    firsts = t.rows[:2]
    if all(r.samples[w] for r in firsts for w in ("mdvm", "qemu")):
        b.plot(t, "start-compare", "spawn → guest's first console byte (median)", "", "ms",
               [("median", [("mdvm", firsts[0].median("mdvm")),
                            ("QEMU -M microvm", firsts[0].median("qemu")),
                            ("QEMU -M pc", firsts[1].median("qemu"))])], kind="hbars")

class _MultiAdd:
    """Add one mdvm sample to several rows (mdvm's runs serve both QEMU variants)."""

    def __init__(self, rows, who):
        self.rows, self.who = rows, who

    def add(self, v):
        for r in self.rows:
            r.add(self.who, v)
