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
    def __init__(self, test, console, rc):
        self.test, self.console, self.rc = test, console, rc
        self.agent = {}
        self.l2exit = None
        for line in console.splitlines():
            m = re.match(r"L2\| AGENT ([a-z0-9_-]+)=(.*)$", line.rstrip("\r"))
            if m:
                self.agent[m.group(1)] = m.group(2)
            m = re.match(r"E2E l2-exit rc=(\d+) seconds=([\d.]+)", line)
            if m:
                self.l2exit = (int(m.group(1)), float(m.group(2)))

    def tail(self, n=60, prefix=None):
        lines = [l for l in self.console.splitlines() if prefix is None or l.startswith(prefix)]
        return "\n".join(lines[-n:])

    def check(self, cond, what):
        """Assert with the tail of the consoles (L1 and L2) on failure."""
        assert cond, "%s\n--- e2e=%s: tail of the L1 console ---\n%s\n--- tail of the L2 console ---\n%s" % (
            what, self.test, self.tail(25), self.tail(40, "L2| "))


def run_l1(cache, test, extra=""):
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "EPYC,+svm", "-m", "2G", "-smp", "2",
           "-nographic", "-no-reboot", "-kernel", os.path.join(cache, "vmlinuz"),
           "-initrd", os.path.join(cache, "l1-initrd.cpio"),
           "-append", "console=ttyS0 panic=-1 quiet loglevel=4 e2e=%s %s" % (test, extra)]
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=QEMU_TIMEOUT)
        out, rc = p.stdout, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = e.stdout or b"", -1
    text = out.decode("utf-8", "replace")
    text = "\n".join(l for l in text.splitlines() if "TCG doesn't support" not in l)
    run = Run(test, text, rc)
    run.check(rc == 0, "QEMU (L1) exited with %d (timeout %d s)" % (rc, QEMU_TIMEOUT))
    run.check("E2E start" in text and "kvm=yes" in text, "L1 has no /dev/kvm (kvm_amd did not load)")
    run.check("E2E end" in text, "L1 test script did not finish")
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


def test_boot_bzimage(images):
    """Stock bzImage via the 64-bit boot protocol, initrd, 2 vCPUs, 256 MiB,
    ACPI power-off ends mdvm with status 0."""
    run = run_l1(images, "boot")
    check_boot(run, 2, 256)
    print("L2 bzImage boot to power-off: %.1f s" % run.l2exit[1])


def test_boot_pvh(images):
    """The vmlinux inside the same bzImage via PVH, initrd as a PVH module, 3 vCPUs, 384 MiB."""
    run = run_l1(images, "boot-pvh")
    check_boot(run, 3, 384)
    print("L2 PVH boot to power-off: %.1f s" % run.l2exit[1])


def test_balloon(images):
    """virtio-balloon found through ACPI (LNRO0005) by the stock virtio_mmio and
    virtio_balloon modules; QMP balloon 512M -> 256M -> 512M while the guest
    reports its memory. (Debian's driver with DEFLATE_ON_OOM keeps MemTotal;
    the balloon's pages leave MemFree.)"""
    run = run_l1(images, "balloon")
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
    print("balloon: %s" % st)
