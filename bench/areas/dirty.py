"""Dirty tracking: cost of one harvest round (KVM harvest + mdvm's folio
fold + taking the dirty frames out of the log), per GiB of guest RAM, with
KVM's dirty ring against its dirty bitmap (owner: the dirty tracking issue).

mdvm's x-debug-dirty-harvest opens a dirty log and times `rounds` syncs
20 ms apart while the guest idles or walks a few MiB.
"""
import os
import statistics

from benchlib import Mdvm, NotMeasured, MiB, GiB, parse_size

TITLE = "Dirty harvest"
ORDER = 60
BUDGET = 120
QUICK_BUDGET = 30

WALK = "walk base=%d size=%d" % (4 * MiB, 4 * MiB)


def run(b):
    t = b.table(TITLE, intro="One harvest round: `dirty_log_sync` (KVM's ring or bitmap, mdvm's own "
                "writes folded in) plus taking the dirty frames out of the log, 20 ms after the last "
                "round. Median over the rounds of one VM; min / median / max over VMs.")
    sizes = [b.pick("1G", "64M"), b.pick("4G", "256M")]
    for guest in ("idle", "walking 4 MiB"):
        for memory in sizes:
            gib = parse_size(memory) / GiB
            rows, abs_rows = {}, {}
            for mode in ("ring", "bitmap"):
                abs_rows[mode] = t.row("%s guest, %s, dirty %s: one harvest round"
                                       % (memory, guest, mode), "µs")
                rows[mode] = t.row("%s guest, %s, dirty %s: harvest round per GiB of RAM"
                                   % (memory, guest, mode), "µs/GiB")
                for r in (rows[mode], abs_rows[mode]):
                    r.no_qemu("QEMU exposes no per-round sync time (its bitmap sync is internal "
                              "to migration)")
            fr = t.row("%s guest, %s: frames found dirty per round" % (memory, guest), "frames",
                       lower_is_better=False)
            fr.no_qemu("—")
            for _ in b.runs(3):
                for mode in ("ring", "bitmap"):
                    with t.guard("mdvm", rows[mode], abs_rows[mode]):
                        r = run_one(b, memory, mode, guest != "idle")
                        rounds = r["rounds"]
                        med = statistics.median((x["sync-ns"] + x["take-ns"]) for x in rounds)
                        rows[mode].add("mdvm", med / 1e3 / gib)
                        abs_rows[mode].add("mdvm", med / 1e3)
                        if mode == "ring":
                            fr.add("mdvm", statistics.median(x["frames"] for x in rounds))
    t.note("Measured inside mdvm (x-debug-dirty-harvest, CLOCK_MONOTONIC around each sync+take). "
           "The ring is scanned whole on each round (1 MiB per vCPU; kvm_pvm overruns it, see "
           "docs/dirty-tracking.md), so its cost is near constant; the bitmap costs one "
           "KVM_GET_DIRTY_LOG per memslot, proportional to RAM. The walking guest touches 4 MiB "
           "(1,024 frames) in about 2 ms per sweep here (emulated).")


def run_one(b, memory, mode, walk):
    old = os.environ.get("MDVM_DIRTY")
    os.environ["MDVM_DIRTY"] = mode
    try:
        vm = Mdvm(b, memory=memory, cmdline="idle", name="mdvm-dirty-%s" % mode, trace=False)
    finally:
        if old is None:
            os.environ.pop("MDVM_DIRTY", None)
        else:
            os.environ["MDVM_DIRTY"] = old
    vm.wait_console("idle: waiting")
    q = vm.connect()
    if walk:
        q.cmd("guest-command", {"command": WALK, "timeout": 20000})
    r = q.cmd("x-debug-dirty-harvest", {"rounds": b.pick(10, 3), "interval-ms": 20})
    if r["mode"] != mode:
        raise NotMeasured("mdvm used the dirty %s, not the %s" % (r["mode"], mode))
    vm.quit()
    return r
