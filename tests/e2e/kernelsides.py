"""What the comparisons with this machine's kernel share (test_kernel_acquire.py, test_kernel_allocspi.py): a network
namespace for the kernel's side and one with an xfrmd for ours, commands run with their output, monitors stopped,
and listings made comparable."""

import contextlib
import datetime
import os
import re
import signal
import subprocess
import uuid

from conftest import running_daemon


def run(*argv, check=True):
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def time_blind(text, within=300):
    """A listing with each add time replaced by TIME, after checking that it is a real time within `within`
    seconds of now (the two sides add within a few seconds of each other, but possibly across a minute's edge)."""
    now = datetime.datetime.now()

    def blind(m):
        added = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")
        assert abs((now - added).total_seconds()) <= within, f"add time {m.group(1)} is not about now ({now:%T})"
        return "add TIME"

    return re.sub(r"add (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", blind, text)


def stop(monitor):
    """Stops a monitor process; returns what it printed."""
    monitor.send_signal(signal.SIGTERM)
    out, _ = monitor.communicate(timeout=10)
    return out


@contextlib.contextmanager
def kernel_and_xfrmd(tmp_path, prefix):
    """Two namespaces, the kernel's and one with an xfrmd; yields (kernel namespace, xfrmd's namespace, its control
    socket), deletes both afterwards."""
    kernel, ours = (f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}{s}" for s in "ko")
    for ns in (kernel, ours):
        run("ip", "netns", "add", ns)
    try:
        with running_daemon(ours, tmp_path / "xfrmd.sock") as (sock, _):
            yield kernel, ours, sock
    finally:
        for ns in (kernel, ours):
            run("ip", "netns", "del", ns, check=False)
