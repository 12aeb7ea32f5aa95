"""Memory errors delivered as machine checks (docs/memory-errors.md): the
guest is told through #MC (or, AMD deferred errors, finds them at its bank
poll), reports the exact address on the console and to the test device,
drops the page and keeps running; its other memory stays intact. Both MCE
back ends run here: this host's KVM has MCE banks (native) and user-space
MSR filtering (emulated). The encoding follows the host's CPU vendor
(AMD here); the main cases also run with MDVM_MCE_ENCODING=intel."""
import os
import re
import subprocess
import time

import pytest

from mdvmtest import GUEST, MDVM, PAGE, check_walk_consistent, wait_migration

MEM = "64M"
WALK_BASE, WALK_SIZE = 4 << 20, 2 << 20
OVER = 1 << 62
U64 = (1 << 64) - 1


def _host_amd():
    with open("/proc/cpuinfo") as f:
        return re.search(r"^vendor_id\s*:\s*(AuthenticAMD|HygonGenuine)", f.read(), re.M) is not None


HOST_AMD = _host_amd()
# What the test guest reports per encoding: kind, MCi_STATUS, MCG_STATUS as
# its handler (or poll) read them.
ENCODINGS = {
    "intel": dict(name="intel", ao="SRAO", ao_status=0xBD000000000000C0, ao_mcg=0x5,    # MCIP | RIPV
                  ar="SRAR", ar_status=0xBD80000000000134, ar_mcg=0x6),                 # MCIP | EIPV
    # Deferred: logged without #MC, found by the guest's poll (MCG_STATUS 0).
    "amd": dict(name="amd", ao="DEFERRED", ao_status=0x9C00180000000000, ao_mcg=0x0,
                ar="CONSUMED", ar_status=0xBD00080000000000, ar_mcg=0x7),              # MCIP | EIPV | RIPV
}
DEFAULT_ENC = "amd" if HOST_AMD else "intel"


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


@pytest.fixture
def enc(monkeypatch):
    """The default encoding (MDVM_MCE_ENCODING unset: the host's vendor)."""
    monkeypatch.delenv("MDVM_MCE_ENCODING", raising=False)
    return ENCODINGS[DEFAULT_ENC]


@pytest.fixture(params=["default", "intel"])
def enc_both(request, monkeypatch):
    if request.param == "intel":
        monkeypatch.setenv("MDVM_MCE_ENCODING", "intel")
        return ENCODINGS["intel"]
    monkeypatch.delenv("MDVM_MCE_ENCODING", raising=False)
    return ENCODINGS[DEFAULT_ENC]


def mce_lines(vm, text=None):
    return re.findall(r"mce: bank=(\d+) status=(0x[0-9a-f]+) addr=(0x[0-9a-f]+) kind=(\w+) mcg=(0x[0-9a-f]+)",
                      vm.console_text() if text is None else text)


def wait_mce(vm, addr, kinds, timeout=20):
    """The guest's report for addr of one of `kinds`: (bank, status, mcg, kind)."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    deadline = time.time() + timeout
    while True:
        for bank, status, a, k, mcg in mce_lines(vm):
            if int(a, 16) == addr and k in kinds:
                return int(bank), int(status, 16), int(mcg, 16), k
        assert vm.proc.poll() is None, "mdvm exited: " + vm.stderr()
        assert time.time() < deadline, "no %s for 0x%x; console:\n%s" % (kinds, addr, vm.console_text()[-1500:])
        time.sleep(0.02)


def wait_ao(vm, addr, e, walked=False):
    """The action-optional error at addr, with the encoding's exact values.
    AMD: a deferred error waits for the guest's poll (once per sweep); a
    sweep that reaches the page first consumes it (the deferred error still
    in the bank: OVER)."""
    kinds = (e["ao"], e["ar"]) if walked and e["name"] == "amd" else (e["ao"],)
    bank, status, mcg, kind = wait_mce(vm, addr, kinds)
    if kind == e["ao"]:
        assert (bank, status, mcg) == (9, e["ao_status"], e["ao_mcg"]), hex(status)
    else:
        assert (bank, status & ~OVER, mcg) == (9, e["ar_status"], e["ar_mcg"]), hex(status)
    return status


def wait_ar(vm, addr, e):
    bank, status, mcg, _ = wait_mce(vm, addr, e["ar"])
    assert (bank, status, mcg) == (9, e["ar_status"], e["ar_mcg"]), (hex(status), hex(mcg))
    return status


def guest_mce(vm):
    """The guest's machine-check registers on the test device (query-guest)."""
    m = vm.qmp.cmd("query-guest")["mce"]
    return dict(m, **{"last-status": m["last-status"] & U64, "last-addr": m["last-addr"] & U64})


