"""End-to-end: stock Debian Linux guests under mdvm, inside a nested-SVM L1
under QEMU TCG (see docs/linux-guests.md). Each test boots L1 with
e2e=NAME; l1-init runs mdvm, prints "E2E ..." lines and the L2 console as
"L2| ..." lines; the L2 agent reports "AGENT key=value"."""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MDVM = os.path.join(ROOT, "build", "mdvm")
QEMU_TIMEOUT = int(os.environ.get("E2E_TIMEOUT", "300"))


@pytest.fixture(scope="session")
def images():
    r = subprocess.run([os.path.join(ROOT, "tests", "e2e", "build.sh"), MDVM],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, "building the e2e images failed:\n" + r.stdout + r.stderr
    return r.stdout.strip().splitlines()[-1]


class Run:
    """One scenario's part of an L1 console (between E2E begin= and finish=)."""
    def __init__(self, test, console, rc):
        self.test, self.console, self.rc = test, console, rc
        self.agent = {}
        self.l2exit = None
        self.host_epoch = None
        for line in console.splitlines():
            m = re.match(r"L2\| AGENT ([a-z0-9_-]+)=(.*)$", line.rstrip("\r"))
            if m:
                self.agent[m.group(1)] = m.group(2)
            m = re.match(r"E2E l2-exit rc=(\d+) seconds=([\d.]+)(?: host_epoch=(\d+))?", line)
            if m:
                self.l2exit = (int(m.group(1)), float(m.group(2)))
                self.host_epoch = int(m.group(3)) if m.group(3) else None
        self.mdvm_err = [l[len("E2E mdvm: "):] for l in console.splitlines() if l.startswith("E2E mdvm: ")]

    def tail(self, n=60, prefix=None):
        lines = [l for l in self.console.splitlines() if prefix is None or l.startswith(prefix)]
        return "\n".join(lines[-n:])

    def e2e(self, key):
        """Values of "E2E key=value ..." lines, as dicts."""
        out = []
        for line in self.console.splitlines():
            if line.startswith("E2E %s " % key) or line.startswith("E2E %s=" % key):
                out.append(dict(re.findall(r"([a-z0-9_-]+)=(\S*)", line[4:])))
        return out

    def check(self, cond, what):
        """Assert with the tail of the consoles (L1 and L2) on failure."""
        assert cond, "%s\n--- e2e=%s: tail of the L1 console ---\n%s\n--- tail of the L2 console ---\n%s" % (
            what, self.test, "\n".join([l for l in self.console.splitlines() if l.strip() and not l.startswith("L2")][-25:]),
            self.tail(40, "L2"))


# Scenarios that share one L1 boot (QEMU start and L1 boot cost ~10 s each);
# each runs after the previous one's mdvm processes ended.
GROUPS = [("boot", "boot-pvh", "balloon"), ("migrate", "compact"), ("mce-native", "mce-emulated")]
_runs = {}


def run_l1(cache, tests, extra=""):
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "EPYC,+svm", "-m", "2G", "-smp", "2",
           "-nographic", "-no-reboot", "-kernel", os.path.join(cache, "vmlinuz"),
           "-initrd", os.path.join(cache, "l1-initrd.cpio"),
           "-append", "console=ttyS0 panic=-1 quiet loglevel=4 e2e=%s %s" % (",".join(tests), extra)]
    timeout = QEMU_TIMEOUT * len(tests)
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        out, rc = p.stdout, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = e.stdout or b"", -1
    text = "\n".join(l for l in out.decode("utf-8", "replace").splitlines() if "TCG doesn't support" not in l)
    with open(os.path.join(cache, "console-%s.log" % "+".join(tests)), "w") as f:
        f.write(text)   # the whole L1 console, for a look after a failure
    return rc, timeout, text


