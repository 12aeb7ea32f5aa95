"""Guest memory seen from the host: fill/verify, and host-side checks of dumps."""
import struct

import pytest

from mdvmtest import PAGE, fill_pattern


def check_fill_dump(dump, base, gen):
    for i in range(0, len(dump), PAGE):
        pfn = (base + i) // PAGE
        want = fill_pattern(pfn, gen)
        for off in (0, 8, 2048, 4088):
            got = struct.unpack_from("<Q", dump, i + off)[0]
            assert got == want, "page 0x%x off %d: got 0x%x want 0x%x" % (base + i, off, got, want)


def test_fill_then_verify_via_test_device(vm):
    st, text = vm.guest("fill base=8M size=1M gen=5")
    assert st == 0, text
    st, text = vm.guest("verify base=8M size=1M gen=5")
    assert (st, text) == (0, "verify: ok pages=256")
    check_fill_dump(vm.pmemsave(8 << 20, 1 << 20), 8 << 20, 5)
    st, text = vm.guest("verify base=8M size=1M gen=6")
    assert st == 1 and "FAIL page=0x800000" in text


def test_verify_detects_host_side_corruption(vm, tmp_path):
    assert vm.guest("fill base=8M size=256K gen=2")[0] == 0
    # Corrupt one page behind the guest's back through a dump+compare: pmemsave
    # is read-only, so corrupt by having the guest walk over part of it.
    assert vm.guest("walk base=8M size=16K")[0] == 0
    vm.qmp.cmd("guest-command", command="idle")
    st, text = vm.guest("verify base=8M size=256K gen=2")
    assert st == 1 and "FAIL page=0x800000" in text


def test_fill_rejects_range_outside_ram(vm):
    st, text = vm.guest("fill base=0x100000000 size=1M")
    assert st == 2, text


@pytest.mark.parametrize("memory", ["32M", "3G", "5G"])
def test_memory_sizes_and_high_ram(vm_factory, memory):
    # 5G puts 1 GiB above the 3 GiB-4 GiB MMIO hole.
    vm = vm_factory(memory=memory).start()
    banner = vm.wait_console(" testdev=")   # the banner is written byte by byte
    assert "ram=%s" % memory in banner.replace("ram=3072M", "ram=3G").replace("ram=5120M", "ram=5G")
    if memory == "5G":
        st, text = vm.guest("fill base=0x100000000 size=64K gen=3")
        assert st == 0, text
        assert vm.guest("verify base=0x100000000 size=64K gen=3") == (0, "verify: ok pages=16")
        check_fill_dump(vm.pmemsave(0x100000000, 64 << 10), 0x100000000, 3)


def test_verify_reports_first_mismatch_mid_range(vm):
    """One page in the middle refilled with another generation: verify names
    exactly that page (and what it found), not the start of the range."""
    assert vm.guest("fill base=8M size=1M gen=5") == (0, "fill: done pages=256 gen=5")
    bad = (8 << 20) + 0x5b000   # page 91 of 256
    assert vm.guest("fill base=0x%x size=4K gen=6" % bad) == (0, "fill: done pages=1 gen=6")
    st, text = vm.guest("verify base=8M size=1M gen=5")
    assert st == 1, text
    assert text == "verify: FAIL page=0x%x got=0x%x want=0x%x off=0" % (
        bad, fill_pattern(bad >> 12, 6), fill_pattern(bad >> 12, 5)), text
    # The pages after it are intact: verifying past it is ok again.
    assert vm.guest("verify base=0x%x size=0x%x gen=5" % (bad + PAGE, (9 << 20) - bad - PAGE)) == \
        (0, "verify: ok pages=%d" % (((9 << 20) - bad - PAGE) // PAGE))
    dump = vm.pmemsave(8 << 20, 1 << 20)
    check_fill_dump(dump[:bad - (8 << 20)], 8 << 20, 5)
    check_fill_dump(dump[bad - (8 << 20):bad - (8 << 20) + PAGE], bad, 6)
