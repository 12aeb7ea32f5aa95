"""configs/*.xml are valid libvirt domain XML and mdvm reads them; mdvm's
config errors name the file and line. Mostly `mdvm run --check-config`, which
parses and validates everything, prints the resolved config and creates no VM;
the shipped walk and hugetlb configs are also booted."""
import glob
import os
import re
import shutil
import subprocess
import time

import pytest

from mdvmtest import MDVM, QMP, ROOT, check_walk_consistent

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.xml")))
NS = "https://mdvm.dev/schemas/domain/1.0"


def validate(path):
    exe = shutil.which("virt-xml-validate")
    assert exe, "virt-xml-validate not found (Debian package libvirt-clients; make deps)"
    return subprocess.run([exe, path, "domain"], capture_output=True, text=True, timeout=60)


def check_config(*args, cwd=ROOT):
    return subprocess.run([MDVM, "run", "--check-config", *args], capture_output=True,
                          text=True, timeout=30, cwd=cwd)


def one_line_error(r, msg, status=2):
    """Bad input: exit status exactly `status`, nothing on stdout, and one
    line on stderr (`mdvm: ...`) that contains `msg`."""
    assert r.returncode == status, (r.returncode, r.stderr)
    assert r.stdout == "", r.stdout
    assert r.stderr.startswith("mdvm: ") and r.stderr.count("\n") == 1 and r.stderr.endswith("\n"), \
        "not one line:\n" + r.stderr
    assert msg in r.stderr, r.stderr


def resolved(out):
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def test_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"default.xml", "walk.xml", "hugetlb.xml"} <= names, names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_passes_virt_xml_validate(path):
    r = validate(path)
    assert r.returncode == 0, "virt-xml-validate %s failed:\n%s%s" % (path, r.stdout, r.stderr)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_accepted_by_mdvm(path):
    r = check_config("--config", path)
    assert r.returncode == 0, "mdvm rejected %s:\n%s" % (path, r.stderr)
    cfg = resolved(r.stdout)
    for key in ("name", "memory", "cpus", "kernel", "cmdline", "console", "backing"):
        assert key in cfg, r.stdout
    assert os.path.samefile(cfg["kernel"], os.path.join(ROOT, "guest", "mdvm-guest.elf"))


def test_default_config_values():
    r = check_config("--config", "configs/default.xml")
    assert r.returncode == 0, r.stderr
    cfg = resolved(r.stdout)
    assert cfg["name"] == "mdvm-default"
    assert cfg["memory"] == "256 MiB (268435456 bytes)"
    assert cfg["cpus"] == "2"
    assert cfg["cmdline"] == ("echo hello from the mdvm test guest; fill size=1M; "
                              "verify size=1M; poweroff")
    assert cfg["console"] == "stdio"
    assert cfg["backing"] == "auto"


def test_default_config_used_without_config_or_kernel():
    r = check_config()   # cwd is the repository root: configs/default.xml
    assert r.returncode == 0, r.stderr
    assert resolved(r.stdout)["name"] == "mdvm-default"


def test_no_kernel_outside_repo(tmp_path):
    r = check_config(cwd=tmp_path)
    one_line_error(r, "no kernel: give --kernel ELF or --config FILE")


def test_cli_overrides_config():
    r = check_config("--memory", "1G", "--config", "configs/walk.xml", "--cpus", "3",
                     "--cmdline", "idle", "--console", "none", "--backing", "memfd",
                     "--control", "/tmp/mdvm-test.sock")
    assert r.returncode == 0, r.stderr
    cfg = resolved(r.stdout)
    assert cfg["name"] == "mdvm-walk"
    assert cfg["memory"] == "1 GiB (1073741824 bytes)"
    assert cfg["cpus"] == "3"
    assert cfg["cmdline"] == "idle"
    assert cfg["console"] == "none"
    assert cfg["backing"] == "memfd"
    assert cfg["control"] == "/tmp/mdvm-test.sock"


def domain(body, os_body="<type arch='x86_64'>hvm</type>"):
    """A libvirt-valid domain with the test guest's kernel and `body` added."""
    return ("<domain type='kvm'>\n"
            "  <name>t</name>\n"
            "  <memory unit='MiB'>64</memory>\n"
            "  <os>%s<kernel>%s</kernel></os>\n"
            "%s\n"
            "</domain>\n" % (os_body, os.path.join(ROOT, "guest", "mdvm-guest.elf"), body))


