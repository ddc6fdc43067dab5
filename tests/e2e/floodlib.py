"""The flood experiment (issue 10, "Load"), shared by scripts/flood.sh and tests/e2e/test_daemon_flood.py.

Two xfrmd peers (daemonlib.Pair, raw ESP between 192.0.2.1 and 192.0.2.2) carry an iperf3 TCP stream from B's
10.0.2.1 to A's 10.0.1.1. A flooder in B's namespace sends, as fast as one Python process can (bounded in count and
time, only to A's namespace address), four kinds of packets at A's daemon in turn: random bytes to UDP 4500, random
bytes as raw ESP (IP protocol 50), and real ESP packets of the B → A SA with sequence numbers A has long seen
(replays, with a good ICV), both as raw ESP and inside UDP 4500 (the wrong encapsulation for that SA).

What is measured (A is the daemon under attack):
- throughput of the stream unloaded and under the flood, in the same run;
- A's resident memory (VmRSS) before, during (sampled) and after the flood;
- two identities over the flood window, from A's metrics and its namespace's kernel counters:
  1. the daemon's: every datagram it took off a socket was delivered into the TUN or counted in exactly one drop
     counter: wire_received = delivered + not_decapsulated + ike_dropped + ring_full + Σ xfrm_stat
     + natt_keepalives + tfc_dummies (the two the stack consumes without an xfrm_stat error);
  2. the wire's: every packet sent at A (the flood plus B's daemon's ESP) was read by A's daemon or counted by A's
     kernel before it got there: flooded + B.wire_sent = A.wire_received + truncated + unframed + UDP receive-buffer
     errors + raw-socket drops + veth drops.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from daemonlib import K2, Pair, run

# Runs in B's namespace: argv = target, count, seconds, payload file. Sends the payloads round-robin by kind and
# prints what it sent, by kind, as one JSON line.
FLOODER = r"""
import json, socket, sys, time
target, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
kinds = json.load(open(sys.argv[4]))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
for s in (udp, raw):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
plan = [(udp if k["via"] == "udp" else raw, (target, 4500 if k["via"] == "udp" else 0),
         [bytes.fromhex(p) for p in k["payloads"]], k["name"]) for k in kinds]
