"""Folio migration and compaction on a running guest (docs/compaction.md).

The guest `walk`s (writes every page of a range, sweep after sweep) while
mdvm moves the walked folios to other host locations, packs sparse hugepages
and collapses regions; afterwards the walk range must hold one interrupted
sweep (pmemsave) and `verify` of a filled range must pass. Freed memory must
leave the process; a poisoned page must never be read or moved."""
import struct
import time

import pytest

from mdvmtest import PAGE, check_walk_consistent, fill_pattern

MiB = 1 << 20
FILL = (4 * MiB, 1 * MiB)          # 256 pages kept for verify
WALK = (8 * MiB, 512 * 1024)       # 128 pages walked: a sparse hugepage once its region is freed


def wait_sweeps(vm, n, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st, text = vm.guest("status")
        if "workload=walk" in text and int(text.split("sweeps=")[1].split()[0]) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError("walk made no progress: " + text)


def status_sweeps(vm):
    return int(vm.guest("status")[1].split("sweeps=")[1].split()[0])


def start(vm_factory, backing, memory="64M"):
    extra = ["--backing", backing]
    if backing == "hugetlb":
        extra.append("--reserve-hugepages")
    try:
        vm = vm_factory(cmdline="idle", memory=memory, extra=extra).start()
    except RuntimeError as e:
        if backing == "hugetlb":
            pytest.skip("no hugetlb pages here: %s" % e)
        raise
    assert vm.guest("fill base=%d size=%d gen=7" % FILL)[0] == 0
    return vm


def walk(vm, base, size):
    assert vm.guest("walk base=%d size=%d" % (base, size))[0] == 0
    wait_sweeps(vm, 2)


def finish(vm, base, size, split=None):
    """End the walk with `verify` of the filled range, then check the walk
    range. The walk increments each page's byte, so pages that started from
    other values (an earlier, smaller walk) are checked as their own run:
    split is the page index where the second run starts."""
    n = status_sweeps(vm)
    wait_sweeps(vm, n + 2)
    st, text = vm.guest("verify base=%d size=%d gen=7" % FILL)
    assert st == 0 and text == "verify: ok pages=%d" % (FILL[1] // PAGE), text
    dump = vm.pmemsave(base, size)
    if split:
        v0, b0 = check_walk_consistent(dump[:split * PAGE])
        v1, b1 = check_walk_consistent(dump[split * PAGE:])
        # one interrupted sweep across both runs: if it stopped in the
        # second run, the first is all done, and vice versa
        assert b0 == split or b1 == len(dump) // PAGE - split, (b0, b1)
    else:
        check_walk_consistent(dump)


def rss_shmem_kb(vm):
    with open("/proc/%d/status" % vm.proc.pid) as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1])
    return 0


@pytest.mark.parametrize("backing", ["memfd", "thp", "anon", "hugetlb"])
@pytest.mark.parametrize("method", ["uffd-wp", "pause"])
def test_migrate_while_walking(vm_factory, backing, method):
    """Move every folio of the walked range to new host memory, repeatedly,
    while the guest writes it: no write is lost."""
    vm = start(vm_factory, backing)
    base, size = (8 * MiB, 2 * MiB)
    walk(vm, base, size)
    moved = 0
    for _ in range(6):
        r = vm.qmp.cmd("x-mdvm-migrate-range", gpa=base, size=size, method=method)
        assert r["method"] == method and r["not-moved"] == 0, r
        moved += r["folios-moved"]
        if method == "pause":
            assert r["longest-stop-ns"] > 0
        else:
            assert r["longest-write-protect-ns"] > 0
    assert moved >= 6
    finish(vm, base, size)


