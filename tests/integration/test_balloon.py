"""virtio-balloon over virtio-mmio (docs/virtio.md), end to end: the test
guest's driver inflates to the target QMP `balloon` sets, and the host
process's memory (from /proc) drops by what was ballooned; deflated and
reported pages come back zeroed; a hostile driver only gets NEEDS_RESET or
has FEATURES_OK refused; interrupts are signalled and delivered."""
import os
import shutil
import socket
import subprocess
import time

import pytest

from mdvmtest import MDVM, PAGE, QMP, check_walk_consistent, run_mdvm, wait_migration

MiB = 1 << 20
MEM = 64 * MiB


def host_mem(pid):
    """Host memory that can back guest RAM, in bytes: anonymous, shared
    (memfd) and hugetlb pages of the mdvm process."""
    total = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("RssAnon", "RssShmem", "HugetlbPages"):
                total += int(val.split()[0]) * 1024
    return total


def populate(vm, base=8 * MiB, end=MEM):
    """Have the guest touch every page of [base, end) once."""
    st, text = vm.guest("walk base=%d size=%d sweeps=1" % (base, end - base))
    assert st == 0, text
    deadline = time.time() + 20
    while "walk: stopped" not in vm.console_text():
        assert time.time() < deadline, "walk did not finish"
        time.sleep(0.02)


def balloon_to(vm, guest_bytes):
    vm.qmp.cmd("balloon", value=guest_bytes)
    st, text = vm.guest("balloon", timeout=60000)
    assert st == 0 and text.startswith("balloon: ok"), text
    return text


def stats(vm):
    return vm.qmp.cmd("query-balloon-stats")


def vm_pages(vm):
    return vm.qmp.cmd("query-memory")["pages"]


