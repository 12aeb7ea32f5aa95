"""The test guest is a real PVH kernel: QEMU boots it too."""
import shutil
import subprocess

import pytest

from mdvmtest import BANNER, GUEST

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
