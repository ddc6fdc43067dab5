"""pytest setup for the comparison of swift-xfrm's `xfrm` with the real Linux kernel (+ iproute2) in qemu.

Needs qemu-system-x86_64, a Debian 6.12 kernel image in /boot with its modules, busybox (dynamic), iproute2,
tcpdump, kmod, gcc with a static libc, and the xfrm binary (env XFRM_TOOL, default .build/debug/xfrm);
scripts/test.sh installs them. A missing piece fails the run (never a skip).
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import kvm  # noqa: E402
import shared  # noqa: E402


def pytest_configure(config):
    os.environ.setdefault("XFRM_TOOL", str(REPO / ".build" / "debug" / "xfrm"))
    tool = os.environ["XFRM_TOOL"]
    if not (os.path.isfile(tool) and os.access(tool, os.X_OK)):
        raise pytest.UsageError(f"kernel tests cannot run: xfrm not found at {tool!r}; run `swift build`")
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist): one token for this run
        os.environ.setdefault("KERNEL_VM_RUN", uuid.uuid4().hex)
    try:
        kvm.ensure_initramfs()
    except kvm.KernelVMError as e:
        raise pytest.UsageError(f"kernel tests cannot run: {e}")


def pytest_collection_finish(session):
    """Starts the VM boots the collected tests need (each test module registers one group named in GROUP)."""
    # The longest boots first (a module's GROUP_PRIORITY, default 0), so that with two workers the longest one
    # runs beside the others in turn rather than after one of them.
    prio = {getattr(item.module, "GROUP", None): getattr(item.module, "GROUP_PRIORITY", 0) for item in session.items}
    prio.pop(None, None)
    groups = sorted(prio, key=lambda g: (-prio[g], g))
    wi = getattr(session.config, "workerinput", None)
    if wi is None and getattr(session.config.option, "numprocesses", None):
        return  # the xdist controller collects too, but runs nothing
    index = int(wi["workerid"].lstrip("gw")) if wi else 0
    shared.prefetch(index, groups)


@pytest.fixture
def xfrm(tmp_path):
    """Runs the xfrm command in tmp_path; returns (exit status, stdout, stderr)."""
    import subprocess

    def run(*args, check=True):
        p = subprocess.run([os.environ["XFRM_TOOL"], *args], capture_output=True, text=True, cwd=tmp_path,
                           timeout=120)
        if check and p.returncode != 0:
            raise AssertionError(f"xfrm {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p.returncode, p.stdout, p.stderr

    return run