@pytest.mark.parametrize("backing", ["memfd", "anon", "thp"])
def test_inflate_half_returns_host_memory(vm_factory, backing):
    vm = vm_factory(memory="64M", extra=["--backing", backing]).start()
    populate(vm)
    before = host_mem(vm.proc.pid)
    text = balloon_to(vm, MEM // 2)
    assert "target=8192 actual=8192" in text, text
    after = host_mem(vm.proc.pid)
    # The top 32 MiB went into the balloon; all of it had been touched.
    assert before - after >= 30 * MiB, (backing, before, after)
    assert vm.qmp.cmd("query-balloon") == {"actual": MEM // 2}
    s = stats(vm)
    assert s["ballooned-pages"] == 8192 and s["actual-pages"] == 8192, s
    assert s["released-bytes"] >= 30 * MiB, s
    # QEMU's event, the last one carrying the final size.
    changes = [e["data"]["actual"] for e in vm.qmp.events if e["event"] == "BALLOON_CHANGE"]
    assert changes and changes[-1] == MEM // 2, changes
    # Ballooned memory reads as zeros from the host side too.
    assert vm.pmemsave(48 * MiB, 64 * 1024) == bytes(64 * 1024)
    # The guest refuses to touch what it gave away.
    st, text = vm.guest("fill base=40M size=1M")
    assert st == 2 and "balloon" in text, text

    # Deflate: pages come back (zeroed) and are usable again.
    text = balloon_to(vm, MEM)
    assert "target=0 actual=0" in text, text
    assert vm.pmemsave(40 * MiB, 64 * 1024) == bytes(64 * 1024)
    assert vm.guest("fill base=32M size=2M gen=9")[0] == 0
    assert vm.guest("verify base=32M size=2M gen=9") == (0, "verify: ok pages=512")
    assert vm.qmp.cmd("query-balloon") == {"actual": MEM}
    assert stats(vm)["ballooned-pages"] == 0


def test_inflate_hugetlb_tracks_pieces(vm_factory):
    """hugetlb: 4 KiB pieces cannot be punched out of a 2 MiB page; whole
    hugepages the balloon emptied are freed, partly ballooned ones wait for
    compaction (issue 5)."""
    vm = vm_factory(memory="64M", extra=["--backing", "hugetlb", "--reserve-hugepages"]).start()
    if "backing: hugetlb" not in vm.stderr():
        pytest.skip("no hugetlb backing here: " + vm.stderr().splitlines()[0])
    populate(vm)
    before = host_mem(vm.proc.pid)
    balloon_to(vm, MEM // 2)
    after = host_mem(vm.proc.pid)
    s = stats(vm)
    assert s["ballooned-pages"] == 8192, s
    # [32M, 64M) is 16 whole hugepages: they can all go back.
    assert before - after >= 30 * MiB, (before, after)
    balloon_to(vm, MEM)
    assert vm.guest("fill base=40M size=1M gen=2")[0] == 0
    assert vm.guest("verify base=40M size=1M gen=2")[0] == 0


def hugetlb_vm(vm_factory, memory, extra=()):
    """A hugetlb-backed VM, or skip when the host has no hugepages for it
    (other tests and processes share the 40 here)."""
    try:
        vm = vm_factory(memory=memory, extra=["--backing", "hugetlb", "--reserve-hugepages"]
                        + list(extra)).start(wait_banner="--incoming" not in extra)
    except RuntimeError as e:
        pytest.skip("no hugetlb backing here: %s" % e)
    if "backing: hugetlb" not in vm.stderr():
        pytest.skip("no hugetlb backing here: " + vm.stderr().splitlines()[0])
    return vm


def migrate(src, dst, uri, timeout=60):
    src.qmp.cmd("migrate", uri=uri)
    r = wait_migration(src, timeout)
    assert r["status"] == "completed", (r, src.stderr(), dst.stderr())
    dst.qmp.wait_event("RESUME")
    return r


def test_hugetlb_partial_deflate_survives_migration(vm_factory, tmp_path):
    """hugetlb: deflating back from a target that is not a multiple of 2 MiB
    (32M -> 31M -> 32M: 256 pages of the top hugepage, which stays mapped).
    The deflated pages must be RAM again (not ballooned: a migration would
    send them as markers and the destination would read zeros)."""
    src = hugetlb_vm(vm_factory, "32M")
    populate(src, end=32 * MiB)
    balloon_to(src, 31 * MiB)
    assert stats(src)["ballooned-pages"] == 256
    text = balloon_to(src, 32 * MiB)
    assert "target=0 actual=0" in text, text
    s = stats(src)
    assert s["ballooned-pages"] == 0 and s["deflated-pages"] == 256, s
    # The top hugepage kept its other half: nothing went back to the host.
    assert s["released-bytes"] == 0, s
    assert vm_pages(src)["ballooned"] == 0
    assert "failed" not in src.stderr(), src.stderr()
    assert src.guest("fill base=30M size=2M gen=11")[0] == 0
    assert src.guest("verify base=30M size=2M gen=11") == (0, "verify: ok pages=512")
    uri = free_port_path(tmp_path)
    dst = hugetlb_vm(vm_factory, "32M", extra=["--incoming", uri])
    migrate(src, dst, uri)
    assert dst.guest("verify base=30M size=2M gen=11") == (0, "verify: ok pages=512")
    assert stats(dst)["ballooned-pages"] == 0
    assert vm_pages(dst)["ballooned"] == 0


def test_hugetlb_reporting_partial_hugepage(vm_factory):
    """hugetlb: reporting 1 MiB of a 2 MiB page cannot give anything back
    (the page stays mapped); the buffer still comes back, the guest's memory
    is intact, and only really freed memory counts as released."""
    vm = hugetlb_vm(vm_factory, "32M")
    assert vm.guest("fill base=16M size=4M gen=4")[0] == 0
    before = host_mem(vm.proc.pid)
    st, text = vm.guest("report-free base=16M size=1M")
    assert (st, text) == (0, "report-free: ok pages=256"), text
    s = stats(vm)
    assert s["reported-bytes"] == 1 * MiB and s["released-bytes"] == 0 and not s["needs-reset"], s
    assert "failed" not in vm.stderr(), vm.stderr()
    # The rest of the hugepage untouched; the reported part may read as zero
    # or as before (a hint), and works as memory again.
    assert vm.guest("verify base=17M size=3M gen=4") == (0, "verify: ok pages=768")
    assert vm.guest("fill base=16M size=1M gen=5")[0] == 0
    assert vm.guest("verify base=16M size=1M gen=5") == (0, "verify: ok pages=256")
    # A whole hugepage reported goes back to the host, and counts.
    st, text = vm.guest("report-free base=18M size=2M")
    assert (st, text) == (0, "report-free: ok pages=512"), text
    s = stats(vm)
    assert s["released-bytes"] == 2 * MiB, s
    assert before - host_mem(vm.proc.pid) >= 2 * MiB * 0.9
    assert vm.pmemsave(18 * MiB, 2 * MiB) == bytes(2 * MiB)
    assert vm.guest("fill base=18M size=2M gen=6")[0] == 0
    assert vm.guest("verify base=16M size=1M gen=5") == (0, "verify: ok pages=256")
    assert vm.guest("verify base=18M size=2M gen=6") == (0, "verify: ok pages=512")


def test_hugetlb_scattered_inflate_then_compaction(vm_factory):
    """hugetlb: the guest balloons every other page of its top 16 MiB
    (`balloon stride=2`), so no hugepage empties and the host gets nothing
    back; compaction then demotes the 8 half-ballooned regions to 4 KiB
    pages and frees their hugepages: the host gets the ballooned 8 MiB.
    Deflated, the pages work again."""
    vm = hugetlb_vm(vm_factory, "32M")
    populate(vm, end=32 * MiB)
    before = host_mem(vm.proc.pid)
    f0 = vm.qmp.cmd("query-memory")["fragmentation"]
    vm.qmp.cmd("balloon", value=24 * MiB)
    st, text = vm.guest("balloon stride=2", timeout=60000)
    assert st == 0 and "target=2048 actual=2048" in text and "stride=2" in text, text
    assert "low=0x1001000" in text, text       # 16M + 4K: every other page from the top
    s = stats(vm)
    assert s["ballooned-pages"] == 2048 and s["released-bytes"] == 0, s
    # Every hugepage keeps half its pages: the host memory barely moves.
    assert before - host_mem(vm.proc.pid) < 1 * MiB, (before, host_mem(vm.proc.pid))
    f1 = vm.qmp.cmd("query-memory")["fragmentation"]
    assert f1["host-bytes"] == f0["host-bytes"], (f0, f1)
    c = vm.qmp.cmd("compact", mode="reclaim")
    assert c["regions-demoted"] == 8 and c["hugepages-freed"] == 8, c
    f2 = vm.qmp.cmd("query-memory")["fragmentation"]
    # 16 MiB of hugepages out, the 8 MiB of live pages in 4 KiB side-file pages.
    assert f1["host-bytes"] - f2["host-bytes"] == 8 * MiB, (f1, f2)
    assert before - host_mem(vm.proc.pid) >= 8 * MiB * 0.9, (before, host_mem(vm.proc.pid))
    # The live half kept its data: the walk wrote 1 into every page once.
    dump = vm.pmemsave(16 * MiB, 16 * MiB)
    assert all(dump[i] == (0 if (i // PAGE) % 2 else 1) for i in range(0, len(dump), PAGE))
    text = balloon_to(vm, 32 * MiB)
    assert "target=0 actual=0" in text, text
    assert stats(vm)["ballooned-pages"] == 0 and vm_pages(vm)["ballooned"] == 0
    assert vm.guest("fill base=16M size=16M gen=12")[0] == 0
    assert vm.guest("verify base=16M size=16M gen=12") == (0, "verify: ok pages=4096")


@pytest.mark.parametrize("backing,target", [
    ("default", 24 * MiB), ("memfd", 24 * MiB), ("anon", 24 * MiB), ("thp", 24 * MiB),
    ("hugetlb", 21 * MiB + 512 * 1024)])
def test_balloon_while_walking(vm_factory, backing, target):
    """auto mode: the guest follows the target between sweeps, its inflate
    requests in flight while it walks on; the walk never touches ballooned
    pages and stays consistent on the rest. Deflated while walking, the
    returned pages are walked too: each part holds one interrupted sweep.
    hugetlb: a target inside a 2 MiB page (that page stays mapped)."""
    ram = 32 * MiB
    if backing == "hugetlb":
        vm = hugetlb_vm(vm_factory, "32M")
    else:
        vm = vm_factory(memory="32M", extra=[] if backing == "default" else ["--backing", backing]).start()
    assert vm.guest("balloon auto=1")[0] == 0
    walk_base, walk_end = 4 * MiB, ram
    assert vm.guest("walk base=%d size=%d" % (walk_base, walk_end - walk_base))[0] == 0
    time.sleep(0.3)
    vm.qmp.cmd("balloon", value=target)
    deadline = time.time() + 30
    while vm.qmp.cmd("query-balloon")["actual"] != target:
        assert time.time() < deadline, stats(vm)
        time.sleep(0.05)
    sweeps = vm.qmp.cmd("query-guest")["sweeps"]
    while vm.qmp.cmd("query-guest")["sweeps"] < sweeps + 2:
        assert time.time() < deadline
        time.sleep(0.02)
    vm.qmp.cmd("stop")
    check_walk_consistent(vm.pmemsave(walk_base, target - walk_base))
    assert vm.pmemsave(target, ram - target) == bytes(ram - target)
    assert stats(vm)["ballooned-pages"] == (ram - target) // PAGE
    vm.qmp.cmd("cont")
    # Give it back while walking; the walk then covers the returned pages too.
    vm.qmp.cmd("balloon", value=ram)
    while vm.qmp.cmd("query-balloon")["actual"] != ram:
        assert time.time() < deadline + 30, stats(vm)
        time.sleep(0.05)
    sweeps = vm.qmp.cmd("query-guest")["sweeps"]
    while vm.qmp.cmd("query-guest")["sweeps"] < sweeps + 2:
        assert time.time() < deadline + 30
        time.sleep(0.02)
    vm.qmp.cmd("stop")
    s = stats(vm)
    assert s["ballooned-pages"] == 0 and not s["needs-reset"], s
    assert vm_pages(vm)["ballooned"] == 0
    kept, returned = vm.pmemsave(walk_base, target - walk_base), vm.pmemsave(target, ram - target)
    check_walk_consistent(kept)
    check_walk_consistent(returned)
    # The returned pages came back zeroed and were walked since.
    assert all(b >= 1 for b in returned[::PAGE]), "a returned page was never walked"
    vm.qmp.cmd("cont")
    assert vm.qmp.cmd("query-status")["status"] == "running"
    assert "failed" not in vm.stderr() and "guest driver error" not in vm.stderr(), vm.stderr()


def test_free_page_reporting(vm_factory):
    vm = vm_factory(memory="64M").start()
    assert vm.guest("fill base=16M size=4M gen=4")[0] == 0
    before = host_mem(vm.proc.pid)
    st, text = vm.guest("report-free base=16M size=4M")
    assert (st, text) == (0, "report-free: ok pages=1024")
    assert before - host_mem(vm.proc.pid) >= 3 * MiB
    # Reported pages read zero on the next touch, and work as memory again.
    assert vm.pmemsave(16 * MiB, 4 * MiB) == bytes(4 * MiB)
    st, text = vm.guest("verify base=16M size=4M gen=4")
    assert st == 1 and "got=0x0" in text, text
    assert vm.guest("fill base=16M size=4M gen=5")[0] == 0
    assert vm.guest("verify base=16M size=4M gen=5") == (0, "verify: ok pages=1024")
    assert stats(vm)["reported-bytes"] == 4 * MiB


def test_reporting_ballooned_pages_keeps_them_ballooned(vm_factory):
    """A driver that reports pages it gave to the balloon (report-free any=1):
    they stay ballooned and counted, so the deflate brings the count to 0."""
    vm = vm_factory(memory="64M").start()
    balloon_to(vm, 60 * MiB)
    assert vm.guest("report-free base=62M size=2M")[0] == 2          # the guest's own check
    assert vm.guest("report-free base=58M size=4M any=1") == (0, "report-free: ok pages=1024")
    s = stats(vm)
    assert s["ballooned-pages"] == 1024 and s["reported-bytes"] == 4 * MiB, s
    assert vm_pages(vm)["ballooned"] == 1024
    balloon_to(vm, MEM)
    s = stats(vm)
    assert s["ballooned-pages"] == 0 and s["deflated-pages"] == 1024, s
    assert vm_pages(vm)["ballooned"] == 0


def test_stats_and_deflate_on_oom(vm_factory):
    vm = vm_factory(memory="64M").start()
    balloon_to(vm, 56 * MiB)
    s = stats(vm)
    assert s["stats"]["stat-total-memory"] == s["stats"]["stat-total-memory"] > 60 * MiB, s
    assert s["last-update"] > 0 and s["features"] & (1 << 1), s
    # Ask for fresh numbers; the guest's next balloon pass sends them.
    assert vm.qmp.cmd("query-balloon-stats", refresh=True)["refresh-requested"] is True
    assert vm.guest("balloon")[0] == 0
    s = stats(vm)
    assert s["stats"]["stat-free-memory"] == s["stats"]["stat-total-memory"] - 8 * MiB, s
    # DEFLATE_ON_OOM: the guest takes pages back without being asked.
    assert s["features"] & (1 << 2), s
    st, text = vm.guest("balloon-oom pages=512")
    assert (st, text) == (0, "balloon-oom: deflated=512 actual=1536"), text
    assert vm.qmp.cmd("query-balloon") == {"actual": 58 * MiB}
    assert stats(vm)["ballooned-pages"] == 1536


KINDS = ["loop", "addr", "len", "head", "idx", "pfn", "ring", "wrflag"]


def test_hostile_driver_gets_needs_reset(vm_factory):
    vm = vm_factory(memory="64M").start()
    assert vm.guest("fill base=8M size=1M gen=7")[0] == 0
    balloon_to(vm, 60 * MiB)    # some real state first
    for i, kind in enumerate(KINDS):
        st, text = vm.guest("balloon-hostile kind=%d" % i)
        assert (st, text) == (0, "balloon-hostile: kind=%s needs_reset=1 status=0x%s"
                              % (kind, text.rsplit("0x", 1)[1])), text
        assert vm.qmp.cmd("query-status")["status"] == "running"
    err = vm.stderr()
    assert err.count("guest driver error") == len(KINDS), err
    assert "a loop" in err and "not guest RAM" in err
    # mdvm and the guest's memory are unharmed; the device works after reset.
    assert vm.guest("verify base=8M size=1M gen=7") == (0, "verify: ok pages=256")
    assert stats(vm)["ballooned-pages"] == 1024
    balloon_to(vm, 56 * MiB)
    assert stats(vm)["ballooned-pages"] == 2048


def irq(vm, args=""):
    """The guest's `virtio-irq`: InterruptStatus (then acknowledged) and its counts."""
    st, text = vm.guest(("virtio-irq " + args).strip())
    assert st == 0 and text.startswith("virtio-irq: "), text
    return dict(kv.split("=") for kv in text.split()[1:])


def test_interrupt_status_and_irqfd(vm_factory):
    """InterruptStatus bit 0 comes with every used buffer and bit 1 with every
    new target and with NEEDS_RESET; INTERRUPT_ACK clears them; and each
    interrupt reaches the vCPU through the irqfd and the in-kernel IOAPIC (the
    guest routes GSI 5 as NMI and counts them) until the pin is masked."""
    vm = vm_factory(memory="64M").start()
    assert vm.guest("fill base=8M size=1M gen=11")[0] == 0
    r = irq(vm, "nmi=1")                   # initialises the driver, acknowledges what was pending
    assert (r["missed"], r["nmi"]) == ("0", "0"), r
    assert irq(vm)["status"] == "0x0", r   # ACK cleared them
    vm.qmp.cmd("balloon", value=60 * MiB)
    r = irq(vm)
    assert (r["status"], r["config"], r["nmi"]) == ("0x2", "1", "1"), r
    st, text = vm.guest("balloon", timeout=60000)
    assert st == 0 and text.startswith("balloon: ok target=1024 actual=1024"), text
    # 1024 pages in requests of 256: four used buffers, each with bit 0 and an interrupt.
    assert irq(vm) == {"status": "0x0", "used": "4", "config": "1", "missed": "0", "nmi": "5"}
    vm.qmp.cmd("balloon", value=MEM)
    st, text = vm.guest("balloon", timeout=60000)
    assert st == 0 and text.startswith("balloon: ok target=0 actual=0"), text
    assert irq(vm) == {"status": "0x0", "used": "8", "config": "2", "missed": "0", "nmi": "10"}
    # The stats buffer handed back (refresh) is a used buffer too.
    assert vm.qmp.cmd("query-balloon-stats", refresh=True)["refresh-requested"] is True
    assert vm.guest("balloon")[0] == 0
    assert irq(vm) == {"status": "0x0", "used": "9", "config": "2", "missed": "0", "nmi": "11"}
    # NEEDS_RESET after DRIVER_OK comes with a configuration-change interrupt.
    assert vm.guest("virtio-negotiate kind=2") == (
        0, "virtio-negotiate: kind=nofeatok status=0x47 int=0x2 qmax=0")
    assert irq(vm, "nmi=0") == {"status": "0x0", "used": "9", "config": "3", "missed": "0", "nmi": "12"}
    # Masked: the bits are still set, nothing is delivered.
    vm.qmp.cmd("balloon", value=60 * MiB)
    st, text = vm.guest("balloon", timeout=60000)
    assert st == 0 and text.startswith("balloon: ok target=1024 actual=1024"), text
    assert irq(vm) == {"status": "0x0", "used": "13", "config": "4", "missed": "0", "nmi": "12"}
    assert vm.qmp.cmd("query-status")["status"] == "running"
    assert vm.guest("verify base=8M size=1M gen=11") == (0, "verify: ok pages=256")
    assert vm.stderr().count("guest driver error") == 1, vm.stderr()


# kind, status read back, InterruptStatus, mdvm's log line
NEGOTIATE = [("noversion", "0x3", "0x0", "did not accept VIRTIO_F_VERSION_1"),
             ("unoffered", "0x3", "0x0", "features 0x400000000 that were not offered"),
             ("nofeatok", "0x47", "0x2", "DRIVER_OK set without FEATURES_OK")]


def test_negotiation_rules(vm_factory):
    """A driver that sets FEATURES_OK without VIRTIO_F_VERSION_1 or with a
    feature that was not offered (RING_PACKED) does not get it; DRIVER_OK
    without FEATURES_OK gets NEEDS_RESET. No queue exists in any of them; a
    buffer made available before DRIVER_OK waits for it. A proper
    initialisation afterwards works: the balloon still inflates and
    deflates, the guest's memory is intact."""
    vm = vm_factory(memory="64M").start()
    assert vm.guest("fill base=8M size=1M gen=12")[0] == 0
    balloon_to(vm, 60 * MiB)
    for i, (kind, status, isr, log) in enumerate(NEGOTIATE):
        n = vm.stderr().count(log)
        st, text = vm.guest("virtio-negotiate kind=%d" % i)
        assert (st, text) == (0, "virtio-negotiate: kind=%s status=%s int=%s qmax=0" % (kind, status, isr))
        assert vm.stderr().count(log) == n + 1, vm.stderr()
        assert vm.qmp.cmd("query-status")["status"] == "running"
        st, text = vm.guest("balloon-info")             # initialises the device again
        assert st == 0 and "status=0xf " in text and "actual=1024" in text, text
        assert not stats(vm)["needs-reset"]
    # An inflate made available and notified before DRIVER_OK (of a page already
    # ballooned) is used only once DRIVER_OK is set (§2.1.2).
    assert vm.guest("virtio-negotiate kind=3") == (
        0, "virtio-negotiate: kind=early used_before_driver_ok=0 used_after=1")
    assert vm.stderr().count("guest driver error") == 1, vm.stderr()
    assert vm.guest("verify base=8M size=1M gen=12") == (0, "verify: ok pages=256")
    assert stats(vm)["ballooned-pages"] == 1024
    balloon_to(vm, 56 * MiB)
    assert stats(vm)["ballooned-pages"] == 2048
    balloon_to(vm, MEM)
    assert stats(vm)["ballooned-pages"] == 0
    assert vm.guest("fill base=56M size=8M gen=13")[0] == 0
    assert vm.guest("verify base=56M size=8M gen=13") == (0, "verify: ok pages=2048")
    assert vm.guest("verify base=8M size=1M gen=12") == (0, "verify: ok pages=256")


def test_qmp_errors_and_ctl(vm_factory, tmp_path):
    vm = vm_factory(memory="64M").start()
    r = vm.qmp.execute("balloon", value=0)
    assert r["error"] == {"class": "GenericError", "desc": "Parameter 'target' expects a size"}
    r = vm.qmp.execute("balloon", value="1G")
    assert r["error"]["class"] == "GenericError"
    r = run_mdvm("ctl", "--socket", vm.sock, "balloon", "60M")
    assert r.returncode == 0, r.stderr
    assert stats(vm)["target"] == 60 * MiB
    r = run_mdvm("ctl", "--socket", vm.sock, "balloon", "32")     # MiB, as QEMU's HMP
    assert r.returncode == 0, r.stderr
    assert stats(vm)["target"] == 32 * MiB
    r = run_mdvm("ctl", "--socket", vm.sock, "query-balloon")
    assert r.stdout.strip() == "actual: %d" % MEM, r.stdout
    # Larger than RAM: clamped, as QEMU.
    vm.qmp.cmd("balloon", value=1 << 40)
    assert stats(vm)["target"] == MEM


def test_no_balloon(vm_factory):
    vm = vm_factory(memory="64M", extra=["--balloon", "off"]).start()
    r = vm.qmp.execute("query-balloon")
    assert r["error"] == {"class": "DeviceNotActive", "desc": "No balloon device has been activated"}
    assert "virtio_mmio" not in vm.console_text()
    st, text = vm.guest("balloon")
    assert st == 2 and "no virtio-balloon device" in text, text


def test_cmdline_passes_device(vm_factory):
    vm = vm_factory(cmdline="echo hi", memory="64M").start()
    st, text = vm.guest("balloon-info")
    assert st == 0 and "base=0xfeb01000 irq=5" in text, text
    # The guest removed the word before running its command line.
    assert 'cmdline="echo hi"' in vm.console_text()


def free_port_path(tmp_path):
    return "unix:" + str(tmp_path / "mig.sock")


def test_balloon_survives_migration(vm_factory, tmp_path):
    src = vm_factory(memory="64M").start()
    populate(src)                     # every page above 8M has data
    balloon_to(src, 40 * MiB)
    assert src.guest("fill base=8M size=1M gen=3")[0] == 0
    uri = free_port_path(tmp_path)
    dst = vm_factory(memory="64M", extra=["--incoming", uri]).start(wait_banner=False)
    src.qmp.cmd("migrate", uri=uri)
    r = wait_migration(src)
    assert r["status"] == "completed", r
    # Ballooned pages travel as markers, not data: of the 56 MiB the guest
    # touched, the 24 MiB in the balloon are not sent.
    assert r["ram"]["transferred"] < 40 * MiB, r
    dst.qmp.wait_event("RESUME")
    assert dst.qmp.cmd("query-balloon") == {"actual": 40 * MiB}
    s = stats(dst)
    assert s["actual-pages"] == 6144 and s["driver-ok"], s
    assert host_mem(dst.proc.pid) < 40 * MiB
    # The driver keeps working against the destination's device.
    assert dst.guest("verify base=8M size=1M gen=3") == (0, "verify: ok pages=256")
    balloon_to(dst, MEM)
    assert dst.guest("fill base=50M size=1M gen=4")[0] == 0
    assert dst.guest("verify base=50M size=1M gen=4")[0] == 0


def test_reported_after_first_pass_migrates_as_unbacked(vm_factory, tmp_path):
    """Pages the first migration pass sent with data, then reported free
    (released, not written again): the release is recorded as dirty, so the
    destination gets them as unbacked, not the stale data of the first pass."""
    src = vm_factory(memory="64M", extra=["--backing", "memfd"]).start()
    populate(src)                      # [8M, 64M) all data
    assert src.guest("fill base=16M size=5M gen=8")[0] == 0
    uri = free_port_path(tmp_path)
    dst = vm_factory(memory="64M", extra=["--backing", "memfd", "--incoming", uri]).start(wait_banner=False)
    src.qmp.cmd("migrate-set-parameters", max_bandwidth=16 << 20)
    src.qmp.cmd("migrate", uri=uri)
    deadline = time.time() + 60
    while True:                        # the first pass is past [16M, 20M)
        r = src.qmp.cmd("query-migrate")
        assert r.get("status") in ("setup", "active") and time.time() < deadline, r
        if r.get("ram", {}).get("transferred", 0) >= 28 * MiB:
            break
        time.sleep(0.01)
    assert src.guest("report-free base=16M size=4M") == (0, "report-free: ok pages=1024")
    r = wait_migration(src, max(1, deadline - time.time()))
    assert r["status"] == "completed", r
    dst.qmp.wait_event("RESUME")
    dst.qmp.cmd("stop")
    assert dst.pmemsave(16 * MiB, 4 * MiB) == bytes(4 * MiB)
    src_pages = src.qmp.cmd("query-memory")["pages"]
    assert dst.qmp.cmd("query-memory")["pages"]["unbacked"] >= src_pages["unbacked"] - 16
    dst.qmp.cmd("cont")
    st, text = dst.guest("verify base=16M size=4M gen=8")
    assert st == 1 and "got=0x0" in text, text
    assert dst.guest("verify base=20M size=1M gen=8") == (0, "verify: ok pages=256")


QEMU = shutil.which("qemu-system-x86_64")


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
def test_guest_driver_against_qemu_microvm(tmp_path):
    """The test guest's driver against QEMU's virtio-balloon-device. QEMU 7.2's
    microvm adds virtio_mmio.device= to a Linux kernel's command line only,
    not to a PVH ELF's, so we pass it: the device lands in the last of the 24
    transports (0xfeb00000 + 23 * 0x200); its GSI is 24 + 23 with the second
    IOAPIC (the guest polls and does not use it)."""
    qsock = str(tmp_path / "qmp.sock")
    cmd = [QEMU, "-M", "microvm", "-accel", "tcg", "-m", "128M", "-nographic", "-no-reboot",
           "-nodefaults", "-serial", "stdio",
           "-global", "virtio-mmio.force-legacy=false",
           "-device", "isa-debug-exit,iobase=0x501,iosize=2",   # microvm has no PM port
           "-device", "virtio-balloon-device,deflate-on-oom=on,free-page-reporting=on",
           "-qmp", "unix:%s,server=on,wait=off" % qsock,
           "-kernel", os.path.join(os.path.dirname(MDVM), "..", "guest", "mdvm-guest.elf"),
           "-append", "virtio_mmio.device=512@0xfeb02e00:47 balloon-info; balloon-wait; balloon; balloon-info; "
                      "fill base=8M size=256K; verify base=8M size=256K; report-free base=8M size=256K; "
                      "balloon-wait; balloon; echo qemu-balloon-done; exit code=0"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    out = b""
    try:
        deadline = time.time() + 30
        while not os.path.exists(qsock):
            assert time.time() < deadline and p.poll() is None, "QEMU did not start"
            time.sleep(0.05)
        q = QMP(qsock).negotiate()
        time.sleep(1)
        q.cmd("balloon", value=96 * MiB)
        deadline = time.time() + 90
        while q.cmd("query-balloon")["actual"] != 96 * MiB:
            assert time.time() < deadline, "QEMU's balloon never reached 96M"
            time.sleep(0.1)
        ev = q.wait_event("BALLOON_CHANGE", timeout=5)
        assert ev["data"]["actual"] <= 128 * MiB
        q.cmd("balloon", value=128 * MiB)
        out, _ = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
            out += p.communicate()[0] or b""
    text = out.decode(errors="replace").replace("\r\n", "\n")
    assert "qemu-balloon-done" in text, text[-3000:]
    assert "balloon: ok target=8192 actual=8192" in text, text[-3000:]
    assert "balloon: ok target=0 actual=0" in text, text[-3000:]
    assert "report-free: ok pages=64" in text, text[-3000:]
    assert "verify: ok pages=64" in text
    assert p.returncode == 1, text[-2000:]    # isa-debug-exit: (0 << 1) | 1


def test_inflate_while_migrating(vm_factory, tmp_path):
    """The guest walks and follows the balloon (auto mode) while the VM
    migrates; the destination has the balloon's state and pages, and the
    walked pages below the balloon are consistent with one interrupted sweep."""
    src = vm_factory(memory="64M").start()
    assert src.guest("balloon auto=1")[0] == 0
    assert src.guest("walk base=4M size=60M")[0] == 0
    uri = free_port_path(tmp_path)
    dst = vm_factory(memory="64M", extra=["--incoming", uri]).start(wait_banner=False)
    src.qmp.cmd("balloon", value=40 * MiB)
    src.qmp.cmd("migrate-set-parameters", max_bandwidth=64 << 20)   # slow enough to overlap
    src.qmp.cmd("migrate", uri=uri)
    deadline = time.time() + 90
    during = []   # the source's inflated pages, sampled while the migration is active
    while True:
        r = src.qmp.cmd("query-migrate")
        if r.get("status") in ("completed", "failed", "cancelled"):
            break
        if r.get("status") == "active":
            during.append(stats(src)["inflated-pages"])
        assert time.time() < deadline, r
        time.sleep(0.02)
    assert r["status"] == "completed", r
    # The two overlapped: the balloon grew while pages were being sent.
    assert len(during) >= 2 and during[-1] > during[0], during
    dst.qmp.wait_event("RESUME")
    # The destination finishes what the source started.
    while dst.qmp.cmd("query-balloon")["actual"] != 40 * MiB:
        assert time.time() < deadline, stats(dst)
        time.sleep(0.05)
    s = stats(dst)
    assert s["actual-pages"] == 6144 and not s["needs-reset"], s
    dst.qmp.cmd("stop")
    check_walk_consistent(dst.pmemsave(4 * MiB, 36 * MiB))
    assert dst.pmemsave(40 * MiB, 24 * MiB) == bytes(24 * MiB)
    dst.qmp.cmd("cont")
    assert "guest driver error" not in src.stderr() + dst.stderr()


def test_system_reset_gives_memory_back(vm_factory):
    vm = vm_factory(memory="64M").start()
    balloon_to(vm, 32 * MiB)
    start = len(vm.console_text())
    vm.qmp.cmd("system_reset")
    vm.wait_console("mdvm-guest: ready", start=start)
    s = stats(vm)
    assert s["ballooned-pages"] == 0 and s["actual-pages"] == 0, s
    # The rebooted guest owns all its RAM; the host still wants 32M back.
    assert s["target"] == 32 * MiB
    assert vm.guest("fill base=48M size=1M gen=6")[0] == 0
    assert vm.guest("verify base=48M size=1M gen=6")[0] == 0
    text = balloon_to(vm, 32 * MiB)
    assert "actual=8192" in text, text


def test_features_withdrawn_by_config(vm_factory, tmp_path):
    """<memballoon autodeflate='off' freePageReporting='off'/>: the device
    does not offer DEFLATE_ON_OOM or REPORTING, the guest's driver runs
    without them, and inflation still works."""
    guest = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "guest", "mdvm-guest.elf")
    xml = tmp_path / "b.xml"
    xml.write_text("<domain type='kvm'><name>b</name><memory unit='MiB'>64</memory>"
                   "<os><type arch='x86_64'>hvm</type><kernel>%s</kernel></os>"
                   "<devices><memballoon model='virtio' autodeflate='off' freePageReporting='off'/>"
                   "</devices></domain>" % guest)
    vm = vm_factory(extra=["--config", str(xml)]).start()
    assert vm.guest("balloon-oom pages=16") == (
        2, "balloon-oom: error: VIRTIO_BALLOON_F_DEFLATE_ON_OOM not negotiated")
    assert vm.guest("report-free base=16M size=4M") == (
        2, "report-free: error: VIRTIO_BALLOON_F_REPORTING not negotiated")
    s = stats(vm)
    assert not s["features"] & (1 << 2) and not s["features"] & (1 << 5), s
    vm.qmp.cmd("balloon", value=48 * MiB)
    assert vm.guest("balloon")[0] == 0
    assert vm.qmp.cmd("query-balloon") == {"actual": 48 * MiB}
