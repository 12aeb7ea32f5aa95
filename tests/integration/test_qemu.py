"""The test guest is a real PVH kernel: QEMU boots it too."""
import os
import shutil
import subprocess
import time

import pytest

from mdvmtest import BANNER, GUEST, QMP, check_walk_consistent

QEMU = shutil.which("qemu-system-x86_64")


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
def test_guest_boots_under_qemu_tcg():
    r = subprocess.run([QEMU, "-accel", "tcg", "-M", "pc", "-m", "128M", "-nographic", "-no-reboot",
                        "-kernel", GUEST, "-append", "echo under-qemu; fill size=256K; verify size=256K; poweroff"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    out = r.stdout.replace("\r\n", "\n")
    assert BANNER in out, out[-2000:]
    assert "testdev=no" in out
    assert "under-qemu" in out and "verify: ok pages=64" in out
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_guest_exit_code_under_qemu():
    r = subprocess.run([QEMU, "-accel", "tcg", "-M", "pc", "-m", "64M", "-nographic", "-no-reboot",
                        "-device", "isa-debug-exit,iobase=0x501,iosize=2",
                        "-kernel", GUEST, "-append", "exit code=5"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == (5 << 1) | 1, r.stdout[-1000:]


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_walk_under_qemu_is_consistent(tmp_path):
    """`walk` under QEMU TCG, stopped and dumped over QEMU's own QMP: the dump
    obeys the same consistency rule as under mdvm (one interrupted sweep)."""
    qmp_path, con = str(tmp_path / "qmp.sock"), tmp_path / "console"
    proc = subprocess.Popen([QEMU, "-accel", "tcg", "-M", "pc", "-m", "64M", "-display", "none",
                             "-no-reboot", "-serial", "file:%s" % con,
                             "-qmp", "unix:%s,server=on,wait=off" % qmp_path,
                             "-kernel", GUEST, "-append", "walk size=1M"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not (con.exists() and "walk: started" in con.read_text(errors="replace")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no 'walk: started'; console:\n" + con.read_text()
            time.sleep(0.05)
        q = QMP(qmp_path).negotiate()
        dump = str(tmp_path / "walk.bin")
        while True:
            q.cmd("stop")
            q.cmd("pmemsave", val=0x400000, size=1 << 20, filename=dump)
            with open(dump, "rb") as f:
                a = f.read()
            assert len(a) == 1 << 20
            if any(a[i] for i in range(0, len(a), 4096)):
                break       # the walk has been over the range at least once
            assert time.time() < deadline, "the walk did not touch its range"
            q.cmd("cont")
            time.sleep(0.1)
        check_walk_consistent(a)
        q.cmd("pmemsave", val=0x400000, size=1 << 20, filename=dump)
        with open(dump, "rb") as f:
            assert f.read() == a, "memory changed while QEMU was stopped"
        # Bytes other than each page's counter are never written.
        assert not any(a[i] for i in range(len(a)) if i % 4096), "walk wrote outside offset 0"
        q.cmd("quit")
        q.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if os.path.exists(qmp_path):
            os.unlink(qmp_path)