# (what is added at line 5, expected message after "<file>:")
BAD = [
    ("  <devices>\n    <interface type='network'><source network='default'/></interface>\n  </devices>",
     "6: <interface> is not supported by mdvm"),
    ("  <devices><disk type='file' device='disk'><source file='/d.img'/>"
     "<target dev='vda'/></disk></devices>",
     "5: <disk> is not supported by mdvm"),
    ("  <cpu mode='host-passthrough'/>", "5: <cpu> is not supported by mdvm"),
    ("  <features><acpi/></features>", "5: <features> is not supported by mdvm"),
    ("  <currentMemory unit='MiB'>32</currentMemory>",
     "5: currentMemory != memory is not supported; use the balloon"),
    ("  <vcpu cpuset='0-1'>2</vcpu>", "5: attribute 'cpuset' of <vcpu> is not supported by mdvm"),
    ("  <metadata><mdvm:config xmlns:mdvm='%s'><mdvm:backing>huge</mdvm:backing>"
     "</mdvm:config></metadata>" % NS,
     "5: <mdvm:backing>: unknown backing 'huge'"),
]


@pytest.mark.parametrize("body,msg", BAD, ids=[m.split(":")[1].strip() for _, m in BAD])
def test_bad_config_rejected(tmp_path, body, msg):
    path = tmp_path / "bad.xml"
    path.write_text(domain(body))
    # Valid libvirt XML, so the rejection is mdvm's own choice, with a reason.
    v = validate(str(path))
    assert v.returncode == 0, v.stderr
    r = check_config("--config", str(path))
    one_line_error(r, "%s:%s" % (path, msg))


def test_missing_initrd_rejected(tmp_path):
    path = tmp_path / "initrd.xml"
    missing = tmp_path / "no-such-initrd.img"
    path.write_text(domain("", os_body="<type arch='x86_64'>hvm</type><initrd>%s</initrd>" % missing))
    r = check_config("--config", str(path))
    one_line_error(r, "initrd '%s': No such file or directory" % missing)


def test_bad_os_rejected(tmp_path):
    path = tmp_path / "loader.xml"
    path.write_text(domain("", os_body="<type arch='x86_64'>hvm</type><loader>/usr/share/OVMF/OVMF_CODE.fd</loader>"))
    r = check_config("--config", str(path))
    one_line_error(r, "%s:4:" % path)
    assert "loader" in r.stderr, r.stderr


def test_domain_type_must_be_kvm(tmp_path):
    path = tmp_path / "qemu.xml"
    path.write_text(domain("").replace("type='kvm'", "type='qemu'"))
    r = check_config("--config", str(path))
    one_line_error(r, "%s:1: <domain type='qemu'>: mdvm runs only type='kvm' domains" % path)


def test_malformed_xml(tmp_path):
    path = tmp_path / "broken.xml"
    path.write_text("<domain type='kvm'>\n<name>x</name>\n")
    r = check_config("--config", str(path))
    one_line_error(r, str(path) + ":")


def test_missing_config(tmp_path):
    r = check_config("--config", str(tmp_path / "nope.xml"))
    one_line_error(r, "%s: No such file or directory" % (tmp_path / "nope.xml"))


@pytest.mark.parametrize("args,msg", [
    (["--foo"], "unknown option '--foo' (see mdvm run --help)"),
    (["--memory", "4X"], "invalid size '4X': expected a number with an optional K/M/G/T suffix"),
    (["--cpus", "0"], "invalid vCPU count '0': expected a number from 1 to 64"),
    (["--kernel", "/nonexistent/vmlinux"], "kernel '/nonexistent/vmlinux': No such file or directory"),
    (["--console", "tty"], "invalid --console 'tty': expected stdio, file:PATH or none"),
    (["extra"], "unexpected argument 'extra'"),
    (["--memory"], "option '--memory' requires an argument"),
    (["--memory", "1M"], "memory 1 MiB is below the minimum of 2 MiB"),
    (["--backing", "bogus"], "invalid --backing 'bogus': expected auto, hugetlb, thp, memfd or anon"),
    (["--balloon", "maybe"], "invalid --balloon 'maybe': expected on or off"),
    (["--console", "file:/nonexistent/dir/x"], "console file '/nonexistent/dir/x': No such file or directory"),
])
def test_cli_errors(args, msg):
    one_line_error(check_config("--config", "configs/default.xml", *args), msg)
    # The same without --check-config: refused before any VM exists.
    r = subprocess.run([MDVM, "run", "--config", "configs/default.xml", *args], capture_output=True,
                       text=True, timeout=30, cwd=ROOT, stdin=subprocess.DEVNULL)
    one_line_error(r, msg)


