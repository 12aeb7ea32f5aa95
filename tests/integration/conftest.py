import fcntl
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import mdvmtest  # noqa: E402


KVM_GET_API_VERSION = 0xAE00   # _IO(KVMIO, 0x00)
KVM_CREATE_VM = 0xAE01         # _IO(KVMIO, 0x01)


def kvm_unusable():
    """Create (and drop) one VM, as mdvm would; None if that works, else why not."""
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return "open: %s" % e.strerror
    step = "KVM_GET_API_VERSION"
    try:
        v = fcntl.ioctl(kvm, KVM_GET_API_VERSION, 0)
        if v != 12:
            return "KVM_GET_API_VERSION is %d, not 12" % v
        step = "KVM_CREATE_VM"
        os.close(fcntl.ioctl(kvm, KVM_CREATE_VM, 0))
    except OSError as e:
        return "%s failed: %s" % (step, e.strerror)
    finally:
        os.close(kvm)
    return None


def pytest_sessionstart(session):
    # A missing or unusable /dev/kvm is a failure of the environment, never a pass.
    if not os.path.exists("/dev/kvm"):
        pytest.exit("environment failure: /dev/kvm does not exist (KVM tests cannot run)", returncode=3)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.exit("environment failure: no permission to open /dev/kvm (run as root)", returncode=3)
    why = kvm_unusable()
    if why:
        pytest.exit("environment failure: /dev/kvm is present but unusable: %s" % why, returncode=3)
    for f in (mdvmtest.MDVM, mdvmtest.GUEST):
        if not os.path.exists(f):
            pytest.exit("build first: %s is missing (make all)" % f, returncode=3)


@pytest.fixture(scope="session")
def kvm_fail_shim(tmp_path_factory):
    """kvm_fail_shim.c built as an LD_PRELOAD library: MDVM_FAIL_IOCTL=NAME
    makes that KVM ioctl fail (see the file)."""
    so = str(tmp_path_factory.mktemp("shim") / "kvm_fail_shim.so")
    r = subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", so,
                        os.path.join(os.path.dirname(__file__), "kvm_fail_shim.c"), "-ldl"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return so


@pytest.fixture
def vm_factory(tmp_path):
    vms = []

    def make(**kw):
        vm = mdvmtest.VM(tmp_path, name="vm%d" % len(vms), **kw)
        vms.append(vm)
        return vm

    yield make
    for vm in vms:
        vm.stop()


@pytest.fixture
def vm(vm_factory):
    """A running idle test guest with a negotiated QMP connection."""
    return vm_factory(cmdline="idle").start()
