import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import mdvmtest  # noqa: E402


def pytest_sessionstart(session):
    # A missing or unusable /dev/kvm is a failure of the environment, never a pass.
    if not os.path.exists("/dev/kvm"):
        pytest.exit("environment failure: /dev/kvm does not exist (KVM tests cannot run)", returncode=3)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.exit("environment failure: no permission to open /dev/kvm (run as root)", returncode=3)
    for f in (mdvmtest.MDVM, mdvmtest.GUEST):
        if not os.path.exists(f):
            pytest.exit("build first: %s is missing (make all)" % f, returncode=3)


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