def test_help():
    r = subprocess.run([MDVM, "run", "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    for opt in ("--config", "--memory", "--cpus", "--kernel", "--cmdline", "--control",
                "--console", "--backing", "--reserve-hugepages", "--help"):
        assert opt in r.stdout, opt
    # Every option of --help is in docs/configuration.md's options table.
    with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
        table = [l for l in f if l.startswith("| `-")]
    documented = set(re.findall(r"`(--[a-z-]+)", "".join(table)))
    offered = set(re.findall(r"^\s+(?:-h, )?(--[a-z-]+)", r.stdout, re.M))
    assert len(offered) >= 14 and offered <= documented, offered - documented


def test_memballoon_features(tmp_path):
    """libvirt's autodeflate / freePageReporting attributes: valid libvirt
    XML, read by mdvm; both default to on; a bad value is refused."""
    path = tmp_path / "balloon.xml"
    path.write_text(domain("  <devices><memballoon model='virtio' autodeflate='off' "
                           "freePageReporting='off'/></devices>"))
    assert validate(str(path)).returncode == 0
    r = check_config("--config", str(path))
    assert r.returncode == 0, r.stderr
    assert resolved(r.stdout)["balloon"] == "on (autodeflate off, free page reporting off)"
    r = check_config("--config", "configs/default.xml")
    assert resolved(r.stdout)["balloon"] == "on (autodeflate on, free page reporting on)"
    path.write_text(domain("  <devices><memballoon model='virtio' autodeflate='yes'/></devices>"))
    r = check_config("--config", str(path))
    one_line_error(r, "<memballoon autodeflate='yes'>: expected 'on' or 'off'")


def test_walk_config_boots(tmp_path):
    """configs/walk.xml as shipped (console on stdout), plus a control socket:
    the guest walks, a stopped dump is consistent, quit ends it with 0."""
    sock, out = str(tmp_path / "walk.sock"), tmp_path / "stdout"
    with open(out, "w") as f:
        p = subprocess.Popen([MDVM, "run", "--config", os.path.join(ROOT, "configs", "walk.xml"),
                              "--control", sock], stdin=subprocess.DEVNULL, stdout=f,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while "walk: started" not in out.read_text(errors="replace"):
            assert p.poll() is None, p.stderr.read()
            assert time.time() < deadline, out.read_text()
            time.sleep(0.02)
        q = QMP(sock).negotiate()
        assert "ram=128M cpus=1" in out.read_text()
        while q.cmd("query-guest")["sweeps"] < 2:
            assert time.time() < deadline, "no walk sweeps"
            time.sleep(0.05)
        q.cmd("stop")
        q.cmd("pmemsave", val=4 << 20, size=4 << 20, filename=str(tmp_path / "d"))
        v, _ = check_walk_consistent((tmp_path / "d").read_bytes())
        assert v >= 2
        q.cmd("quit")
        assert q.wait_event("SHUTDOWN")["data"]["reason"] == "host-qmp-quit"
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_hugetlb_config_boots():
    """configs/hugetlb.xml boots on hugetlb pages and powers off; as root with
    too few free huge pages, --reserve-hugepages (as the file says)."""
    cmd = [MDVM, "run", "--config", os.path.join(ROOT, "configs", "hugetlb.xml")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if r.returncode != 0 and "hugepages could be reserved" in r.stderr and os.geteuid() == 0:
        r = subprocess.run(cmd + ["--reserve-hugepages"], capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL)
    if r.returncode != 0 and "hugepages could be reserved" in r.stderr:
        pytest.skip("no 128 huge pages for configs/hugetlb.xml: " + r.stderr.strip())
    assert r.returncode == 0, r.stderr
    assert "mdvm: backing: hugetlb" in r.stderr, r.stderr
    assert "ready ram=256M cpus=2" in r.stdout and "verify: ok pages=256" in r.stdout, r.stdout
    assert "poweroff: ok" in r.stdout
