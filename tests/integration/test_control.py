"""The QMP control socket against a running guest: every command, and bad
input that must leave the VM running."""
import json
import os
import signal
import socket
import stat
import subprocess
import time

import pytest

from mdvmtest import MDVM, QMP, ROOT, QMPError, check_walk_consistent


def test_socket_mode_and_greeting(vm):
    st = os.stat(vm.sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert "version" in vm.qmp.greeting["QMP"]


def test_capabilities_negotiation_required(vm):
    q = QMP(vm.sock)
    r = q.execute("query-status")
    assert r["error"]["class"] == "CommandNotFound"
    q.negotiate()
    assert q.cmd("query-status")["status"] == "running"
    q.close()


def test_query_status_stop_cont(vm):
    assert vm.qmp.cmd("query-status") == {"status": "running", "running": True, "singlestep": False}
    vm.qmp.cmd("stop")
    vm.qmp.wait_event("STOP")
    assert vm.qmp.cmd("query-status")["status"] == "paused"
    vm.qmp.cmd("cont")
    vm.qmp.wait_event("RESUME")
    assert vm.qmp.cmd("query-status")["running"] is True
    assert vm.guest("echo alive") == (0, "alive")


def test_stop_freezes_guest_memory(vm_factory):
    vm = vm_factory(cmdline="walk size=1M").start()
    vm.wait_console("walk: started")
    time.sleep(0.3)
    vm.qmp.cmd("stop")
    a = vm.pmemsave(0x400000, 1 << 20)
    time.sleep(0.3)
    b = vm.pmemsave(0x400000, 1 << 20)
    assert a == b, "guest memory changed while paused"
    check_walk_consistent(a)
    vm.qmp.cmd("cont")
    time.sleep(0.3)
    c = vm.pmemsave(0x400000, 1 << 20)
    assert c != a, "guest did not resume walking"


def test_pmemsave_walk_consistency(vm_factory):
    vm = vm_factory(cmdline="walk base=4M size=4M").start()
    vm.wait_console("walk: started")
    for _ in range(3):
        time.sleep(0.2)
        # Dump while running: a single-byte-per-page sweep seen from outside is
        # itself one interrupted sweep only if the VM is stopped.
        vm.qmp.cmd("stop")
        v, boundary = check_walk_consistent(vm.pmemsave(0x400000, 4 << 20))
        vm.qmp.cmd("cont")
    sweeps = vm.qmp.cmd("query-guest")["sweeps"]
    assert sweeps > 0


def test_pmemsave_errors(vm, tmp_path):
    with pytest.raises(QMPError) as e:
        vm.qmp.cmd("pmemsave", val=0xC0000000, size=4096, filename=str(tmp_path / "x"))
    assert "Invalid addr" in e.value.desc
    with pytest.raises(QMPError) as e:
        vm.qmp.cmd("pmemsave", val=0, size=4096, filename="/nonexistent-dir/x")
    assert "nonexistent-dir" in e.value.desc
    with pytest.raises(QMPError) as e:
        vm.qmp.cmd("pmemsave", val=0, filename=str(tmp_path / "x"))
    assert "size" in e.value.desc
    assert vm.guest("echo still-here") == (0, "still-here")


def test_system_reset(vm):
    vm.guest("echo before-reset")
    vm.qmp.cmd("system_reset")
    vm.qmp.wait_event("RESET")
    c = vm.wait_console("mdvm-guest: ready", start=len(vm.console_text()) - 1)
    assert c.count("mdvm-guest: ready") == 2
    assert vm.guest("echo after-reset") == (0, "after-reset")


def test_quit(vm):
    vm.qmp.cmd("quit")
    ev = vm.qmp.wait_event("SHUTDOWN", timeout=10)
    assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert set(ev["timestamp"]) == {"seconds", "microseconds"}
    assert vm.wait_exit(10) == 0
    assert not os.path.exists(vm.sock)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_the_vm(vm, sig):
    """SIGTERM/SIGINT end the VM like quit, with SHUTDOWN "host-signal"
    (QEMU's shape) and status 128+N."""
    vm.proc.send_signal(sig)
    ev = vm.qmp.wait_event("SHUTDOWN", timeout=10)
    assert ev["data"] == {"guest": False, "reason": "host-signal"}, ev
    assert vm.wait_exit(10) == 128 + sig
    assert "host signal %s (exit status %d)" % (sig.name, 128 + sig) in vm.stderr(), vm.stderr()
    assert not os.path.exists(vm.sock)


@pytest.mark.parametrize("command,reason,status", [
    ("poweroff", "guest-shutdown", 0),
    ("exit code=7", "guest-shutdown", 7),   # the debug-exit port
    ("reset", "guest-reset", 0),            # 0xcf9: mdvm exits, as QEMU with -no-reboot
])
def test_guest_ends_the_vm(vm, command, reason, status):
    """The guest powers off, exits or resets: SHUTDOWN with the documented
    reason, then mdvm exits with the documented status."""
    second = QMP(vm.sock).negotiate()   # every client gets the event
    vm.qmp.send_raw(json.dumps({"execute": "guest-command", "arguments": {"command": command}}))
    for q in (vm.qmp, second):
        ev = q.wait_event("SHUTDOWN", timeout=10)
        assert ev["data"] == {"guest": True, "reason": reason}, ev
    second.close()
    assert vm.wait_exit(10) == status, vm.stderr()
    assert not os.path.exists(vm.sock)


def test_vmm_error_shutdown_is_guest_panic(vm_factory, kvm_fail_shim, tmp_path, monkeypatch):
    """mdvm stops the VM on an error (here KVM_RUN fails, injected once the
    trigger file exists): SHUTDOWN guest-panic, exit status 1."""
    trigger = tmp_path / "fail-kvm-run-now"
    monkeypatch.setenv("LD_PRELOAD", kvm_fail_shim)
    monkeypatch.setenv("MDVM_FAIL_IOCTL", "KVM_RUN")
    monkeypatch.setenv("MDVM_FAIL_IF_EXISTS", str(trigger))
    vm = vm_factory(cmdline="idle").start()
    assert vm.guest("echo still-fine") == (0, "still-fine")
    trigger.touch()   # the idle guest leaves KVM_RUN at least every 50 ms
    ev = vm.qmp.wait_event("SHUTDOWN", timeout=10)
    assert ev["data"] == {"guest": True, "reason": "guest-panic"}, ev
    assert vm.wait_exit(10) == 1
    assert "KVM_RUN failed: Cannot allocate memory" in vm.stderr(), vm.stderr()


def test_guest_command_errors(vm):
    st, text = vm.guest("no-such-command")
    assert st == 2 and "unknown command" in text
    with pytest.raises(QMPError) as e:
        vm.qmp.cmd("guest-command")
    assert "command" in e.value.desc


def test_query_commands_and_version(vm):
    names = {c["name"] for c in vm.qmp.cmd("query-commands")}
    for n in ("query-status", "stop", "cont", "system_reset", "quit", "pmemsave",
              "query-cpus-fast", "guest-command", "query-memory"):
        assert n in names
    assert "qemu" in vm.qmp.cmd("query-version")
    # docs/control.md lists every command the server has.
    with open(os.path.join(ROOT, "docs", "control.md")) as f:
        doc = f.read()
    missing = sorted(n for n in names if "`%s`" % n not in doc)
    assert not missing, "not in docs/control.md: %s" % missing


@pytest.mark.parametrize("junk", [
    b'{"execute": bad json}\n',
    b'[1, 2, 3]\n',
    b'{"no-execute": 1}\n',
    b'{"execute": 42}\n',
    b'{"execute": "query-status", "arguments": [1]}\n',
    b'"just a string"\n',
])
def test_malformed_input_gets_error_and_vm_survives(vm, junk):
    vm.qmp.send_raw(junk)
    r = vm.qmp.reply()
    assert "error" in r, r
    assert r["error"]["class"] == "GenericError"
    # Same connection still works, and so does the guest.
    assert vm.qmp.cmd("query-status")["running"] is True
    assert vm.guest("echo ok") == (0, "ok")


def test_unknown_command_and_bad_arguments(vm):
    r = vm.qmp.execute("no-such-command")
    assert r["error"]["class"] == "CommandNotFound"
    r = vm.qmp.execute("stop", bogus=1)
    assert "error" in r and "bogus" in r["error"]["desc"]
    r = vm.qmp.execute("pmemsave", val="zero", size=4096, filename="/tmp/x")
    assert "error" in r and "val" in r["error"]["desc"]
    assert vm.qmp.cmd("query-status")["running"] is True


def test_id_is_echoed(vm):
    vm.qmp.send_raw(json.dumps({"execute": "query-status", "id": {"n": 7}}))
    assert vm.qmp.reply()["id"] == {"n": 7}


def test_abrupt_disconnect_during_deferred_command(vm):
    s = socket.socket(socket.AF_UNIX)
    s.connect(vm.sock)
    s.sendall(b'{"execute":"qmp_capabilities"}{"execute":"guest-command","arguments":{"command":"echo x"}}')
    s.close()
    time.sleep(0.2)
    assert vm.guest("echo survived") == (0, "survived")


def test_garbage_flood_does_not_kill_vm(vm):
    s = socket.socket(socket.AF_UNIX)
    s.connect(vm.sock)
    try:
        s.sendall(b"\x00\xff{" * 200000)
    except OSError:
        pass
    s.close()
    assert vm.qmp.cmd("query-status")["running"] is True


def test_ctl_client(vm):
    def ctl(*args):
        return subprocess.run([MDVM, "ctl", "--socket", vm.sock] + list(args),
                              capture_output=True, text=True, timeout=30)
    r = ctl("query-status")
    assert r.returncode == 0 and "running" in r.stdout
    r = ctl("query-status", "--json")
    assert json.loads(r.stdout)["return"]["status"] == "running"
    r = ctl("guest", "echo", "via", "ctl")
    assert r.returncode == 0 and "via ctl" in r.stdout
    r = ctl("no-such-command")
    assert r.returncode == 1 and "error" in r.stderr
    r = subprocess.run([MDVM, "ctl", "--socket", vm.sock + ".nope", "query-status"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "cannot connect" in r.stderr