def scenario(cache, test):
    """The Run of one scenario; the first call runs its whole group in one L1."""
    group = next(g for g in GROUPS if test in g)
    if group not in _runs:
        _runs[group] = run_l1(cache, group)
        rc, timeout, text = _runs[group]
        if rc == 0 and "E2E end" not in text and "Kernel panic" not in text:
            # L1 reset itself (QEMU -no-reboot exits 0): no panic, no
            # oops, the console just stops (seen once, in the balloon
            # scenario, 2026-11-22). mdvm is a user process in L1 and cannot
            # reset it; TCG's nested SVM can. Run the group once more, and
            # say so in the output.
            last = re.findall(r"^E2E begin=(\S+)", text, re.M)
            print("\nL1 reset during %s (console ended, no panic); running %s again"
                  % (last[-1] if last else "boot", "+".join(group)))
            _runs[group] = run_l1(cache, group)
        elif "guest triple fault" in text:
            # An L2 CPU reset by itself, no guest log before it: seen once
            # in ~5 nested migrations (2026-11-22, source vCPU 1 while
            # auto-converge kicked it every 10 ms), never on the host's own
            # KVM. Cause not found (TCG's nested SVM is suspect, as for
            # the L1 resets above). Run the group once more and say so: a
            # fault that comes back fails the test.
            print("\nan L2 guest triple-faulted in %s; running it again" % "+".join(group))
            _runs[group] = run_l1(cache, group)
    rc, timeout, text = _runs[group]
    m = re.search(r"^E2E begin=%s$(.*?)^E2E finish=%s seconds=([\d.]+)" % (test, test), text, re.M | re.S)
    run = Run(test, m.group(1) if m else text, rc)
    run.check("E2E start" in text and "kvm=yes" in text, "L1 has no /dev/kvm (kvm_amd did not load)")
    run.check(m, "L1 did not finish scenario %s (QEMU exit %d, timeout %d s)" % (test, rc, timeout))
    print("%s: %s s in L1" % (test, m.group(2)))
    return run


