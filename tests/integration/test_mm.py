"""Guest RAM behind the memdesc scheme, on real KVM: every backing kind, and
query-memory figures that match what the guest touched."""
import json
import os
import time

import pytest

from mdvmtest import run_mdvm, GUEST

BACKINGS = ["memfd", "anon", "thp", "hugetlb", "auto"]


def hugetlb_extra(backing):
    # mdvm raises vm.nr_hugepages itself (root) and gives them back at exit.
    return ["--reserve-hugepages"] if backing in ("hugetlb", "auto") else []


@pytest.mark.parametrize("backing", BACKINGS)
def test_fill_verify_on_every_backing(vm_factory, backing):
    before = open("/proc/sys/vm/nr_hugepages").read()
    vm = vm_factory(memory="64M", extra=["--backing", backing] + hugetlb_extra(backing)).start()
    mem = vm.qmp.cmd("query-memory")
    if backing != "auto":
        assert mem["backing"] == backing
    else:
        assert mem["backing"] in ("hugetlb", "thp", "memfd")
    st, text = vm.guest("fill base=16M size=6M gen=9")
    assert st == 0, text
    assert vm.guest("verify base=16M size=6M gen=9") == (0, "verify: ok pages=1536")
    vm.stop()
    assert open("/proc/sys/vm/nr_hugepages").read() == before, "mdvm did not restore nr_hugepages"


@pytest.mark.parametrize("backing", ["memfd", "anon", "hugetlb"])
def test_query_memory_counts_match_guest_touch(vm_factory, backing):
    vm = vm_factory(memory="64M", extra=["--backing", backing] + hugetlb_extra(backing)).start()
    m0 = vm.qmp.cmd("query-memory")
    assert m0["ram-size"] == 64 << 20
    assert m0["backing"] == backing
    for key in ("backing", "pages", "folios", "hugepages-in-use", "occupancy-histogram", "metadata-bytes"):
        assert key in m0, key
    # Every frame is counted once, under exactly one type.
    assert sum(m0["pages"].values()) * 4096 >= m0["ram-size"]
    # 8 MiB at 16 MiB: four untouched 2 MiB regions -> four order-9 folios.
    assert vm.guest("fill base=16M size=8M gen=1")[0] == 0
    m1 = vm.qmp.cmd("query-memory")
    if backing != "hugetlb":   # hugetlb maps a region whole: no fault to count
        assert m1["first-touch-faults"] - m0["first-touch-faults"] == 4
    assert m1["folios"]["order-9"] - m0["folios"]["order-9"] == 4
    assert m1["pages"]["ram"] - m0["pages"]["ram"] == 2048
    assert m1["pages"]["unbacked"] == m0["pages"]["unbacked"] - 2048
    assert m1["hugepages-in-use"] - m0["hugepages-in-use"] == 4
    assert m1["populated-bytes"] - m0["populated-bytes"] == 8 << 20
    # Four more full hugepages in the histogram's top bucket; the histogram
    # covers exactly the hugepages in use.
    occ0, occ1 = m0["occupancy-histogram"], m1["occupancy-histogram"]
    assert occ1["512"] - occ0["512"] == 4, (occ0, occ1)
    assert sum(occ1.values()) == m1["hugepages-in-use"], occ1
    # Metadata: four order-9 folios cost descriptors, not per-page leaves.
    assert 0 <= m1["metadata-bytes"] - m0["metadata-bytes"] < 4096, (m0["metadata-bytes"], m1["metadata-bytes"])
    # Reading back touches nothing new.
    assert vm.guest("verify base=16M size=8M gen=1")[0] == 0
    m2 = vm.qmp.cmd("query-memory")
    assert m2["first-touch-faults"] == m1["first-touch-faults"]
    # Boot structures are typed reserved; the hole is MMIO.
    assert m2["pages"]["reserved"] >= 2
    assert m2["pages"]["mmio"] > 0
    # The command-line client shows the same figures.
    r = run_mdvm("ctl", "--socket", vm.sock, "query-memory", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["return"]["ram-size"] == 64 << 20


def test_untouched_memory_costs_no_host_memory(vm_factory):
    vm = vm_factory(memory="4G", extra=["--backing", "memfd"]).start()
    m = vm.qmp.cmd("query-memory")
    assert m["populated-bytes"] < 64 << 20, m
    rss_kb = 0
    with open("/proc/%d/status" % vm.proc.pid) as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssShmem:")):
                rss_kb += int(line.split()[1])
    assert rss_kb * 1024 < 96 << 20, "a barely touched 4 GiB guest uses %d KiB" % rss_kb


def test_one_terabyte_guest_starts_and_works(vm_factory):
    vm = vm_factory(memory="1T").start()
    m = vm.qmp.cmd("query-memory")
    assert m["ram-size"] == 1 << 40
    # Metadata stays small because the guest touched little.
    assert m["metadata-bytes"] < 8 << 20, m["metadata-bytes"]
    assert vm.guest("fill base=64M size=2M gen=4")[0] == 0
    assert vm.guest("verify base=64M size=2M gen=4") == (0, "verify: ok pages=512")
    # RAM far above the eagerly registered memslots (lazy slot path).
    # (The test guest maps up to 32 GiB without 1 GiB pages; 30 GiB is well
    # above the 16 GiB registered at start.)
    hi = 30 << 30
    st, text = vm.guest("fill base=0x%x size=64K gen=5" % hi)
    assert st == 0, text
    assert vm.guest("verify base=0x%x size=64K gen=5" % hi) == (0, "verify: ok pages=16")


def test_bad_backing_is_a_clear_error():
    r = run_mdvm("run", "--kernel", GUEST, "--backing", "bogus")
    assert r.returncode != 0 and "backing" in r.stderr
