"""KVM ioctl failures: each gives exit status 1 and its own one-line reason.
The failure is injected with an LD_PRELOAD shim (kvm_fail_shim.c) that makes
one chosen ioctl fail with a chosen errno; everything else is real KVM."""
import errno
import os
import subprocess

import pytest

from mdvmtest import GUEST, MDVM

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def shim(kvm_fail_shim):
    return kvm_fail_shim


def run_failing(shim, ioctl, err, *extra, skip=0):
    env = dict(os.environ, LD_PRELOAD=shim, MDVM_FAIL_IOCTL=ioctl, MDVM_FAIL_ERRNO=str(err),
               MDVM_FAIL_SKIP=str(skip))
    return subprocess.run([MDVM, "run", "--kernel", GUEST, "--memory", "32M", "--console", "none",
                           "--cmdline", "poweroff", *extra],
                          env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


# (ioctl, errno, extra args, calls that succeed first, the one line on stderr)
CASES = [
    ("KVM_GET_API_VERSION", errno.EIO, (), 0, "KVM_GET_API_VERSION failed: Input/output error"),
    ("KVM_CREATE_VM", errno.ENOMEM, (), 0, "KVM_CREATE_VM failed: Cannot allocate memory"),
    ("KVM_GET_VCPU_MMAP_SIZE", errno.EINVAL, (), 0, "KVM_GET_VCPU_MMAP_SIZE failed: Invalid argument"),
    ("KVM_CREATE_IRQCHIP", errno.EEXIST, (), 0, "KVM_CREATE_IRQCHIP failed: File exists"),
    ("KVM_CREATE_PIT2", errno.ENOMEM, (), 0, "KVM_CREATE_PIT2 failed: Cannot allocate memory"),
    ("KVM_SET_USER_MEMORY_REGION", errno.EEXIST, (), 0,
     "registering guest RAM slot 0: File exists"),
    ("KVM_CREATE_VCPU", errno.EINVAL, (), 0, "KVM_CREATE_VCPU 0 failed: Invalid argument"),
    # A later vCPU: the ones already created are torn down cleanly.
    ("KVM_CREATE_VCPU", errno.ENOSPC, ("--cpus", "3"), 2,
     "KVM_CREATE_VCPU 2 failed: No space left on device"),
    ("KVM_SET_CPUID2", errno.E2BIG, (), 0, "KVM_SET_CPUID2 failed: Argument list too long"),
    ("KVM_SET_SREGS", errno.EINVAL, (), 0, "KVM_SET_SREGS failed: Invalid argument"),
    ("KVM_SET_REGS", errno.EFAULT, (), 0, "KVM_SET_REGS failed: Bad address"),
]


@pytest.mark.parametrize("ioctl,err,extra,skip,msg", CASES,
                         ids=["%s-%d" % (c[0], c[3]) for c in CASES])
def test_kvm_ioctl_failure_is_one_line(shim, ioctl, err, extra, skip, msg):
    r = run_failing(shim, ioctl, err, *extra, skip=skip)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr == "mdvm: %s\n" % msg, r.stderr
    assert r.stdout == ""


def test_kvm_run_failure(shim):
    """KVM_RUN failing while the guest runs: exit 1, the reason and the vCPU
    state (several lines: this is a running VM, its setup lines came first)."""
    r = run_failing(shim, "KVM_RUN", errno.EFAULT)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "mdvm: vcpu 0: KVM_RUN failed: Bad address\n" in r.stderr, r.stderr
    assert r.stderr.endswith("mdvm: KVM_RUN failed (exit status 1)\n"), r.stderr


def test_shim_is_inert_without_selection(shim):
    """The shim itself does not disturb a normal run."""
    env = dict(os.environ, LD_PRELOAD=shim)
    env.pop("MDVM_FAIL_IOCTL", None)
    r = subprocess.run([MDVM, "run", "--kernel", GUEST, "--memory", "32M", "--console", "none",
                        "--cmdline", "poweroff"], env=env, capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr


def test_session_check_reports_unusable_kvm(shim):
    """conftest's start-of-session check: a /dev/kvm on which no VM can be
    created stops the whole run as an environment failure, with the reason."""
    env = dict(os.environ, LD_PRELOAD=shim, MDVM_FAIL_IOCTL="KVM_CREATE_VM",
               MDVM_FAIL_ERRNO=str(errno.EPERM))
    r = subprocess.run(["/usr/bin/python3", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        os.path.join(HERE, "test_boot.py"), "-k", "test_console_none"],
                       env=env, capture_output=True, text=True, timeout=120, cwd=HERE)
    assert r.returncode == 3, r.stdout + r.stderr
    assert ("environment failure: /dev/kvm is present but unusable: "
            "KVM_CREATE_VM failed: Operation not permitted") in r.stdout + r.stderr
