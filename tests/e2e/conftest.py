"""pytest setup for the end-to-end tests of the `xfrm` command (offline stack, pcap mode).

scapy is the independent ESP peer. The suite fails (never skips) when the xfrm binary (env XFRM_TOOL, default
.build/debug/xfrm) or scapy is missing; scripts/test.sh builds and installs both.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_configure(config):
    os.environ.setdefault("XFRM_TOOL", str(REPO / ".build" / "debug" / "xfrm"))
    tool = os.environ["XFRM_TOOL"]
    if not (os.path.isfile(tool) and os.access(tool, os.X_OK)):
        raise pytest.UsageError(f"e2e tests cannot run: xfrm not found at {tool!r}; run `swift build`")
    try:
        from scapy.config import conf
        import scapy.layers.ipsec  # noqa: F401
    except ImportError as e:
        raise pytest.UsageError(f"e2e tests cannot run: {e}; pip install scapy cryptography")
    if not conf.crypto_valid:
        raise pytest.UsageError("e2e tests cannot run: scapy cannot use the cryptography package")


@pytest.fixture
def xfrm(tmp_path):
    """Runs the xfrm command; returns (exit status, stdout, stderr)."""

    def run(*args, check=True):
        # The suite drives the offline stack (its batches use the simulated network and clock); pcap and demo are
        # offline anyway; -S / --kernel pick another stack explicitly.
        if not {"pcap", "demo", "-S", "--kernel", "--offline"} & set(args):
            args = ("--offline", *args)
        p = subprocess.run([os.environ["XFRM_TOOL"], *args], capture_output=True, text=True, cwd=tmp_path,
                           timeout=120)
        if check and p.returncode != 0:
            raise AssertionError(f"xfrm {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p.returncode, p.stdout, p.stderr

    return run


@pytest.fixture
def pair(tmp_path):
    """Two xfrmd daemons in two namespaces joined by a veth (daemonlib.Pair), torn down afterwards."""
    from daemonlib import Pair

    p = Pair(tmp_path)
    yield p
    p.close()


# xfrmd in a network namespace of its own (test_daemon.py, test_bridge.py): the daemon creates its TUN device (xfrm0)
# there, never on the host.

def xfrmd_path() -> str:
    return str(Path(os.environ["XFRM_TOOL"]).with_name("xfrmd"))


@pytest.fixture
def netns():
    name = f"xfrmd-{os.getpid()}-{time.monotonic_ns() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def daemon(tmp_path, netns):
    # In a namespace of its own: the daemon creates its TUN device (xfrm0) there, never on the host.
    with running_daemon(netns, tmp_path / "xfrmd.sock") as d:
        yield d


@contextlib.contextmanager
def running_daemon(netns, sock, *args):
    """An xfrmd in `netns` with its control socket at `sock` (and `args`); yields (sock, process), stops it after."""
    p = subprocess.Popen(["ip", "netns", "exec", netns, xfrmd_path(), "--socket", str(sock), "--log-level", "debug",
                          *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 10
        while not sock.exists():
            assert p.poll() is None, p.stderr.read()
            assert time.time() < deadline, "xfrmd did not create its socket"
            time.sleep(0.05)
        yield sock, p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
