"""Direction B: `esp-tool encap` is the sender, scapy the receiver.

scapy must decrypt every packet to the inner packet we gave esp-tool.  We also
check the wire: outer header, SPI, the low 32 bits of the sequence number,
ESP length alignment, padding bytes and the next header.
"""

import pytest
from scapy.layers.inet6 import IPv6

from esplib import (ALGO_IDS, ALGOS, INNER6, LINKTYPE_ETHERNET, LINKTYPE_RAW, MODE_IDS, MODES, assert_all_ok,
                    check_outer, encap_roundtrip, inner_packets, make_params, run_esp_tool, scapy_open_esp)

NATT_ALGOS = ["gcm128", "gcm256", "chacha", "gmac128", "cbc256-sha256", "cbc128-sha1", "null-sha256"]


@pytest.mark.parametrize("mode", MODE_IDS)
@pytest.mark.parametrize("algo", ALGO_IDS)
def test_encap(algo, mode, work):
    p = make_params(algo, mode)
    encap_roundtrip(p, inner_packets(MODES[mode].inner_version, align=p.algo.align), work, linktype=LINKTYPE_RAW)


@pytest.mark.parametrize("mode", MODE_IDS)
@pytest.mark.parametrize("algo", ["gcm128", "cbc256-sha256"])
def test_encap_ethernet_linktype(algo, mode, work):
    p = make_params(algo, mode, spi=0xC0DE0002, seq=77)
    encap_roundtrip(p, inner_packets(MODES[mode].inner_version, align=4, big=False), work,
                    linktype=LINKTYPE_ETHERNET)


@pytest.mark.parametrize("mode", MODE_IDS)
@pytest.mark.parametrize("algo", NATT_ALGOS)
def test_encap_natt(algo, mode, work):
    p = make_params(algo, mode, natt=(4500, 4500))
    encap_roundtrip(p, inner_packets(MODES[mode].inner_version, align=p.algo.align), work)


@pytest.mark.parametrize("mode", ["tunnel4in4", "transport6"])
@pytest.mark.parametrize("algo", ["gcm128", "cbc128-sha1"])
def test_encap_natt_peer_behind_nat(algo, mode, work):
    """We send from 4500 to the peer's NAT-mapped port 33001."""
    p = make_params(algo, mode, natt=(4500, 33001))
    encap_roundtrip(p, inner_packets(MODES[mode].inner_version, align=4, big=False), work)


ESN_HIGH = 0x12345678


@pytest.mark.parametrize("mode", ["tunnel4in4", "transport6", "tunnel4in6"])
@pytest.mark.parametrize("algo", ALGO_IDS)
def test_encap_esn(algo, mode, work):
    """ESN: the high half goes into the AAD/ICV only; the wire carries the low half."""
    p = make_params(algo, mode, esn=True, seq=(ESN_HIGH << 32) | 5000)
    encap_roundtrip(p, inner_packets(MODES[mode].inner_version, align=p.algo.align), work)


@pytest.mark.parametrize("algo", ["gcm128", "chacha", "gmac128", "cbc256-sha256", "null-sha1"])
def test_encap_esn_low_half_wraps(algo, work):
    """Sequence numbers cross 2^32 mid-file: the wire seq goes ...fffe, ffff, 0, 1 while hi goes up."""
    p = make_params(algo, "tunnel6in4", esn=True, seq=(ESN_HIGH << 32) | 0xFFFFFFFC)
    res = encap_roundtrip(p, inner_packets(6, align=16, big=False)[:10], work)
    assert len(res.out_packets) == 10


@pytest.mark.parametrize("mode", ["tunnel4in4", "transport6", "tunnel6in4", "transport4"])
@pytest.mark.parametrize("algo", ["gcm256", "chacha", "cbc256-sha512"])
def test_encap_esn_natt(algo, mode, work):
    p = make_params(algo, mode, esn=True, seq=(7 << 32) | 50, natt=(4500, 4500))
    encap_roundtrip(p, inner_packets(MODES[mode].inner_version, align=p.algo.align, big=False), work)


