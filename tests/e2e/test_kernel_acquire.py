"""ACQUIRE and the larval SA, against this machine's kernel (6.18, XFRM without ESP: no SA can be added, but a packet
that an OUT policy protects still makes xfrm_state_find create a larval SA and send an ACQUIRE to the key manager).

The same policies go into the kernel (through `xfrm --kernel`, in a network namespace whose veth is named xfrm0) and
into an xfrmd (in a namespace of its own, TUN xfrm0), the same flows are sent in each from sockets bound to the same
addresses and ports, and then:
- the ACQUIRE messages, as `xfrm monitor` prints them (the kernel's also as iproute2's `ip xfrm monitor` prints
  them), are the same, message for message;
- the larval SAs, as `xfrm -s state list` prints them, are the same but for the acquire sequence number (a counter
  the kernel shares across namespaces) and the add time's seconds.
A monitor runs on each side: the kernel creates no larval SA while no key manager listens (km_is_alive)."""

import os
import re
import subprocess
import time

import pytest

from kernelsides import kernel_and_xfrmd, run, time_blind, stop

A4, B4 = "192.0.2.1", "192.0.2.2"
A6, B6 = "2001:db8::1", "2001:db8::2"

# Each case: the OUT policies, the flows sent (in order) as (kind, family, source port, destination port), and how
# many ACQUIREs (and larval SAs) the kernel makes of them.
CASES = {
    # A tunnel template; XFRM_POLICY_CPU_ACQUIRE (flag 4) with no SA at all: a plain ACQUIRE, no XFRMA_SA_PCPU (the
    # kernel sets the CPU only when a fallback SA exists). The same flow again finds its larval SA, and so does
    # another source port: a larval SA for the template's addresses and reqid means an acquire in progress for any
    # flow (xfrm_state_look_at), whatever its selector.
    "udp4-tunnel-cpu-acquire": (
        [f"policy add src {A4}/32 dst {B4}/32 dir out flag 0x04 priority 7 "
         f"tmpl src {A4} dst {B4} proto esp reqid 1 mode tunnel"],
        [("udp", 4, 40000, 9), ("udp", 4, 40000, 9), ("udp", 4, 40001, 9)], 1),
    # IPv6, a transport template without addresses (the larval SA takes them from the flow), a TCP SYN. The IPv6
    # flow has no output interface when the policy is looked up, so the larval selector has no `dev`.
    "tcp6-transport": (
        [f"policy add src {A6}/128 dst {B6}/128 proto tcp dir out "
         "tmpl proto esp mode transport reqid 9"],
        [("tcp", 6, 41000, 443)], 1),
    # Two templates, the first optional (level use): xfrm_state_find runs for each, so the optional one has its
    # ACQUIRE and larval SA too, before the required tunnel one.
    "udp4-two-templates-first-optional": (
        [f"policy add src {A4}/24 dst {B4}/24 proto udp dport 53 dir out "
         f"tmpl proto esp mode transport reqid 3 level use "
         f"tmpl src {A4} dst {B4} proto esp reqid 4 mode tunnel"],
        [("udp", 4, 42000, 53)], 2),
    # ICMP: the selector's ports are the message's type and code (an echo request, type 8 code 0).
    "icmp4-echo": (
        [f"policy add src {A4}/32 dst {B4}/32 proto icmp dir out "
         f"tmpl src {A4} dst {B4} proto esp reqid 6 mode tunnel"],
        [("icmp", 4, 8, 0)], 1),
    # IPv6 inside an IPv4 tunnel.
    "udp6-tunnel-v4-outer": (
        [f"policy add src {A6}/64 dst {B6}/64 dir out "
         f"tmpl src {A4} dst {B4} proto esp reqid 5 mode tunnel"],
        [("udp", 6, 43000, 4789)], 1),
}


def send(ns, kind, family, sport, dport):
    """Sends one UDP datagram, starts one TCP connection (its SYN), or sends an ICMP message of type `sport` and code
    `dport` (IPv4, a raw socket), from the namespace's A to B."""
    src, dst = (A4, B4) if family == 4 else (A6, B6)
    if kind == "icmp":
        code = (
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\n"
            f"s.bind(({src!r}, 0))\n"
            f"m = bytearray([{sport}, {dport}, 0, 0, 0x12, 0x34, 0, 1]) + b'acquire!'\n"
            "c = sum((m[i] << 8) + m[i + 1] for i in range(0, len(m), 2))\n"
            "c = (c & 0xffff) + (c >> 16)\n"
            "m[2:4] = (~c & 0xffff).to_bytes(2, 'big')\n"
            "try:\n"
            f"    s.sendto(bytes(m), ({dst!r}, 0))\n"
            "except OSError:\n"
            "    pass\n"
        )
        run("ip", "netns", "exec", ns, "python3", "-c", code)
        return
    code = (
        "import socket, sys\n"
        f"f = socket.AF_INET if {family} == 4 else socket.AF_INET6\n"
        f"s = socket.socket(f, socket.SOCK_DGRAM if {kind!r} == 'udp' else socket.SOCK_STREAM)\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(({src!r}, {sport}))\n"
        "s.settimeout(0.3)\n"
        "try:\n"
        f"    s.sendto(b'acquire', ({dst!r}, {dport})) if {kind!r} == 'udp' else s.connect(({dst!r}, {dport}))\n"
        "except OSError as e:\n"
        "    print(e.errno, file=sys.stderr)\n"
    )
    run("ip", "netns", "exec", ns, "python3", "-c", code)


