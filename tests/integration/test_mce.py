"""Memory errors delivered as machine checks (docs/memory-errors.md): the
guest is told through #MC, reports the exact address, drops the page and
keeps running; its other memory stays intact. Both MCE back ends run here:
this host's KVM has MCE banks (native) and user-space MSR filtering
(emulated)."""
import os
import re
import subprocess
import time

import pytest

from mdvmtest import MDVM, PAGE, check_walk_consistent

MEM = "64M"
WALK_BASE, WALK_SIZE = 4 << 20, 2 << 20
SRAO_STATUS = 0xBD000000000000C0
SRAR_STATUS = 0xBD80000000000134


@pytest.fixture
def vm_factory(vm_factory):
    """Guest RAM on THP unless a test asks otherwise: with hugepages free on
    the host (other tests reserve them), --backing auto picks hugetlb, where
    accesses to a poisoned page are not caught (docs/memory-errors.md)."""
    def make(**kw):
        extra = list(kw.pop("extra", []))
        if "--backing" not in extra:
            extra += ["--backing", "thp"]
        return vm_factory(extra=extra, **kw)
    return make


@pytest.fixture(params=["native", "emulated"])
def backend(request, monkeypatch):
    monkeypatch.setenv("MDVM_MCE", request.param)
    return request.param


def mce_lines(vm, text=None):
    return re.findall(r"mce: bank=(\d+) status=(0x[0-9a-f]+) addr=(0x[0-9a-f]+) kind=(\w+) mcg=(0x[0-9a-f]+)",
                      vm.console_text() if text is None else text)


def wait_mce(vm, addr, kind, timeout=20):
    deadline = time.time() + timeout
    while True:
        for bank, status, a, k, mcg in mce_lines(vm):
            if int(a, 16) == addr and k == kind:
                return int(bank), int(status, 16), int(mcg, 16)
        assert vm.proc.poll() is None, "mdvm exited: " + vm.stderr()
        assert time.time() < deadline, "no %s for 0x%x; console:\n%s" % (kind, addr, vm.console_text()[-1500:])
        time.sleep(0.02)


def settle(vm):
    """The walk runs guest commands between sweeps: once one answers, the
    handler of any machine check raised so far has finished (an SRAO can be
    followed by an SRAR for the same page when the sweep was about to touch
    it; a third error meanwhile would find MCIP set and shut the CPU down)."""
    assert vm.guest("mce")[0] == 0


def wait_sweeps(vm, more, timeout=20):
    start = vm.qmp.cmd("query-guest")["sweeps"]
    deadline = time.time() + timeout
    while vm.qmp.cmd("query-guest")["sweeps"] < start + more:
        assert time.time() < deadline, "guest stopped walking"
        time.sleep(0.02)


def events(vm, name):
    while True:   # drain what has arrived
        vm.qmp.sock.settimeout(0.2)
        try:
            vm.qmp.events.append(vm.qmp.recv())
        except Exception:
            break
    vm.qmp.sock.settimeout(30)
    return [e["data"] for e in vm.qmp.events if e["event"] == name]


def dump_without(vm, base, size, bad):
    """pmemsave of [base, base+size) minus the poisoned pages (pmemsave
    refuses them), concatenated."""
    out, cur = b"", base
    for b in sorted(bad) + [base + size]:
        if b > cur:
            out += vm.pmemsave(cur, b - cur)
        cur = b + PAGE
    return out


def start_walker(vm_factory, **kw):
    vm = vm_factory(cmdline="idle", memory=MEM, **kw).start()
    assert vm.guest("fill base=8M size=512K gen=7")[0] == 0
    assert vm.guest("walk base=%d size=%d" % (WALK_BASE, WALK_SIZE))[0] == 0
    wait_sweeps(vm, 2)
    return vm


def finish_and_check(vm, bad_walk, bad_fill):
    """Stop the walk, check the rest of the memory: walk consistent, fill intact."""
    wait_sweeps(vm, 3)
    st, text = vm.guest("verify base=8M size=512K gen=7")   # ends the walk
    assert st == 0, text
    want = "verify: ok pages=%d" % (128 - len(bad_fill)) + (" poisoned=%d" % len(bad_fill) if bad_fill else "")
    assert text == want
    check_walk_consistent(dump_without(vm, WALK_BASE, WALK_SIZE, bad_walk))
    st, text = vm.guest("mce")
    assert st == 0
    for p in bad_walk + bad_fill:
        assert "0x%x" % p in text, text