def check_guest_regs(vm, bad):
    """The test device's machine-check registers agree with the console:
    one error per report line, the last one's status and address."""
    lines = mce_lines(vm)
    m = guest_mce(vm)
    assert m == {"errors": len(lines), "bad-pages": bad, "last-status": int(lines[-1][1], 16),
                 "last-addr": int(lines[-1][2], 16)}, (m, lines)
    return m


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
    return [e["data"] for e in vm.qmp.events if e.get("event") == name]


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
    assert guest_mce(vm)["bad-pages"] == len(bad_walk) + len(bad_fill)


def migrate(src, dst_factory, tmp_path, before=None):
    uri = "unix:" + str(tmp_path / "mig.sock")
    dst = dst_factory(cmdline="idle", memory=MEM, extra=["--incoming", uri]).start(wait_banner=False)
    if before:
        before(dst)
    src.qmp.cmd("migrate", uri=uri)
    return dst


def wait_migrated(src, dst):
    r = wait_migration(src)
    assert r["status"] == "completed", r
    dst.qmp.wait_event("RESUME")


def test_backend_reported(backend, enc, vm_factory):
    vm = vm_factory(cmdline="idle", memory=MEM).start()
    q = vm.qmp.cmd("query-mce")
    assert q["backend"] == backend and q["banks"] == 10
    assert q["mcg-cap"] == (1 << 24) | (1 << 8) | 10      # SER_P, CTL_P, no CMCI/LMCE
    assert "machine checks: %s back end (10 banks" % backend in vm.stderr()
    assert "%s encoding)" % enc["name"] in vm.stderr()
    # CPUID 0x80000007 SUCCOR only on AMD/Hygon hosts (the guest sees the host's vendor).
    vm.wait_console("mce: enabled banks=10 cap=0x100010a vendor=%s succor=%d"
                    % ("amd" if HOST_AMD else "intel", 1 if HOST_AMD else 0))
    assert guest_mce(vm) == {"errors": 0, "bad-pages": 0, "last-status": 0, "last-addr": 0}


