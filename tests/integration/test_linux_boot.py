"""Linux boot protocol on this host with Debian's stock kernel (fetched by
tests/e2e/build.sh --fetch): errors for bad kernels, initrds and memory sizes,
and what mdvm writes for a bzImage (zero page, e820, command line, initrd,
ACPI tables), read back with pmemsave. The guest itself runs too slowly here
to boot; tests/e2e boots it under nested SVM."""
import os
import struct
import subprocess

import pytest

from mdvmtest import ROOT, VM, run_mdvm


@pytest.fixture(scope="module")
def kernel():
    r = subprocess.run([os.path.join(ROOT, "tests", "e2e", "build.sh"), "--fetch"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return os.path.join(r.stdout.strip().splitlines()[-1], "vmlinuz")


def patched(tmp_path, src, name, edits):
    data = bytearray(open(src, "rb").read())
    for off, fmt, val in edits:
        struct.pack_into(fmt, data, off, val)
    p = tmp_path / name
    p.write_bytes(bytes(data))
    return str(p)


def test_bzimage_too_little_memory(kernel):
    r = run_mdvm("run", "--kernel", kernel, "--memory", "64M", "--console", "none")
    assert r.returncode == 1
    assert "guest memory too small" in r.stderr and "give --memory of at least" in r.stderr, r.stderr


def test_initrd_does_not_fit(kernel, tmp_path):
    big = tmp_path / "initrd"
    big.write_bytes(b"\0" * (48 << 20))
    r = run_mdvm("run", "--kernel", kernel, "--initrd", str(big), "--memory", "120M", "--console", "none")
    assert r.returncode == 1
    assert "initrd '%s' (49152 KiB) does not fit in guest RAM" % big in r.stderr, r.stderr


def test_bzimage_header_errors(kernel, tmp_path):
    cases = [
        ("old", [(0x206, "<H", 0x20b)], "Linux boot protocol 2.11 is too old"),
        ("no64", [(0x236, "<H", 0)], "no 64-bit entry point"),
        ("zimage", [(0x211, "<B", 0)], "zImage"),
        ("noflag", [(0x1fe, "<H", 0)], "not an ELF file or a Linux bzImage"),
    ]
    for name, edits, msg in cases:
        k = patched(tmp_path, kernel, name, edits)
        r = run_mdvm("run", "--kernel", k, "--memory", "256M", "--console", "none")
        assert r.returncode == 1 and msg in r.stderr, (name, r.stderr)
    trunc = tmp_path / "trunc"
    trunc.write_bytes(open(kernel, "rb").read()[:40 * 512])
    r = run_mdvm("run", "--kernel", str(trunc), "--memory", "256M", "--console", "none")
    assert r.returncode == 1 and "truncated bzImage" in r.stderr, r.stderr
    # Cut in the middle of the compressed kernel: the header's syssize says so.
    data = open(kernel, "rb").read()
    cut = tmp_path / "cut"
    cut.write_bytes(data[:len(data) // 2])
    r = run_mdvm("run", "--kernel", str(cut), "--memory", "256M", "--console", "none")
    assert r.returncode == 1 and "truncated bzImage (the header says" in r.stderr, r.stderr


def test_cmdline_longer_than_kernel_accepts(kernel):
    r = run_mdvm("run", "--kernel", kernel, "--memory", "256M", "--console", "none",
                 "--balloon", "off", "--cmdline", "x" * 3000)
    assert r.returncode == 1
    assert "command line is 3000 bytes; this kernel accepts at most 2047" in r.stderr, r.stderr


def test_bzimage_boot_structures(kernel, tmp_path):
    """Load the real bzImage with an initrd; check what the kernel will read."""
    initrd = tmp_path / "initrd"
    payload = os.urandom(3 << 20)
    initrd.write_bytes(payload)
    cmdline = "console=ttyS0 reboot=t"
    vm = VM(tmp_path, cmdline=cmdline, memory="256M", cpus=2,
            extra=["--kernel", kernel, "--initrd", str(initrd)])
    vm.start(wait_banner=False)
    try:
        zp = vm.pmemsave(0x10000, 4096)
        hdr = open(kernel, "rb").read(0x300)
        assert zp[0x1fe:0x200] == b"\x55\xaa" and zp[0x202:0x206] == b"HdrS"
        assert zp[0x206:0x208] == hdr[0x206:0x208]        # the file's setup header
        assert zp[0x210] == 0xff                           # type_of_loader
        assert struct.unpack_from("<I", zp, 0x228)[0] == 0x18000
        got = vm.pmemsave(0x18000, 4096)
        assert got.startswith(cmdline.encode())
        image, size = struct.unpack_from("<II", zp, 0x218)
        assert size == len(payload) and image % 4096 == 0
        pref, init_size = struct.unpack_from("<Q", hdr, 0x258)[0], struct.unpack_from("<I", hdr, 0x260)[0]
        assert image >= pref + init_size and image + size <= 256 << 20
        assert vm.pmemsave(image, size) == payload
        # e820: RAM adds up to 256 MiB minus the reserved low ranges.
        n = zp[0x1e8]
        ents = [struct.unpack_from("<QQI", zp, 0x2d0 + 20 * i) for i in range(n)]
        ram = sum(s for a, s, t in ents if t == 1)
        assert 255 << 20 < ram < 256 << 20, ents
        assert all(a + s <= b for (a, s, _), (b, _, _) in zip(ents, ents[1:])), ents
        # RSDP where boot_params.acpi_rsdp_addr says, with a valid checksum; MADT has 2 CPUs.
        rsdp_addr = struct.unpack_from("<Q", zp, 0x70)[0]
        rsdp = vm.pmemsave(rsdp_addr, 36)
        assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
        xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
        xsdt = vm.pmemsave(xsdt_addr, 52)
        tables = {}
        for i in range(2):
            addr = struct.unpack_from("<Q", xsdt, 36 + 8 * i)[0]
            h = vm.pmemsave(addr, 36)
            t = vm.pmemsave(addr, struct.unpack_from("<I", h, 4)[0])
            assert sum(t) % 256 == 0, h[:4]
            tables[h[:4]] = t
        madt = tables[b"APIC"]
        off, lapics = 44, []
        while off < len(madt):
            if madt[off] == 0:
                lapics.append(madt[off + 3])              # APIC ID
            off += madt[off + 1]
        assert lapics == [0, 1], madt
        assert struct.unpack_from("<I", tables[b"FACP"], 112)[0] & (1 << 20)   # HW_REDUCED_ACPI
        assert vm.qmp.cmd("query-status")["status"] == "running"
    finally:
        vm.stop()


def test_pvh_kernel_too_little_memory(tmp_path):
    """An ELF whose segments lie below the MMIO hole but past the end of RAM
    asks for more --memory, as the bzImage path does (the test guest, its
    load addresses moved up by 16 MiB)."""
    from mdvmtest import GUEST
    data = bytearray(open(GUEST, "rb").read())
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    top = 0
    for i in range(phnum):
        off = phoff + i * phentsize
        ptype, = struct.unpack_from("<I", data, off)
        if ptype == 1:   # PT_LOAD: p_vaddr, p_paddr at +0x10, +0x18; p_memsz at +0x28
            for f in (0x10, 0x18):
                v, = struct.unpack_from("<Q", data, off + f)
                struct.pack_into("<Q", data, off + f, v + (16 << 20))
            paddr, = struct.unpack_from("<Q", data, off + 0x18)
            memsz, = struct.unpack_from("<Q", data, off + 0x28)
            top = max(top, paddr + memsz)
    p = tmp_path / "high.elf"
    p.write_bytes(bytes(data))
    r = run_mdvm("run", "--kernel", str(p), "--memory", "8M", "--console", "none")
    assert r.returncode == 1, r.stderr
    assert "guest memory too small" in r.stderr and "RAM ends at 0x800000" in r.stderr, r.stderr
    need = int(r.stderr.split("at least ")[1].split()[0])
    assert need << 20 >= top, (need, top)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
