"""pytest setup for the interop suite.

The suite refuses to run (rather than skipping tests) when a piece it needs is
missing: the esp-tool binary (env ESP_TOOL, default .build/debug/esp-tool),
scapy with cryptography, or tshark.  scripts/test.sh installs all of them.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[2]


def _fail(msg: str):
    raise pytest.UsageError("interop tests cannot run: " + msg)


def pytest_configure(config):
    if "ESP_TOOL" not in os.environ:
        os.environ["ESP_TOOL"] = str(REPO / ".build" / "debug" / "esp-tool")
    tool = os.environ["ESP_TOOL"]
    if not (os.path.isfile(tool) and os.access(tool, os.X_OK)):
        _fail(f"esp-tool not found or not executable at {tool!r}; build it with `swift build` "
              "or point ESP_TOOL at the binary (scripts/test.sh does both)")
    try:
        import cryptography  # noqa: F401
        import scapy  # noqa: F401
        from scapy.config import conf
        from scapy.layers.ipsec import CRYPT_ALGOS  # noqa: F401
    except ImportError as e:
        _fail(f"{e}; run `pip install scapy cryptography` (scripts/test.sh does)")
    if not conf.crypto_valid:
        _fail("scapy cannot use the cryptography package (conf.crypto_valid is False)")
    if shutil.which("tshark") is None:
        _fail("tshark is not installed; run `apt-get install -y tshark` (scripts/test.sh does)")
    try:
        subprocess.run(["tshark", "--version"], capture_output=True, check=True, timeout=60)
    except (subprocess.SubprocessError, OSError) as e:
        _fail(f"tshark does not run: {e}")


@pytest.fixture
def work(tmp_path):
    """A per-test scratch directory for SA files and pcaps."""
    return tmp_path
