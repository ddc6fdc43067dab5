"""The real Linux kernel as a live ESP peer of xfrmd (issue 8: live interop with the kernel itself).

One boot, one host network namespace:

    host netns NS                                         guest (Debian 6.12 under qemu/TCG)
    xfrmd: TUN xfrm0 10.0.1.1/32, route 10.0.2.0/24       lo 10.0.2.1/32, route 10.0.1.0/24 via 192.0.2.1
    tapk 192.0.2.1/24  <---- qemu TAP / virtio-net ---->  eth0 192.0.2.2/24

For each CASE, sequentially: both sides flush their SAs and policies and get the mirror pair (tunnel mode, SPI
0x1000+k from 192.0.2.1 to .2, 0x2000+k back; the daemon through `xfrm -S`, the kernel through `ip xfrm`), then
the guest pings 10.0.1.1 from 10.0.2.1, the host pings 10.0.2.1 from 10.0.1.1, and a TCP transfer goes each way
with its SHA-256 checked on the receiver (python on the host, busybox nc + sha256sum in the guest); last, the
guest's `ip -s xfrm state` and /proc/net/xfrm_stat and the daemon's `xfrm -s state list` are taken. NAT-T cases
add `encap espinudp 4500 4500 0.0.0.0` on both sides; the guest holds a UDP_ENCAP socket on 4500 (pcapinject -l)
so its kernel decapsulates, the daemon has its own UDP port. IPv6 cases carry the same IPv4 traffic in raw ESP between
2001:db8::1 (tapk) and 2001:db8::2 (eth0). tcpdump on tapk records the whole session.

The session runs once per pytest run (shared.register_session: one pytest-xdist worker boots it, in the
background from collection on, the others read its JSON result); each case is its own test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

import kvm
import shared
from listings import state_blocks
from livevm import LiveVM

HOST, GUEST = "192.0.2.1", "192.0.2.2"
HOST6, GUEST6 = "2001:db8::1", "2001:db8::2"  # the outer addresses of the IPv6 cases
HOST_IN, GUEST_IN = "10.0.1.1", "10.0.2.1"
HOST_NET, GUEST_NET = "10.0.1.0/24", "10.0.2.0/24"
TCP_BYTES = 512 * 1024
PINGS = 3


def key(label: str, n: int) -> str:
    return "0x" + (hashlib.sha256(label.encode()).digest() * 3)[:n].hex()


ALGOS = {
    "gcm128": lambda l: f"aead rfc4106(gcm(aes)) {key(l, 20)} 128",
    "gcm256": lambda l: f"aead rfc4106(gcm(aes)) {key(l, 36)} 128",
    "chacha": lambda l: f"aead rfc7539esp(chacha20,poly1305) {key(l, 36)} 128",
    "cbc-sha256": lambda l: f"enc cbc(aes) {key(l + 'e', 16)} auth-trunc hmac(sha256) {key(l + 'a', 32)} 128",
}


@dataclass(frozen=True)
class Case:
    k: int
    algo: str
    natt: bool
    esn: bool = False
    outer6: bool = False  # raw ESP over IPv6 between the outer addresses HOST6 and GUEST6 (inner IPv4 as ever)
    tfcpad: int = 0  # both SAs on both sides pad inner packets to this (RFC 4303 §2.4 TFC padding)

    @property
    def id(self) -> str:
        return f"{self.algo}-{'nat-t' if self.natt else 'raw-esp'}{'-esn' if self.esn else ''}" \
            f"{'-ipv6' if self.outer6 else ''}{f'-tfcpad{self.tfcpad}' if self.tfcpad else ''}"

    @property
    def ends(self) -> tuple[str, str]:
        """The host's and the guest's outer addresses."""
        return (HOST6, GUEST6) if self.outer6 else (HOST, GUEST)

    @property
    def spi_out(self) -> int:  # host -> guest
        return 0x1000 + self.k

    @property
    def spi_in(self) -> int:  # guest -> host
        return 0x2000 + self.k

    def state_lines(self) -> list[str]:
        extra = " flag esn replay-window 128" if self.esn else " replay-window 32"
        if self.natt:
            extra += " encap espinudp 4500 4500 0.0.0.0"
        if self.outer6:  # an SA's selector defaults to its outer family: the IPv4 inner traffic is named
            extra += " sel src 0.0.0.0/0 dst 0.0.0.0/0"
        if self.tfcpad:
            extra += f" tfcpad {self.tfcpad}"
        h, g = self.ends
        return [f"state add src {h} dst {g} proto esp spi 0x{self.spi_out:x} reqid {self.k} mode tunnel "
                f"{ALGOS[self.algo](f'{self.id}/out')}{extra}",
                f"state add src {g} dst {h} proto esp spi 0x{self.spi_in:x} reqid {100 + self.k} "
                f"mode tunnel {ALGOS[self.algo](f'{self.id}/in')}{extra}"]

    def host_policies(self) -> list[str]:
        h, g = self.ends
        return [f"policy add src {HOST_NET} dst {GUEST_NET} dir out "
                f"tmpl src {h} dst {g} proto esp reqid {self.k} mode tunnel",
                f"policy add src {GUEST_NET} dst {HOST_NET} dir in "
                f"tmpl src {g} dst {h} proto esp reqid {100 + self.k} mode tunnel"]

    def guest_policies(self) -> list[str]:
        h, g = self.ends
        return [f"policy add src {GUEST_NET} dst {HOST_NET} dir out "
                f"tmpl src {g} dst {h} proto esp reqid {100 + self.k} mode tunnel",
                f"policy add src {HOST_NET} dst {GUEST_NET} dir in "
                f"tmpl src {h} dst {g} proto esp reqid {self.k} mode tunnel"]


CASES = [Case(k + 1, algo, natt) for k, (natt, algo) in
         enumerate((n, a) for n in (False, True) for a in ("gcm128", "gcm256", "chacha", "cbc-sha256"))]
CASES += [Case(9, "gcm128", False, esn=True), Case(10, "cbc-sha256", True, esn=True)]
# Over IPv6 (the kernel decapsulates ESP in UDP over IPv6 only on an IPv6 UDP_ENCAP socket, which the guest lacks):
# xfrmd's raw IPv6 ESP socket, whose payloads the host's kernel frames.
CASES += [Case(11, "gcm128", False, outer6=True), Case(12, "chacha", False, esn=True, outer6=True)]
# TFC padding both ways (the kernel pads in esp_output, which NAT-T SAs take: with esp4_offload loaded a raw-ESP SA
# goes through esp_xmit, which does not pad): every ESP packet, ACKs included, at least tfcpad long on the wire
CASES += [Case(13, "gcm128", True, tfcpad=1000)]

# Everything on tapk but the links' housekeeping (ARP, IPv6 neighbour discovery, router solicitations, MLD).
WIRE_FILTER = ("not arp and not (ip6 and (src net fe80::/10 or src host :: or dst net ff00::/8 or "
               "(icmp6 and (ip6[40] == 135 or ip6[40] == 136))))")

HOST_SERVER = """
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1); s.settimeout(30)
print("listening", flush=True)
c, peer = s.accept(); c.settimeout(30); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(65536)
    if not b: break
    h.update(b); n += len(b)