def test_mce_off_and_bad_encoding(vm_factory, monkeypatch):
    # Off: mdvm clears CPUID MCE/MCA. This project's KVM (kvm_pvm) sets
    # them again; mdvm notices and says so: the guest then finds KVM's own
    # empty bank model (32 banks, MCG_CAP 0x20), never mdvm's.
    monkeypatch.setenv("MDVM_MCE", "off")
    vm = vm_factory(cmdline="idle", memory=MEM).start()
    assert "machine checks: off (MDVM_MCE=off)" in vm.stderr()
    if "KVM keeps CPUID MCE/MCA set" in vm.stderr():
        assert "mce: enabled banks=32 cap=0x20 " in vm.console_text()
    else:
        assert "mce: no machine-check architecture (CPUID.1:EDX MCE/MCA clear)" in vm.console_text()
    assert "succor=" not in vm.console_text() or "succor=0" in vm.console_text()
    assert vm.qmp.cmd("query-mce")["backend"] == "off"
    # Poisoning still works (the guest is not told).
    vm.qmp.cmd("inject-memory-error", gpa=0x500000)
    assert vm.qmp.cmd("query-mce")["poisoned-count"] == 1
    monkeypatch.setenv("MDVM_MCE", "emulated")
    monkeypatch.setenv("MDVM_MCE_ENCODING", "sparc")
    r = subprocess.run([MDVM, "run", "--kernel", GUEST, "--memory", MEM], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0
    assert "MDVM_MCE_ENCODING=sparc: expected intel, amd or auto" in r.stderr, r.stderr
    r = subprocess.run([MDVM, "run", "--help"], capture_output=True, text=True, timeout=30)
    assert "MDVM_MCE=" in r.stdout and "MDVM_MCE_ENCODING=" in r.stdout


def test_action_optional_while_walking(backend, enc_both, vm_factory):
    e = enc_both
    vm = start_walker(vm_factory)
    a, b = WALK_BASE + 0x80000, (8 << 20) + 0x40000
    vm.qmp.cmd("inject-memory-error", gpa=a)
    wait_ao(vm, a, e, walked=True)
    settle(vm)
    # (the sweep may have met a before the report: then a consumed error follows)
    assert check_guest_regs(vm, 1)["last-addr"] == a
    vm.qmp.cmd("inject-memory-error", gpa=b, kind="action-optional")
    wait_ao(vm, b, e)                  # outside the walk: reported as action optional
    settle(vm)
    assert check_guest_regs(vm, 2)["last-status"] == e["ao_status"]
    finish_and_check(vm, [a], [b])
    q = vm.qmp.cmd("query-mce")
    assert q["poisoned-count"] == 2 and sorted(q["poisoned-pages"]) == [a, b]
    assert vm.qmp.cmd("query-memory")["pages"]["poisoned"] == 2
    assert q["injected"]["action-optional"] >= 2
    ev = events(vm, "MEMORY_FAILURE")
    assert {"recipient": "guest", "action": "inject",
            "flags": {"action-required": False, "recursive": False}} in ev
    # pmemsave refuses poisoned memory (it is never read).
    r = vm.qmp.execute("pmemsave", val=a, size=PAGE, filename=os.path.join(vm.tmp, "p.bin"))
    assert "error" in r, r


def test_action_required_on_access(backend, enc_both, vm_factory):
    e = enc_both
    vm = start_walker(vm_factory)
    a = WALK_BASE + 0x123000
    vm.qmp.cmd("inject-memory-error", gpa=a, kind="action-required")
    wait_ar(vm, a, e)
    settle(vm)
    assert guest_mce(vm) == {"errors": 1, "bad-pages": 1, "last-status": e["ar_status"], "last-addr": a}
    # The fill region: poisoned, then touched by verify.
    b = (8 << 20) + 0x10000
    vm.qmp.cmd("inject-memory-error", gpa=b, kind="action-required")
    finish_and_check(vm, [a], [b])
    wait_ar(vm, b, e)
    assert guest_mce(vm) == {"errors": 2, "bad-pages": 2, "last-status": e["ar_status"], "last-addr": b}
    ev = events(vm, "MEMORY_FAILURE")
    assert {"recipient": "guest", "action": "inject",
            "flags": {"action-required": True, "recursive": False}} in ev
    assert vm.qmp.cmd("query-mce")["injected"]["action-required"] == 2


def test_count_and_bad_requests(enc, vm_factory):
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
        wait_ao(vm, p, enc)
    r = vm.qmp.execute("inject-memory-error", gpa=0x601000)
    assert r["error"]["desc"] == "GPA 0x601000 is already poisoned"
    assert vm.qmp.cmd("query-mce")["poisoned-count"] == 3
    assert guest_mce(vm)["errors"] == 3 and guest_mce(vm)["bad-pages"] == 3
    # The guest is fine: memory around the pages verifies.
    assert vm.guest("fill base=0x5ff000 size=20K gen=3") == (0, "fill: done pages=2 gen=3 poisoned=3")
    assert vm.guest("verify base=0x5ff000 size=20K gen=3") == (0, "verify: ok pages=2 poisoned=3")
    # mdvm ctl spelling.
    r = subprocess.run([MDVM, "ctl", "--socket", vm.sock, "inject-memory-error", "gpa=0x700000",
                        "kind=action-required"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert 0x700000 in vm.qmp.cmd("query-mce")["poisoned-pages"]


def test_machine_check_during_machine_check_shuts_down(backend, enc, vm_factory):
    vm = start_walker(vm_factory)
    assert vm.guest("mce hold=1")[0] == 0     # the handler leaves MCG_STATUS.MCIP set
    a, b = WALK_BASE + 0x10000, WALK_BASE + 0x20000
    if enc["name"] == "intel":
        vm.qmp.cmd("inject-memory-error", gpa=a)
        wait_ao(vm, a, enc)
    else:   # an AMD deferred error raises no #MC: take a consumed one
        vm.qmp.cmd("inject-memory-error", gpa=a, kind="action-required")
        wait_ar(vm, a, enc)
    vm.qmp.cmd("inject-memory-error", gpa=b, kind="action-required")
    assert vm.wait_exit(20) == 0
    assert "MCG_STATUS.MCIP was set" in vm.stderr()
    ev = events(vm, "MEMORY_FAILURE")
    assert {"recipient": "guest", "action": "reset",
            "flags": {"action-required": True, "recursive": True}} in ev, ev
    assert any(e["reason"] == "guest-reset" for e in events(vm, "SHUTDOWN"))


def test_host_sigbus(backend, enc, vm_factory):
    vm = start_walker(vm_factory)
    # Action optional, delivered to the main thread: isolated, guest told.
    a = WALK_BASE + 0x40000
    vm.qmp.cmd("x-debug-raise-sigbus", kind="action-optional", gpa=a)
    wait_ao(vm, a, enc, walked=True)
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


def test_host_sigbus_action_required(backend, enc, vm_factory):
    # On the vCPU thread, for a page in RAM: a consumed error on that vCPU.
    # The signal is raised by hand, not by an access, so the idle guest has
    # no recovery point: it reports the error and stops, as a kernel that
    # consumed poison outside any fixup.
    vm = vm_factory(cmdline="idle", memory=MEM).start()
    b = 0x450000
    vm.qmp.cmd("x-debug-raise-sigbus", kind="action-required", gpa=b, cpu_index=0)
    wait_ar(vm, b, enc)
    assert vm.wait_exit(20) == 3
    assert "mce: fatal: unrecoverable machine check" in vm.console_text()
    # Outside guest RAM: fatal for mdvm, with a clear message, after a
    # MEMORY_FAILURE event as QEMU's (recipient hypervisor, action fatal).
    vm2 = vm_factory(cmdline="idle", memory=MEM).start()
    vm2.qmp.send_raw('{"execute": "x-debug-raise-sigbus", "arguments": '
                     '{"kind": "action-required", "host-address": 4096, "cpu-index": 0}}')
    assert vm2.wait_exit(20) == 1
    assert "hardware memory error (SIGBUS BUS_MCEERR_AR) at host address 0x1000, outside guest RAM" \
        in vm2.stderr()
    assert events(vm2, "MEMORY_FAILURE") == [{"recipient": "hypervisor", "action": "fatal",
                                              "flags": {"action-required": True, "recursive": False}}]


def test_inject_at_startup_option(enc, vm_factory):
    vm = vm_factory(cmdline="idle", memory=MEM,
                    extra=["--inject-memory-error-at", "0x500000:ao@300",
                           "--inject-memory-error-at", "0x501000:action-required@300"]).start()
    wait_ao(vm, 0x500000, enc)
    deadline = time.time() + 10
    while vm.qmp.cmd("query-mce")["poisoned-count"] < 2:
        assert time.time() < deadline
        time.sleep(0.02)
    assert vm.guest("verify base=0x500000 size=8K gen=1") == (0, "verify: ok pages=0 poisoned=2")
    wait_ar(vm, 0x501000, enc)
    r = subprocess.run([MDVM, "run", "--kernel", "x", "--inject-memory-error-at", "0x500001"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--inject-memory-error-at: GPA 0x500001 is not 4 KiB aligned" in r.stderr


def test_poison_survives_migration(backend, enc, vm_factory, tmp_path):
    src = start_walker(vm_factory)
    a, b = WALK_BASE + 0x30000, WALK_BASE + 0x60000
    src.qmp.cmd("inject-memory-error", gpa=a)
    wait_ao(src, a, enc, walked=True)
    settle(src)
    # Slow enough that the migration is still running at the injection.
    src.qmp.cmd("migrate-set-parameters", max_bandwidth=4 << 20)
    dst = migrate(src, vm_factory, tmp_path)
    deadline = time.time() + 20
    while src.qmp.cmd("query-migrate")["status"] == "setup":
        assert time.time() < deadline
        time.sleep(0.01)
    # ... and one more during the migration.
    assert src.qmp.cmd("query-migrate")["status"] == "active"
    src.qmp.cmd("inject-memory-error", gpa=b, kind="action-required")
    assert src.qmp.cmd("query-migrate")["status"] == "active"
    src.qmp.cmd("migrate-set-parameters", max_bandwidth=0)
    wait_migrated(src, dst)
    assert {a, b} <= set(dst.qmp.cmd("query-mce")["poisoned-pages"])
    assert dst.qmp.cmd("query-memory")["pages"]["poisoned"] == 2
    # The guest keeps skipping a, and meets b on the destination (if it did
    # not on the source) as a consumed error; its memory is intact.
    wait_sweeps(dst, 3)
    deadline = time.time() + 20
    # The guest may be in the middle of printing when it moves: one console
    # line can start in the source's console file and end in the destination's.
    while not any(int(x[2], 16) == b and x[3] == enc["ar"]
                  for x in mce_lines(None, src.console_text() + dst.console_text())):
        assert time.time() < deadline, "b was never raised:\n" + dst.console_text()[-1500:]
        time.sleep(0.05)
    finish_and_check(dst, [a, b], [])


def test_poisoned_firmware_and_unbacked_pages_migrate(enc, vm_factory, tmp_path):
    """A poisoned reserved (firmware) page and a never-touched one: the
    destination poisons them too (both used to fail the migration or be
    lost: mm/ reports -EIO for a reserved page it did poison, and 0 for an
    unbacked page it did not)."""
    src = vm_factory(cmdline="idle", memory=MEM).start()
    fw, untouched = 0xE1000, (60 << 20)
    assert src.qmp.cmd("query-memory")["pages"]["poisoned"] == 0
    src.qmp.cmd("inject-memory-error", gpa=fw)
    wait_ao(src, fw, enc)
    assert "hit a reserved (firmware) page" in src.stderr()
    src.qmp.cmd("inject-memory-error", gpa=untouched, kind="action-required")
    assert sorted(src.qmp.cmd("query-mce")["poisoned-pages"]) == [fw, untouched]
    dst = migrate(src, vm_factory, tmp_path)
    wait_migrated(src, dst)
    assert sorted(dst.qmp.cmd("query-mce")["poisoned-pages"]) == [fw, untouched]
    assert dst.qmp.cmd("query-memory")["pages"]["poisoned"] == 2
    # The guest's view went along: it still knows fw is bad, and touching
    # the other page on the destination is a consumed error there.
    assert guest_mce(dst)["bad-pages"] == 1 and guest_mce(dst)["last-addr"] == fw
    assert dst.guest("verify base=%d size=4K gen=1" % untouched) == (0, "verify: ok pages=0 poisoned=1")
    wait_ar(dst, untouched, enc)
    assert dst.proc.poll() is None


def test_inject_refused_while_migrating_or_migrated(enc, vm_factory, tmp_path):
    src = vm_factory(cmdline="idle", memory=MEM).start()
    dst = migrate(src, vm_factory, tmp_path, before=lambda d: (
        # A destination still waiting for the stream: nothing to poison yet.
        _refused(d, "inmigrate")))
    wait_migrated(src, dst)
    _refused(src, "postmigrate")      # the guest runs elsewhere now
    assert src.qmp.cmd("query-mce")["poisoned-count"] == 0
    dst.qmp.cmd("inject-memory-error", gpa=0x500000)
    wait_ao(dst, 0x500000, enc)
    dst.qmp.cmd("stop")               # paused: accepted, told when it runs
    dst.qmp.cmd("inject-memory-error", gpa=0x501000)
    dst.qmp.cmd("cont")
    wait_ao(dst, 0x501000, enc)


def _refused(vm, status):
    r = vm.qmp.execute("inject-memory-error", gpa=0x500000)
    assert r.get("error", {}).get("desc") == "the VM is not running (status: %s)" % status, r


def test_action_optional_to_second_vcpu(enc, vm_factory):
    """cpu-index 1 of a 2-vCPU guest (the test guest never starts its AP, so
    that vCPU waits for SIPI with CR4.MCE clear)."""
    vm = vm_factory(cmdline="idle", memory=MEM, cpus=2).start()
    vm.qmp.cmd("inject-memory-error", gpa=0x500000, cpu_index=1)
    if enc["name"] == "amd":
        # A deferred error is logged in vCPU 1's bank; no #MC, nothing stops.
        deadline = time.time() + 10
        while vm.qmp.cmd("query-mce")["injected"]["action-optional"] < 1:
            assert time.time() < deadline
            time.sleep(0.02)
        v = vm.qmp.cmd("query-mce")["vcpus"]
        assert v[1]["queued"] == 0 and v[0]["queued"] == 0
        assert vm.proc.poll() is None and "0x500000" not in vm.console_text()
    else:
        # An uncorrected error on a CPU with CR4.MCE clear: shutdown, as hardware.
        assert vm.wait_exit(20) == 0
        assert "vcpu 1: machine check for GPA 0x500000 with CR4.MCE clear" in vm.stderr()


def test_system_reset_replaces_poisoned_pages(backend, enc, vm_factory):
    vm = vm_factory(cmdline="idle", memory=MEM).start()
    vm.qmp.cmd("inject-memory-error", gpa=0x500000)
    wait_ao(vm, 0x500000, enc)
    assert vm.qmp.cmd("query-memory")["pages"]["poisoned"] == 1
    n = len(vm.console_text())
    vm.qmp.cmd("system_reset")
    vm.wait_console("mdvm-guest: ready", start=n)
    assert vm.qmp.cmd("query-mce")["poisoned-count"] == 0
    assert vm.qmp.cmd("query-memory")["pages"]["poisoned"] == 0
    assert guest_mce(vm)["errors"] == 0
    assert vm.pmemsave(0x500000, PAGE) == bytes(PAGE)        # fresh, zeroed
    assert vm.guest("fill base=0x500000 size=4K gen=2") == (0, "fill: done pages=1 gen=2")
    assert vm.guest("verify base=0x500000 size=4K gen=2") == (0, "verify: ok pages=1")


def test_mcip_survives_migration(backend, enc, vm_factory, tmp_path):
    """Switch over while the guest's #MC handler still holds MCG_STATUS.MCIP:
    the destination gets the same MCA registers and the error still queued
    behind MCIP (the MCE section), so another error there still shuts the
    CPU down."""
    src = start_walker(vm_factory)
    assert src.guest("mce hold=1")[0] == 0
    # c outside the walk: the walk cannot touch it while it waits.
    a, c, b = (8 << 20) + 0x10000, (8 << 20) + 0x20000, WALK_BASE + 0x70000
    if enc["name"] == "intel":
        src.qmp.cmd("inject-memory-error", gpa=a)
        wait_ao(src, a, enc)
    else:   # an AMD deferred error raises no #MC: the walk consumes one
        a = WALK_BASE + 0x10000
        src.qmp.cmd("inject-memory-error", gpa=a, kind="action-required")
        wait_ar(src, a, enc)
    src.wait_console("mce: holding MCG_STATUS.MCIP")   # the handler is done with the banks
    src.qmp.cmd("inject-memory-error", gpa=c)        # waits behind MCIP
    assert src.qmp.cmd("query-mce")["vcpus"][0]["queued"] == 1
    dst = migrate(src, vm_factory, tmp_path)
    wait_migrated(src, dst)
    v, w = src.qmp.cmd("query-mce")["vcpus"][0], dst.qmp.cmd("query-mce")["vcpus"][0]
    assert w == v and w["queued"] == 1, (v, w)
    if backend == "emulated":
        mcg = 0x5 if enc["name"] == "intel" else 0x7
        assert w["mcg-status"] == mcg and w["banks"] == []     # bank read and cleared
    assert {a, c} <= set(dst.qmp.cmd("query-mce")["poisoned-pages"])
    assert "0x%x" % c not in dst.console_text()                # still not delivered
    # A second error during the first's handling is a shutdown, as on the source.
    dst.qmp.cmd("inject-memory-error", gpa=b, kind="action-required")
    assert dst.wait_exit(20) == 0
    assert "MCG_STATUS.MCIP was set" in dst.stderr()


def test_migration_refuses_other_encoding(vm_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("MDVM_MCE_ENCODING", "intel")
    src = vm_factory(cmdline="idle", memory=MEM).start()
    monkeypatch.setenv("MDVM_MCE_ENCODING", "amd")
    dst = migrate(src, vm_factory, tmp_path)
    assert dst.wait_exit(30) == 1
    assert "machine checks: intel encoding on the source, amd here (MDVM_MCE_ENCODING must agree)" \
        in dst.stderr()
    deadline = time.time() + 30
    while src.qmp.cmd("query-migrate")["status"] not in ("failed", "completed"):
        assert time.time() < deadline
        time.sleep(0.05)
    assert src.qmp.cmd("query-migrate")["status"] == "failed"
    assert src.qmp.cmd("query-status")["status"] == "running"


def test_action_required_hugetlb(backend, enc, vm_factory):
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
    wait_ar(vm, a, enc)
    settle(vm)
    b = (8 << 20) + 0x10000                                   # the fill region, touched by verify
    vm.qmp.cmd("inject-memory-error", gpa=b, kind="action-required")
    assert vm.qmp.cmd("query-memory")["fragmentation"]["regions-demoted"] == 2
    r = vm.qmp.cmd("compact", mode="collapse")
    assert r["regions-promoted"] == 0 and r["regions-collapsed"] == 0, r
    assert vm.qmp.cmd("query-memory")["fragmentation"]["regions-demoted"] == 2
    finish_and_check(vm, [a], [b])
    wait_ar(vm, b, enc)
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
