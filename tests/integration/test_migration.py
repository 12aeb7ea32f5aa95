"""Live migration between real mdvm processes (docs/migration.md), in the
style of QEMU's migration-test: the guest walks memory while it is being
migrated, and the destination's memory must be consistent with one
interrupted sweep."""
import os
import re
import socket
import struct
import threading
import time

import pytest

from mdvmtest import PAGE, check_walk_consistent, fill_pattern, run_mdvm, wait_migration

MEM = "64M"
WALK_BASE, WALK_SIZE = 4 << 20, 4 << 20


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def dest(vm_factory, uri, cmdline="idle"):
    return vm_factory(cmdline=cmdline, memory=MEM, extra=["--incoming", uri]).start(wait_banner=False)


def wait_sweeps(vm, more, timeout=30):
    start = vm.qmp.cmd("query-guest")["sweeps"]
    deadline = time.time() + timeout
    while vm.qmp.cmd("query-guest")["sweeps"] < start + more:
        assert time.time() < deadline, "guest stopped walking"
        time.sleep(0.02)


def migration_statuses(vm, last):
    """The MIGRATION events' statuses, in order, up to `last`."""
    statuses = []
    while not statuses or statuses[-1] != last:
        statuses.append(vm.qmp.wait_event("MIGRATION")["data"]["status"])
    return statuses