def normalized_states(listing):
    """A `-s state list` without what cannot agree: the acquire sequence number and the add time's seconds."""
    return time_blind(re.sub(r" seq 0x[0-9a-f]{8} ", " seq SEQ ", listing))


@pytest.fixture
def namespaces(tmp_path):
    with kernel_and_xfrmd(tmp_path, "xfrmacq") as (kernel, ours, sock):
        # The kernel's side: a veth named like xfrmd's TUN, so both selectors list `dev xfrm0`.
        run("ip", "-n", kernel, "link", "add", "xfrm0", "type", "veth", "peer", "name", "xk1")
        run("ip", "-n", kernel, "addr", "add", f"{A4}/24", "dev", "xfrm0")
        run("ip", "-n", kernel, "addr", "add", f"{A6}/64", "dev", "xfrm0", "nodad")
        for dev in ("lo", "xfrm0", "xk1"):
            run("ip", "-n", kernel, "link", "set", dev, "up")
        run("ip", "-n", ours, "link", "set", "lo", "up")
        run("ip", "-n", ours, "addr", "add", f"{A4}/32", "dev", "xfrm0")
        run("ip", "-n", ours, "addr", "add", f"{A6}/128", "dev", "xfrm0", "nodad")
        run("ip", "-n", ours, "link", "set", "xfrm0", "up")
        run("ip", "-n", ours, "route", "add", f"{B4}/32", "dev", "xfrm0", "src", A4)
        run("ip", "-n", ours, "route", "add", f"{B6}/128", "dev", "xfrm0", "src", A6)
        yield kernel, ours, sock


@pytest.mark.parametrize("case", sorted(CASES))
def test_acquire_and_larval_sa_are_the_kernels(namespaces, case):
    kernel, ours, sock = namespaces
    policies, flows, expected = CASES[case]
    tool = os.environ["XFRM_TOOL"]
    # Each side's listing tool runs in its namespace, so that ifindexes print as that namespace's names.
    k = lambda *a: ["ip", "netns", "exec", kernel, tool, "--kernel", *a]
    o = lambda *a: ["ip", "netns", "exec", ours, tool, "-S", str(sock), *a]
    for line in policies:
        run(*k(*line.split()))
        run(*o(*line.split()))
    monitors = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for argv in (k("monitor"), o("monitor"), ["ip", "netns", "exec", kernel, "ip", "xfrm", "monitor"])]
    try:
        time.sleep(1.0)  # every monitor joined its groups
        for flow in flows:
            send(kernel, *flow)
            send(ours, *flow)
        time.sleep(1.0)
        kernel_states = run(*k("-s", "state", "list")).stdout
        our_states = run(*o("-s", "state", "list")).stdout
    finally:
        kernel_events, our_events, iproute2_events = (stop(m) for m in monitors)
    assert kernel_events == iproute2_events, "xfrm --kernel monitor reads the kernel's ACQUIRE as ip xfrm does"
    assert kernel_events.count("acquire proto ") == expected, kernel_events
    assert kernel_states.count("\tproto esp spi 0x00000000(0) ") == expected, kernel_states
    assert our_events == kernel_events
    assert normalized_states(our_states) == normalized_states(kernel_states)


def test_a_larval_sa_expires_after_30_seconds_with_the_kernels_expire(namespaces):
    """XFRM_ACQ_EXPIRES: a larval SA that no key manager filled in is deleted 30 s after its ACQUIRE (or ALLOCSPI),
    with a hard EXPIRE (xfrm_timer_handler); the two monitors print the same ACQUIRE and EXPIREs (the per-CPU one's
    with its direction and CPU), and both SADs are empty."""
    kernel, ours, sock = namespaces
    tool = os.environ["XFRM_TOOL"]
    k = lambda *a: ["ip", "netns", "exec", kernel, tool, "--kernel", *a]
    o = lambda *a: ["ip", "netns", "exec", ours, tool, "-S", str(sock), *a]
    line = f"policy add src {A4}/32 dst {B4}/32 dir out tmpl src {A4} dst {B4} proto esp reqid 1 mode tunnel"
    run(*k(*line.split()))
    run(*o(*line.split()))
    monitors = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for argv in (k("monitor"), o("monitor"))]
    try:
        time.sleep(1.0)
        send(kernel, "udp", 4, 40000, 9)
        send(ours, "udp", 4, 40000, 9)
        # And a per-CPU, directed larval SA from ALLOCSPI: its EXPIRE carries XFRMA_SA_DIR and XFRMA_SA_PCPU.
        spi = (f"state allocspi src {A4} dst 198.51.100.9 proto esp mode tunnel reqid 3 dir out pcpu-num 1 "
               "min 0x4242 max 0x4242").split()
        assert run(*k(*spi)).stdout == run(*o(*spi)).stdout
        deadline = time.time() + 45
        while time.time() < deadline:
            if not run(*k("state", "list")).stdout and not run(*o("state", "list")).stdout:
                break
            time.sleep(1.0)
        time.sleep(0.5)
    finally:
        kernel_events, our_events = (stop(m) for m in monitors)
    assert "acquire proto esp" in kernel_events and "Expired src 192.0.2.1 dst 192.0.2.2" in kernel_events, \
        kernel_events
    assert kernel_events.count("\thard 1") == 2 and "\tdir out\n\tpcpu-num 1\n" in kernel_events, kernel_events
    assert our_events == kernel_events
    assert run(*k("state", "list")).stdout == run(*o("state", "list")).stdout == ""


