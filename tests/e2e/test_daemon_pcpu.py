"""Per-CPU SAs (RFC 9611; `pcpu-num`, XFRMA_SA_PCPU as in Linux 6.13) through xfrmd with `--workers 4`: one tunnel
a → b has an SA for CPUs (workers) 0, 1 and 2 and a fallback SA bound to no CPU, which worker 3 uses. The engine
spreads the tunnel's flows over the workers by flow hash; each worker uses its own SA, so every SA's counters grow
and each SA's sequence numbers still leave one by one."""

import os
import re
import signal
import subprocess
import time

from daemonlib import K2, Pair, WIRE_FILTER, run, transfer

A, B = "192.0.2.1", "192.0.2.2"
# One key per SA: SPI → key (the fallback first).
KEYS = {0x1001: "0x0102030405060708090a0b0c0d0e0f1011121314",
        0x1100: "0x2122232425262728292a2b2c2d2e2f3031323334",
        0x1101: "0x3132333435363738393a3b3c3d3e3f4041424344",
        0x1102: "0x4142434445464748494a4b4c4d4e4f5051525354"}
CPU = {0x1100: 0, 0x1101: 1, 0x1102: 2}
FLOWS = 32  # TCP connections a → b; the chance that one of four workers gets none is 4·(3/4)^32 < 0.1 %


def configure(pair, cpus=(0, 1, 2)):
    for spi, key in KEYS.items():
        if spi in CPU and CPU[spi] not in cpus:
            continue
        pcpu = f" pcpu-num {CPU[spi]}" if spi in CPU else ""
        aead = f"aead rfc4106(gcm(aes)) {key} 128"
        pair.xfrm("a", f"state add src {A} dst {B} proto esp spi {spi:#x} reqid 1 mode tunnel {aead} dir out{pcpu}")
        pair.xfrm("b", f"state add src {A} dst {B} proto esp spi {spi:#x} reqid 1 mode tunnel {aead} "
                       "replay-window 128 dir in")
    for side in "ab":
        pair.xfrm(side, f"state add src {B} dst {A} proto esp spi 0x2002 reqid 2 mode tunnel "
                        f"aead rfc4106(gcm(aes)) {K2} 128 replay-window 128")
    pair.ipv4_policies()


def sa_packets(listing):
    """SPI → packets, from an `xfrm -s state list`."""
    out, spi = {}, None
    for line in listing.splitlines():
        if "proto esp spi 0x" in line:
            spi = int(line.split("spi 0x")[1][:8], 16)
        elif spi is not None and (m := re.fullmatch(r"\s+\d+\(bytes\), (\d+)\(packets\)", line)):
            out[spi] = int(m.group(1))  # "lifetime current:" then "  B(bytes), P(packets)"
    return out


def test_one_tunnel_spreads_over_four_workers_with_an_sa_per_worker(tmp_path):
    pair = Pair(tmp_path, daemon_args=["--workers", "4"])
    try:
        configure(pair)
        listing = pair.xfrm("a", "state list")
        for spi, cpu in CPU.items():
            assert f"spi 0x{spi:08x} reqid 1 mode tunnel" in listing
        assert listing.count("\tdir out\n\tpcpu-num ") == 3, listing
        assert "\tpcpu-num 0\n" in listing and "\tpcpu-num 2\n" in listing, listing

        capture = tmp_path / "veth.pcap"
        dump = subprocess.Popen(["ip", "netns", "exec", pair.ns["b"], "tcpdump", "-ni", pair.dev["b"], "-w",
                                 str(capture), WIRE_FILTER], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.0)
        for _ in range(FLOWS):  # each connection has its own source port: its own flow hash
            transfer(pair, "a", "10.0.1.1", "10.0.2.1", size=96 * 1024)
        transfer(pair, "b", "10.0.2.1", "10.0.1.1", size=1024 * 1024)
        time.sleep(0.5)
        dump.send_signal(signal.SIGINT)
        dump.communicate(timeout=10)

        # Every SA of the tunnel carried traffic: the three per-CPU SAs and the fallback (worker 3's), on both ends.
        sent = sa_packets(pair.xfrm("a", "-s state list"))
        received = sa_packets(pair.xfrm("b", "-s state list"))
        for spi in KEYS:
            assert sent[spi] > 0 and received[spi] > 0, (hex(spi), sent, received)
        assert "replay-window 0 replay 0 failed 0" in pair.xfrm("b", "-s state list")

        # Only ESP on the wire; each SA's sequence numbers one by one (one worker per SA, in order).
        listing = run("tcpdump", "-nr", str(capture)).stdout.splitlines()
        assert all(": ESP(spi=0x0000" in l for l in listing), [l for l in listing if "ESP(" not in l][:5]
        last = {}
        for l in listing:
            spi, seq = l.split("ESP(spi=")[1].split(")")[0].split(",seq=")
            assert int(seq, 16) == last.get(spi, int(seq, 16) - 1) + 1, (spi, last.get(spi), seq)
            last[spi] = int(seq, 16)
        assert {int(s, 16) for s in last} == set(KEYS) | {0x2002}, last

        # tshark decrypts every packet with its SA's key and finds every ICV good.
        uats = []
        for spi, key in list(KEYS.items()) + [(0x2002, K2)]:
            fields = ["IPv4", "*", "*", f"0x{spi:08x}", "AES-GCM with 16 octet ICV [RFC4106]", key, "NULL", ""]
            uats += ["-o", "uat:esp_sa:" + ",".join(f'"{f}"' for f in fields)]
        home = tmp_path / "home"
        home.mkdir(exist_ok=True)
        shark = run("tshark", "-n", "-r", str(capture), "-o", "esp.enable_encryption_decode:TRUE",
                    "-o", "esp.enable_authentication_check:TRUE", *uats, "-T", "fields", "-e", "esp.spi",
                    "-e", "esp.icv_good", "-e", "frame.protocols", timeout=300,
                    env=dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config")))
        rows = [l.split("\t") for l in shark.stdout.splitlines() if l.strip()]
        assert len(rows) == len(listing)
        bad = [r for r in rows if r[1] != "1" or "tcp" not in r[2]]
        assert not bad, bad[:5]

        m = pair.metrics("a")
        assert all(v == 0 for k, v in m.items() if k.startswith("xfrm_stat_total{")), m
        assert m['xfrmd_datapath_packets_total{event="ring_full"}'] == 0, m
    finally:
        pair.close()


def test_two_workers_send_a_per_cpu_tunnel_on_cpu_0(tmp_path):
    """`--workers 2`: all output runs on the TUN thread, which is CPU 0 — pcpu-num 0's SA carries the tunnel and
    the fallback stays unused."""
    pair = Pair(tmp_path, daemon_args=["--workers", "2"])
    try:
        configure(pair, cpus=(0, 1))  # the daemon's CPUs: max(its workers, the machine's processors)
        for _ in range(4):
            transfer(pair, "a", "10.0.1.1", "10.0.2.1", size=64 * 1024)
        sent = sa_packets(pair.xfrm("a", "-s state list"))
        assert sent[0x1100] > 0 and sent[0x1001] == sent[0x1101] == 0, sent
    finally:
        pair.close()
