"""tshark as a third-party check of pcaps `esp-tool encap` writes.

tshark 4.0.17 (Debian 12) decrypts ESP given the SA in its `esp_sa` UAT and
checks the ICV.  It has no ChaCha20-Poly1305 and no ESN, so this covers
AES-GCM-16 (128/256) and AES-CBC + HMAC-SHA-256-128, tunnel and transport,
IPv4 and IPv6 outer headers, with and without NAT-T (UDP 4500).

Every packet written must show `esp.icv_good == 1`, the right SPI and
sequence number, and the inner protocol in the dissection.
"""

import os
import subprocess

import pytest

from esplib import (INNER4, INNER6, MODE_IDS, SAParams, assert_all_ok, inner_packets, ip_proto, make_params,
                    run_esp_tool)

TSHARK_ALGOS = {
    # our algo id: (tshark encryption name, tshark auth name)
    "gcm128": ("AES-GCM with 16 octet ICV [RFC4106]", "NULL"),
    "gcm256": ("AES-GCM with 16 octet ICV [RFC4106]", "NULL"),
    "cbc256-sha256": ("AES-CBC [RFC3602]", "HMAC-SHA-256-128 [RFC4868]"),
}

L4_NAMES = {1: "icmp", 58: "icmpv6", 17: "udp", 6: "tcp"}
FIELDS = ["frame.number", "esp.spi", "esp.sequence", "esp.icv_good", "esp.icv_bad", "frame.protocols", "ip.src",
          "ipv6.src"]


def uat_line(p: SAParams, enc_key: bytes = None) -> str:
    enc_name, auth_name = TSHARK_ALGOS[p.algo.id]
    family = "IPv4" if p.mode.outer_version == 4 else "IPv6"
    key = p.crypt_key if enc_key is None else enc_key
    auth_key = "0x" + p.auth_key.hex() if p.algo.auth_name else ""
    fields = [family, "*", "*", f"0x{p.spi:08x}", enc_name, "0x" + key.hex(), auth_name, auth_key]
    return "uat:esp_sa:" + ",".join(f'"{f}"' for f in fields)


def tshark_fields(pcap, uat: str, home) -> list[list[str]]:
    argv = ["tshark", "-n", "-r", str(pcap),
            "-o", "esp.enable_encryption_decode:TRUE",
            "-o", "esp.enable_authentication_check:TRUE",
            "-o", uat,
            "-T", "fields", "-E", "separator=/t", "-E", "occurrence=a", "-E", "aggregator=,"]
    for f in FIELDS:
        argv += ["-e", f]
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, f"tshark failed ({r.returncode}): {r.stderr}\n$ {' '.join(argv)}"
    rows = [ln.split("\t") for ln in r.stdout.splitlines() if ln.strip()]
    for row in rows:
        assert len(row) == len(FIELDS), f"unexpected tshark row {row!r}"
    return rows


def expected_protocols(p: SAParams, inner: bytes) -> str:
    outer = "ip" if p.mode.outer_version == 4 else "ipv6"
    chain = ["raw", outer]
    if p.natt:
        chain += ["udp", "udpencap"]
    chain.append("esp")
    if p.mode.tunnel:
        chain.append("ip" if inner[0] >> 4 == 4 else "ipv6")
    chain.append(L4_NAMES[ip_proto(inner)])
    return ":".join(chain)


def encap_and_dissect(p: SAParams, work, enc_key: bytes = None):
    inners = inner_packets(p.mode.inner_version, align=p.algo.align)
    res = run_esp_tool("encap", p, inners, work, name="tshark")
    assert_all_ok(res, p)
    assert len(res.out_packets) == len(inners)
    home = work / "home"
    (home / ".config" / "wireshark").mkdir(parents=True, exist_ok=True)
    rows = tshark_fields(work / "tshark.out.pcap", uat_line(p, enc_key), home)
    assert len(rows) == len(inners), f"tshark read {len(rows)} frames, esp-tool wrote {len(inners)}"
    return inners, rows


@pytest.mark.parametrize("natt", [False, True], ids=["esp", "natt"])
@pytest.mark.parametrize("mode", MODE_IDS)
@pytest.mark.parametrize("algo", list(TSHARK_ALGOS))
def test_tshark_decrypts_and_verifies_every_packet(algo, mode, natt, work):
    p = make_params(algo, mode, natt=(4500, 4500) if natt else None, seq=1000, spi=0x0A0B0C0D)
    inners, rows = encap_and_dissect(p, work)
    good = [r for r in rows if r[3] == "1"]
    problems = []
    for i, (inner, row) in enumerate(zip(inners, rows)):
        frame, spi, seq, icv_good, icv_bad, protocols, ip_src, ipv6_src = row
        want_proto = expected_protocols(p, inner)
        if icv_good != "1" or icv_bad == "1":
            problems.append(f"frame {frame}: icv_good={icv_good!r} icv_bad={icv_bad!r}")
        if int(spi, 16) != p.spi:
            problems.append(f"frame {frame}: spi {spi}")
        if seq != str(p.seq + i):
            problems.append(f"frame {frame}: esp.sequence {seq}, want {p.seq + i}")
        if not protocols.startswith(want_proto):
            problems.append(f"frame {frame}: protocols {protocols!r}, want {want_proto!r}...")
        inner_src = INNER4[0] if inner[0] >> 4 == 4 else INNER6[0]
        if inner_src not in (ip_src + "," + ipv6_src).split(","):
            problems.append(f"frame {frame}: inner source {inner_src} not shown (ip.src={ip_src} ipv6.src={ipv6_src})")
    assert not problems, f"[{p.describe()}] tshark disagrees:\n" + "\n".join(problems[:20])
    assert len(good) == len(inners), f"{len(good)} of {len(inners)} packets have a good ICV in tshark"


@pytest.mark.parametrize("algo", list(TSHARK_ALGOS))
def test_tshark_oracle_rejects_a_wrong_key(algo, work):
    """Control: with one key bit changed tshark must report no good ICV (so the test above can fail)."""
    p = make_params(algo, "tunnel4in4")
    wrong = bytearray(p.crypt_key)
    wrong[0] ^= 0x80
    if p.algo.auth_name:
        # For CBC+HMAC the ICV covers the ciphertext only, so change the auth key instead.
        p_wrong = make_params(algo, "tunnel4in4", key_label="some-other-key")
        inners, _ = encap_and_dissect(p, work)
        home = work / "home"
        rows = tshark_fields(work / "tshark.out.pcap", uat_line(p_wrong), home)
    else:
        inners, rows = encap_and_dissect(p, work, enc_key=bytes(wrong))
    assert len(rows) == len(inners)
    assert not [r for r in rows if r[3] == "1"], "tshark says ICV good with a wrong key"
    # (tshark 4.0 leaves both fields empty on the odd frame whose garbage trailer it cannot parse)
    assert sum(r[4] == "1" for r in rows) >= len(rows) - 2, f"tshark did not flag bad ICVs: {[r[4] for r in rows]}"
