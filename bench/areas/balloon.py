"""Balloon: host memory returned when the guest inflates its balloon by half
of its RAM, and how fast, mdvm against QEMU's virtio-balloon (-M microvm
-device virtio-balloon-device) running the same test-guest driver
(owner: the balloon issue, docs/virtio.md).

Each run: the guest touches all RAM above 8 MiB once (walk sweeps=1), the
host takes the guest-RAM RSS from smaps, sets QMP `balloon` to half the RAM,
waits until the guest's driver reports the target reached (mdvm: the
`balloon` guest command returns; QEMU: query-balloon shows it), and takes
the RSS again.
"""
import os
import time

from benchlib import Mdvm, Qemu, NotMeasured, MiB

TITLE = "Balloon"
ORDER = 80
BUDGET = 180
QUICK_BUDGET = 40

QEMU_DEV = "0xfeb02e00"          # microvm's last virtio-mmio transport (docs/virtio.md)


def mdvm_inflate(b, mem, backing):
    extra = ["--backing", backing] + (["--reserve-hugepages"] if backing == "hugetlb" else [])
    vm = Mdvm(b, memory=mem, cmdline="idle", extra=extra)
    try:
        vm.wait_console("idle: waiting", timeout=30)
        if backing not in vm.err.text().split("backing:", 1)[-1].split("\n", 1)[0]:
            raise NotMeasured("backing %s not available here: %s"
                              % (backing, vm.err.text().strip().splitlines()[0]))
        q = vm.connect()
        ram = vm.ram_bytes
        start = vm.out.text().__len__()
        q.cmd("guest-command", {"command": "walk base=8M size=%d sweeps=1" % (ram - 8 * MiB)})
        vm.wait_console("walk: stopped", timeout=60, start=start)
        before = vm.memory()["guest_rss"]
        t0 = time.monotonic()
        q.cmd("balloon", {"value": ram // 2})
        r = q.cmd("guest-command", {"command": "balloon", "timeout": 120000})
        wall = time.monotonic() - t0
        if r["status"] != 0 or "balloon: ok" not in r["response"]:
            raise NotMeasured("guest: " + r["response"])
        after = vm.memory()["guest_rss"]
        s = q.cmd("query-balloon-stats")
        return dict(returned=before - after, wall=wall, ballooned=s["ballooned-pages"] * 4096,
                    dev_s=s["inflate-ns"] / 1e9, before=before, after=after)
    finally:
        vm.quit()


class hugepages:
    """Make `n` 2 MiB hugepages free for QEMU (as mdvm's --reserve-hugepages
    does for itself) and give back what was added afterwards."""
    PATH = "/proc/sys/vm/nr_hugepages"

    def __init__(self, n):
        self.n, self.added = n, 0

    def __enter__(self):
        free = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("HugePages_Free:"):
                    free = int(line.split()[1])
        if free < self.n:
            try:
                with open(self.PATH) as f:
                    cur = int(f.read())
                with open(self.PATH, "w") as f:
                    f.write(str(cur + self.n - free))
                self.added = self.n - free
            except OSError as e:
                raise NotMeasured("cannot reserve %d hugepages for QEMU: %s" % (self.n, e))
        return self

    def __exit__(self, *exc):
        if self.added:
            with open(self.PATH) as f:
                cur = int(f.read())
            with open(self.PATH, "w") as f:
                f.write(str(max(cur - self.added, 0)))


def qemu_inflate(b, mem, hugetlb=False):
    if hugetlb:
        with hugepages(int(mem[:-1]) * (512 if mem.endswith("G") else 1) // 2):
            return qemu_inflate_1(b, mem, True)
    return qemu_inflate_1(b, mem, False)


def qemu_inflate_1(b, mem, hugetlb):
    ram_mib = int(mem[:-1]) * (1024 if mem.endswith("G") else 1)
    # The second wait keeps the guest alive until the host has looked.
    cmd = ("virtio_mmio.device=512@%s:47 walk base=8M size=%dM sweeps=1; "
           "balloon-wait timeout=120; balloon; balloon-wait timeout=120; balloon; exit code=0"
           % (QEMU_DEV, ram_mib - 8))
    extra = ["-global", "virtio-mmio.force-legacy=false", "-device", "virtio-balloon-device"]
    machine = "microvm"
    if hugetlb:
        machine = "microvm,memory-backend=ram0"
        extra += ["-object", "memory-backend-memfd,id=ram0,size=%s,hugetlb=on" % mem]
    vm = Qemu(b, memory=mem, machine=machine, cmdline=cmd, extra=extra)
    try:
        vm.wait_console("walk: stopped", timeout=60)
        q = vm.connect()
        before = vm.memory()["guest_rss"]
        target = vm.ram_bytes // 2
        t0 = time.monotonic()
        q.cmd("balloon", {"value": target})
        deadline = t0 + 120
        while q.cmd("query-balloon")["actual"] != target:
            if time.monotonic() > deadline:
                raise NotMeasured("QEMU's balloon did not reach the target in 120 s")
            time.sleep(0.002)
        wall = time.monotonic() - t0
        vm.wait_console("balloon: ok", timeout=30)
        after = vm.memory()["guest_rss"]
        q.cmd("balloon", {"value": vm.ram_bytes})
        vm.wait_exit(60)
        return dict(returned=before - after, wall=wall, ballooned=vm.ram_bytes - target,
                    before=before, after=after)
    finally:
        if vm.alive():
            vm.quit()


def run(b):
    mem = b.pick("256M", "64M")
    t = b.table(TITLE, intro="Inflate the balloon of a %s test guest to half its RAM after the guest "
                "touched all of it; host memory from smaps (guest-RAM VMAs)." % mem)
    r4_rate = t.row("memory returned per second of inflation, 4 KiB backing (memfd)", "MiB/s",
                    note="wall time QMP balloon → driver at target", lower_is_better=False)
    r4_dev = t.row("device-side release rate, 4 KiB backing", "MiB/s",
                   note="released bytes / host time in the inflate queue", lower_is_better=False)
    r4_share = t.row("share of ballooned memory returned, 4 KiB backing", "%", lower_is_better=False)
    r2_rate = t.row("memory returned per second of inflation, 2 MiB backing (hugetlb)", "MiB/s",
                    lower_is_better=False)
    r2_share = t.row("share of ballooned memory returned, 2 MiB backing (hugetlb)", "%",
                     lower_is_better=False)
    rt_share = t.row("share of ballooned memory returned, 2 MiB backing (THP)", "%",
                     lower_is_better=False)
    r4_dev.no_qemu("QEMU exposes no per-queue host time")
    comp = {}
    for _ in b.runs(2):
        with t.guard("mdvm", r4_rate, r4_dev, r4_share):
            m = mdvm_inflate(b, mem, "memfd")
            r4_rate.add("mdvm", m["returned"] / MiB / m["wall"])
            r4_dev.add("mdvm", m["returned"] / MiB / max(m["dev_s"], 1e-9))
            r4_share.add("mdvm", 100.0 * m["returned"] / m["ballooned"])
            comp["mdvm (memfd)"] = (m["before"], m["after"])
        with t.guard("qemu", r4_rate, r4_share, rt_share):
            qm = qemu_inflate(b, mem)
            r4_rate.add("qemu", qm["returned"] / MiB / qm["wall"])
            r4_share.add("qemu", 100.0 * qm["returned"] / qm["ballooned"])
            # QEMU's default RAM is anonymous memory with MADV_HUGEPAGE: THP.
            rt_share.add("qemu", 100.0 * qm["returned"] / qm["ballooned"])
            comp["QEMU (anon, THP)"] = (qm["before"], qm["after"])
        with t.guard("mdvm", r2_rate, r2_share):
            m = mdvm_inflate(b, mem, "hugetlb")
            r2_rate.add("mdvm", m["returned"] / MiB / m["wall"])
            r2_share.add("mdvm", 100.0 * m["returned"] / m["ballooned"])
            comp["mdvm (hugetlb)"] = (m["before"], m["after"])
        with t.guard("qemu", r2_rate, r2_share):
            qm = qemu_inflate(b, mem, hugetlb=True)
            r2_rate.add("qemu", qm["returned"] / MiB / qm["wall"])
            r2_share.add("qemu", 100.0 * qm["returned"] / qm["ballooned"])
            comp["QEMU (hugetlb)"] = (qm["before"], qm["after"])
        with t.guard("mdvm", rt_share):
            m = mdvm_inflate(b, mem, "thp")
            rt_share.add("mdvm", 100.0 * m["returned"] / m["ballooned"])
    if comp:
        b.plot(t, "balloon-memory", "guest-RAM RSS before/after inflating half of %s" % mem, "", "MiB",
               [("before", [(k, v[0] / MiB) for k, v in comp.items()]),
                ("after", [(k, v[1] / MiB) for k, v in comp.items()])], kind="bars")
    t.note("Both run the test guest's own virtio-balloon driver (guest/balloon.c), which gives "
           "pages from the top of RAM downwards in batches of 256 PFNs and writes `actual` after "
           "each batch. The wall-clock rate is bound by guest instruction emulation (KVM here "
           "emulates ~2 M instructions/s; QEMU's TCG is much faster), so it compares emulators as "
           "much as VMMs; the device-side rate is mdvm's own host cost (mm_release_range: "
           "fallocate punch hole on the memfd). Contiguous ballooned ranges free whole 2 MiB "
           "hugepages on hugetlb; scattered 4 KiB balloon pages in hugetlb memory are returned "
           "only by compaction (issue 5). QEMU: `-M microvm -global "
           "virtio-mmio.force-legacy=false -device virtio-balloon-device`, RAM anonymous with "
           "MADV_HUGEPAGE (THP), the balloon discards 4 KiB pages with MADV_DONTNEED; hugetlb: "
           "`-object memory-backend-memfd,hugetlb=on` (nr_hugepages raised for the run and "
           "restored); QEMU 7.2 discards a hugepage only when all its 4 KiB pieces arrive within "
           "one notification, and a 256-PFN request (Linux's batch too) covers 1 MiB, so it "
           "returns nothing here.")
