"""Boot the test guest on real KVM and check what it prints and how mdvm exits."""
import os
import subprocess

from mdvmtest import BANNER, GUEST, MDVM, ROOT, run_mdvm


def vmm_error(r, msg):
    """A VMM error (docs/architecture.md): exit status exactly 1 and one line
    on stderr, `mdvm: ` and the reason, which contains `msg`."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.startswith("mdvm: ") and r.stderr.count("\n") == 1 and r.stderr.endswith("\n"), \
        "not one line:\n" + r.stderr
    assert msg in r.stderr, r.stderr


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
    assert r.returncode == 3, r.stderr   # the guest's exception handler exits with 3
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
    vmm_error(r, "cannot open /dev/kvm: no such device")


def test_no_kvm_permission_is_a_clear_error():
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        MDVM, "run", "--kernel", GUEST, "--memory", "32M", "--console", "none"],
                       capture_output=True, text=True, timeout=30)
    vmm_error(r, "cannot open /dev/kvm: permission denied")


def test_not_an_elf_kernel(tmp_path):
    k = tmp_path / "k"
    k.write_bytes(b"this is not an ELF file at all" * 10)
    r = run_mdvm("run", "--kernel", str(k), "--memory", "32M")
    vmm_error(r, "not an ELF file")


def test_elf_without_pvh_note(tmp_path):
    r = run_mdvm("run", "--kernel", "/bin/true", "--memory", "32M")
    vmm_error(r, "kernel '/bin/true': no PVH entry point (ELF note XEN_ELFNOTE_PHYS32_ENTRY)")


def test_control_socket_cannot_be_created(tmp_path):
    r = run_mdvm("run", "--kernel", GUEST, "--memory", "32M", "--console", "none",
                 "--control", str(tmp_path / "no-such-dir" / "vm.sock"))
    vmm_error(r, "cannot bind %s: No such file or directory" % (tmp_path / "no-such-dir" / "vm.sock"))


def test_setup_lines_printed_once_the_vm_runs(tmp_path):
    """The informational setup lines (backing, machine checks) are held back
    only until the VM runs: a good start still prints them."""
    r = run_mdvm("run", "--kernel", GUEST, "--memory", "32M", "--console", "none",
                 "--cmdline", "poweroff")
    assert r.returncode == 0, r.stderr
    assert "mdvm: backing: " in r.stderr, r.stderr
