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


def vmas(vm):
    with open("/proc/%d/maps" % vm.pid) as f:
        return sum(1 for _ in f)


def reclaim(b, mem, backing, method):
    vm, q, ram = start(b, mem, backing)
    try:
        h0 = q.cmd("query-memory")["fragmentation"]["host-bytes"]
        r = q.cmd("x-mdvm-release-range", {"gpa": 8 * MiB, "size": ram - 8 * MiB,
                                           "chunk": 4096, "stride": 8192})
        freed = r["released-bytes"]
        maps = vmas(vm)
        hr = q.cmd("query-memory")["fragmentation"]["host-bytes"]
        c = q.cmd("compact", {"method": method})
        h1 = q.cmd("query-memory")["fragmentation"]["host-bytes"]
        c["returned-total"] = h0 - h1   # at release (memfd punches) and by compaction
        c["host-bytes"] = (h0, hr, h1)  # walked, after the release, after compact
        c["maps-after-release"] = maps
        return freed, c
    finally:
        vm.quit()


def migrate_all(b, mem, method):
    vm, q, ram = start(b, mem, "hugetlb")
    try:
        return q.cmd("x-mdvm-migrate-range", {"gpa": 8 * MiB, "size": ram - 8 * MiB, "method": method})
    finally:
        vm.quit()


def run(b):
    measure(b)


def measure(b):
    mem = b.pick("1G", "128M")
    t = b.table(TITLE, intro="%s guest, every other 4 KiB page above 8 MiB freed (50 %%, scattered), "
                "then `compact`; folio moves while the vCPU runs." % mem)
    rows = {
        "frac_hugetlb": t.row("freed memory returned to the host, hugetlb (demotion)", "%",
                              note="hugetlb pages given back minus the 4 KiB pages the live data "
                                   "moved to; QEMU, Firecracker, kvmtool: 0", lower_is_better=False),
        "hp_hugetlb": t.row("hugetlb pages given back, of those with a free page", "%",
                            lower_is_better=False),
        "time_hugetlb": t.row("demotion time per GiB of guest RAM (hugetlb, uffd-wp)", "s"),
        "wp_hugetlb": t.row("longest write-protect window per demoted 2 MiB region", "us"),
        "stop_hugetlb": t.row("longest vCPU stop per demoted 2 MiB region, pause method", "us"),
        "frac_memfd": t.row("freed memory returned to the host, memfd", "%", lower_is_better=False,
                            note="punched at release; compaction then packs within its mapping budget"),
        "maps_memfd": t.row("mappings (VMAs) after the scattered release, memfd", "",
                            note="was ~260k (one per page): needed vm.max_map_count raised"),
        "hp_memfd": t.row("pool hugepages emptied by compaction, memfd", "", lower_is_better=False),
        "wp_memfd": t.row("longest write-protect window, 4 KiB folio (memfd)", "us",
                          note="a vCPU writing that folio waits at most this; others never"),
        "time_h": t.row("2 MiB folio migration, time per GiB (hugetlb, uffd-wp)", "s"),
        "wp_h": t.row("longest write-protect window per 2 MiB folio (hugetlb)", "us"),
        "stop_h": t.row("longest vCPU stop per 2 MiB folio, pause method (hugetlb)", "us"),
    }
    for r in rows.values():
        r.no_qemu("QEMU does not compact or move guest RAM on the host")
    comp = {}   # backing -> host bytes (walked, released, compacted), first run
    for _ in b.runs(3):
        with t.guard("mdvm", rows["frac_hugetlb"], rows["hp_hugetlb"], rows["time_hugetlb"],
                     rows["wp_hugetlb"]):
            freed, c = reclaim(b, mem, "hugetlb", "uffd-wp")
            rows["frac_hugetlb"].add("mdvm", 100.0 * c["returned-total"] / freed)
            regions = freed // MiB   # every other page: one free MiB per 2 MiB region
            rows["hp_hugetlb"].add("mdvm", 100.0 * c["hugepages-freed"] / regions)
            if not c["regions-demoted"]:
                raise NotMeasured("nothing demoted: " + c.get("note", "?"))
            rows["time_hugetlb"].add("mdvm", c["time-ns"] / 1e9 / (2 * freed / (1 << 30)))
            rows["wp_hugetlb"].add("mdvm", c["longest-write-protect-ns"] / 1e3)
            comp.setdefault("mdvm (hugetlb)", c["host-bytes"])
        with t.guard("mdvm", rows["stop_hugetlb"]):
            freed, c = reclaim(b, mem, "hugetlb", "pause")
            rows["stop_hugetlb"].add("mdvm", c["longest-stop-ns"] / 1e3)
        with t.guard("mdvm", rows["frac_memfd"], rows["maps_memfd"], rows["hp_memfd"], rows["wp_memfd"]):
            freed, c = reclaim(b, mem, "memfd", "uffd-wp")
            rows["frac_memfd"].add("mdvm", 100.0 * c["returned-total"] / freed)
            rows["maps_memfd"].add("mdvm", c["maps-after-release"])
            rows["hp_memfd"].add("mdvm", c["hugepages-freed"])
            rows["wp_memfd"].add("mdvm", c["longest-write-protect-ns"] / 1e3)
            comp.setdefault("mdvm (memfd)", c["host-bytes"])
        with t.guard("mdvm", rows["time_h"], rows["wp_h"]):
            m = migrate_all(b, mem, "uffd-wp")
            if not m["bytes-moved"]:
                raise NotMeasured("nothing moved: " + m.get("reason", "?"))
            rows["time_h"].add("mdvm", m["time-ns"] / 1e9 / (m["bytes-moved"] / (1 << 30)))
            rows["wp_h"].add("mdvm", m["longest-write-protect-ns"] / 1e3)
        with t.guard("mdvm", rows["stop_h"]):
            m = migrate_all(b, mem, "pause")
            rows["stop_h"].add("mdvm", m["longest-stop-ns"] / 1e3)
    if comp:
        stages = ("guest touched all", "half freed (scattered)", "after compact")
        b.plot(t, "reclaim-memory", "host memory behind guest RAM (%s guest): touched, half freed "
               "scattered, compacted" % mem, "", "MiB",
               [(st, [(k, v[i] / MiB) for k, v in comp.items()]) for i, st in enumerate(stages)],
               kind="bars", caption="host memory behind guest RAM (query-memory host-bytes: "
               "allocated blocks of the backing files) before and after a scattered release of half "
               "the pages and `compact`; QEMU keeps all of it on hugetlb (balloon table)")
    t.note("hugetlb: a 2 MiB page maps whole at its guest region, so a half-free region keeps "
           "it; compaction demotes such regions (live pages to 4 KiB pages of a shmem side file, "
           "the region remapped from it, the hugetlb page punched) and collapse promotes them "
           "back. memfd: freed 4 KiB pages are punched at release and stay holes of the existing "
           "mapping (no VMA per page); moving 4 KiB pieces between pool hugepages costs mappings, "
           "so compaction stops at half the headroom below vm.max_map_count. See "
           "docs/compaction.md.")
