"""Boot the test guest on real KVM and check what it prints and how mdvm exits."""
import os
import subprocess

from mdvmtest import BANNER, GUEST, MDVM, ROOT, run_mdvm


def test_banner_and_poweroff(tmp_path):
    con = tmp_path / "con"
    r = run_mdvm("run", "--kernel", GUEST, "--memory", "32M", "--console", "file:%s" % con,
                 "--cmdline", "echo hello-there; poweroff")
    text = con.read_text()
    assert r.returncode == 0, r.stderr
    assert BANNER in text
    assert "ram=32M" in text
    assert "hello-there" in text
    assert "poweroff" in text


def test_console_on_stdout():
    r = run_mdvm("run", "--kernel", GUEST, "--memory", "32M", "--cmdline", "echo on-stdout; poweroff")
    assert r.returncode == 0, r.stderr
    assert BANNER in r.stdout and "on-stdout" in r.stdout


def test_console_none():
    r = run_mdvm("run", "--kernel", GUEST, "--memory", "32M", "--console", "none",
                 "--cmdline", "poweroff")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""


def test_exit_code_from_debug_exit_port():
    r = run_mdvm("run", "--kernel", GUEST, "--memory", "32M", "--console", "none",
                 "--cmdline", "exit code=42")
    assert r.returncode == 42, r.stderr


def test_guest_exception_is_reported_and_fails():
    r = run_mdvm("run", "--kernel", GUEST, "--memory", "32M", "--cmdline", "fault")
    assert r.returncode != 0
    assert "exception" in r.stdout.lower() and "#UD" in r.stdout, r.stdout


def test_fill_verify_on_boot_cmdline():
    r = run_mdvm("run", "--kernel", GUEST, "--memory", "64M", "--cmdline",
                 "fill size=2M gen=7; verify size=2M gen=7; poweroff")
    assert r.returncode == 0, r.stderr
    assert "verify: ok pages=512" in r.stdout, r.stdout


def test_cpus_visible(vm_factory):
    vm = vm_factory(cpus=3).start()
    cpus = vm.qmp.cmd("query-cpus-fast")
    assert [c["cpu-index"] for c in cpus] == [0, 1, 2]
    tids = {c["thread-id"] for c in cpus}
    assert len(tids) == 3 and os.getpid() not in tids
    assert "cpus=3" in vm.wait_console(" testdev=")   # the banner is written byte by byte


def test_default_config_boots():
    """What `make run` runs: configs/default.xml boots, runs its demo and powers off."""
    r = subprocess.run([MDVM, "run", "--config", os.path.join(ROOT, "configs", "default.xml")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert BANNER in r.stdout and "verify: ok" in r.stdout


def test_no_kvm_device_is_a_clear_error(tmp_path):
    # Hide /dev/kvm in a private mount namespace.
    r = subprocess.run(["unshare", "-m", "sh", "-c",
                        "mount -t tmpfs none /dev && exec %s run --kernel %s --memory 32M" % (MDVM, GUEST)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "cannot open /dev/kvm: no such device" in r.stderr


def test_no_kvm_permission_is_a_clear_error():
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        MDVM, "run", "--kernel", GUEST, "--memory", "32M", "--console", "none"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "cannot open /dev/kvm: permission denied" in r.stderr, r.stderr


def test_not_an_elf_kernel(tmp_path):
    k = tmp_path / "k"
    k.write_bytes(b"this is not an ELF file at all" * 10)
    r = run_mdvm("run", "--kernel", str(k), "--memory", "32M")
    assert r.returncode == 1
    assert "not an ELF file" in r.stderr


def test_elf_without_pvh_note(tmp_path):
    r = run_mdvm("run", "--kernel", "/bin/true", "--memory", "32M")
    assert r.returncode == 1
    assert "PVH" in r.stderr or "not in guest RAM" in r.stderr, r.stderr
