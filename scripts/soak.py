"""Soak test (issue 10; not in CI): two xfrmd peers in network namespaces carry numbered UDP traffic both ways for
DURATION seconds while the SAs are rekeyed every REKEY seconds the way an IKE daemon does it (RFC 7296 §2.8: the
new inbound SAs first, then the new outbound ones; a second later the old outbound SAs, a second after that the old
inbound ones, all with `xfrm -S`).

Reports the daemons' resident memory over time, packets sent, received, lost and duplicated per direction (lost
must be 0), the rekeys done and the daemons' counters; a table, then JSON lines (one per sample, one summary).
Exit status 1 if a packet was lost or duplicated, an xfrm_stat error counter moved, or memory grew by more than
--max-growth-kib.

    scripts/soak.sh [DURATION] [--rekey SECONDS] [--rate PPS] [--natt]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from daemonlib import Pair  # noqa: E402
from floodlib import daemon_counts, kernel_drops, rss_kib  # noqa: E402

# In each namespace: receives numbered datagrams on (me, 7000) and sends RATE per second to (peer, 7000) for
# SECONDS, then keeps receiving for 3 s; prints sent, distinct received, duplicates and the highest number seen.
TRAFFIC = r"""
import json, socket, struct, sys, threading, time
me, peer, rate, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
rx.bind((me, 7000)); rx.settimeout(0.5)
seen = bytearray(rate * int(seconds + 5) + 16); dup = 0; distinct = 0
sent = 0
def send():
    global sent
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); tx.bind((me, 0))
    start = time.monotonic()
    while True:
        t = time.monotonic() - start
        if t >= seconds: break
        # Paced: a sender that fell behind (a busy machine) catches up at most 20 datagrams per tick, never in a
        # burst that would overflow the TUN's queue.
        due = min(int(t * rate), len(seen) - 1, sent + 20)
        while sent < due:
            tx.sendto(struct.pack("!Q", sent) + b"x" * 192, (peer, 7000)); sent += 1
        time.sleep(0.002)
threading.Thread(target=send, daemon=True).start()
print("ready", flush=True)
# Until the traffic time is over and then 3 s without a datagram (what a busy machine queued arrives late), at most
# 60 s more.
end, last, limit = time.monotonic() + seconds, time.monotonic(), time.monotonic() + seconds + 60
while time.monotonic() < limit and (time.monotonic() < end or time.monotonic() - last < 3):
    try:
        d = rx.recv(2048)
        last = time.monotonic()
    except socket.timeout:
        continue
    n = struct.unpack("!Q", d[:8])[0]
    if seen[n]: dup += 1
    else: seen[n] = 1; distinct += 1
print(json.dumps({"sent": sent, "received": distinct, "duplicates": dup}), flush=True)
"""

A, B = "192.0.2.1", "192.0.2.2"


def key():
    return "0x" + os.urandom(20).hex()


def add_generation(pair: Pair, g: int, natt: bool):
    """Generation g's SA pair: SPIs 0x10000 + 2g (a→b) and + 2g + 1 (b→a), fresh keys; inbound SAs first."""
    encap = " encap espinudp 4500 4500 0.0.0.0" if natt else ""
    ab, ba = 0x10000 + 2 * g, 0x10001 + 2 * g
    kab, kba = key(), key()
    line = "state add src {s} dst {d} proto esp spi {spi:#x} reqid {r} mode tunnel aead rfc4106(gcm(aes)) {k} 128"
    pair.xfrm("b", line.format(s=A, d=B, spi=ab, r=1, k=kab) + encap + " replay-window 128")
    pair.xfrm("a", line.format(s=B, d=A, spi=ba, r=2, k=kba) + encap + " replay-window 128")
    pair.xfrm("a", line.format(s=A, d=B, spi=ab, r=1, k=kab) + encap)
    pair.xfrm("b", line.format(s=B, d=A, spi=ba, r=2, k=kba) + encap)
    return ab, ba


