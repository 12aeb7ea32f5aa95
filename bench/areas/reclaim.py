"""Compaction and reclaim (owner: the compaction issue, docs/compaction.md).

Each run: the guest touches all RAM above 8 MiB once (walk sweeps=1); the
host frees every other 4 KiB page of it (x-mdvm-release-range chunk=4K
stride=8K: 50 % of the guest's pages, scattered), then runs QMP `compact`
and reports what came back as whole pool hugepages, how long it took per GiB
moved, and the longest vCPU stall. A second figure moves every 2 MiB folio
of the guest (x-mdvm-migrate-range) on hugetlb, the case where a folio is a
real host hugepage, with both methods.
"""
from benchlib import Mdvm, NotMeasured, MiB

TITLE = "Reclaim and compaction"
ORDER = 70
BUDGET = 150
QUICK_BUDGET = 40


def start(b, mem, backing):
    extra = ["--backing", backing] + (["--reserve-hugepages"] if backing == "hugetlb" else [])
    vm = Mdvm(b, memory=mem, cmdline="idle", extra=extra)
    vm.wait_console("idle: waiting", timeout=30)
    if backing not in vm.err.text().split("backing:", 1)[-1].split("\n", 1)[0]:
        vm.quit()
        raise NotMeasured("backing %s not available here" % backing)
    q = vm.connect()
    ram = vm.ram_bytes
    start_at = len(vm.out.text())
    q.cmd("guest-command", {"command": "walk base=8M size=%d sweeps=1" % (ram - 8 * MiB)})
    vm.wait_console("walk: stopped", timeout=120, start=start_at)
    return vm, q, ram


def reclaim(b, mem, backing, method):
    vm, q, ram = start(b, mem, backing)
    try:
        r = q.cmd("x-mdvm-release-range", {"gpa": 8 * MiB, "size": ram - 8 * MiB,
                                           "chunk": 4096, "stride": 8192})
        freed = r["released-bytes"]
        c = q.cmd("compact", {"method": method})
        return freed, c
    finally:
        vm.quit()


def migrate_all(b, mem, method):
    vm, q, ram = start(b, mem, "hugetlb")
    try:
        return q.cmd("x-mdvm-migrate-range", {"gpa": 8 * MiB, "size": ram - 8 * MiB, "method": method})
    finally:
        vm.quit()


class max_map_count:
    """4 KiB folios scattered over a shmem file are one VMA each (and one
    placeholder VMA per freed page between them): 1 GiB freed every other
    page needs ~260k VMAs, above the default vm.max_map_count (65530), where
    mm/ aborts (left to the memdesc owner). Raised for the run, restored."""
    PATH = "/proc/sys/vm/max_map_count"

    def __enter__(self):
        with open(self.PATH) as f:
            self.old = int(f.read())
        try:
            with open(self.PATH, "w") as f:
                f.write(str(max(self.old, 1 << 20)))
        except OSError:
            pass
        return self

    def __exit__(self, *a):
        try:
            with open(self.PATH, "w") as f:
                f.write(str(self.old))
        except OSError:
            pass


def run(b):
    with max_map_count():
        measure(b)


def measure(b):
    mem = b.pick("1G", "128M")
    t = b.table(TITLE, intro="%s guest, every other 4 KiB page above 8 MiB freed (50 %%, scattered), "
                "then `compact`; folio moves while the vCPU runs." % mem)
    rows = {
        "frac_memfd": t.row("freed memory returned as whole pool hugepages, memfd", "%",
                            lower_is_better=False),
        "frac_hugetlb": t.row("freed memory returned as whole hugepages, hugetlb", "%",
                              note="needs demotion to 4 KiB pieces: not implemented",
                              lower_is_better=False),
        "time_memfd": t.row("compaction time per GiB moved, 4 KiB folios (memfd, uffd-wp)", "s"),
        "wp_memfd": t.row("longest write-protect window, 4 KiB folio (memfd)", "us",
                          note="a vCPU writing that folio waits at most this; others never"),
        "stop_memfd": t.row("longest vCPU stop, pause method, 2 MiB per stop (memfd)", "us"),
        "time_h": t.row("2 MiB folio migration, time per GiB (hugetlb, uffd-wp)", "s"),
        "wp_h": t.row("longest write-protect window per 2 MiB folio (hugetlb)", "us"),
        "stop_h": t.row("longest vCPU stop per 2 MiB folio, pause method (hugetlb)", "us"),
    }
    for r in rows.values():
        r.no_qemu("QEMU does not compact or move guest RAM on the host")
    for _ in b.runs(3):
        with t.guard("mdvm", rows["frac_memfd"], rows["time_memfd"], rows["wp_memfd"]):
            freed, c = reclaim(b, mem, "memfd", "uffd-wp")
            rows["frac_memfd"].add("mdvm", 100.0 * c["hugepages-freed"] * 2 * MiB / freed)
            if not c["bytes-moved"]:
                raise NotMeasured("nothing moved")
            rows["time_memfd"].add("mdvm", c["time-ns"] / 1e9 / (c["bytes-moved"] / (1 << 30)))
            rows["wp_memfd"].add("mdvm", c["longest-write-protect-ns"] / 1e3)
        with t.guard("mdvm", rows["stop_memfd"]):
            freed, c = reclaim(b, mem, "memfd", "pause")
            rows["stop_memfd"].add("mdvm", c["longest-stop-ns"] / 1e3)
        with t.guard("mdvm", rows["frac_hugetlb"]):
            freed, c = reclaim(b, mem, "hugetlb", "uffd-wp")
            rows["frac_hugetlb"].add("mdvm", 100.0 * c["hugepages-freed"] * 2 * MiB / freed)
        with t.guard("mdvm", rows["time_h"], rows["wp_h"]):
            m = migrate_all(b, mem, "uffd-wp")
            if not m["bytes-moved"]:
                raise NotMeasured("nothing moved: " + m.get("reason", "?"))
            rows["time_h"].add("mdvm", m["time-ns"] / 1e9 / (m["bytes-moved"] / (1 << 30)))
            rows["wp_h"].add("mdvm", m["longest-write-protect-ns"] / 1e3)
        with t.guard("mdvm", rows["stop_h"]):
            m = migrate_all(b, mem, "pause")
            rows["stop_h"].add("mdvm", m["longest-stop-ns"] / 1e3)
    t.note("memfd: the freed 4 KiB pages went back to the host at release (each is punched from "
           "the shmem file); compaction then empties whole 2 MiB ranges of the file (pool "
           "hugepages), which is what the first row counts. hugetlb: a 2 MiB page is mapped whole "
           "at its guest region, so a half-free region keeps its page; see docs/compaction.md.")