@pytest.mark.parametrize("backing", ["memfd", "thp", "anon", "hugetlb"])
def test_compact_and_collapse_while_walking(vm_factory, backing):
    vm = start(vm_factory, backing)
    base, size = WALK
    walk(vm, base, size)
    q0 = vm.qmp.cmd("query-memory")
    # Free the rest of both 2 MiB regions: the walk's and the fill's hugepages
    # become sparse (128 and 256 of 512 pieces).
    for gpa, sz in ((FILL[0] + FILL[1], 2 * MiB - FILL[1]), (base + size, 2 * MiB - size)):
        r = vm.qmp.cmd("x-mdvm-release-range", gpa=gpa, size=sz)
        assert r["released-bytes"] == sz, r
    for i in range(3):
        r = vm.qmp.cmd("compact")
        if backing == "memfd" and i == 0:
            # the walk's 128 pieces move into the fill's hugepage while it runs
            assert r["folios-moved"] >= 1 and r["hugepages-freed"] >= 1, r
            assert r["fragmentation-after"]["hugepages-in-use"] < r["fragmentation-before"]["hugepages-in-use"]
        if backing != "memfd":
            assert r["folios-moved"] == 0 and "note" in r, r
    # The guest takes the whole walk region back; collapse gathers it into one
    # 2 MiB folio (moving the pieces that were packed elsewhere) while it walks.
    walk(vm, base, 2 * MiB)
    collapsed = 0
    for _ in range(3):
        r = vm.qmp.cmd("compact", mode="collapse", gpa=base, size=2 * MiB)
        collapsed += r["regions-collapsed"]
    assert collapsed == 1, r
    q = vm.qmp.cmd("query-memory")
    assert q["folios"]["order-9"] >= q0["folios"]["order-9"] - 1
    assert "fragmentation" in q and "percent" in q["fragmentation"]
    finish(vm, base, 2 * MiB, split=WALK[1] // PAGE)


@pytest.mark.parametrize("backing", ["memfd", "hugetlb"])
def test_released_memory_leaves_the_process(vm_factory, backing):
    """Scattered release (every other page of 8 MiB), then compaction: the
    file backing guest RAM shrinks by what was freed (memfd at once, by the
    punch of each page; compaction then frees whole pool hugepages)."""
    vm = start(vm_factory, backing)
    region = (16 * MiB, 8 * MiB)
    assert vm.guest("fill base=%d size=%d gen=3" % region)[0] == 0
    f0 = vm.qmp.cmd("query-memory")["fragmentation"]
    shm0 = rss_shmem_kb(vm)
    r = vm.qmp.cmd("x-mdvm-release-range", gpa=region[0], size=region[1], chunk=PAGE, stride=2 * PAGE)
    assert r["released-bytes"] == region[1] // 2
    c = vm.qmp.cmd("compact")
    f1 = vm.qmp.cmd("query-memory")["fragmentation"]
    if backing == "memfd":
        assert f0["host-bytes"] - f1["host-bytes"] >= region[1] // 2
        assert (shm0 - rss_shmem_kb(vm)) * 1024 >= region[1] // 2 * 0.9
        assert c["hugepages-freed"] == 2, c
        assert f1["hugepages-in-use"] == f0["hugepages-in-use"] - 2
    else:
        # hugetlb: a 2 MiB page maps whole; half-free regions keep their page
        assert c["hugepages-freed"] == 0 and "hugetlb" in c["note"]
        # whole regions do go back
        r = vm.qmp.cmd("x-mdvm-release-range", gpa=region[0], size=region[1])
        f2 = vm.qmp.cmd("query-memory")["fragmentation"]
        assert f0["host-bytes"] - f2["host-bytes"] == region[1]


def test_poisoned_folio_never_read_or_moved(vm_factory):
    """memfd: a poisoned page's backing is punched and armed with
    UFFDIO_POISON; reading it would kill mdvm with SIGBUS."""
    vm = start(vm_factory, "memfd")
    base, size = WALK
    walk(vm, base, size)
    bad = base + 5 * PAGE
    vm.qmp.cmd("inject-memory-error", gpa=bad)
    vm.qmp.cmd("x-mdvm-release-range", gpa=base + size, size=2 * MiB - size)
    vm.qmp.cmd("x-mdvm-release-range", gpa=FILL[0] + FILL[1], size=2 * MiB - FILL[1])
    for _ in range(3):
        r = vm.qmp.cmd("compact")
        r = vm.qmp.cmd("compact", mode="collapse")
    r = vm.qmp.cmd("x-mdvm-migrate-range", gpa=bad, size=PAGE)
    assert r["folios-moved"] == 0 and r["reason"] == "poisoned", r
    assert vm.proc.poll() is None
    assert vm.qmp.cmd("query-mce")["poisoned-pages"] == [bad]
    # the guest may have taken the #MC; the fill range is intact either way
    st, text = vm.guest("verify base=%d size=%d gen=7" % FILL)
    assert st == 0, text


def test_compact_bad_requests(vm_factory):
    vm = start(vm_factory, "memfd")
    for args, msg in (({"mode": "shrink"}, "mode must be reclaim or collapse"),
                      ({"method": "magic"}, "method must be auto, uffd-wp or pause"),
                      ({"gpa": 0, "size": 2 * MiB}, "apply to mode=collapse only"),
                      ({"budget": -1}, "")):
        r = vm.qmp.execute("compact", **args)
        assert "error" in r and msg in r["error"]["desc"], r
    r = vm.qmp.execute("x-mdvm-release-range", gpa=3, size=PAGE)
    assert "multiples of 4 KiB" in r["error"]["desc"]
    r = vm.qmp.execute("x-mdvm-release-range", gpa=1 << 40, size=PAGE)
    assert "is not guest RAM" in r["error"]["desc"]
    assert vm.guest("verify base=%d size=%d gen=7" % FILL)[0] == 0


def test_auto_compaction(vm_factory):
    vm = vm_factory(cmdline="idle", memory="64M", extra=["--backing", "memfd", "--compaction", "auto"]).start()
    assert vm.guest("fill base=%d size=%d gen=3" % (16 * MiB, 8 * MiB))[0] == 0
    before = vm.qmp.cmd("query-memory")["fragmentation"]["hugepages-in-use"]
    vm.qmp.cmd("x-mdvm-release-range", gpa=16 * MiB, size=8 * MiB, chunk=PAGE, stride=2 * PAGE)
    deadline = time.time() + 10
    while time.time() < deadline:
        f = vm.qmp.cmd("query-memory")["fragmentation"]
        if f["hugepages-in-use"] <= before - 2:
            break
        time.sleep(0.2)
    assert f["hugepages-in-use"] <= before - 2, f
    # the pages kept (every odd one: chunk 0 of each stride went) still hold
    # what the guest wrote; the released ones read as zero
    dump = vm.pmemsave(16 * MiB, 8 * MiB)
    assert struct.unpack_from("<Q", dump, 0)[0] == 0
    for i in range(1, 8 * MiB // PAGE, 2):
        pfn = (16 * MiB) // PAGE + i
        assert struct.unpack_from("<Q", dump, i * PAGE)[0] == fill_pattern(pfn, 3), i
