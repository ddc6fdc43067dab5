"""Direction A: scapy is the sender, `esp-tool decap` the receiver.

Every delivered packet must be byte-identical to the inner packet scapy
started from; for transport mode that is also what scapy's own decryption
rebuilds (protocol, length and checksum restored), which decap_roundtrip checks.
"""

import pytest

from esplib import (ALGO_IDS, LINKTYPE_ETHERNET, LINKTYPE_RAW, MODE_IDS, MODES, decap_roundtrip, inner_packets,
                    make_params)

NATT_ALGOS = ["gcm128", "gcm256", "chacha", "gmac128", "cbc256-sha256", "cbc128-sha1", "null-sha256"]


@pytest.mark.parametrize("mode", MODE_IDS)
@pytest.mark.parametrize("algo", ALGO_IDS)
def test_decap(algo, mode, work):
    p = make_params(algo, mode)
    inners = inner_packets(MODES[mode].inner_version, align=p.algo.align)
    decap_roundtrip(p, inners, range(1, len(inners) + 1), work, linktype=LINKTYPE_ETHERNET)


@pytest.mark.parametrize("mode", MODE_IDS)
@pytest.mark.parametrize("algo", ["gcm128", "cbc256-sha256"])
def test_decap_raw_ip_linktype(algo, mode, work):
    p = make_params(algo, mode, spi=0xC0DE0001)
    inners = inner_packets(MODES[mode].inner_version, align=4, big=False)
    decap_roundtrip(p, inners, range(1, len(inners) + 1), work, linktype=LINKTYPE_RAW)


@pytest.mark.parametrize("mode", MODE_IDS)
@pytest.mark.parametrize("algo", NATT_ALGOS)
def test_decap_natt(algo, mode, work):
    p = make_params(algo, mode, natt=(4500, 4500))
    inners = inner_packets(MODES[mode].inner_version, align=p.algo.align)
    decap_roundtrip(p, inners, range(1, len(inners) + 1), work)


@pytest.mark.parametrize("mode", ["tunnel4in4", "transport6"])
@pytest.mark.parametrize("algo", ["gcm128", "cbc128-sha1"])
def test_decap_natt_peer_behind_nat(algo, mode, work):
    """The peer's NAT rewrote its source port: ESP arrives from 33001 to 4500."""
    p = make_params(algo, mode, natt=(33001, 4500))
    inners = inner_packets(MODES[mode].inner_version, align=4, big=False)
    decap_roundtrip(p, inners, range(1, len(inners) + 1), work)


ESN_HIGH = 0x12345678


@pytest.mark.parametrize("mode", ["tunnel4in4", "transport6", "tunnel6in4"])
@pytest.mark.parametrize("algo", ALGO_IDS)
def test_decap_esn(algo, mode, work):
    """ESN: the high half (never on the wire) comes from replay_seq."""
    base = (ESN_HIGH << 32) | 1000
    p = make_params(algo, mode, esn=True, replay_seq=base, replay_window=64)
    inners = inner_packets(MODES[mode].inner_version, align=p.algo.align)
    decap_roundtrip(p, inners, [base + 1 + i for i in range(len(inners))], work)


@pytest.mark.parametrize("algo", ["gcm128", "chacha", "gmac256", "cbc256-sha256", "null-sha1"])
def test_decap_esn_low_half_wraps(algo, work):
    """The sender crosses 2^32: the receiver must infer high+1 (RFC 4303 appendix A)."""
    base = (ESN_HIGH << 32) | 0xFFFFFFF0
    p = make_params(algo, "tunnel4in4", esn=True, replay_seq=base, replay_window=32)
    inners = inner_packets(4, align=4, big=False)
    lows = [0xFFFFFFF1 + i for i in range(14)] + [1, 2, 3, 5, 4]  # seq 0 skipped: scapy can't send it
    inners = (inners * 3)[:len(lows)]
    seqs = [(ESN_HIGH << 32) | lo if lo > 0x80000000 else ((ESN_HIGH + 1) << 32) | lo for lo in lows]
    decap_roundtrip(p, inners, seqs, work)


@pytest.mark.parametrize("algo", ["gcm128", "cbc256-sha256"])
def test_decap_esn_late_packet_from_before_the_wrap(algo, work):
    """After the wrap, a late packet from just below 2^32 still belongs to the old high half."""
    hi = ESN_HIGH
    p = make_params(algo, "tunnel6in6", esn=True, replay_seq=(hi << 32) | 0xFFFFFFF0, replay_window=64)
    inners = inner_packets(6, align=4, big=False)[:6]
    seqs = [(hi << 32) | 0xFFFFFFF8, ((hi + 1) << 32) | 3, ((hi + 1) << 32) | 4, (hi << 32) | 0xFFFFFFFA,
            (hi << 32) | 0xFFFFFFFF, ((hi + 1) << 32) | 1]
    decap_roundtrip(p, inners, seqs, work)


@pytest.mark.parametrize("mode", ["tunnel4in4", "transport6", "tunnel6in4", "transport4"])
@pytest.mark.parametrize("algo", ["gcm256", "chacha", "cbc256-sha512"])
def test_decap_esn_natt(algo, mode, work):
    base = (7 << 32) | 50
    p = make_params(algo, mode, esn=True, replay_seq=base, natt=(4500, 4500))
    inners = inner_packets(MODES[mode].inner_version, align=p.algo.align, big=False)
    decap_roundtrip(p, inners, [base + 1 + i for i in range(len(inners))], work)
