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
        if backing == "hugetlb" and i == 0:
            # both half-free regions demoted to 4 KiB pages (one of them
            # while the guest writes it); their hugetlb pages go back
            assert r["regions-demoted"] == 2 and r["hugepages-freed"] == 2, r
            assert r["bytes-returned"] > 0, r
        if backing in ("thp", "anon"):
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
        # hugetlb: the four half-free regions are demoted (their live pages
        # move to 4 KiB pages of a side file) and their 2 MiB pages go back
        assert c["regions-demoted"] == 4 and c["hugepages-freed"] == 4, c
        assert f0["host-bytes"] - f1["host-bytes"] == region[1] // 2
        assert f1["regions-demoted"] == 4
        assert vm.guest("verify base=%d size=%d gen=3" % (region[0] + PAGE, PAGE))[0] == 0
        # whole regions go back too, and a demoted region releases 4 KiB pages
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


def vma_count(vm):
    with open("/proc/%d/maps" % vm.proc.pid) as f:
        return sum(1 for _ in f)


@pytest.mark.parametrize("backing", ["memfd", "anon"])
def test_scattered_release_of_1g(vm_factory, backing):
    """Every other 4 KiB page of a 1 GiB guest released (130048 scattered
    pages) while the guest runs: released pages stay holes of the existing
    mappings (one VMA each used to hit vm.max_map_count, 65530, and abort
    mdvm); the guest keeps running, its memory intact, and takes released
    pages back by touching them."""
    vm = start(vm_factory, backing, memory="1G")
    assert vm.guest("walk base=%d size=%d sweeps=1" % (8 * MiB, 1016 * MiB))[0] == 0
    deadline = time.time() + 60
    while "workload=idle" not in vm.guest("status")[1] and time.time() < deadline:
        time.sleep(0.2)
    walk(vm, 6 * MiB, 2 * MiB)   # the guest writes on while pages go
    maps0 = vma_count(vm)
    r = vm.qmp.cmd("x-mdvm-release-range", gpa=8 * MiB, size=1016 * MiB, chunk=PAGE, stride=2 * PAGE)
    assert r["released-bytes"] == 508 * MiB and r["failed-bytes"] == 0, r
    assert vma_count(vm) < maps0 + 100, (maps0, vma_count(vm))
    vm.qmp.cmd("compact")
    with open("/proc/sys/vm/max_map_count") as f:
        assert vma_count(vm) < int(f.read()) // 2 + maps0   # compaction's mapping budget
    assert vm.proc.poll() is None
    # kept pages hold what the walk wrote, released ones read zero
    dump = vm.pmemsave(8 * MiB, 64 * PAGE)
    for i in range(64):
        assert dump[i * PAGE] == (1 if i % 2 else 0), (i, dump[i * PAGE])
    finish(vm, 6 * MiB, 2 * MiB)
    # the guest takes released pages back by writing them
    assert vm.guest("fill base=%d size=%d gen=5" % (8 * MiB, 2 * MiB))[0] == 0
    st, text = vm.guest("verify base=%d size=%d gen=5" % (8 * MiB, 2 * MiB))
    assert st == 0 and text == "verify: ok pages=512", text


def test_auto_compaction_collapses(vm_factory):
    """--compaction auto also collapses: a 2 MiB region the guest filled again
    page by page (512 small folios after a scattered release) becomes one
    2 MiB folio, while the guest walks elsewhere."""
    vm = vm_factory(cmdline="idle", memory="64M",
                    extra=["--backing", "memfd", "--compaction", "auto"]).start()
    assert vm.guest("fill base=%d size=%d gen=7" % FILL)[0] == 0
    region = (16 * MiB, 2 * MiB)
    assert vm.guest("fill base=%d size=%d gen=3" % region)[0] == 0
    vm.qmp.cmd("x-mdvm-release-range", gpa=region[0], size=region[1], chunk=PAGE, stride=2 * PAGE)
    assert vm.guest("fill base=%d size=%d gen=4" % region)[0] == 0
    q = vm.qmp.cmd("query-memory")["folios"]
    assert q["order-0"] >= 512, q
    walk(vm, *WALK)
    deadline = time.time() + 20
    while True:
        ev = vm.qmp.wait_event("COMPACTION", timeout=max(1, deadline - time.time()))
        if ev["data"].get("mode") == "collapse":
            break
    assert ev["data"]["regions-collapsed"] >= 1, ev
    assert vm.qmp.cmd("query-memory")["folios"]["order-0"] < q["order-0"] - 500
    finish(vm, *WALK)
    st, text = vm.guest("verify base=%d size=%d gen=4" % region)
    assert st == 0 and text == "verify: ok pages=512", text
