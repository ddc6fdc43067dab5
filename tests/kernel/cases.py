"""Seeded, deterministic `ip xfrm state add` and `ip xfrm policy add` lines for the kernel comparison.

Each case is one add line (words, without the leading `ip`), built from a random choice of every option the
iproute2 grammar offers for ESP states and policies. Most are valid; some are refused by the kernel on purpose
(wrong key or ICV length, an unknown algorithm, tfcpad in transport mode, espinudp-nonike, a policy index of the
wrong direction ...). Addresses are documentation ones (TEST-NET-1/2/3, 2001:db8::/32).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SEED = 20240707
N_STATES = 220
N_POLICIES = 130

V4_NETS = ["192.0.2", "198.51.100", "203.0.113"]


@dataclass
class Case:
    id: str  # "s017" / "p042"
    kind: str  # "state" | "policy"
    words: list[str]  # "xfrm state add ..." words
    tags: set[str] = field(default_factory=set)  # features used, for the expected-difference rules

    @property
    def line(self) -> str:
        return " ".join(self.words)


def _v4(r: random.Random) -> str:
    return f"{r.choice(V4_NETS)}.{r.randint(1, 254)}"


def _v6(r: random.Random) -> str:
    return f"2001:db8:{r.randint(0, 0xffff):x}::{r.randint(1, 0xffff):x}"


def _addr(r: random.Random, fam: int) -> str:
    return _v4(r) if fam == 4 else _v6(r)


def _prefix(r: random.Random, fam: int) -> str:
    if fam == 4:
        plen = r.choice([0, 8, 16, 24, 24, 28, 32, 32])
        a = _v4(r)
    else:
        plen = r.choice([0, 32, 48, 64, 64, 96, 128, 128])
        a = _v6(r)
    return f"{a}/{plen}" if r.random() < 0.9 or plen not in (32, 128) else a


def _hex(r: random.Random, n: int) -> str:
    return "0x" + bytes(r.randrange(256) for _ in range(n)).hex()


def _num(r: random.Random, v: int) -> str:
    return str(v) if r.random() < 0.3 else hex(v)


def _upspec(r: random.Random, fam: int, tags: set[str]) -> list[str]:
    p = r.random()
    if p < 0.35:
        proto = r.choice(["tcp", "udp", "sctp"])
        w = ["proto", proto]
        if r.random() < 0.7:
            w += ["sport", str(r.randint(1, 65535))]
        if r.random() < 0.7:
            w += ["dport", str(r.randint(1, 65535))]
        return w
    if p < 0.5:
        w = ["proto", "icmp" if fam == 4 else "ipv6-icmp"]
        if r.random() < 0.7:
            w += ["type", str(r.choice([0, 3, 8, 128, 129, 135]))]
            if r.random() < 0.6:
                w += ["code", str(r.randint(0, 4))]
        return w
    if p < 0.55:
        tags.add("gre")
        return ["proto", "gre"] + (["key", str(r.randint(0, (1 << 32) - 1))] if r.random() < 0.7 else [])
    if p < 0.6:
        return ["proto", str(r.choice([47, 50, 132, 136]))]
    return []


def _limits(r: random.Random, tags: set[str]) -> list[str]:
    w: list[str] = []
    for name in ["time-soft", "time-hard", "time-use-soft", "time-use-hard", "byte-soft", "byte-hard",
                 "packet-soft", "packet-hard"]:
        if r.random() < 0.3:
            if name.startswith("time"):  # nothing expires during the run (the host's clock stands still)
                v = r.choice([0, 3600, 86400, 4294967295, r.randint(600, 10 ** 6)])
            else:
                v = r.choice([0, 1, 60, 3600, 10 ** 9, r.randint(1, 10 ** 6),
                              (1 << 64) - 1 if name.startswith("byte") else 4294967295])
            w += ["limit", name, str(v)]
    if w:
        tags.add("limits")
    return w


AEADS = [
    # (name, key bytes accepted (incl. 4-byte salt), icv bits accepted)
    ("rfc4106(gcm(aes))", [20, 36], [64, 96, 128]),
    ("rfc4106(gcm(aes))", [28], [128]),
    ("rfc7539esp(chacha20,poly1305)", [36], [128]),
    ("rfc4543(gcm(aes))", [20, 36], [128]),
]
AUTHS = [("hmac(sha1)", 20, [96, 160]), ("hmac(sha256)", 32, [128, 96, 256]), ("hmac(sha512)", 64, [256, 512])]


def _algos(r: random.Random, tags: set[str]) -> list[str]:
    p = r.random()
    if p < 0.5:
        name, keys, icvs = r.choice(AEADS)
        klen, icv = r.choice(keys), r.choice(icvs)
        if r.random() < 0.08:  # a key or ICV length the algorithm does not take
            tags.add("bad-algo")
            if r.random() < 0.5:
                klen = r.choice([16, 32, 24, 40])
            else:
                icv = r.choice([32, 160, 256, 0, 96 if "chacha" in name else 48])
        tags.add("aead")
        return ["aead", name, _hex(r, klen), str(icv)]
    if p < 0.93:
        tags.add("cbc")
        ek = r.choice([16, 16, 24, 32])
        if r.random() < 0.05:
            tags.add("bad-algo")
            ek = r.choice([8, 15, 20])
        w = ["enc", r.choice(["cbc(aes)", "cbc(aes)", "aes"]) if ek in (16, 24, 32) else "cbc(aes)", _hex(r, ek)]
        aname, ak, truncs = r.choice(AUTHS)
        if r.random() < 0.15:
            tags.add("auth-untruncated")
            w += ["auth", aname, _hex(r, ak)]
        else:
            t = r.choice(truncs)
            if r.random() < 0.05:
                tags.add("bad-algo")
                t = r.choice([64, 1024])
                if t < 96:
                    tags.add("auth-trunc-short")
            w += ["auth-trunc", aname, _hex(r, ak), str(t)]
        if r.random() < 0.5:  # the two halves in either order
            w = w[3:] + w[:3]
        return w
    if p < 0.97:
        tags.add("enc-only")
        return ["enc", "cbc(aes)", _hex(r, 16)]
    tags.add("bad-algo")
    return ["aead", r.choice(["gcm(aes)", "rfc4106(ccm(aes))x", "rfc7539(chacha20,poly1305)"]), _hex(r, 20), "128"]


def state_case(r: random.Random, i: int, used_spis: set[int]) -> Case:
    tags: set[str] = set()
    fam = 4 if r.random() < 0.65 else 6
    tags.add(f"v{fam}")
    spi = 0
    while spi == 0 or spi in used_spis:  # all states live in one SAD in the guest: SPIs never collide
        spi = r.choice([r.randint(0x100, 0xffffffff), r.randint(0x100, 0xffff), r.randint(1, 0xff)])
    used_spis.add(spi)
    w = ["xfrm", "state", "add", "src", _addr(r, fam), "dst", _addr(r, fam), "proto", "esp", "spi", _num(r, spi)]
    algos = _algos(r, tags)
    mode = "tunnel" if r.random() < 0.6 else "transport"
    tags.add(mode)
    opts: list[list[str]] = [algos, ["mode", mode]]
    if r.random() < 0.6:
        opts.append(["reqid", _num(r, r.choice([1, 2, 100, r.randint(1, 0xffffffff)]))])
    flags = [f for f in ["noecn", "decap-dscp", "nopmtudisc", "wildrecv", "icmp", "af-unspec", "align4", "esn"]
             if r.random() < (0.25 if f == "esn" else 0.08)]
    if flags:
        tags.update(f"flag-{f}" for f in flags)
        opts.append(["flag", *flags])
    extra = [f for f in ["dont-encap-dscp", "oseq-may-wrap"] if r.random() < 0.1]
    if extra:
        tags.update(f"extra-{f}" for f in extra)
        opts.append(["extra-flag", *extra])
    if r.random() < (0.95 if "flag-esn" in tags else 0.6):  # ESN without a window: refused (a few cases)
        win = r.choice([0, 32, 32, 64, 128, 1024, 4096, r.randint(1, 31), r.randint(33, 2000)])
        tags.add("replay-window-big" if win > 32 else "replay-window")
        opts.append(["replay-window", str(win)])
    if r.random() < 0.12:
        opts.append(["replay-seq", _num(r, r.randint(0, 5000))])
        tags.add("replay-seq")
    if r.random() < 0.12:
        opts.append(["replay-oseq", _num(r, r.randint(0, 5000))])
        tags.add("replay-oseq")
    if r.random() < 0.2:
        m = ["mark", _num(r, r.randint(0, 0xffffffff))]
        if r.random() < 0.6:
            m += ["mask", _num(r, r.choice([0xffffffff, 0xff, 0xff00, 0xf0f0f0f0, r.randint(0, 0xffffffff)]))]
        tags.add("mark")
        opts.append(m)
    if r.random() < 0.15:
        m = ["output-mark", _num(r, r.randint(0, 0xffffffff))]
        if r.random() < 0.5:
            m += ["mask", _num(r, r.choice([0xffffffff, 0xff, r.randint(1, 0xffffffff)]))]
        tags.add("output-mark")
        opts.append(m)
    if r.random() < 0.15:
        opts.append(["if_id", _num(r, r.randint(0, 0xffffffff))])
        tags.add("if_id")
    if r.random() < 0.12:
        opts.append(["tfcpad", str(r.choice([0, 1, 64, 1500, r.randint(1, 4000)]))])
        tags.add("tfcpad")
    if r.random() < 0.15:
        kind = "espinudp-nonike" if r.random() < 0.15 else "espinudp"
        tags.add(f"encap-{kind}")
        oa = "0.0.0.0" if fam == 4 else "::"
        if r.random() < 0.2:
            oa = _addr(r, fam)
        opts.append(["encap", kind, str(r.choice([4500, r.randint(1024, 65535)])),
                     str(r.choice([4500, r.randint(1024, 65535)])), oa])
    if r.random() < 0.25:
        sfam = fam if (mode == "transport" or r.random() < 0.8) else 10 - fam
        tags.add("sel" if sfam == fam else "sel-other-family")
        s = ["sel"]
        if r.random() < 0.9:
            s += ["src", _prefix(r, sfam)]
        if r.random() < 0.9:
            s += ["dst", _prefix(r, sfam)]
        s += _upspec(r, sfam, tags)
        if len(s) > 1:
            opts.append(s)
    lim = _limits(r, tags)
    if lim:
        opts.append(lim)
    r.shuffle(opts)
    for o in opts:
        w += o
    return Case(f"s{i:03d}", "state", w, tags)


def _tmpl(r: random.Random, fam: int, direction: str, tags: set[str]) -> list[str]:
    w = ["tmpl"]
    proto = r.choice(["esp", "esp", "esp", "ah", "comp"])
    mode = r.choice(["tunnel", "transport"])
    if mode == "tunnel" or r.random() < 0.2:
        tfam = fam if r.random() < 0.8 else 10 - fam
        w += ["src", _addr(r, tfam), "dst", _addr(r, tfam)]
    w += ["proto", proto]
    if r.random() < 0.2:  # comp's SPI is a 16-bit CPI
        w += ["spi", _num(r, r.randint(0x100, 0xffff if proto == "comp" else 0xffffffff))]
    w += ["mode", mode]
    if r.random() < 0.7:
        w += ["reqid", _num(r, r.randint(0, 100))]
    if r.random() < 0.2:
        w += ["level", r.choice(["use", "required"])]
        tags.add("level")
    tags.add(f"tmpl-{proto}-{mode}")
    return w


def policy_case(r: random.Random, i: int) -> Case:
    tags: set[str] = set()
    fam = 4 if r.random() < 0.6 else 6
    direction = r.choice(["in", "out", "fwd"])
    w = ["xfrm", "policy", "add"]
    sel: list[str] = []
    # All policies live in one SPD in the guest and are told apart by their selector addresses: random
    # addresses, and never both left out.
    if r.random() < 0.95:
        sel += ["src", _prefix(r, fam)]
    if r.random() < 0.95 or not sel:
        sel += ["dst", _prefix(r, fam)]
    sel += _upspec(r, fam, tags)
    opts: list[list[str]] = [["dir", direction]]
    if r.random() < 0.5:
        opts.append(["priority", str(r.choice([0, 1, 100, 1000, r.randint(0, 0xffffffff)]))])
    if r.random() < 0.2:
        opts.append(["action", r.choice(["block", "allow"])])
    if r.random() < 0.15:
        m = ["mark", _num(r, r.randint(0, 0xffffffff))]
        if r.random() < 0.6:
            m += ["mask", _num(r, r.choice([0xffffffff, 0xff, r.randint(0, 0xffffffff)]))]
        tags.add("mark")
        opts.append(m)
    if r.random() < 0.15:
        opts.append(["if_id", _num(r, r.randint(0, 0xffffffff))])
    if r.random() < 0.1:
        opts.append(["flag", *r.sample(["localok", "icmp"], r.randint(1, 2))])
    if r.random() < 0.06:
        d = {"in": 0, "out": 1, "fwd": 2}[direction]
        if r.random() < 0.3:
            d = (d + 1) % 3
            tags.add("bad-index")
        # far above the indexes the kernel allocates itself here (8 per insert), so they never collide
        opts.append(["index", str(r.randint(100000, 200000) * 8 + d)])
        tags.add("index")
    if r.random() < 0.05:
        opts.append(["ptype", "sub"])
        tags.add("ptype-sub")
    lim = _limits(r, tags)
    if lim:
        opts.append(lim)
    r.shuffle(opts)
    w += sel
    for o in opts:
        w += o
    for _ in range(r.choice([0, 1, 1, 1, 2, 2, 3])):
        w += _tmpl(r, fam, direction, tags)
    return Case(f"p{i:03d}", "policy", w, tags)


def all_cases() -> list[Case]:
    r = random.Random(SEED)
    spis: set[int] = set()
    states = [state_case(r, i, spis) for i in range(N_STATES)]
    from listings import case_key
    policies: list[Case] = []
    keys: set[tuple] = set()
    while len(policies) < N_POLICIES:
        c = policy_case(r, len(policies))
        if case_key(c) not in keys:
            keys.add(case_key(c))
            policies.append(c)
    return states + policies
