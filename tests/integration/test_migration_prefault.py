"""The PREFAULT hint of migration stream v3 (docs/migration.md): a
destination checks each run like a RAM record and refuses a bad one with a
clear error; a hand-built stream, so the checksums are right and only the
content is wrong."""
import socket
import struct

import pytest

from mdvmtest import PAGE

MEM = 64 << 20


def crc32c(data, crc=0):
    table = crc32c.table
    if table is None:
        table = crc32c.table = []
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            table.append(c)
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


crc32c.table = None


def section(typ, payload):
    h = struct.pack("<III", typ, len(payload), crc32c(payload))
    return h + struct.pack("<I", crc32c(h)) + payload


def stream_start(version=4):
    h = b"MDVM-MIG" + struct.pack("<I", version)
    config = struct.pack("<QII", MEM, 1, 1) + struct.pack("<QQ", 0, MEM) + bytes(16 * 7)
    return h + struct.pack("<I", crc32c(h)) + section(1, config)


def send_to(path, data):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(data)
    return s


def test_prefault_run_outside_ram_refused(vm_factory, tmp_path):
    path = str(tmp_path / "in.sock")
    dst = vm_factory(cmdline="idle", memory="64M", extra=["--incoming", "unix:" + path]).start(wait_banner=False)
    good = struct.pack("<QIBBH", 0x800, 512, 1, 9, 0)
    bad = struct.pack("<QIBBH", MEM // PAGE - 8, 512, 1, 9, 0)   # runs past the end of RAM
    s = send_to(path, stream_start() + section(9, good + bad))
    assert dst.wait_exit(30) == 1
    s.close()
    err = dst.stderr()
    assert "incoming migration failed: prefault section: bad run (gfn 0x3ff8, 512 pages)" in err, err


def test_prefault_twice_refused(vm_factory, tmp_path):
    path = str(tmp_path / "in.sock")
    dst = vm_factory(cmdline="idle", memory="64M", extra=["--incoming", "unix:" + path]).start(wait_banner=False)
    run = section(9, struct.pack("<QIBBH", 0x800, 512, 1, 9, 0))
    s = send_to(path, stream_start() + run + run)
    assert dst.wait_exit(30) == 1
    s.close()
    err = dst.stderr()
    assert "incoming migration failed: bad prefault section" in err, err


@pytest.mark.parametrize("version", [2, 3, 5])
def test_other_stream_version_refused(vm_factory, tmp_path, version):
    """A destination reads only its own stream version (older MCE and
    test-device sections differ); the header is refused before anything
    is loaded."""
    path = str(tmp_path / "in.sock")
    dst = vm_factory(cmdline="idle", memory="64M", extra=["--incoming", "unix:" + path]).start(wait_banner=False)
    s = send_to(path, stream_start(version=version))
    assert dst.wait_exit(30) == 1
    s.close()
    err = dst.stderr()
    assert "unsupported stream version %d (this mdvm reads version 4)" % version in err, err
