"""Live migration between real mdvm processes (docs/migration.md), in the
style of QEMU's migration-test: the guest walks memory while it is being
migrated, and the destination's memory must be consistent with one
interrupted sweep."""
import os
import socket
import struct
import threading
import time

import pytest

from mdvmtest import PAGE, check_walk_consistent, fill_pattern

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


def wait_migration(vm, timeout=60):
    deadline = time.time() + timeout
    while True:
        r = vm.qmp.cmd("query-migrate")
        if r.get("status") in ("completed", "failed", "cancelled"):
            return r
        assert time.time() < deadline, "migration did not finish: %r" % r
        time.sleep(0.02)


def wait_sweeps(vm, more, timeout=30):
    start = vm.qmp.cmd("query-guest")["sweeps"]
    deadline = time.time() + timeout
    while vm.qmp.cmd("query-guest")["sweeps"] < start + more:
        assert time.time() < deadline, "guest stopped walking"
        time.sleep(0.02)


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
    assert "downtime" in r
    statuses = []
    while not statuses or statuses[-1] != "completed":
        statuses.append(src.qmp.wait_event("MIGRATION")["data"]["status"])
    assert statuses == ["setup", "active", "device", "completed"], statuses
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