def check_fill(dump, base, gen):
    for i in range(0, len(dump), PAGE):
        want = fill_pattern((base + i) // PAGE, gen)
        got = struct.unpack_from("<Q", dump, i)[0]
        assert got == want, "page 0x%x: got 0x%x want 0x%x" % (base + i, got, want)


def test_walk_while_migrating_unix(vm_factory, tmp_path):
    src = vm_factory(cmdline="idle", memory=MEM).start()
    uri = "unix:" + str(tmp_path / "mig.sock")
    dst = dest(vm_factory, uri)
    assert dst.qmp.cmd("query-status")["status"] == "inmigrate"
    assert src.guest("walk base=%d size=%d" % (WALK_BASE, WALK_SIZE))[0] == 0
    wait_sweeps(src, 3)
    # A 1 ms downtime limit cannot be met while the guest walks: this
    # forces iterations (and auto-converge) before the switch-over.
    src.qmp.cmd("migrate-set-parameters", downtime_limit=1)
    # ... and a bandwidth cap makes the first pass last long enough for the
    # walk to dirty pages behind it, whatever else runs on the host.
    src.qmp.cmd("migrate-set-parameters", max_bandwidth=32 << 20)
    src.qmp.cmd("migrate", uri=uri)
    r = wait_migration(src)
    assert r["status"] == "completed", r
    assert r["ram"]["dirty-sync-count"] >= 2 and r["x-dirty-tracking"] == "ring", r
    assert r["ram"]["transferred"] > WALK_SIZE
    assert "downtime" in r and "expected-downtime" not in r, r
    assert r["ram"]["total"] == 64 << 20 and r["ram"]["remaining"] == 0, r
    assert migration_statuses(src, "completed") == ["setup", "active", "device", "completed"]
    src.qmp.wait_event("STOP")
    assert src.qmp.cmd("query-status")["status"] == "postmigrate"
    dst.qmp.wait_event("RESUME")
    assert dst.qmp.cmd("query-status")["status"] == "running"
    # The destination's memory: one interrupted sweep. Stop it first so the
    # dump is a snapshot.
    dst.qmp.cmd("stop")
    check_walk_consistent(dst.pmemsave(WALK_BASE, WALK_SIZE))
    dst.qmp.cmd("cont")
    # ... and the guest walks on where it was.
    wait_sweeps(dst, 3)
    st, text = dst.guest("status")
    assert st == 0 and "workload=walk" in text, text


def test_fill_migrate_verify_tcp(vm_factory):
    src = vm_factory(cmdline="idle", memory=MEM).start()
    uri = "tcp:127.0.0.1:%d" % free_port()
    dst = dest(vm_factory, uri)
    assert src.guest("fill base=8M size=1M gen=7")[0] == 0
    src.qmp.cmd("migrate", uri=uri)
    r = wait_migration(src)
    assert r["status"] == "completed", r
    dst.qmp.wait_event("RESUME")
    assert dst.guest("verify base=8M size=1M gen=7") == (0, "verify: ok pages=256")
    # Untouched memory stayed zero and was not sent as data.
    assert dst.pmemsave(40 << 20, 1 << 20) == bytes(1 << 20)
    assert r["ram"]["transferred"] < 16 << 20, r


def test_migrate_a_b_a(vm_factory, tmp_path):
    a = vm_factory(cmdline="idle", memory=MEM).start()
    assert a.guest("fill base=16M size=512K gen=3")[0] == 0
    assert a.guest("walk base=%d size=%d" % (WALK_BASE, WALK_SIZE))[0] == 0
    wait_sweeps(a, 2)
    uri_b = "unix:" + str(tmp_path / "b.sock")
    b = dest(vm_factory, uri_b)
    a.qmp.cmd("migrate", uri=uri_b)
    assert wait_migration(a)["status"] == "completed"
    b.qmp.wait_event("RESUME")
    wait_sweeps(b, 2)
    uri_a2 = "tcp:127.0.0.1:%d" % free_port()
    a2 = dest(vm_factory, uri_a2)
    b.qmp.cmd("migrate", uri=uri_a2)
    assert wait_migration(b)["status"] == "completed"
    a2.qmp.wait_event("RESUME")
    wait_sweeps(a2, 2)
    a2.qmp.cmd("stop")
    check_walk_consistent(a2.pmemsave(WALK_BASE, WALK_SIZE))
    a2.qmp.cmd("cont")
    assert a2.guest("verify base=16M size=512K gen=3") == (0, "verify: ok pages=128")


def slow_pair(vm_factory, tmp_path):
    """A migration that takes seconds: 16 MiB of random data at 2 MB/s."""
    src = vm_factory(cmdline="idle", memory=MEM).start()
    assert src.guest("fill base=8M size=256K gen=9")[0] == 0
    src.qmp.cmd("x-mdvm-fill-random", gpa=32 << 20, size=16 << 20, seed=5)
    before = src.pmemsave(32 << 20, 16 << 20)
    assert src.guest("walk base=%d size=%d" % (WALK_BASE, WALK_SIZE))[0] == 0
    uri = "unix:" + str(tmp_path / "slow.sock")
    dst = dest(vm_factory, uri)
    src.qmp.cmd("migrate-set-parameters", max_bandwidth=2 << 20)
    src.qmp.cmd("migrate", uri=uri)
    deadline = time.time() + 10
    while src.qmp.cmd("query-migrate")["ram"]["transferred"] < 1 << 20:
        assert time.time() < deadline
        time.sleep(0.02)
    return src, dst, before


def check_source_intact(src, before):
    assert src.qmp.cmd("query-status")["status"] == "running"
    wait_sweeps(src, 2)
    assert src.pmemsave(32 << 20, 16 << 20) == before
    # Stop the walk (a non-walk command ends it), then check the fill.
    assert src.guest("verify base=8M size=256K gen=9") == (0, "verify: ok pages=64")


def test_cancel_midway(vm_factory, tmp_path):
    src, dst, before = slow_pair(vm_factory, tmp_path)
    src.qmp.cmd("migrate_cancel")
    r = wait_migration(src)
    assert r["status"] == "cancelled", r
    assert "error-desc" not in r and r["ram"]["total"] == 64 << 20, r
    assert migration_statuses(src, "cancelled") == ["setup", "active", "cancelling", "cancelled"]
    # The vCPUs never stopped: no STOP, no RESUME.
    assert not [e for e in src.qmp.events if e["event"] in ("STOP", "RESUME")]
    # The destination got half a stream: it refuses it and exits non-zero.
    assert dst.wait_exit(20) == 1
    assert "incoming migration failed" in dst.stderr()
    check_source_intact(src, before)
    # The source can migrate again afterwards.
    uri = "unix:" + str(tmp_path / "again.sock")
    dst2 = dest(vm_factory, uri)
    src.qmp.cmd("migrate-set-parameters", max_bandwidth=0)
    src.qmp.cmd("migrate", uri=uri)
    assert wait_migration(src)["status"] == "completed"
    dst2.qmp.wait_event("RESUME")
    assert dst2.pmemsave(32 << 20, 16 << 20) == before


def test_kill_destination_midway(vm_factory, tmp_path):
    src, dst, before = slow_pair(vm_factory, tmp_path)
    dst.proc.kill()
    dst.proc.wait()
    r = wait_migration(src)
    assert r["status"] == "failed", r
    assert "error-desc" in r
    assert migration_statuses(src, "failed") == ["setup", "active", "failed"]
    check_source_intact(src, before)


def test_quit_source_midway(vm_factory, tmp_path):
    """quit while the migration thread is sending: mdvm stops the thread
    before freeing the VM and exits 0 (it used to crash with SIGSEGV)."""
    src, dst, before = slow_pair(vm_factory, tmp_path)
    src.qmp.cmd("quit")
    assert src.wait_exit(20) == 0
    assert "Segmentation" not in src.stderr()
    assert dst.wait_exit(20) == 1
    assert "incoming migration failed" in dst.stderr()


def test_quit_destination_midway(vm_factory, tmp_path):
    """quit on the destination while it receives: it ends its receiver
    first and exits 0; the source's migration fails, its guest is intact."""
    src, dst, before = slow_pair(vm_factory, tmp_path)
    dst.qmp.cmd("quit")
    assert dst.wait_exit(20) == 0
    r = wait_migration(src)
    assert r["status"] == "failed", r
    check_source_intact(src, before)


class Proxy:
    """Forwards a migration stream, flipping one byte or cutting it short."""

    def __init__(self, listen_path, target_path, flip_at=None, cut_at=None):
        self.ls = socket.socket(socket.AF_UNIX)
        self.ls.bind(listen_path)
        self.ls.listen(1)
        self.target, self.flip_at, self.cut_at = target_path, flip_at, cut_at
        self.forwarded = 0
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        try:
            self.forward()
        except OSError:
            pass   # the destination hung up on the bad stream: expected

    def forward(self):
        a, _ = self.ls.accept()
        b = socket.socket(socket.AF_UNIX)
        b.connect(self.target)
        threading.Thread(target=self.back, args=(b, a), daemon=True).start()
        while True:
            data = a.recv(1 << 16)
            if not data:
                break
            start = self.forwarded
            if self.flip_at is not None and start <= self.flip_at < start + len(data):
                data = bytearray(data)
                data[self.flip_at - start] ^= 0x5a
                data = bytes(data)
            if self.cut_at is not None and start + len(data) >= self.cut_at:
                b.sendall(data[:self.cut_at - start])
                break
            b.sendall(data)
            self.forwarded += len(data)
        b.shutdown(socket.SHUT_WR)
        a.close()

    def back(self, b, a):
        try:
            while True:
                data = b.recv(4096)
                if not data:
                    break
                a.sendall(data)
        except OSError:
            pass


@pytest.mark.parametrize("how,at,msg", [
    ("flip", 5, "not an mdvm migration stream"),
    ("flip", 200000, "checksum mismatch"),
    ("flip", 20, "corrupted section header"),
    ("cut", 300000, "stream truncated"),
])
def test_corrupted_stream_rejected(vm_factory, tmp_path, how, at, msg):
    src = vm_factory(cmdline="idle", memory=MEM).start()
    assert src.guest("fill base=8M size=1M gen=4")[0] == 0
    real = str(tmp_path / "real.sock")
    dst = dest(vm_factory, "unix:" + real)
    proxy_path = str(tmp_path / "proxy.sock")
    Proxy(proxy_path, real, flip_at=at if how == "flip" else None,
          cut_at=at if how == "cut" else None)
    src.qmp.cmd("migrate", uri="unix:" + proxy_path)
    assert dst.wait_exit(30) == 1
    err = dst.stderr()
    assert "incoming migration failed" in err and msg in err, err
    r = wait_migration(src)
    assert r["status"] == "failed", r
    assert src.qmp.cmd("query-status")["status"] == "running"
    assert src.guest("verify base=8M size=1M gen=4") == (0, "verify: ok pages=256")


def test_config_mismatch_and_bad_uri(vm_factory, tmp_path):
    src = vm_factory(cmdline="idle", memory=MEM).start()
    uri = "unix:" + str(tmp_path / "mm.sock")
    dst = vm_factory(cmdline="idle", memory="32M", extra=["--incoming", uri]).start(wait_banner=False)
    src.qmp.cmd("migrate", uri=uri)
    assert wait_migration(src)["status"] == "failed"
    assert dst.wait_exit(20) == 1
    assert "configuration mismatch: source has 64 MiB RAM" in dst.stderr()
    with pytest.raises(Exception) as e:
        src.qmp.cmd("migrate", uri="fd:3")
    assert "expected tcp:HOST:PORT or unix:PATH" in str(e.value)
    with pytest.raises(Exception) as e:
        src.qmp.cmd("migrate", uri="unix:" + str(tmp_path / "nobody.sock"))
    assert "Failed to connect" in str(e.value)
    assert src.qmp.cmd("query-status")["status"] == "running"


def test_walk_while_migrating_bitmap(vm_factory, tmp_path, monkeypatch):
    """The same as the first test on KVM's dirty bitmap (KVM_GET_DIRTY_LOG +
    KVM_CLEAR_DIRTY_LOG) instead of the dirty ring."""
    monkeypatch.setenv("MDVM_DIRTY", "bitmap")
    src = vm_factory(cmdline="idle", memory=MEM).start()
    uri = "unix:" + str(tmp_path / "bm.sock")
    dst = dest(vm_factory, uri)
    assert src.guest("walk base=%d size=%d" % (WALK_BASE, WALK_SIZE))[0] == 0
    wait_sweeps(src, 3)
    src.qmp.cmd("migrate-set-parameters", downtime_limit=1, max_bandwidth=32 << 20)
    src.qmp.cmd("migrate", uri=uri)
    r = wait_migration(src)
    assert r["status"] == "completed", r
    assert r["ram"]["dirty-sync-count"] >= 2 and r["x-dirty-tracking"] == "bitmap", r
    dst.qmp.wait_event("RESUME")
    dst.qmp.cmd("stop")
    check_walk_consistent(dst.pmemsave(WALK_BASE, WALK_SIZE))
    dst.qmp.cmd("cont")
    wait_sweeps(dst, 3)


def test_iteration_limit_switches_over_clearly(vm_factory, tmp_path):
    """A downtime limit the walking guest can never meet (0 ms) and a cap
    of 3 iterations: the migration switches over at the cap, says so
    (query-migrate, stderr), and the guest arrives intact."""
    src = vm_factory(cmdline="idle", memory=MEM).start()
    uri = "unix:" + str(tmp_path / "cap.sock")
    dst = dest(vm_factory, uri)
    assert src.guest("walk base=%d size=%d" % (WALK_BASE, WALK_SIZE))[0] == 0
    wait_sweeps(src, 2)
    src.qmp.cmd("migrate-set-parameters", downtime_limit=0, max_bandwidth=32 << 20, x_max_iterations=3)
    assert src.qmp.cmd("query-migrate-parameters")["x-max-iterations"] == 3
    src.qmp.cmd("migrate", uri=uri)
    r = wait_migration(src)
    assert r["status"] == "completed", r
    assert r["ram"]["dirty-sync-count"] == 3 and r.get("x-iteration-limit-reached") is True, r
    assert "3 iterations without meeting the downtime limit" in src.stderr()
    dst.qmp.wait_event("RESUME")
    dst.qmp.cmd("stop")
    check_walk_consistent(dst.pmemsave(WALK_BASE, WALK_SIZE))


def test_paused_vm_migrates_paused(vm_factory, tmp_path):
    """As QEMU: a paused guest migrates and stays paused on the destination
    until `cont`."""
    src = vm_factory(cmdline="idle", memory=MEM).start()
    assert src.guest("fill base=8M size=512K gen=5")[0] == 0
    src.qmp.cmd("stop")
    uri = "unix:" + str(tmp_path / "p.sock")
    dst = dest(vm_factory, uri)
    src.qmp.cmd("migrate", uri=uri)
    r = wait_migration(src)
    assert r["status"] == "completed", r
    assert src.qmp.cmd("query-status")["status"] == "postmigrate"
    st = None
    deadline = time.time() + 20
    while st != "paused":
        assert time.time() < deadline, st
        st = dst.qmp.cmd("query-status")["status"]
        time.sleep(0.02)
    assert not [e for e in dst.qmp.events if e["event"] == "RESUME"]
    dst.qmp.cmd("cont")
    dst.qmp.wait_event("RESUME")
    assert dst.guest("verify base=8M size=512K gen=5") == (0, "verify: ok pages=128")


def test_paused_source_stays_paused_on_failure(vm_factory, tmp_path):
    src = vm_factory(cmdline="idle", memory=MEM).start()
    src.qmp.cmd("stop")
    uri = "unix:" + str(tmp_path / "pf.sock")
    dst = vm_factory(cmdline="idle", memory="32M", extra=["--incoming", uri]).start(wait_banner=False)
    src.qmp.cmd("migrate", uri=uri)
    assert wait_migration(src)["status"] == "failed"
    assert dst.wait_exit(20) == 1
    assert src.qmp.cmd("query-status")["status"] == "paused"
    src.qmp.cmd("cont")
    assert src.guest("status")[0] == 0


@pytest.mark.parametrize("mode", ["ring", "bitmap"])
def test_dirty_harvest_rounds(vm_factory, monkeypatch, mode):
    """x-debug-dirty-harvest (bench/areas/dirty.py): the walking guest's pages
    are found by either KVM source; bad arguments change nothing."""
    monkeypatch.setenv("MDVM_DIRTY", mode)
    vm = vm_factory(cmdline="idle", memory=MEM).start()
    r = vm.qmp.execute("x-debug-dirty-harvest", rounds=0)
    assert "rounds must be 1..100" in r["error"]["desc"], r
    assert vm.guest("walk base=%d size=%d" % (WALK_BASE, WALK_SIZE))[0] == 0
    wait_sweeps(vm, 1)
    r = vm.qmp.cmd("x-debug-dirty-harvest", rounds=3, interval_ms=100)
    assert r["mode"] == mode and len(r["rounds"]) == 3, r
    # A sweep of 4 MiB writes its 1,024 frames once (a few ms, longer when the
    # host is busy): the rounds together see at least one whole sweep, and
    # only frames the walk writes (plus a few of the guest's own).
    frames = [x["frames"] for x in r["rounds"]]
    assert sum(frames) >= WALK_SIZE // PAGE and max(frames) <= WALK_SIZE // PAGE + 64, r
    wait_sweeps(vm, 1)


def test_thp_source_to_hugetlb_destination(vm_factory, tmp_path):
    """Backings may differ: a hugetlb destination cannot give back part of a
    2 MiB page that holds boot data, so unbacked source pages there arrive as
    zeros instead of failing the migration."""
    uri = "unix:%s" % (tmp_path / "mig.sock")
    dst = vm_factory(cmdline="idle", memory=MEM,
                     extra=["--incoming", uri, "--backing", "hugetlb", "--reserve-hugepages"]).start(wait_banner=False)
    if "backing: hugetlb" not in dst.stderr():
        pytest.skip("no hugetlb backing here: " + dst.stderr().splitlines()[0])
    src = vm_factory(cmdline="idle", memory=MEM, extra=["--backing", "thp"]).start()
    assert src.guest("fill base=8M size=1M gen=3")[0] == 0
    src.qmp.cmd("migrate", uri=uri)
    r = wait_migration(src)
    assert r["status"] == "completed", (r, dst.stderr())
    dst.qmp.wait_event("RESUME")
    assert dst.guest("verify base=8M size=1M gen=3") == (0, "verify: ok pages=256")
    assert dst.pmemsave(0, 0x6000) == src.pmemsave(0, 0x6000)


@pytest.mark.parametrize("quiet,dirty", [(1, "ring"), (512, "bitmap")])
def test_auto_converge(vm_factory, tmp_path, monkeypatch, quiet, dirty):
    """The walk dirties its 4 MiB far faster than a 16 MiB/s link drains
    them: auto-converge throttles the vCPU (kicked out of KVM_RUN every
    10 ms) until a pass fits the downtime limit. It must converge that way,
    not through the iteration cap. query-migrate's figures are checked on
    the way. quiet=512 with the dirty bitmap: the walk leaves KVM_RUN by
    itself only about once a second (with the dirty ring, a full ring would
    bring it out), so only the kicks let the throttle bite."""
    monkeypatch.setenv("MDVM_DIRTY", dirty)
    src = vm_factory(cmdline="idle", memory=MEM).start()
    uri = "unix:" + str(tmp_path / "ac.sock")
    dst = dest(vm_factory, uri)
    assert src.guest("walk base=%d size=%d quiet=%d" % (WALK_BASE, WALK_SIZE, quiet))[0] == 0
    wait_sweeps(src, 2)
    src.qmp.cmd("migrate-set-parameters", downtime_limit=50, max_bandwidth=16 << 20)
    assert src.qmp.cmd("query-migrate-parameters")["x-max-iterations"] == 100
    src.qmp.cmd("migrate", uri=uri)
    throttle, rates, deadline = 0, [], time.time() + 90
    while True:
        r = src.qmp.cmd("query-migrate")
        if r["status"] in ("completed", "failed", "cancelled"):
            break
        ram = r["ram"]
        assert ram["total"] == 64 << 20 and 0 <= ram["remaining"] <= ram["total"], r
        if r["status"] == "active":
            assert "expected-downtime" in r and "downtime" not in r, r
        if ram["dirty-sync-count"] >= 2:
            rates.append(ram["dirty-pages-rate"])
        throttle = max(throttle, r.get("cpu-throttle-percentage", 0))
        assert time.time() < deadline, r
        time.sleep(0.05)
    assert r["status"] == "completed", r
    assert "x-iteration-limit-reached" not in r, r
    assert 0 < r["ram"]["dirty-sync-count"] < 100, r
    throttle = max(throttle, r.get("cpu-throttle-percentage", 0))
    assert 20 <= throttle <= 99, r
    assert rates and max(rates) > 0, rates
    assert "switching over anyway" not in src.stderr()
    dst.qmp.wait_event("RESUME")
    dst.qmp.cmd("stop")
    check_walk_consistent(dst.pmemsave(WALK_BASE, WALK_SIZE))
    dst.qmp.cmd("cont")
    wait_sweeps(dst, 2)


PROGRESS = re.compile(r"^\[[#.]{40}\] +(\d+)% (\S+) [\d.]+ MiB sent, ([\d.]+) MiB left, iter (\d+), \d+ ms$")


def test_ctl_migrate_progress(vm_factory, tmp_path):
    """`mdvm ctl migrate URI`: progress lines (guest RAM accounted for, not
    bytes sent), a summary, exit 0; a bad URI or nobody listening: a clear
    error, non-zero, and the source runs on."""
    src = vm_factory(cmdline="idle", memory=MEM).start()
    p = run_mdvm("ctl", "--socket", src.sock, "migrate", "fd:3")
    assert p.returncode != 0 and "expected tcp:HOST:PORT or unix:PATH" in p.stderr, p
    p = run_mdvm("ctl", "--socket", src.sock, "migrate", "unix:" + str(tmp_path / "nobody.sock"))
    assert p.returncode != 0 and "Failed to connect" in p.stderr, p
    assert src.qmp.cmd("query-status")["status"] == "running"
    assert src.guest("status")[0] == 0

    # 16 MiB of random data at 4 MiB/s: a first pass of a few seconds.
    src.qmp.cmd("x-mdvm-fill-random", gpa=32 << 20, size=16 << 20, seed=3)
    before = src.pmemsave(32 << 20, 16 << 20)
    uri = "unix:" + str(tmp_path / "ctl.sock")
    dst = dest(vm_factory, uri)
    src.qmp.cmd("migrate-set-parameters", max_bandwidth=4 << 20)
    p = run_mdvm("ctl", "--socket", src.sock, "migrate", uri)
    assert p.returncode == 0, p
    lines = [PROGRESS.match(x) for x in p.stderr.splitlines()]
    assert lines and all(lines), p.stderr
    pct = [int(m.group(1)) for m in lines]
    assert [m.group(2) for m in lines][-1] == "completed" and pct[-1] == 100, p.stderr
    # The bar moves while the first pass walks (not stuck near 0 until
    # the end), never backwards here (the guest is idle), 100 only at the end.
    assert any(0 < x < 100 and m.group(2) == "active" for x, m in zip(pct, lines)), p.stderr
    assert pct == sorted(pct) and pct.count(100) == 1, p.stderr
    assert p.stdout.startswith("migration completed: "), p.stdout
    dst.qmp.wait_event("RESUME")
    assert dst.pmemsave(32 << 20, 16 << 20) == before


SEC_CONFIG, SEC_RAM, SEC_VM, SEC_VCPU, SEC_DEVICE, SEC_END, SEC_SYNC, SEC_MCE, SEC_PREFAULT = range(1, 10)


class SectionProxy:
    """Forwards a migration stream section by section (docs/migration.md,
    "Stream format") and records the sections. On the first section of type
    `kind` it can flip a payload byte, cut the stream in the middle of it,
    or hold it and everything after; or it drops the destination's final
    acknowledgement (OKOK), or the source's go-ahead (GOGO), and hangs up
    on both sides."""

    def __init__(self, listen_path, target_path, action=None, kind=None):
        self.ls = socket.socket(socket.AF_UNIX)
        self.ls.bind(listen_path)
        self.ls.listen(1)
        self.target, self.action, self.kind = target_path, action, kind
        self.sections = []      # (type, payload); RAM payloads as their length only
        self.acted = False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        try:
            self.forward()
        except OSError:
            pass

    def forward(self):
        a, _ = self.ls.accept()
        b = socket.socket(socket.AF_UNIX)
        b.connect(self.target)
        self.a, self.b = a, b
        threading.Thread(target=self.back, daemon=True).start()
        buf, header, passing, ended = bytearray(), False, True, False
        while True:
            data = a.recv(1 << 20)
            if not data:
                break
            buf += data
            while passing:
                if ended:        # after END: the source's GOGO, raw
                    if not buf:
                        break
                    if self.action == "drop-go":
                        self.acted = True
                        a.shutdown(socket.SHUT_RDWR)
                        b.shutdown(socket.SHUT_RDWR)
                        return
                    b.sendall(bytes(buf))
                    buf.clear()
                    break
                if not header:
                    if len(buf) < 16:
                        break
                    b.sendall(bytes(buf[:16]))
                    del buf[:16]
                    header = True
                    continue
                if len(buf) < 16:
                    break
                typ, ln = struct.unpack_from("<II", buf, 0)
                if len(buf) < 16 + ln:
                    break
                sec = bytearray(buf[:16 + ln])
                del buf[:16 + ln]
                self.sections.append((typ, ln if typ == SEC_RAM else bytes(sec[16:])))
                if typ == self.kind and not self.acted and self.action in ("flip", "cut", "hold"):
                    self.acted = True
                    if self.action == "flip":
                        sec[16 + ln // 2] ^= 0x5a
                    elif self.action == "cut":
                        b.sendall(bytes(sec[:16 + ln // 2]))
                        b.shutdown(socket.SHUT_WR)
                        passing = False
                        break
                    else:
                        passing = False
                        break
                b.sendall(bytes(sec))
                ended = typ == SEC_END
            if not passing:
                buf.clear()     # drain the source, forward nothing more
        b.shutdown(socket.SHUT_WR)

    def back(self):
        try:
            while True:
                data = self.b.recv(4096)
                if not data:
                    break
                if self.action == "drop-ack" and b"OKOK" in data:
                    self.acted = True
                    self.a.shutdown(socket.SHUT_RDWR)
                    self.b.shutdown(socket.SHUT_RDWR)
                    break
                self.a.sendall(data)
        except OSError:
            pass

    def device_names(self):
        return [p[:16].rstrip(b"\0").decode() for t, p in self.sections if t == SEC_DEVICE]


def test_stream_sections_and_rtc_state(vm_factory, tmp_path):
    """Through a transparent proxy: the sections come in the documented
    order, and the CMOS RTC's state (index, 128 bytes, clock offset) is a
    DEVICE section of its own; the switch-over (OKOK, then GOGO) passes."""
    src = vm_factory(cmdline="idle", memory=MEM).start()
    real = str(tmp_path / "real.sock")
    dst = dest(vm_factory, "unix:" + real)
    proxy = SectionProxy(str(tmp_path / "proxy.sock"), real)
    src.qmp.cmd("migrate", uri="unix:" + str(tmp_path / "proxy.sock"))
    assert wait_migration(src)["status"] == "completed"
    dst.qmp.wait_event("RESUME")
    assert dst.guest("status")[0] == 0
    types = [t for t, _ in proxy.sections]
    assert types[:2] == [SEC_CONFIG, SEC_PREFAULT] and types[-1] == SEC_END, types
    names = proxy.device_names()
    tail = types[types.index(SEC_VM):]
    assert tail == [SEC_VM, SEC_VCPU, SEC_MCE] + [SEC_DEVICE] * len(names) + [SEC_END], types
    assert names in (["serial", "testdev", "rtc"], ["serial", "testdev", "rtc", "virtio-balloon"]), names
    rtc = [p[16:] for t, p in proxy.sections if t == SEC_DEVICE and p.startswith(b"rtc\0")][0]
    version, index, offset = struct.unpack_from("<IB3xq", rtc)
    nvram = rtc[16:]
    assert version == 1 and len(nvram) == 128 and index < 0x80, rtc
    # Register A (divider), B (24-hour BCD), D (valid) as the device keeps them.
    assert (nvram[0x0a], nvram[0x0b], nvram[0x0d]) == (0x26, 0x02, 0x80), nvram
    end = struct.unpack("<QQQII", proxy.sections[-1][1])
    assert end[4] == 2, end   # MIG_END_CONFIRM, not paused


def walking_source(vm_factory):
    src = vm_factory(cmdline="idle", memory=MEM).start()
    assert src.guest("fill base=16M size=512K gen=6")[0] == 0
    assert src.guest("walk base=%d size=%d" % (WALK_BASE, WALK_SIZE))[0] == 0
    wait_sweeps(src, 2)
    return src


def check_resumed_intact(src):
    """The source stopped its vCPUs for the last pass and resumed them after
    the failure: STOP then RESUME, running, the walk goes on, memory intact."""
    src.qmp.wait_event("STOP")
    src.qmp.wait_event("RESUME")
    check_running_intact(src)


def check_running_intact(src):
    """Running, the walk goes on and is consistent, the filled data verifies."""
    assert src.qmp.cmd("query-status")["status"] == "running"
    wait_sweeps(src, 2)
    src.qmp.cmd("stop")
    check_walk_consistent(src.pmemsave(WALK_BASE, WALK_SIZE))
    src.qmp.cmd("cont")
    assert src.guest("verify base=16M size=512K gen=6") == (0, "verify: ok pages=128")


def dest_events(dst):
    """Every event the destination emitted before it exited."""
    try:
        while True:
            msg = dst.qmp.recv()
            if "event" in msg:
                dst.qmp.events.append(msg)
    except (EOFError, OSError):
        pass
    return [e["event"] + ("/" + e["data"]["status"] if e["event"] == "MIGRATION" else "")
            for e in dst.qmp.events]


@pytest.mark.parametrize("action,kind,msg", [
    ("flip", SEC_VCPU, "checksum mismatch"),
    ("flip", SEC_DEVICE, "checksum mismatch"),
    ("cut", SEC_END, "stream truncated"),
])
def test_failure_after_stop_resumes_source(vm_factory, tmp_path, action, kind, msg):
    """A final section (vCPU, device, END) corrupted or cut short after the
    source stopped its vCPUs: the destination refuses it (exit 1, never
    runs), the source resumes with its memory intact."""
    src = walking_source(vm_factory)
    real = str(tmp_path / "real.sock")
    dst = dest(vm_factory, "unix:" + real)
    proxy = SectionProxy(str(tmp_path / "proxy.sock"), real, action=action, kind=kind)
    src.qmp.cmd("migrate", uri="unix:" + str(tmp_path / "proxy.sock"))
    r = wait_migration(src)
    assert r["status"] == "failed" and r["error-desc"], r
    assert proxy.acted
    assert dst.wait_exit(30) == 1
    assert "incoming migration failed" in dst.stderr() and msg in dst.stderr(), dst.stderr()
    assert "RESUME" not in dest_events(dst)
    assert migration_statuses(src, "failed") == ["setup", "active", "device", "failed"]
    check_resumed_intact(src)


def test_cancel_in_device_phase(vm_factory, tmp_path):
    """migrate_cancel while the source waits, vCPUs stopped, for the
    destination's answer (the proxy holds END back): cancelled, resumed."""
    src = walking_source(vm_factory)
    real = str(tmp_path / "real.sock")
    dst = dest(vm_factory, "unix:" + real)
    proxy = SectionProxy(str(tmp_path / "proxy.sock"), real, action="hold", kind=SEC_END)
    src.qmp.cmd("migrate", uri="unix:" + str(tmp_path / "proxy.sock"))
    deadline = time.time() + 60
    while src.qmp.cmd("query-migrate")["status"] != "device" or not proxy.acted:
        assert time.time() < deadline, src.qmp.cmd("query-migrate")
        time.sleep(0.02)
    assert src.qmp.cmd("query-status")["status"] == "finish-migrate"
    src.qmp.cmd("migrate_cancel")
    r = wait_migration(src)
    assert r["status"] == "cancelled", r
    assert migration_statuses(src, "cancelled") == ["setup", "active", "device", "cancelling",
                                                    "cancelled"]
    assert dst.wait_exit(30) == 1
    assert "incoming migration failed: stream truncated" in dst.stderr(), dst.stderr()
    assert "RESUME" not in dest_events(dst)
    check_resumed_intact(src)


def test_lost_acknowledgement_only_source_runs(vm_factory, tmp_path):
    """The connection breaks after the destination loaded everything and
    sent its OKOK but before the source got it: the source resumes; the
    destination, never told GOGO, must not run the guest too."""
    src = walking_source(vm_factory)
    real = str(tmp_path / "real.sock")
    dst = dest(vm_factory, "unix:" + real)
    proxy = SectionProxy(str(tmp_path / "proxy.sock"), real, action="drop-ack")
    src.qmp.cmd("migrate", uri="unix:" + str(tmp_path / "proxy.sock"))
    r = wait_migration(src)
    assert r["status"] == "failed", r
    assert "before acknowledging" in r["error-desc"], r
    assert proxy.acted
    assert dst.wait_exit(30) == 1
    assert "did not confirm the switch-over" in dst.stderr(), dst.stderr()
    ev = dest_events(dst)
    assert "RESUME" not in ev and "MIGRATION/completed" not in ev, ev
    assert migration_statuses(src, "failed") == ["setup", "active", "device", "failed"]
    check_resumed_intact(src)


def test_lost_go_ahead_source_resumed_by_cont(vm_factory, tmp_path):
    """The source's GOGO is lost: the source has handed over (completed,
    postmigrate), the destination, never told to run, exits 1. Neither runs
    the guest; `cont` on the source brings it back (as in QEMU), intact."""
    src = walking_source(vm_factory)
    real = str(tmp_path / "real.sock")
    dst = dest(vm_factory, "unix:" + real)
    proxy = SectionProxy(str(tmp_path / "proxy.sock"), real, action="drop-go")
    src.qmp.cmd("migrate", uri="unix:" + str(tmp_path / "proxy.sock"))
    r = wait_migration(src)
    assert r["status"] == "completed", (r, dst.wait_exit(30), dst.stderr())
    assert proxy.acted
    assert dst.wait_exit(30) == 1
    assert "RESUME" not in dest_events(dst)
    assert src.qmp.cmd("query-status")["status"] == "postmigrate"
    src.qmp.cmd("cont")
    src.qmp.wait_event("RESUME")
    check_running_intact(src)