c.sendall(h.hexdigest().encode()); c.close()
print(n, h.hexdigest(), peer[0])
"""

HOST_CLIENT = """
import hashlib, os, socket, sys
data = os.urandom(int(sys.argv[1]))
c = socket.create_connection((sys.argv[3], 5002), timeout=20, source_address=(sys.argv[2], 0))
c.sendall(data); c.shutdown(socket.SHUT_WR)
while c.recv(1024): pass
print(hashlib.sha256(data).hexdigest())
"""


def run(*argv, check=True, timeout=60, **kw):
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=check, **kw)


class Session:
    """The host namespace, xfrmd, tcpdump and the VM; close() removes all of it."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.ns = f"xlk{uuid.uuid4().hex[:8]}"
        self.sock = work / "x.sock"
        self.tool = os.environ["XFRM_TOOL"]
        self.xfrmd_bin = str(Path(self.tool).with_name("xfrmd"))
        for t in (self.tool, self.xfrmd_bin):
            if not os.access(t, os.X_OK):
                raise kvm.KernelVMError(f"{t} is missing: swift build")
        kvm._which("tcpdump", "tcpdump")
        self.xfrmd: subprocess.Popen | None = None
        self.dump: subprocess.Popen | None = None
        self.vm: LiveVM | None = None
        self.daemon_log = ""
        run("ip", "netns", "add", self.ns)
        self.ip("link", "set", "lo", "up")

    def ip(self, *args, check=True):
        return run("ip", "-n", self.ns, *args, check=check)

    def exec(self, *argv, **kw):
        return run("ip", "netns", "exec", self.ns, *argv, **kw)

    def start(self) -> None:
        self.xfrmd = subprocess.Popen(["ip", "netns", "exec", self.ns, self.xfrmd_bin, "--socket", str(self.sock)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
        deadline = time.time() + 20
        while not self.sock.exists():
            if self.xfrmd.poll() is not None or time.time() > deadline:
                raise kvm.KernelVMError(f"xfrmd did not start: {self.xfrmd.communicate(timeout=5)}")
            time.sleep(0.05)
        self.ip("addr", "add", f"{HOST_IN}/32", "dev", "xfrm0")
        self.ip("link", "set", "xfrm0", "mtu", "1400")
        self.ip("link", "set", "xfrm0", "up")
        self.ip("route", "add", GUEST_NET, "dev", "xfrm0", "src", HOST_IN)
        self.vm = LiveVM(self.ns, self.work / "vm")
        self.ip("addr", "add", f"{HOST}/24", "dev", self.vm.tap)
        self.ip("addr", "add", f"{HOST6}/64", "dev", self.vm.tap, "nodad")
        self.ip("link", "set", self.vm.tap, "up")
        self.dump = subprocess.Popen(["ip", "netns", "exec", self.ns, "tcpdump", "-ni", self.vm.tap, "-U", "-w",
                                      str(self.work / "tap.pcap"), WIRE_FILTER], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        vm = self.vm
        vm.check("ip link set eth0 up && ip addr add 192.0.2.2/24 dev eth0 && ip addr add 10.0.2.1/32 dev lo"
                 f" && ip addr add {GUEST6}/64 dev eth0 nodad")
        vm.check(f"ip route add {HOST_NET} via {HOST} dev eth0 src {GUEST_IN}")
        out = vm.check("pcapinject -l 4500 >/tmp/encap.log 2>&1 & sleep 0.3; cat /tmp/encap.log")
        assert "UDP_ENCAP_ESPINUDP socket on port 4500" in out, out
        # tcpdump says "listening on" (stderr) once it captures.
        assert self.dump.stderr is not None
        ready, _, _ = select.select([self.dump.stderr], [], [], 15)
        line = self.dump.stderr.readline() if ready else b""
        if b"listening on" not in line:
            raise kvm.KernelVMError(f"tcpdump on {vm.tap} did not start: {line!r}")

    def xfrm(self, line: str) -> str:
        r = run(self.tool, "-S", str(self.sock), *line.split(), check=False)
        if r.returncode != 0:
            raise AssertionError(f"xfrm -S: `{line}` failed ({r.returncode}): {r.stderr}")
        return r.stdout

    def run_case(self, c: Case) -> dict:
        vm = self.vm
        assert vm is not None
        r: dict = {"case": asdict(c), "id": c.id}
        t0 = time.monotonic()
        self.xfrm("state flush")
        self.xfrm("policy flush")
        vm.check("ip xfrm state flush && ip xfrm policy flush")
        for line in c.state_lines() + c.host_policies():
            self.xfrm(line)
        vm.check(" && ".join("ip xfrm " + " ".join(map(shlex.quote, l.split()))
                             for l in c.state_lines() + c.guest_policies()))
        # Pings, both ways.
        rc, out = vm.sh(f"ping -c {PINGS} -i 0.3 -W 5 -I {GUEST_IN} {HOST_IN}", timeout=60)
        r["guest_ping"] = [rc, out]
        p = self.exec("busybox", "ping", "-c", str(PINGS), "-i", "0.3", "-W", "5", "-I", HOST_IN, GUEST_IN,
                      check=False)
        r["host_ping"] = [p.returncode, p.stdout + p.stderr]
        # TCP host -> guest: busybox nc listens in the guest, python sends from 10.0.1.1.
        vm.check("kill $(cat /tmp/nc.pid 2>/dev/null) 2>/dev/null; rm -f /tmp/rx; nc -l -p 5002 >/tmp/rx 2>/tmp/nc.err & echo $! >/tmp/nc.pid")
        time.sleep(0.3)
        p = self.exec(sys.executable, "-c", HOST_CLIENT, str(TCP_BYTES), HOST_IN, GUEST_IN, check=False,
                      timeout=90)
        r["h2g_sent"] = [p.returncode, p.stdout.strip(), p.stderr[-2000:]]
        rc, out = vm.sh("i=0; while kill -0 $(cat /tmp/nc.pid) 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; "
                        "i=$((i+1)); done; wc -c </tmp/rx; sha256sum /tmp/rx; cat /tmp/nc.err", timeout=60)
        r["h2g_received"] = [rc, out]
        # TCP guest -> host: python listens on 10.0.1.1, busybox nc sends from the guest (source 10.0.2.1 by route).
        server = subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-c", HOST_SERVER, HOST_IN],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        try:
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "listening", server.communicate(timeout=5)
            rc, out = vm.sh(f"head -c {TCP_BYTES} /dev/urandom >/tmp/tx && sha256sum /tmp/tx && "
                            f"nc -w 10 {HOST_IN} 5001 </tmp/tx; r=$?; echo; echo nc-rc=$r", timeout=120)
            r["g2h_sent"] = [rc, out]
            if "nc-rc=0" not in out.split():
                server.kill()
            sout, serr = server.communicate(timeout=60)
            r["g2h_received"] = [server.returncode, sout.strip(), serr[-2000:]]
        finally:
            if server.poll() is None:
                server.kill()
                server.communicate(timeout=10)
        # Counters on both sides.
        r["guest_states"] = vm.check("ip -s xfrm state")
        r["guest_xfrm_stat"] = vm.check("cat /proc/net/xfrm_stat")
        r["host_states"] = self.xfrm("-s state list")
        r["seconds"] = time.monotonic() - t0
        return r

    def close(self) -> None:
        if self.vm is not None:
            try:
                self.vm.close()
            except Exception:
                pass
        if self.dump is not None and self.dump.poll() is None:
            self.dump.send_signal(signal.SIGINT)
            try:
                self.dump.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.dump.kill()
                self.dump.communicate(timeout=10)
        if self.xfrmd is not None:
            if self.xfrmd.poll() is None:
                self.xfrmd.send_signal(signal.SIGTERM)
            try:
                _, self.daemon_log = self.xfrmd.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                self.xfrmd.kill()
                _, self.daemon_log = self.xfrmd.communicate(timeout=10)
        run("ip", "netns", "del", self.ns, check=False)


ADDRESS = r"(\d+\.\d+\.\d+\.\d+?|[0-9a-f:]+)"  # IPv4 or IPv6, before tcpdump's ".PORT"
WIRE_LINE = re.compile(rf" IP6? {ADDRESS}(\.4500)? > {ADDRESS}(\.4500)?: (UDP-encap: )?ESP\(spi=0x([0-9a-f]{{8}}),"
                       r"seq=0x[0-9a-f]+\), length (\d+)")


def wire_summary(lines: list[str]) -> dict:
    """tcpdump's listing of tapk, reduced: per SPI, how many packets went from where to where, raw or in UDP; the
    lines that were not ESP at all (the first 50)."""
    per_spi: dict[str, dict[str, int]] = {}
    shortest: dict[str, int] = {}  # per SPI, the shortest ESP packet (tcpdump's ESP length)
    stray = []
    for l in lines:
        m = WIRE_LINE.search(l)
        if not m or bool(m.group(2)) != bool(m.group(4)) or bool(m.group(2)) != bool(m.group(5)):
            stray.append(l)
            continue
        how = f"{m.group(1)} > {m.group(3)} {'udp' if m.group(5) else 'raw'}"
        d = per_spi.setdefault(m.group(6), {})
        d[how] = d.get(how, 0) + 1
        shortest[m.group(6)] = min(shortest.get(m.group(6), 1 << 20), int(m.group(7)))
    return {"lines": len(lines), "per_spi": per_spi, "shortest": shortest, "stray": stray[:50],
            "stray_count": len(stray)}


def live_session() -> dict:
    """Runs every case in one boot; never raises (failures go into the result)."""
    t0 = time.monotonic()
    result: dict = {"cases": {}, "setup_error": None, "wire": wire_summary([]), "daemon_log": "", "boot_seconds": None}
    kvm.WORK.mkdir(parents=True, exist_ok=True)
    for old in kvm.WORK.glob("live.*"):  # earlier sessions' work directories (kept when they failed)
        if old.is_dir() and old.stat().st_mtime < time.time() - 3600:
            shutil.rmtree(old, ignore_errors=True)
    work = Path(tempfile.mkdtemp(dir=kvm.WORK, prefix="live."))
    result["work"] = str(work)
    s = None
    try:
        s = Session(work)
        s.start()
        result["boot_seconds"] = s.vm.boot_seconds
        for c in CASES:
            try:
                result["cases"][c.id] = s.run_case(c)
            except Exception:
                result["cases"][c.id] = {"error": traceback.format_exc()}
    except Exception:
        result["setup_error"] = traceback.format_exc()
    finally:
        transcript = "\n".join(s.vm.transcript) if s is not None and s.vm is not None else ""
        if s is not None:
            try:
                s.close()
            except Exception:
                result["setup_error"] = (result["setup_error"] or "") + "cleanup: " + traceback.format_exc()
            result["daemon_log"] = s.daemon_log[-20000:]
            if s.vm is not None:
                result["console_tail"] = kvm._tail(s.vm.console)
        pcap = work / "tap.pcap"
        if pcap.exists():
            result["wire"] = wire_summary(run("tcpdump", "-nr", str(pcap), check=False).stdout.splitlines())
    def bad(c: dict) -> bool:
        return "error" in c or c["guest_ping"][0] != 0 or c["host_ping"][0] != 0 or c["h2g_sent"][0] != 0 \
            or "nc-rc=0" not in c["g2h_sent"][1].split() or c["g2h_received"][0] != 0

    (work / "vm" / "initrd.cpio.gz").unlink(missing_ok=True)
    if result["setup_error"] is None and not any(bad(c) for c in result["cases"].values()):
        shutil.rmtree(work, ignore_errors=True)  # else kept for an hour: the VM's console, the pcap of tapk
    return {"rc": 0 if result["setup_error"] is None else 1, "seconds": time.monotonic() - t0,
            "output": transcript, "result": result}


GROUP = "live-peer"
GROUP_PRIORITY = 1  # the longest session: started first (conftest.py)
_xfrmd = Path(os.environ.get("XFRM_TOOL", "")).with_name("xfrmd")
shared.register_session(GROUP, json.dumps([asdict(c) for c in CASES]) + Path(__file__).read_text()
                        + (f"{_xfrmd.stat().st_mtime_ns}" if _xfrmd.exists() else ""), live_session)


@pytest.fixture(scope="session")
def live():
    data = shared.get(GROUP)
    r = data["result"]
    assert r["setup_error"] is None, f"the live session could not start:\n{r['setup_error']}\n" \
                                     f"daemon log:\n{r['daemon_log'][-3000:]}\nconsole:\n{r.get('console_tail')}"
    return r


def check_counters(listing: str, c: Case, who: str) -> None:
    blocks = state_blocks(listing)
    assert set(blocks) == {c.spi_out, c.spi_in}, f"{who}: SAs {sorted(map(hex, blocks))}:\n{listing}"
    for spi, b in blocks.items():
        m = re.search(r"replay-window (\d+) replay (\d+) failed (\d+)", b)
        assert m, f"{who}: no stats line for SPI 0x{spi:x}:\n{b}"
        assert m.groups() == ("0", "0", "0"), f"{who}: SPI 0x{spi:x} counted failures: {m.group(0)}\n{b}"
        m = re.search(r"(\d+)\(packets\)", b)
        assert m and int(m.group(1)) >= PINGS, f"{who}: SPI 0x{spi:x} counted no packets:\n{b}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_and_xfrmd_exchange_pings_and_tcp(live, case: Case):
    r = live["cases"][case.id]
    assert "error" not in r, r.get("error")
    ctx = f"\ndaemon log tail:\n{live['daemon_log'][-2000:]}"
    rc, out = r["guest_ping"]
    assert rc == 0 and f"{PINGS} packets received" in out, f"guest -> host ping:\n{out}{ctx}"
    rc, out = r["host_ping"]
    assert rc == 0 and f"{PINGS} packets received" in out, f"host -> guest ping:\n{out}{ctx}"
    rc, sent, err = r["h2g_sent"]
    assert rc == 0 and re.fullmatch(r"[0-9a-f]{64}", sent), f"host -> guest TCP (sender): {err}{ctx}"
    rc, out = r["h2g_received"]
    assert out.split()[:2] == [str(TCP_BYTES), sent], f"host -> guest TCP: sent {sent}, guest has:\n{out}{ctx}"
    rc, out = r["g2h_sent"]
    words = out.split()
    assert rc == 0 and "nc-rc=0" in words, f"guest -> host TCP (sender):\n{out}{ctx}"
    rc, got, err = r["g2h_received"]
    assert rc == 0 and got.split() == [str(TCP_BYTES), words[0], GUEST_IN], \
        f"guest -> host TCP: guest sent {words[0]}, host got {got!r} {err}{ctx}"
    assert words[2] == words[0], f"the host's echo of the hash: {out}"
    check_counters(r["guest_states"], case, "kernel")
    stat = dict(l.split() for l in r["guest_xfrm_stat"].splitlines() if l.strip())
    assert all(v == "0" for v in stat.values()), {k: v for k, v in stat.items() if v != "0"}
    check_counters(r["host_states"], case, "xfrmd")
    for who, listing in (("kernel", r["guest_states"]), ("xfrmd", r["host_states"])):
        assert (listing.count("flag esn") == 2 and listing.count("anti-replay esn context:") == 2) == case.esn, \
            f"{who}:\n{listing}"
        assert listing.count("encap type espinudp sport 4500 dport 4500") == (2 if case.natt else 0), \
            f"{who}:\n{listing}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_the_wire_carried_the_case_as_esp(live, case: Case):
    per_spi = live["wire"]["per_spi"]
    kind = "udp" if case.natt else "raw"
    out = per_spi.get(f"{case.spi_out:08x}", {})
    back = per_spi.get(f"{case.spi_in:08x}", {})
    h, g = case.ends
    assert list(out) == [f"{h} > {g} {kind}"] and list(back) == [f"{g} > {h} {kind}"], (out, back)
    assert min(out.values()) >= PINGS and min(back.values()) >= PINGS, (out, back)
    shortest = live["wire"]["shortest"]
    lengths = (shortest[f"{case.spi_out:08x}"], shortest[f"{case.spi_in:08x}"])
    if case.tfcpad:  # ESP header, IV, the padded inner packet, trailer, ICV: even a bare ACK
        assert min(lengths) >= case.tfcpad + 8 + 8 + 2 + 16, f"shortest ESP packets (xfrmd, kernel): {lengths}"
    else:  # the pure ACKs and pings of an unpadded tunnel stay short
        assert max(lengths) < 200, f"shortest ESP packets (xfrmd, kernel): {lengths}"


def test_nothing_but_esp_on_the_wire(live):
    w = live["wire"]
    assert w["lines"] > 0, "tcpdump recorded nothing on tapk"
    assert w["stray_count"] == 0, w["stray"][:10]
    spis = {f"{s:08x}" for c in CASES for s in (c.spi_out, c.spi_in)}
    assert set(w["per_spi"]) == spis, sorted(set(w["per_spi"]) ^ spis)


def test_the_daemon_sent_everything_and_saw_only_esp(live):
    """xfrmd's data-path counters (logged when it stops): no send error, nothing on the wire that was not ESP."""
    lines = [l for l in live["daemon_log"].splitlines() if "data path" in l and "wire-sent=" in l]
    assert lines, live["daemon_log"]
    counts = dict(w.split("=", 1) for w in lines[-1].split() if "=" in w and w.split("=", 1)[1].isdigit())
    assert counts["send-errors"] == "0" and counts["not-esp"] == "0", lines[-1]
    assert int(counts["wire-sent"]) > 0 and int(counts["wire-received"]) > 0, lines[-1]