def test_backend_reported(backend, vm_factory):
    vm = vm_factory(cmdline="idle", memory=MEM).start()
    q = vm.qmp.cmd("query-mce")
    assert q["backend"] == backend and q["banks"] == 10
    assert q["mcg-cap"] == (1 << 24) | (1 << 8) | 10      # SER_P, CTL_P, no CMCI/LMCE
    assert "machine checks: %s back end (10 banks" % backend in vm.stderr()
    assert "mce: enabled banks=10" in vm.console_text()


def test_action_optional_while_walking(backend, vm_factory):
    vm = start_walker(vm_factory)
    a, b = WALK_BASE + 0x80000, (8 << 20) + 0x40000
    vm.qmp.cmd("inject-memory-error", gpa=a)
    bank, status, mcg = wait_mce(vm, a, "SRAO")
    assert (bank, status, mcg) == (9, SRAO_STATUS, 0x5)      # MCIP | RIPV
    settle(vm)
    vm.qmp.cmd("inject-memory-error", gpa=b, kind="action-optional")
    wait_mce(vm, b, "SRAO")
    finish_and_check(vm, [a], [b])
    q = vm.qmp.cmd("query-mce")
    assert q["poisoned-count"] == 2 and sorted(q["poisoned-pages"]) == [a, b]
    assert q["injected"]["action-optional"] >= 2
    ev = events(vm, "MEMORY_FAILURE")
    assert {"recipient": "guest", "action": "inject",
            "flags": {"action-required": False, "recursive": False}} in ev
    # pmemsave refuses poisoned memory (it is never read).
    r = vm.qmp.execute("pmemsave", val=a, size=PAGE, filename=os.path.join(vm.tmp, "p.bin"))
    assert "error" in r, r


def test_action_required_on_access(backend, vm_factory):
    vm = start_walker(vm_factory)
    a = WALK_BASE + 0x123000
    vm.qmp.cmd("inject-memory-error", gpa=a, kind="action-required")
    bank, status, mcg = wait_mce(vm, a, "SRAR")
    assert (bank, status) == (9, SRAR_STATUS)
    assert mcg == 0x6                                         # MCIP | EIPV, RIPV clear
    settle(vm)
    # The fill region: poisoned, then touched by verify.
    b = (8 << 20) + 0x10000
    vm.qmp.cmd("inject-memory-error", gpa=b, kind="action-required")
    finish_and_check(vm, [a], [b])
    wait_mce(vm, b, "SRAR")
    ev = events(vm, "MEMORY_FAILURE")
    assert {"recipient": "guest", "action": "inject",
            "flags": {"action-required": True, "recursive": False}} in ev
    assert vm.qmp.cmd("query-mce")["injected"]["action-required"] == 2