sent = {k["name"]: 0 for k in kinds}
failed = 0
deadline = time.monotonic() + seconds
n = 0
while n < count:
    if n % 4096 == 0 and time.monotonic() > deadline:
        break
    sock, addr, payloads, name = plan[n % len(plan)]
    try:
        sock.sendto(payloads[(n // len(plan)) % len(payloads)], addr)
        sent[name] += 1
    except OSError:
        failed += 1  # ENOBUFS from our own qdisc: never left this namespace
    n += 1
print(json.dumps({"sent": sent, "send_failed": failed}))
"""


def replayed_esp(count: int) -> list[bytes]:
    """ESP packets (no outer IP header) of the B → A SA (SPI 0x2002, key K2) with sequence numbers 1..count."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.ipsec import ESP, SecurityAssociation
    key = bytes.fromhex(K2[2:])
    out = []
    for seq in range(1, count + 1):
        sa = SecurityAssociation(ESP, spi=0x2002, crypt_algo="AES-GCM", crypt_key=key, seq_num=seq,
                                 tunnel_header=IP(src="192.0.2.2", dst="192.0.2.1"))
        inner = IP(src="10.0.2.1", dst="10.0.1.1") / UDP(sport=7, dport=9) / (b"replay" * 10)
        out.append(bytes(sa.encrypt(inner))[20:])
    return out


def flood_kinds(replays: int = 64) -> list[dict]:
    rnd = os.urandom
    garbage = [rnd(1 + (i * 37) % 200).hex() for i in range(512)]
    # Random UDP payloads: most start with a random SPI (unknown SA), some with the zero non-ESP marker (IKE), some
    # are one 0xff byte (a NAT-T keepalive): each has its own counter.
    udp = garbage[:500] + [("00000000" + rnd(40).hex())] * 6 + ["ff"] * 6
    esp = [r.hex() for r in replayed_esp(replays)]
    return [{"name": "garbage_udp", "via": "udp", "payloads": udp},
            {"name": "garbage_raw", "via": "raw", "payloads": garbage},
            {"name": "replay_raw", "via": "raw", "payloads": esp},
            {"name": "replay_udp", "via": "udp", "payloads": esp}]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def kernel_drops(pair: Pair, side: str) -> dict:
    """The namespace's kernel counters for packets dropped before a socket read them."""
    snmp = pair.exec(side, "cat", "/proc/net/snmp").stdout.splitlines()
    udp = [l.split()[1:] for l in snmp if l.startswith("Udp:")]
    udp_fields = dict(zip(udp[0], map(int, udp[1])))
    ip = [l.split()[1:] for l in snmp if l.startswith("Ip:")]
    ip_fields = dict(zip(ip[0], map(int, ip[1])))
    raw_drops = 0
    for f in ("/proc/net/raw", "/proc/net/raw6"):
        for l in pair.exec(side, "cat", f).stdout.splitlines()[1:]:
            raw_drops += int(l.split()[-1])
    link = json.loads(pair.exec(side, "ip", "-s", "-j", "link", "show", "dev", pair.dev[side]).stdout)[0]
    return {"udp_rcvbuf_errors": udp_fields["RcvbufErrors"], "raw_drops": raw_drops,
            # Not in the flood's identity (none of these happens to a flooded packet), but where else a lost
            # packet could be counted: the soak reports them.
            "udp_in_errors": udp_fields["InErrors"], "udp_csum_errors": udp_fields["InCsumErrors"],
            "udp_no_ports": udp_fields["NoPorts"], "udp_mem_errors": udp_fields.get("MemErrors", 0), "ip_in_discards": ip_fields["InDiscards"],
            "ip_in_hdr_errors": ip_fields["InHdrErrors"], "ip_in_addr_errors": ip_fields["InAddrErrors"],
            "veth_rx_dropped": link["stats64"]["rx"]["dropped"],
            "veth_tx_dropped": link["stats64"]["tx"]["dropped"]}


def daemon_counts(pair: Pair, side: str) -> dict:
    m = pair.metrics(side)
    out = {k.split('"')[1]: v for k, v in m.items() if k.startswith("xfrmd_datapath_packets_total{")}
    out["xfrm_stat_sum"] = sum(v for k, v in m.items() if k.startswith("xfrm_stat_total{"))
    out["xfrm_stat"] = {k.split('"')[1]: v for k, v in m.items() if k.startswith("xfrm_stat_total{") and v}
    return out


def iperf(pair: Pair, seconds: float) -> subprocess.Popen:
    """Starts an iperf3 TCP stream B (10.0.2.1) → A (10.0.1.1); returns the client (its stdout is iperf3's JSON)."""
    server = subprocess.Popen(["ip", "netns", "exec", pair.ns["a"], "iperf3", "-s", "-B", "10.0.1.1", "-1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    client = subprocess.Popen(["ip", "netns", "exec", pair.ns["b"], "iperf3", "-c", "10.0.1.1", "-B", "10.0.2.1",
                               "-t", str(seconds), "-J"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client.server = server
    return client


def iperf_gbps(client: subprocess.Popen) -> float:
    out, err = client.communicate(timeout=120)
    client.server.wait(timeout=10)
    assert client.returncode == 0, (out[-2000:], err)
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}


def experiment(pair: Pair, tmp: Path, count: int, flood_seconds: float, stream_seconds: float) -> dict:
    """Runs the whole experiment on a configured pair (raw ESP); returns every figure."""
    pid = pair.procs[0].pid
    kinds_file = tmp / "flood-kinds.json"
    kinds_file.write_text(json.dumps(flood_kinds()))
    unloaded = iperf_gbps(iperf(pair, stream_seconds))
    rss_before = rss_kib(pid)
    a0, b0, k0 = daemon_counts(pair, "a"), daemon_counts(pair, "b"), kernel_drops(pair, "a")
    kb0 = kernel_drops(pair, "b")
    client = iperf(pair, stream_seconds)
    time.sleep(min(1.0, stream_seconds / 4))  # the stream is up (and A's replay window far past the replays)
    flooder = subprocess.Popen(["ip", "netns", "exec", pair.ns["b"], "python3", "-c", FLOODER, "192.0.2.1",
                                str(count), str(flood_seconds), str(kinds_file)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    rss_samples = []
    while flooder.poll() is None:
        rss_samples.append(rss_kib(pid))
        time.sleep(0.2)
    flood_time = time.monotonic() - t0
    out, err = flooder.communicate()
    assert flooder.returncode == 0, err
    flood = json.loads(out)
    loaded = iperf_gbps(client)
    time.sleep(0.5)  # the last packets read and counted
    rss_after = rss_kib(pid)
    a1, b1, k1 = daemon_counts(pair, "a"), daemon_counts(pair, "b"), kernel_drops(pair, "a")
    kb1 = kernel_drops(pair, "b")
    da, db, dk = delta(a1, a0), delta(b1, b0), delta(k1, k0)
    dkb = delta(kb1, kb0)
    flooded = sum(flood["sent"].values())
    drops = (da["not_decapsulated"] + da["ike_dropped"] + da["ring_full"] + da["xfrm_stat_sum"]
             + da["natt_keepalives"] + da["tfc_dummies"])
    wire_lost = dk["udp_rcvbuf_errors"] + dk["raw_drops"] + dk["veth_rx_dropped"] + dkb["veth_tx_dropped"]
    return {
        "unloaded_gbps": unloaded, "loaded_gbps": loaded, "ratio": loaded / unloaded,
        "flooded": flooded, "flood_by_kind": flood["sent"], "flood_send_failed": flood["send_failed"],
        "flood_seconds": flood_time, "flood_pps": flooded / flood_time,
        "rss_before_kib": rss_before, "rss_max_kib": max(rss_samples + [rss_after]), "rss_after_kib": rss_after,
        "wire_received": da["wire_received"], "delivered": da["delivered"], "counted_drops": drops,
        "xfrm_stat_delta": {k: a1["xfrm_stat"].get(k, 0) - a0["xfrm_stat"].get(k, 0) for k in a1["xfrm_stat"]},
        "datapath_delta": {k: v for k, v in da.items() if v and k not in ("xfrm_stat_sum",)},
        "kernel_drops": dk, "peer_wire_sent": db["wire_sent"], "peer_veth_tx_dropped": dkb["veth_tx_dropped"],
        "truncated": da["truncated"], "unframed": da["unframed"],
        # 1. the daemon's identity; 2. the wire's (see the top of this file).
        "daemon_identity": da["wire_received"] == da["delivered"] + drops,
        "wire_identity": flooded + db["wire_sent"] == da["wire_received"] + da["truncated"] + da["unframed"]
        + wire_lost,
        "wire_lost_in_kernel": wire_lost,
    }


def table(r: dict) -> str:
    rows = [("unloaded stream", f"{r['unloaded_gbps']:.3f} Gbit/s"),
            ("stream under flood", f"{r['loaded_gbps']:.3f} Gbit/s ({r['ratio']:.2f} of unloaded)"),
            ("flooded packets", f"{r['flooded']:,} in {r['flood_seconds']:.1f} s ({r['flood_pps']:,.0f}/s)"),
            ("  by kind", ", ".join(f"{k} {v:,}" for k, v in r["flood_by_kind"].items())),
            ("A read from its sockets", f"{r['wire_received']:,.0f}"),
            ("A delivered into its TUN", f"{r['delivered']:,.0f}"),
            ("A counted drops", f"{r['counted_drops']:,.0f}: "
             + ", ".join(f"{k} {v:,.0f}" for k, v in r["xfrm_stat_delta"].items() if v)),
            ("dropped by A's kernel", f"{r['wire_lost_in_kernel']:,.0f} ({r['kernel_drops']})"),
            ("received = delivered + drops", str(r["daemon_identity"])),
            ("sent = read + kernel drops", str(r["wire_identity"])),
            ("A's RSS before / max / after", f"{r['rss_before_kib']:,} / {r['rss_max_kib']:,} / "
             f"{r['rss_after_kib']:,} KiB")]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def main() -> int:
    import argparse
    import tempfile
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=3_000_000, help="flooded packets at most")
    p.add_argument("--seconds", type=float, default=15, help="flood duration at most")
    p.add_argument("--stream-seconds", type=float, default=20, help="each iperf3 run")
    p.add_argument("--daemon-args", default="", help="extra xfrmd options for both daemons")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        pair = Pair(Path(d), daemon_args=a.daemon_args.split())
        try:
            pair.configure(natt=False)
            r = experiment(pair, Path(d), a.count, a.seconds, a.stream_seconds)
        finally:
            pair.close()
    print(table(r))
    print(json.dumps(r))
    ok = r["daemon_identity"] and r["wire_identity"] and r["ratio"] >= 0.5
    print("flood: PASS" if ok else "flood: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