def delete_generation(pair: Pair, spis):
    """The old pair goes senders first: the outbound SAs, then (a second later, once what they sent has arrived)
    the inbound ones."""
    ab, ba = spis
    pair.xfrm("a", f"state delete src {A} dst {B} proto esp spi {ab:#x}")
    pair.xfrm("b", f"state delete src {B} dst {A} proto esp spi {ba:#x}")
    time.sleep(1.0)
    pair.xfrm("b", f"state delete src {A} dst {B} proto esp spi {ab:#x}")
    pair.xfrm("a", f"state delete src {B} dst {A} proto esp spi {ba:#x}")


def host_drops(pair: Pair, side: str) -> dict:
    """Where a lost packet could have gone outside the daemon: the namespace's UDP and raw socket drops, the
    veth's, and the TUN's (a queue the daemon did not read in time)."""
    d = kernel_drops(pair, side)
    tun = json.loads(pair.exec(side, "ip", "-s", "-j", "link", "show", "dev", "xfrm0").stdout)[0]["stats64"]
    d["tun_tx_dropped"] = tun["tx"]["dropped"]
    d["tun_rx_dropped"] = tun["rx"]["dropped"]
    # The backlog queue (netdev_max_backlog) a TUN write lands in: per CPU and for the whole host, not the namespace.
    d["softnet_dropped"] = sum(int(l.split()[1], 16)
                               for l in pair.exec(side, "cat", "/proc/net/softnet_stat").stdout.splitlines())
    netstat = pair.exec(side, "cat", "/proc/net/netstat").stdout.splitlines()
    ipext = [l.split()[1:] for l in netstat if l.startswith("IpExt:")]
    d["ip_in_truncated"] = dict(zip(ipext[0], map(int, ipext[1]))).get("InTruncatedPkts", 0) if ipext else 0
    return d


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("duration", nargs="?", type=float, default=1800, help="seconds of traffic (default 1800)")
    p.add_argument("--rekey", type=float, default=10, help="seconds between rekeys (default 10)")
    p.add_argument("--rate", type=int, default=2000, help="datagrams per second each way (default 2000)")
    p.add_argument("--sample", type=float, default=30, help="seconds between memory samples (default 30)")
    p.add_argument("--natt", action="store_true", help="ESP in UDP 4500 instead of raw ESP")
    p.add_argument("--txqueuelen", type=int, default=10000,
                   help="the TUN devices' queue (default 10000: 5 s at the default rate; the kernel's 500 overflows "
                        "when a busy machine keeps the daemon off the CPU for a quarter of a second)")
    p.add_argument("--max-growth-kib", type=int, default=8192, help="allowed RSS growth per daemon (default 8 MiB)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        pair = Pair(Path(d))
        try:
            return soak(pair, a)
        finally:
            pair.close()


def soak(pair: Pair, a) -> int:
    for side in "ab":
        pair.ip(side, "link", "set", "xfrm0", "txqueuelen", str(a.txqueuelen))
    current = add_generation(pair, 0, a.natt)
    pair.ipv4_policies()
    pids = {s: pair.procs[i].pid for i, s in enumerate("ab")}
    before = {s: daemon_counts(pair, s) for s in "ab"}
    kbefore = {s: host_drops(pair, s) for s in "ab"}
    traffic = {}
    for side, me, peer in [("a", "10.0.1.1", "10.0.2.1"), ("b", "10.0.2.1", "10.0.1.1")]:
        traffic[side] = subprocess.Popen(["ip", "netns", "exec", pair.ns[side], "python3", "-c", TRAFFIC, me, peer,
                                          str(a.rate), str(a.duration)], stdout=subprocess.PIPE, text=True)
    for t in traffic.values():
        assert t.stdout.readline().strip() == "ready"
    start = time.monotonic()
    samples = []
    rekeys, g = 0, 0
    next_rekey, next_sample = start + a.rekey, start
    while time.monotonic() - start < a.duration:
        now = time.monotonic()
        if now >= next_sample:
            s = {"t": round(now - start, 1), **{f"rss_kib_{x}": rss_kib(pids[x]) for x in "ab"}}
            samples.append(s)
            print(json.dumps({"sample": s}), flush=True)
            next_sample += a.sample
        if now >= next_rekey:
            g += 1
            new = add_generation(pair, g, a.natt)
            time.sleep(1.0)  # packets in flight under the old SAs arrive first
            delete_generation(pair, current)
            current, rekeys = new, rekeys + 1
            next_rekey += a.rekey
        time.sleep(0.1)
    results = {}
    for side, t in traffic.items():
        out, _ = t.communicate(timeout=120)
        results[side] = json.loads(out.strip().splitlines()[-1])
    samples.append({"t": round(time.monotonic() - start, 1), **{f"rss_kib_{x}": rss_kib(pids[x]) for x in "ab"}})
    after = {s: daemon_counts(pair, s) for s in "ab"}
    kdrops = {s: {k: v - kbefore[s][k] for k, v in host_drops(pair, s).items() if v - kbefore[s][k]} for s in "ab"}
    # A sends, B receives (a→b) and the other way round.
    flows = {"a→b": (results["a"]["sent"], results["b"]["received"], results["b"]["duplicates"]),
             "b→a": (results["b"]["sent"], results["a"]["received"], results["a"]["duplicates"])}
    lost = {f: s - r for f, (s, r, _) in flows.items()}
    errors = {s: {k: v - before[s]["xfrm_stat"].get(k, 0) for k, v in after[s]["xfrm_stat"].items()
                  if v - before[s]["xfrm_stat"].get(k, 0)} for s in "ab"}
    growth = {x: max(s[f"rss_kib_{x}"] for s in samples) - samples[0][f"rss_kib_{x}"] for x in "ab"}
    sas = {s: pair.xfrm(s, "state count").strip() for s in "ab"}
    print(f"\nsoak: {a.duration:.0f} s, rekey every {a.rekey:.0f} s ({rekeys} rekeys), {a.rate} datagrams/s each way, "
          f"{'ESP in UDP 4500' if a.natt else 'raw ESP'}, TUN txqueuelen {a.txqueuelen}")
    print(f"{'t (s)':>8} {'RSS A (KiB)':>12} {'RSS B (KiB)':>12}")
    for s in samples:
        print(f"{s['t']:>8} {s['rss_kib_a']:>12,} {s['rss_kib_b']:>12,}")
    print(f"{'flow':<6} {'sent':>10} {'received':>10} {'lost':>6} {'duplicates':>10}")
    for f, (s, r, dup) in flows.items():
        print(f"{f:<6} {s:>10,} {r:>10,} {lost[f]:>6} {dup:>10}")
    for s in "ab":
        moved = {k: v - before[s].get(k, 0) for k, v in after[s].items() if isinstance(v, float)
                 and v - before[s].get(k, 0) and k not in ("xfrm_stat_sum",)}
        print(f"daemon {s}: {sas[s]}; xfrm_stat errors {errors[s] or 'none'}; data path {moved}; "
              f"kernel drops in its namespace {kdrops[s] or 'none'}")
    ok = all(v == 0 for v in lost.values()) and all(d == 0 for _, _, d in flows.values()) \
        and not any(errors.values()) and all(v <= a.max_growth_kib for v in growth.values())
    print(json.dumps({"summary": {"duration": a.duration, "rekeys": rekeys, "rate": a.rate, "natt": a.natt,
                                  "txqueuelen": a.txqueuelen,
                                  "flows": {f: dict(zip(("sent", "received", "duplicates"), v))
                                            for f, v in flows.items()},
                                  "lost": lost, "xfrm_stat_errors": errors, "kernel_drops": kdrops, "rss_growth_kib": growth,
                                  "samples": samples, "pass": ok}}))
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