def test_count_and_bad_requests(vm_factory):
    vm = vm_factory(cmdline="idle", memory=MEM).start()
    bad = [
        (dict(gpa=0x500010), "gpa 0x500010 is not 4 KiB aligned"),
        (dict(gpa=0x100000000), "GPA 0x100000000 is not guest RAM"),
        (dict(gpa=(64 << 20) - PAGE, count=2), "GPA 0x4000000 is not guest RAM"),
        (dict(gpa=0x500000, kind="maybe"), "Parameter 'kind' does not accept value 'maybe'"),
        (dict(gpa=0x500000, count=0), "count must be 1..512"),
        (dict(gpa=0x500000, cpu_index=3), "cpu-index 3: the VM has vCPUs 0..0"),
        (dict(gpa=-1), "Parameter 'gpa' expects a non-negative integer"),
    ]
    for args, msg in bad:
        r = vm.qmp.execute("inject-memory-error", **args)
        assert "error" in r and msg in r["error"]["desc"], (args, r)
    assert vm.qmp.cmd("query-mce")["poisoned-count"] == 0
    vm.qmp.cmd("inject-memory-error", gpa=0x600000, count=3)
    for p in (0x600000, 0x601000, 0x602000):
        wait_mce(vm, p, "SRAO")
    r = vm.qmp.execute("inject-memory-error", gpa=0x601000)
    assert r["error"]["desc"] == "GPA 0x601000 is already poisoned"
    assert vm.qmp.cmd("query-mce")["poisoned-count"] == 3
    # The guest is fine: memory around the pages verifies.
    assert vm.guest("fill base=0x5ff000 size=20K gen=3") == (0, "fill: done pages=2 gen=3 poisoned=3")
    assert vm.guest("verify base=0x5ff000 size=20K gen=3") == (0, "verify: ok pages=2 poisoned=3")
    # mdvm ctl spelling.
    r = subprocess.run([MDVM, "ctl", "--socket", vm.sock, "inject-memory-error", "gpa=0x700000",
                        "kind=action-required"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert 0x700000 in vm.qmp.cmd("query-mce")["poisoned-pages"]


def test_machine_check_during_machine_check_shuts_down(backend, vm_factory):
    vm = start_walker(vm_factory)
    assert vm.guest("mce hold=1")[0] == 0     # the handler leaves MCG_STATUS.MCIP set
    a, b = WALK_BASE + 0x10000, WALK_BASE + 0x20000
    vm.qmp.cmd("inject-memory-error", gpa=a)
    wait_mce(vm, a, "SRAO")
    vm.qmp.cmd("inject-memory-error", gpa=b, kind="action-required")
    assert vm.wait_exit(20) == 0
    assert "MCG_STATUS.MCIP was set" in vm.stderr()
    ev = events(vm, "MEMORY_FAILURE")
    assert {"recipient": "guest", "action": "reset",
            "flags": {"action-required": True, "recursive": True}} in ev, ev
    assert any(e["reason"] == "guest-reset" for e in events(vm, "SHUTDOWN"))


def test_host_sigbus(vm_factory):
    vm = start_walker(vm_factory)
    # Action optional, delivered to the main thread: isolated, guest told.
    a = WALK_BASE + 0x40000
    vm.qmp.cmd("x-debug-raise-sigbus", kind="action-optional", gpa=a)
    wait_mce(vm, a, "SRAO")
    settle(vm)
    # Action optional outside guest RAM: the hypervisor ignores it.
    vm.qmp.cmd("x-debug-raise-sigbus", kind="action-optional", host_address=0x1000)
    deadline = time.time() + 10
    while {"recipient": "hypervisor", "action": "ignore",
           "flags": {"action-required": False, "recursive": False}} not in events(vm, "MEMORY_FAILURE"):
        assert time.time() < deadline
    finish_and_check(vm, [a], [])
    q = vm.qmp.cmd("query-mce")
    assert q["host-errors"] == 2 and q["poisoned-pages"] == [a]


def test_host_sigbus_action_required(vm_factory):
    # On the vCPU thread, for a page in RAM: SRAR on that vCPU. The signal is
    # raised by hand, not by an access, so the idle guest has no recovery
    # point: it reports the error and stops, as a kernel that consumed
    # poison outside any fixup.
    vm = vm_factory(cmdline="idle", memory=MEM).start()
    b = 0x450000
    vm.qmp.cmd("x-debug-raise-sigbus", kind="action-required", gpa=b, cpu_index=0)
    bank, status, mcg = wait_mce(vm, b, "SRAR")
    assert (bank, status, mcg) == (9, SRAR_STATUS, 0x6)
    assert vm.wait_exit(20) == 3
    assert "mce: fatal: unrecoverable machine check" in vm.console_text()
    # Outside guest RAM: fatal for mdvm, with a clear message.
    vm2 = vm_factory(cmdline="idle", memory=MEM).start()
    vm2.qmp.send_raw('{"execute": "x-debug-raise-sigbus", "arguments": '
                     '{"kind": "action-required", "host-address": 4096, "cpu-index": 0}}')
    assert vm2.wait_exit(20) == 1
    assert "hardware memory error (SIGBUS BUS_MCEERR_AR) at host address 0x1000, outside guest RAM" \
        in vm2.stderr()


def test_inject_at_startup_option(vm_factory):
    vm = vm_factory(cmdline="idle", memory=MEM,
                    extra=["--inject-memory-error-at", "0x500000:ao@300",
                           "--inject-memory-error-at", "0x501000:action-required@300"]).start()
    wait_mce(vm, 0x500000, "SRAO")
    deadline = time.time() + 10
    while vm.qmp.cmd("query-mce")["poisoned-count"] < 2:
        assert time.time() < deadline
        time.sleep(0.02)
    assert vm.guest("verify base=0x500000 size=8K gen=1") == (0, "verify: ok pages=0 poisoned=2")
    wait_mce(vm, 0x501000, "SRAR")
    r = subprocess.run([MDVM, "run", "--kernel", "x", "--inject-memory-error-at", "0x500001"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--inject-memory-error-at: GPA 0x500001 is not 4 KiB aligned" in r.stderr


def test_poison_survives_migration(vm_factory, tmp_path):
    src = start_walker(vm_factory)
    a, b = WALK_BASE + 0x30000, WALK_BASE + 0x60000
    src.qmp.cmd("inject-memory-error", gpa=a)
    wait_mce(src, a, "SRAO")
    settle(src)
    uri = "unix:" + str(tmp_path / "mig.sock")
    dst = vm_factory(cmdline="idle", memory=MEM, extra=["--incoming", uri]).start(wait_banner=False)
    src.qmp.cmd("migrate", uri=uri)
    # ... and one more during the migration.
    src.qmp.cmd("inject-memory-error", gpa=b, kind="action-required")
    deadline = time.time() + 60
    while src.qmp.cmd("query-migrate").get("status") not in ("completed", "failed", "cancelled"):
        assert time.time() < deadline
        time.sleep(0.02)
    assert src.qmp.cmd("query-migrate")["status"] == "completed"
    dst.qmp.wait_event("RESUME")
    assert {a, b} <= set(dst.qmp.cmd("query-mce")["poisoned-pages"])
    # The guest keeps skipping a, and meets b on the destination (if it did
    # not on the source) as an SRAR; its memory is intact.
    wait_sweeps(dst, 3)
    deadline = time.time() + 20
    # The guest may be in the middle of printing when it moves: one console
    # line can start in the source's console file and end in the destination's.
    while not any(int(x[2], 16) == b and x[3] == "SRAR"
                  for x in mce_lines(None, src.console_text() + dst.console_text())):
        assert time.time() < deadline, "b was never raised:\n" + dst.console_text()[-1500:]
        time.sleep(0.05)
    finish_and_check(dst, [a, b], [])


def test_system_reset_replaces_poisoned_pages(vm_factory):
    vm = vm_factory(cmdline="idle", memory=MEM).start()
    vm.qmp.cmd("inject-memory-error", gpa=0x500000)
    wait_mce(vm, 0x500000, "SRAO")
    n = len(vm.console_text())
    vm.qmp.cmd("system_reset")
    vm.wait_console("mdvm-guest: ready", start=n)
    assert vm.qmp.cmd("query-mce")["poisoned-count"] == 0
    assert vm.pmemsave(0x500000, PAGE) == bytes(PAGE)        # fresh, zeroed
    assert vm.guest("fill base=0x500000 size=4K gen=2") == (0, "fill: done pages=1 gen=2")
    assert vm.guest("verify base=0x500000 size=4K gen=2") == (0, "verify: ok pages=1")


def test_mcip_survives_migration(backend, vm_factory, tmp_path):
    """Switch over while the guest's #MC handler still holds MCG_STATUS.MCIP:
    the destination gets the same MCA registers and the SRAO still queued
    behind MCIP (the MCE section), so another error there still shuts the
    CPU down."""
    src = start_walker(vm_factory)
    assert src.guest("mce hold=1")[0] == 0
    # a and c outside the walk: the walk cannot touch them between the
    # error and the handler (that would be an #MC during the #MC already).
    a, c, b = (8 << 20) + 0x10000, (8 << 20) + 0x20000, WALK_BASE + 0x70000
    src.qmp.cmd("inject-memory-error", gpa=a)
    wait_mce(src, a, "SRAO")
    src.wait_console("mce: holding MCG_STATUS.MCIP")   # the handler is done with the banks
    src.qmp.cmd("inject-memory-error", gpa=c)        # waits behind MCIP
    assert src.qmp.cmd("query-mce")["vcpus"][0]["queued"] == 1
    uri = "unix:" + str(tmp_path / "mig.sock")
    dst = vm_factory(cmdline="idle", memory=MEM, extra=["--incoming", uri]).start(wait_banner=False)
    src.qmp.cmd("migrate", uri=uri)
    deadline = time.time() + 60
    while src.qmp.cmd("query-migrate").get("status") not in ("completed", "failed", "cancelled"):
        assert time.time() < deadline
        time.sleep(0.02)
    assert src.qmp.cmd("query-migrate")["status"] == "completed"
    dst.qmp.wait_event("RESUME")
    v, w = src.qmp.cmd("query-mce")["vcpus"][0], dst.qmp.cmd("query-mce")["vcpus"][0]
    assert w == v and w["queued"] == 1, (v, w)
    if backend == "emulated":
        assert w["mcg-status"] == 0x5 and w["banks"] == []     # MCIP | RIPV; bank read and cleared
    assert {a, c} <= set(dst.qmp.cmd("query-mce")["poisoned-pages"])
    assert "0x%x" % c not in dst.console_text()                # still not delivered
    # A second error during the first's handling is a shutdown, as on the source.
    dst.qmp.cmd("inject-memory-error", gpa=b, kind="action-required")
    assert dst.wait_exit(20) == 0
    assert "MCG_STATUS.MCIP was set" in dst.stderr()


def test_action_required_hugetlb(backend, vm_factory):
    """hugetlbfs maps 2 MiB at a time: the failure first demotes the page's
    region to 4 KiB pages (the failed page is not copied), so the access is
    caught as on memfd; compaction does not collapse the region while it is
    poisoned; a system reset gives it fresh memory and collapse promotes it."""
    # --reserve-hugepages raises vm.nr_hugepages and mdvm restores it on exit.
    vm = start_walker(vm_factory, extra=["--backing", "hugetlb", "--reserve-hugepages"])
    if "backing: hugetlb" not in vm.stderr():
        pytest.skip("no hugetlb backing here: " + vm.stderr().splitlines()[0])
    assert vm.qmp.cmd("query-memory")["fragmentation"]["regions-demoted"] == 0
    a = WALK_BASE + 0x123000
    vm.qmp.cmd("inject-memory-error", gpa=a, kind="action-required")
    bank, status, mcg = wait_mce(vm, a, "SRAR")
    assert (bank, status, mcg) == (9, SRAR_STATUS, 0x6)
    settle(vm)
    b = (8 << 20) + 0x10000                                   # the fill region, touched by verify
    vm.qmp.cmd("inject-memory-error", gpa=b, kind="action-required")
    assert vm.qmp.cmd("query-memory")["fragmentation"]["regions-demoted"] == 2
    r = vm.qmp.cmd("compact", mode="collapse")
    assert r["regions-promoted"] == 0 and r["regions-collapsed"] == 0, r
    assert vm.qmp.cmd("query-memory")["fragmentation"]["regions-demoted"] == 2
    finish_and_check(vm, [a], [b])
    wait_mce(vm, b, "SRAR")
    assert vm.qmp.cmd("query-mce")["injected"]["action-required"] == 2
    # System reset: fresh pages; the regions can be hugetlb pages again.
    n = len(vm.console_text())
    vm.qmp.cmd("system_reset")
    vm.wait_console("mdvm-guest: ready", start=n)
    assert vm.qmp.cmd("query-mce")["poisoned-count"] == 0
    assert vm.pmemsave(a, PAGE) == bytes(PAGE)
    r = vm.qmp.cmd("compact", mode="collapse", gpa=WALK_BASE, size=6 << 20)
    assert r["regions-promoted"] == 2, r
    assert vm.qmp.cmd("query-memory")["fragmentation"]["regions-demoted"] == 0
    assert vm.guest("fill base=%d size=8K gen=2" % a) == (0, "fill: done pages=2 gen=2")
    assert vm.guest("verify base=%d size=8K gen=2" % a) == (0, "verify: ok pages=2")