@pytest.mark.parametrize("algo", ["gcm128", "gcm256", "chacha", "gmac128", "gmac256"])
@pytest.mark.parametrize("esn", [False, True])
def test_encap_counter_iv_is_the_sequence_number_under_a_per_sa_salt(algo, esn, work):
    """Our stack's IV for GCM/GMAC/ChaCha (the kernel's seqiv): the 64-bit sequence number XOR a random salt drawn
    per SA, so IVs never repeat under one key (RFC 4106 section 3.1) and a key installed twice with the same
    starting sequence number does not repeat them either."""
    seq = ((ESN_HIGH << 32) | 0xFFFFFFFE) if esn else 41
    ivs = []
    for run in range(2):
        p = make_params(algo, "tunnel4in4", esn=esn, seq=seq)
        res = encap_roundtrip(p, inner_packets(4, align=4, big=False)[:5], work / f"run{run}")
        salts = {int.from_bytes(out[20 + 8:20 + 16], "big") ^ (seq + i) for i, out in enumerate(res.out_packets)}
        assert len(salts) == 1, f"IV XOR sequence number is not constant within one SA: {salts}"
        ivs += [out[20 + 8:20 + 16] for out in res.out_packets]
    assert len(set(ivs)) == len(ivs), "the same key installed twice with the same sequence numbers repeated an IV"


@pytest.mark.parametrize("algo", ["cbc128-sha1", "cbc256-sha256", "gcm128"])
def test_encap_fixed_iv(algo, work):
    iv = bytes(range(0xA0, 0xA0 + ALGOS[algo].iv_len))
    p = make_params(algo, "tunnel4in4", fixed_iv=iv)
    encap_roundtrip(p, inner_packets(4, align=4, big=False)[:1], work)  # checks the wire IV too


@pytest.mark.parametrize("algo", ["cbc128-sha1", "gcm128"])
def test_encap_fixed_iv_refuses_a_second_packet(algo, work):
    """One IV under one key protects one packet: esp-tool refuses a fixed IV for a pcap of two."""
    iv = bytes(range(0xA0, 0xA0 + ALGOS[algo].iv_len))
    p = make_params(algo, "tunnel4in4", fixed_iv=iv)
    res = run_esp_tool("encap", p, inner_packets(4, align=4, big=False)[:2], work, check_ok=False)
    assert res.returncode != 0, res.explain()
    assert "a fixed IV protects one packet only" in res.stderr, res.explain()
    assert not (work / "case.out.pcap").exists() or (work / "case.out.pcap").stat().st_size <= 24, res.explain()


@pytest.mark.parametrize("algo", ["cbc128-sha1", "cbc256-sha256"])
def test_encap_cbc_ivs_differ(algo, work):
    """Without a fixed IV, CBC IVs must not repeat (RFC 3602: unpredictable IV)."""
    p = make_params(algo, "tunnel4in4")
    res = encap_roundtrip(p, inner_packets(4, align=4, big=False), work)
    ivs = [out[28:44] for out in res.out_packets]
    assert len(set(ivs)) == len(ivs), f"repeated CBC IVs: {[iv.hex() for iv in ivs]}"


@pytest.mark.parametrize("algo", ["gcm128", "chacha", "cbc256-sha256", "null-sha256"])
def test_encap_transport_empty_payload(algo, work):
    """IPv6 'no next header' with an empty payload.

    scapy's high-level decrypt mangles an empty payload, so this checks with
    its low-level ESP decryption: payload empty, next header 59.
    """
    inner = bytes(IPv6(src=INNER6[0], dst=INNER6[1], nh=59))
    p = make_params(algo, "transport6")
    res = run_esp_tool("encap", p, [inner], work, name="empty")
    assert_all_ok(res, p)
    (out,) = res.out_packets
    info = check_outer(out, p, inner)
    assert (info.spi, info.seq) == (p.spi, 1)
    plain = scapy_open_esp(p, out)
    assert bytes(plain.data) == b"" and plain.nh == 59, f"payload {bytes(plain.data).hex()} nh {plain.nh}"
    assert bytes(plain.padding) == bytes(range(1, plain.padlen + 1))