def check_boot(run, cpus, mem_mib):
    run.check(run.l2exit is not None and run.l2exit[0] == 0,
              "mdvm did not exit 0 after the guest powered off: %s" % (run.l2exit,))
    a = run.agent
    run.check(a.get("done") == "1", "the L2 agent did not finish")
    run.check(a.get("nproc") == str(cpus), "guest sees %s CPUs, want %d" % (a.get("nproc"), cpus))
    run.check(a.get("online") == "0-%d" % (cpus - 1), "online CPUs %s" % a.get("online"))
    # The e820 RAM the kernel counted: all of --memory but mdvm's reserved
    # low ranges (boot area, zero page/page tables, 0x9fc00-1M) and page 0.
    e820 = int(a.get("e820_ram_kb", "0"))
    run.check(mem_mib * 1024 - 1024 <= e820 <= mem_mib * 1024,
              "kernel counted %d KiB of RAM, want about %d KiB" % (e820, mem_mib * 1024))
    memtotal = int(a.get("memtotal_kb", "0"))
    run.check(mem_mib * 1024 * 0.7 <= memtotal < e820, "MemTotal %d KiB" % memtotal)
    run.check(a.get("clocksource") == "kvm-clock", "clocksource %s" % a.get("clocksource"))
    run.check(re.match(r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d$", a.get("rtc", "")), "RTC %s" % a.get("rtc"))
    # The CMOS clock tells the host's time: L1's clock, read when mdvm exited
    # (the guest read its RTC during boot, the run took seconds to minutes).
    rtc = int(a.get("rtc_epoch") or 0)
    run.check(run.host_epoch and 0 <= run.host_epoch - rtc <= 300,
              "guest RTC %s s since the epoch, host %s when mdvm exited" % (rtc, run.host_epoch))
    # The 16550 interrupts carried the console (8250 driver, IRQ 4).
    run.check(int(a.get("serial_irqs") or 0) > 0, "no ttyS0 interrupts: %s" % a.get("serial_irqs"))
    # virtio-balloon found through ACPI (a stock kernel has no virtio_mmio.device=)
    # and bound by Debian's module.
    run.check("insmod-failed" not in a, "a module did not load: %s" % a.get("insmod-failed"))
    run.check(a.get("virtio_devices", "").split() == ["virtio0"], "virtio devices: %s" % a.get("virtio_devices"))
    run.check("LNRO0005" in a.get("virtio0_path", ""), "virtio0 not under the ACPI device: %s" % a.get("virtio0_path"))
    run.check(a.get("virtio0_driver") == "virtio_balloon", "virtio0 driver: %s" % a.get("virtio0_driver"))


def test_boot_bzimage(images):
    """Stock bzImage via the 64-bit boot protocol, initrd, 2 vCPUs, 256 MiB,
    ACPI power-off ends mdvm with status 0."""
    run = scenario(images, "boot")
    check_boot(run, 2, 256)
    print("L2 bzImage boot to power-off: %.1f s" % run.l2exit[1])


def test_boot_pvh(images):
    """The vmlinux inside the same bzImage via PVH, initrd as a PVH module, 3 vCPUs, 384 MiB."""
    run = scenario(images, "boot-pvh")
    check_boot(run, 3, 384)
    # It ends by a reset (reboot=a: the FADT reset register, port 0xcf9),
    # which ends mdvm with status 0, saying why.
    run.check(any("port 0xcf9" in l for l in run.mdvm_err) and
              any("guest reset; exiting" in l for l in run.mdvm_err),
              "mdvm did not report the guest's reset: %s" % run.mdvm_err)
    print("L2 PVH boot to reset: %.1f s" % run.l2exit[1])


def test_balloon(images):
    """virtio-balloon found through ACPI (LNRO0005) by the stock virtio_mmio and
    virtio_balloon modules; QMP balloon 512M -> 256M -> 512M while the guest
    reports its memory. (Debian's driver with DEFLATE_ON_OOM keeps MemTotal;
    the balloon's pages leave MemFree.)"""
    run = scenario(images, "balloon")
    st = {}
    for line in run.console.splitlines():
        m = re.match(r"E2E (before|inflated|deflated) actual=(\d+) rss_kb=(\d+) guest=(\d+),(\d+)", line)
        if m:
            st[m.group(1)] = dict(actual=int(m.group(2)), rss=int(m.group(3)),
                                  total=int(m.group(4)), free=int(m.group(5)))
    run.check(set(st) == {"before", "inflated", "deflated"}, "balloon steps missing: %s" % st)
    run.check(run.agent.get("ready") == "1", "the L2 agent did not start")
    b, i, d = st["before"], st["inflated"], st["deflated"]
    run.check(b["actual"] == 512 << 20 and i["actual"] == 256 << 20 and d["actual"] == 512 << 20,
              "query-balloon actual: %s" % st)
    run.check(b["free"] - i["free"] >= 200 * 1024, "guest MemFree did not drop by ~256 MiB: %s" % st)
    run.check(abs(d["free"] - b["free"]) <= 48 * 1024, "guest MemFree not back after deflate: %s" % st)
    run.check(i["rss"] <= b["rss"] + 8 * 1024, "mdvm's RSS grew while inflating: %s" % st)
    # DEFLATE_ON_OOM: the driver keeps MemTotal.
    run.check(b["total"] == i["total"] == d["total"], "guest MemTotal moved: %s" % st)
    # The balloon's 256 MiB are typed ballooned and have no host memory: what
    # stays backed fits in the other 256 MiB.
    im = run.e2e("inflated-memory")
    run.check(im, "no query-memory after inflating")
    line = next(l for l in run.console.splitlines() if l.startswith("E2E inflated-memory "))
    ballooned = re.search(r'"ballooned":(\d+)', line)
    populated = re.search(r'"populated-bytes":(\d+)', line)
    # The guest kernel now and then touches a page it gave the balloon (0-2
    # per run here, at 2 MiB-aligned GPAs); mdvm backs it again and logs
    # "touched while in the balloon". Before mm/ kept large folios off
    # ballooned pages, ~420 pages a run went back this way.
    run.check(ballooned and 65536 - 64 <= int(ballooned.group(1)) <= 65536, "ballooned pages: %s" % line)
    stats = next((l for l in run.console.splitlines() if l.startswith("E2E inflated-balloon ")), "")
    dev = re.search(r'"ballooned-pages":(\d+)', stats)
    run.check(dev and int(dev.group(1)) == 65536, "the device's ballooned-pages: %s" % stats)
    run.check(populated and int(populated.group(1)) <= 256 << 20,
              "%s bytes of guest RAM backed with 256 of 512 MiB ballooned" % (populated and populated.group(1)))
    print("balloon: %s" % st)
    # Free page reporting (CONFIG_PAGE_REPORTING=y, reports free blocks of
    # pageblock order, 2 MiB): the guest touched 128 MiB and freed it; mdvm's
    # RSS (smaps_rollup) must fall back from its peak.
    rep = run.e2e("reporting")
    run.check(rep and rep[0].get("freed") == "1" and rep[0].get("peak_kb"),
              "the guest did not touch and free its memory: %s" % rep)
    peak, after, reported = int(rep[0]["peak_kb"]), int(rep[0]["after_kb"]), int(rep[0]["reported"])
    run.check(peak - after >= 64 * 1024,
              "mdvm's RSS %d KiB -> %d KiB: free page reporting did not return memory" % (peak, after))
    run.check(reported >= 64 << 20, "query-balloon-stats reported-bytes grew by %d" % reported)
    print("free page reporting: RSS %d -> %d MiB, %d MiB reported" % (peak >> 10, after >> 10, reported >> 20))


def check_memcheck(run, console_prefix="L2| "):
    """memcheck's verdict on the console after the host operation."""
    lines = [l[len(console_prefix):].rstrip("\r") for l in run.console.splitlines() if l.startswith(console_prefix)]
    sweeps = [l for l in lines if l.startswith("memcheck: sweep")]
    verdict = [l for l in lines if l.startswith("memcheck: PASS") or l.startswith("memcheck: FAIL")]
    run.check(verdict and verdict[-1].startswith("memcheck: PASS"), "memcheck: %s" % verdict)
    run.check(run.agent.get("memcheck_rc") == "0", "memcheck exit %s" % run.agent.get("memcheck_rc"))
    return sweeps, verdict[-1]


def test_migrate(images):
    """Live migration between two mdvm processes in L1 while memcheck (24 MiB,
    every page checked against the last sweep) runs in the guest; the guest
    finishes on the destination, its check passes and it powers off there."""
    run = scenario(images, "migrate")
    mig = run.e2e("migrate")
    run.check(mig and mig[0].get("rc") == "0", "mdvm ctl migrate failed: %s" % mig)
    src = [l for l in run.console.splitlines() if l.startswith("E2E source {")]
    run.check(src and re.search(r'"status": *"completed"', src[0]), "source query-migrate: %s" % src)
    run.check(run.l2exit is not None and run.l2exit[0] == 0, "destination mdvm exit: %s" % (run.l2exit,))
    sweeps, verdict = check_memcheck(run)
    run.check(len(sweeps) >= 2, "memcheck did not sweep on the destination: %s" % sweeps)
    src_sweeps = [l for l in run.console.splitlines() if l.startswith("L2A| memcheck: sweep")]
    run.check(src_sweeps, "memcheck did not run on the source")
    print("migration: %s s; source sweeps %d, destination sweeps %d, %s" % (
        mig[0].get("seconds"), len(src_sweeps), len(sweeps), verdict))


def test_compact(images):
    """Compaction under a running Linux guest, on memfd backing: the backing
    where reclaim means something (it packs the live 4 KiB folios of
    half-empty pool hugepages into others and returns the emptied 2 MiB file
    ranges; on hugetlb, thp and anon it does nothing, docs/compaction.md).
    x-mdvm-migrate-range first moves every folio of 16-240 MiB. In the
    guest, memcheck (16 MiB) frees every odd page of its memory and keeps
    checking the even ones; the guest's virtio-balloon inflates by 64 MiB,
    taking those scattered 4 KiB holes first (order-0 allocations come from
    the order-0 free lists), and mdvm punches them. Then QMP compact
    mode=reclaim must move folios and free pool hugepages, and mdvm's memory
    (smaps_rollup Rss) must be below where it was before the inflation; the
    balloon deflates, memcheck writes its holes again, compact mode=collapse
    must gather regions into 2 MiB folios. memcheck checks its pages all the
    while and passes."""
    run = scenario(images, "compact")
    run.check(run.agent.get("holes") == "1", "memcheck did not free its holes")
    mr = run.e2e("migrate-range")
    run.check(mr and mr[0].get("rc") == "0", "x-mdvm-migrate-range: %s" % mr)
    mr_moved = re.search(r'"folios-moved": *(\d+)', run.console.split("E2E migrate-range", 1)[1])
    run.check(mr_moved and int(mr_moved.group(1)) > 0, "x-mdvm-migrate-range moved nothing")
    run.check("inflated" in run.agent and run.e2e("balloon") and run.e2e("balloon")[0].get("actual") == str(192 << 20),
              "the balloon did not inflate to 192 MiB: %s %s" % (run.e2e("balloon"), run.agent.get("inflated")))
    steps = {}
    for line in run.console.splitlines():
        m = re.match(r"E2E compact mode=(reclaim|collapse) rc=(\d+) seconds=([\d.]+) reply=(.*)", line)
        if m:
            run.check(m.group(2) == "0" and '"return"' in m.group(4), "compact mode=%s failed: %s" % (m.group(1), line))
            steps[m.group(1)] = dict((k, int(v)) for k, v in re.findall(r'"([a-z-]+)": *(\d+)', m.group(4)))
            steps[m.group(1)]["seconds"] = float(m.group(3))
    run.check(set(steps) == {"reclaim", "collapse"}, "compaction steps missing: %s" % steps)
    frag = dict((d["step"], d) for d in run.e2e("frag"))
    run.check(set(frag) >= {"before", "inflated", "reclaimed", "collapsed"}, "host memory samples: %s" % frag)
    # L1's Shmem (the memfd's pages, as L1's kernel counts them), mdvm's own
    # count of the memfd's blocks (query-memory host-bytes), and its Rss
    shmem = dict((k, int(d["shmem_kb"])) for k, d in frag.items())
    host = {}
    for line in run.console.splitlines():
        m = re.match(r'E2E frag step=(\w+) .*"host-bytes":(\d+)', line)
        if m:
            host[m.group(1)] = int(m.group(2)) >> 10
    rss = dict((k, int(d["rss_kb"])) for k, d in frag.items())
    run.check(set(host) >= {"before", "inflated", "reclaimed", "collapsed"}, "query-memory samples: %s" % host)
    r, c = steps["reclaim"], steps["collapse"]
    run.check(r["folios-moved"] > 0, "reclaim moved no folio: %s" % r)
    run.check(r["hugepages-freed"] > 0, "reclaim freed no hugepage: %s" % r)
    # memcheck's 8 MiB of holes had been touched: the balloon took most of
    # them and mdvm punched them from the memfd (at release: on memfd that
    # is where the memory goes back, reclaim then empties whole pool
    # hugepages); reclaim must keep it so. (mdvm's Rss is not the measure:
    # it counts only what is mapped in mdvm's page tables, not the file.)
    for name, m in (("L1 Shmem", shmem), ("mdvm host-bytes", host)):
        run.check(m["reclaimed"] <= m["before"] - 6 * 1024,
                  "%s %d KiB before the inflation, %d KiB after reclaim: the holes did not go back to L1" % (
                      name, m["before"], m["reclaimed"]))
    run.check("refilled" in run.agent, "memcheck did not write its holes again after the deflation")
    run.check(c["regions-collapsed"] > 0, "collapse made no 2 MiB folio: %s" % c)
    run.check(run.agent.get("finish"), "the agent did not see the host's finish signal")
    run.check(run.l2exit is not None and run.l2exit[0] == 0, "mdvm exit: %s" % (run.l2exit,))
    sweeps, verdict = check_memcheck(run)
    run.check(len(sweeps) >= 5, "memcheck swept %d times" % len(sweeps))
    print("compaction (memfd): migrate-range %s folios; reclaim %d folios (%d KiB) moved, %d hugepages freed, "
          "%d bytes returned, %.1f s, %d pauses, longest %.0f ms; before/inflated/reclaimed/collapsed: "
          "L1 Shmem %s MiB, host-bytes %s MiB, Rss %s MiB; collapse %d regions, %d folios moved, %.1f s; %s" % (
              mr_moved.group(1), r["folios-moved"], r["bytes-moved"] >> 10, r["hugepages-freed"],
              r["bytes-returned"], r["seconds"], r["pauses"], r["longest-vcpu-pause-ns"] / 1e6,
              "/".join(str(shmem[k] >> 10) for k in ("before", "inflated", "reclaimed", "collapsed")),
              "/".join(str(host[k] >> 10) for k in ("before", "inflated", "reclaimed", "collapsed")),
              "/".join(str(rss[k] >> 10) for k in ("before", "inflated", "reclaimed", "collapsed")),
              c["regions-collapsed"], c["folios-moved"], c["seconds"], verdict))


def test_compact_guest_not_stalled(images):
    """The compaction scenario's guest logs no soft lockup or RCU stall: the
    pause method stops L2 for up to seconds at a time here, and vm_pause tells
    kvm-clock (KVM_KVMCLOCK_CTRL) so the guest's watchdogs discount it."""
    run = scenario(images, "compact")
    stalls = [l for l in run.console.splitlines() if l.startswith("L2") and
              ("soft lockup" in l or "rcu_sched detected stall" in l or "rcu: INFO" in l)]
    run.check(not stalls, "the guest logged stalls during compaction:\n%s" % "\n".join(stalls))


def check_mce(run):
    p = run.e2e("poison")
    run.check(p and p[0].get("ao", "").startswith("0x"), "the guest program gave no pages: %s" % p)
    ao, ar = int(p[0]["ao"], 16), int(p[0]["ar"], 16)
    run.check(run.e2e("inject-ao")[0].get("rc") == "0" and run.e2e("inject-ar")[0].get("rc") == "0",
              "inject-memory-error failed")
    dmesg = [l for l in run.console.splitlines() if "AGENT-DMESG" in l]
    for gpa, kind in ((ao, "action-optional"), (ar, "action-required")):
        run.check(any("Memory failure: %#x:" % (gpa >> 12) in l for l in dmesg),
                  "no memory-failure handling of page %#x (%s) in the guest's log:\n%s" % (
                      gpa >> 12, kind, "\n".join(dmesg)))
    run.check(any("Memory failure: %#x: Sending SIGBUS" % (ar >> 12) in l or
                  ("Memory failure: %#x:" % (ar >> 12) in l and "Killing" in l) for l in dmesg),
              "the guest kernel did not kill the program touching %#x:\n%s" % (ar, "\n".join(dmesg)))
    run.check(run.agent.get("poison_rc") == "0", "the program did not get SIGBUS BUS_MCEERR_AR at the "
              "poisoned page (exit %s)" % run.agent.get("poison_rc"))
    run.check(run.agent.get("done") == "1", "the guest did not keep running")
    run.check(run.l2exit is not None and run.l2exit[0] == 0, "mdvm exit: %s" % (run.l2exit,))


def test_mce_native(images):
    """Action-optional and action-required machine checks through KVM's MCE
    banks (kvm_amd, MDVM_MCE=native): the guest kernel handles the right
    pages, the program touching its poisoned page gets SIGBUS, the guest runs on."""
    check_mce(scenario(images, "mce-native"))


def test_mce_emulated(images):
    """The same with mdvm's user-space MCA registers (MDVM_MCE=emulated)."""
    check_mce(scenario(images, "mce-emulated"))
