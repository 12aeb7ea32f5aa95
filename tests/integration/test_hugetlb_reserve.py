"""hugetlb backing reserves the guest's hugepages at start (issue #3).

Two mdvm processes on one host (a migration's source and destination) must
not both pick hugetlb when only one fits: the first reserves its hugepages
(HugePages_Rsvd, not populated), the second falls back to thp and says why,
and neither fails later for lack of hugepages. Explicit --backing hugetlb
without enough hugepages fails at start.
"""
import os

import pytest

from mdvmtest import GUEST, run_mdvm

NR = "/proc/sys/vm/nr_hugepages"
MiB = 1 << 20
AVAIL = 24          # hugepages free and unreserved during the test
GUEST_MEM = 32      # MiB: 16 hugepages, more than half of AVAIL


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v.split()[0])
    return out


@pytest.fixture
def hugepages():
    """Set nr_hugepages so that exactly AVAIL hugepages are free and
    unreserved; restore the old value afterwards."""
    with open(NR) as f:
        old = int(f.read())
    m = meminfo()
    target = old + AVAIL - (m["HugePages_Free"] - m["HugePages_Rsvd"])
    with open(NR, "w") as f:
        f.write("%d\n" % target)
    m = meminfo()
    if m["HugePages_Free"] - m["HugePages_Rsvd"] != AVAIL:
        with open(NR, "w") as f:
            f.write("%d\n" % old)
        pytest.fail("could not make %d hugepages available (host memory short?): %r" % (AVAIL, m))
    yield
    with open(NR, "w") as f:
        f.write("%d\n" % old)


def fill_verify(vm, base, size, gen):
    st, out = vm.guest("fill base=%dM size=%dM gen=%d" % (base, size, gen))
    assert st == 0 and "fill: done" in out, out
    st, out = vm.guest("verify base=%dM size=%dM gen=%d" % (base, size, gen))
    assert st == 0 and "verify: ok pages=%d" % (size * 256) in out, out


def test_second_process_falls_back_and_explicit_fails(hugepages, vm_factory):
    need = GUEST_MEM * MiB >> 21
    m0 = meminfo()
    a = vm_factory(cmdline="idle", memory="%dM" % GUEST_MEM, extra=["--backing", "auto"]).start()
    assert "backing: hugetlb" in a.stderr(), a.stderr()
    m1 = meminfo()
    populated = m0["HugePages_Free"] - m1["HugePages_Free"]
    reserved = m1["HugePages_Rsvd"] - m0["HugePages_Rsvd"]
    # Reserved, not populated: boot touched a few regions, the rest is only reserved.
    assert populated + reserved == need, (m0, m1)
    assert populated < need // 2 and reserved > need // 2, (m0, m1)

    # The second one finds only AVAIL - need unreserved and falls back.
    b = vm_factory(cmdline="idle", memory="%dM" % GUEST_MEM, extra=["--backing", "auto"]).start()
    want = "backing: thp (hugetlb: only %d of %d hugepages could be reserved" % (AVAIL - need, need)
    assert want in b.stderr(), b.stderr()
    assert b.qmp.cmd("query-memory")["backing"] == "thp"
    assert a.qmp.cmd("query-memory")["backing"] == "hugetlb"

    # Explicit hugetlb: a clear error at start, nothing run.
    r = run_mdvm("run", "--kernel", GUEST, "--memory", "%dM" % GUEST_MEM, "--backing", "hugetlb",
                 "--cmdline", "exit code=0", timeout=60)
    assert r.returncode != 0, r
    assert "hugetlb backing: only %d of %d hugepages could be reserved" % (AVAIL - need, need) \
        in r.stderr, r.stderr

    # Both guests touch most of their RAM: A's hugepages come from its reservation.
    fill_verify(a, 4, GUEST_MEM - 8, 7)
    fill_verify(b, 4, GUEST_MEM - 8, 9)
    m2 = meminfo()
    assert m2["HugePages_Free"] <= m1["HugePages_Free"] - (GUEST_MEM - 8) // 2 + 2, (m1, m2)
    st, out = a.guest("verify base=4M size=%dM gen=7" % (GUEST_MEM - 8))
    assert st == 0 and "verify: ok" in out, out

    # Exit gives every reservation back.
    a.stop()
    b.stop()
    m3 = meminfo()
    assert m3["HugePages_Free"] - m3["HugePages_Rsvd"] == AVAIL, m3


def test_explicit_hugetlb_reserves_or_fails(hugepages, vm_factory):
    """--backing hugetlb of more than AVAIL fails at start; of AVAIL exactly
    it runs and fills all of it."""
    r = run_mdvm("run", "--kernel", GUEST, "--memory", "%dM" % (2 * (AVAIL + 1)),
                 "--backing", "hugetlb", "--cmdline", "exit code=0", timeout=60)
    assert r.returncode != 0
    assert "hugetlb backing: only %d of %d hugepages could be reserved" % (AVAIL, AVAIL + 1) \
        in r.stderr, r.stderr
    v = vm_factory(cmdline="idle", memory="%dM" % (2 * AVAIL), extra=["--backing", "hugetlb"]).start()
    assert "backing: hugetlb" in v.stderr(), v.stderr()
    fill_verify(v, 4, 2 * AVAIL - 8, 3)
    assert v.qmp.cmd("query-memory")["backing"] == "hugetlb"
