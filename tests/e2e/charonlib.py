"""strongSwan's charon in a network namespace, for the suites that run it (test_strongswan_live.py: charon with
kernel-libipsec as xfrmd's IKE peer; test_bridge_strongswan.py: charon programming xfrmd through xfrm-bridge).
Recipe and facts: ../shared/interop/README.md §4."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

CHARON = "/usr/lib/ipsec/charon"
PLUGINS = Path("/usr/lib/ipsec/plugins")
PSK = "swift-xfrm-live-interop-psk-0123456789"
# What every charon here loads, in this order; a kernel interface plugin given goes between them (kernel-libipsec
# must come before kernel-netlink to take the IPsec part).
BASE_PLUGINS = "random nonce openssl aes sha1 sha2 hmac gcm chapoly kdf pem pkcs1 x509 pubkey gmp curve25519"
TAIL_PLUGINS = "kernel-netlink socket-default vici updown"


def run(*argv, check=True, timeout=60, **kw):
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=check, **kw)


def require_tools(plugins=("kernel-libipsec",)):
    """The suites never skip: a missing strongSwan piece is a failure that names the package to install."""
    missing = [t for t in ("swanctl", "tcpdump", "busybox", "python3") if shutil.which(t) is None]
    missing += [p for p in (CHARON,) if not os.access(p, os.X_OK)]
    packages = {"kernel-libipsec": "libcharon-extra-plugins", "chapoly": "libstrongswan-extra-plugins",
                "gcm": "libstrongswan-standard-plugins", "openssl": "libstrongswan-standard-plugins",
                "vici": "strongswan-charon", "curve25519": "libstrongswan-standard-plugins",
                "kernel-netlink": "strongswan-charon"}
    for plugin in [*plugins, "chapoly", "gcm", "openssl", "vici", "curve25519", "kernel-netlink"]:
        if not (PLUGINS / f"libstrongswan-{plugin}.so").exists():
            missing.append(f"{PLUGINS}/libstrongswan-{plugin}.so ({packages[plugin]})")
    if missing:
        pytest.fail("strongSwan cannot run, missing: " + ", ".join(missing) +
                    " (apt-get install strongswan-charon strongswan-swanctl libcharon-extra-plugins "
                    "libstrongswan-standard-plugins libstrongswan-extra-plugins tcpdump busybox; scripts/test.sh "
                    "installs them)", pytrace=False)


def parse_swanctl_raw(text: str) -> dict:
    """`swanctl --list-sas --raw` of a single IKE_SA → {"ike": {...}, "children": [{...}, ...], "child": {...}}: the
    key=value pairs of each level (lists such as local-ts are kept as their bracketed text). Right after a rekey
    charon lists the old CHILD_SA too (DELETED, its inbound SA kept for `delete_rekeyed_delay`), so "child" is the
    INSTALLED one when there is one, else the first listed."""
    body = text.split("list-sa event", 1)[1] if "list-sa event" in text else ""
    ike_part, _, child_part = body.partition("child-sas {")
    pairs = lambda s: dict(re.findall(r"([\w-]+)=(\[[^\]]*\]|[^\s{}]+)", s))
    children = [pairs(block) for _, block in re.findall(r"([\w.-]+)\s*\{([^{}]*)\}", child_part)]
    installed = [c for c in children if c.get("state") == "INSTALLED"]
    child = installed[0] if installed else (children[0] if children else {})
    return {"ike": pairs(ike_part), "children": children, "child": child}


class Charon:
    """One charon in namespace `ns`, its files in `d` (strongswan.conf, swanctl.conf, charon.log, charon.vici),
    one connection `peer` with one CHILD_SA `net` authenticated by PSK. `wrapper` runs before charon (xfrm-bridge)."""

    def __init__(self, ns: str, d: Path, side: str, local: str, remote: str, local_ts: str, remote_ts: str,
                 esp_proposal: str, plugins: str, settings=(), wrapper=(), log_levels=("chd = 4", "esp = 2"),
                 child_settings=(), conn_settings=()):
        self.ns, self.dir, self.side = ns, d, side
        d.mkdir(parents=True, exist_ok=True)
        # strongSwan's parser wants one setting a line.
        (d / "strongswan.conf").write_text("\n".join([
            "charon {", *settings, f"load = {BASE_PLUGINS} {plugins} {TAIL_PLUGINS}",
            "plugins {", "vici {", f"socket = {self.vici}", "}", "}",
            "filelog {", "main {", f"path = {d / 'charon.log'}", "flush_line = yes", "default = 1", *log_levels,
            "}", "}",
            "}", ""]))
        (d / "swanctl.conf").write_text("\n".join([
            "connections {", "peer {", "version = 2", "mobike = no",
            f"local_addrs = {local}", f"remote_addrs = {remote}",
            "proposals = aes128-sha256-modp2048", *conn_settings,
            "local {", "auth = psk", f"id = {side}.example", "}", "remote {", "auth = psk", "}",
            "children {", "net {", f"local_ts = {local_ts}", f"remote_ts = {remote_ts}",
            f"esp_proposals = {esp_proposal}", *child_settings, "}", "}",
            "}", "}",
            "secrets {", "ike-peer {", f'secret = "{PSK}"', "}", "}", ""]))
        # `ip netns exec` gives the command its own mount namespace: a private /run holds charon's pid file, so
        # charons of parallel tests never meet. The vici socket lives in our directory, reachable from here.
        # exec all the way down: the Popen's pid is charon's.
        prefix = " ".join(wrapper)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "sh", "-c",
             f"mount -t tmpfs tmpfs /run && STRONGSWAN_CONF={d / 'strongswan.conf'} exec {prefix} {CHARON}"],
            stdout=open(d / "charon.out", "w"), stderr=subprocess.STDOUT)

    @property
    def vici(self) -> str:
        return f"unix://{self.dir / 'charon.vici'}"

    def log(self) -> str:
        p = self.dir / "charon.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def load(self, diag=lambda: ""):
        """Waits for the vici socket, then loads the connection and the secret."""
        deadline = time.time() + 15
        while run("swanctl", "--stats", "--uri", self.vici, check=False).returncode != 0:
            assert self.proc.poll() is None, \
                f"charon {self.side} exited: {(self.dir / 'charon.out').read_text()}\n{diag()}"
            assert time.time() < deadline, f"charon {self.side}'s vici socket never answered\n{diag()}"
            time.sleep(0.1)
        self.swanctl("--load-all", "--file", str(self.dir / "swanctl.conf"), diag=diag)

    def swanctl(self, *args, timeout=30, diag=lambda: ""):
        r = run("swanctl", *args, "--uri", self.vici, check=False, timeout=timeout)
        assert r.returncode == 0, (f"swanctl {' '.join(args)} on {self.side} failed", r.stdout, r.stderr, diag())
        return r.stdout

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()  # nothing to say goodbye to: the namespaces go next
        self.proc.wait(timeout=10)