def test_allocspi_gives_the_spi_to_the_acquires_larval_sa_by_tunnel_or_by_sequence_number(namespaces):
    """ALLOCSPI for the ACQUIRE's template (same mode, reqid, protocol and addresses) gives its SPI to the ACQUIRE's
    larval SA, which keeps the flow's selector (xfrm_find_acq); a second one makes a new larval SA. ALLOCSPI with the
    ACQUIRE's sequence number (each side's own: the kernel's counter is shared across namespaces) finds that larval
    SA whatever the reqid (xfrm_find_acq_byseq), and one that has its SPI already is answered as it is."""
    kernel, ours, sock = namespaces
    tool = os.environ["XFRM_TOOL"]
    k = lambda *a: ["ip", "netns", "exec", kernel, tool, "--kernel", *a]
    o = lambda *a: ["ip", "netns", "exec", ours, tool, "-S", str(sock), *a]
    for i, reqid in enumerate((1, 2)):
        line = (f"policy add src {A4}/32 dst 198.51.100.{i + 1}/32 dir out "
                f"tmpl src {A4} dst {B4} proto esp reqid {reqid} mode tunnel")
        run(*k(*line.split()))
        run(*o(*line.split()))
    run("ip", "-n", kernel, "route", "add", "198.51.100.0/24", "dev", "xfrm0", "src", A4)
    run("ip", "-n", ours, "route", "add", "198.51.100.0/24", "dev", "xfrm0", "src", A4)
    monitors = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for argv in (k("monitor"), o("monitor"))]
    try:
        time.sleep(1.0)
        for ns in (kernel, ours):
            for i in (1, 2):
                code = ("import socket\n"
                        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                        f"s.bind(({A4!r}, 44000))\n"
                        "try:\n"
                        f"    s.sendto(b'acquire', ('198.51.100.{i}', 9))\n"
                        "except OSError:\n"
                        "    pass\n")
                run("ip", "netns", "exec", ns, "python3", "-c", code)
        time.sleep(0.5)
        answers = {}
        for side, cmd in (("kernel", k), ("ours", o)):
            listing = run(*cmd("-s", "state", "list")).stdout
            # `seq 0x%08u`: iproute2 prints the sequence number in decimal; the reqid-2 ACQUIRE's larval SA.
            seq = int(re.search(r"reqid 2\(0x00000002\) mode tunnel\n\treplay-window 0 seq 0x(\d+)", listing).group(1))
            # `seq` is parsed as a big-endian number (xfrm_seq_parse): give the bytes that read back as `seq`.
            wire_seq = int.from_bytes(seq.to_bytes(4, "little"), "big")
            lines = [f"state allocspi src {A4} dst {B4} proto esp mode tunnel reqid 1 min 0x900 max 0x900",
                     f"state allocspi src {A4} dst {B4} proto esp mode tunnel reqid 1 min 0x901 max 0x901",
                     f"state allocspi src {A4} dst {B4} proto esp mode tunnel reqid 77 seq {wire_seq:#x} "
                     "min 0x902 max 0x902",
                     f"state allocspi src {A4} dst {B4} proto esp mode tunnel reqid 77 seq {wire_seq:#x} "
                     "min 0x903 max 0x903",
                     "-s state list"]
            answers[side] = [(r.returncode, time_blind(r.stdout), r.stderr)
                             for r in (run(*cmd(*l.split()), check=False) for l in lines)]
    finally:
        for m in monitors:
            stop(m)
    strip_seq = lambda a: [(rc, re.sub(r" seq 0x\d{8} ", " seq SEQ ", out), err) for rc, out, err in a]
    assert strip_seq(answers["ours"]) == strip_seq(answers["kernel"])
    kernel_listing = answers["kernel"][-1][1]
    assert "spi 0x00000900(2304) reqid 1(0x00000001)" in kernel_listing, kernel_listing
    assert "spi 0x00000902(2306) reqid 2(0x00000002)" in kernel_listing, "the reqid-2 ACQUIRE's larval SA, by seq"
    assert answers["kernel"][3][1] == answers["kernel"][2][1], "the same SA again, with its SPI"

