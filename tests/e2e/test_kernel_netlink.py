"""`xfrm --kernel`: the `ip xfrm` grammar over NETLINK_XFRM to this machine's kernel, with the same encoder the
in-process server uses. Each test runs in a network namespace of its own (created and deleted here), so the host's
SPD is never touched. This kernel has XFRM netlink but no ESP: policies work, state adds fail with its message.
iproute2's `ip xfrm` on the same namespace is the reference, byte for byte."""

import os
import subprocess
import time
import uuid

import pytest

POLICIES = [
    "policy add src 198.51.100.0/24 dst 203.0.113.0/24 dir out priority 5 "
    "tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 3 mode tunnel",
    "policy add src 203.0.113.0/24 dst 198.51.100.0/24 dir in tmpl src 192.0.2.2 dst 192.0.2.1 proto esp reqid 4 "
    "mode tunnel level use",
    "policy add src 2001:db8:1::/64 dst 2001:db8:2::/64 proto tcp dport 443 dir fwd action block mark 7 mask 0xff",
    "policy add src 198.51.100.7 dst 203.0.113.9 proto udp sport 500 dir out priority 9 if_id 0x42 "
    "tmpl proto esp mode transport reqid 9",
    "policy add dir in ptype main src 0.0.0.0/0 dst 0.0.0.0/0 proto icmp type 8 code 0",
    "policy add src 198.51.100.0/25 dst 203.0.113.128/25 dir out limit time-hard 600 limit packet-soft 100 "
    "tmpl src 2001:db8::1 dst 2001:db8::2 proto esp mode tunnel reqid 11 tmpl proto esp mode transport reqid 12",
]


@pytest.fixture
def netns():
    name = f"xfrmk-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_ns(ns, *argv, check=False):
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=60,
                          check=check)


def xfrm_k(ns, *args):
    return in_ns(ns, os.environ["XFRM_TOOL"], "--kernel", *args)


def test_policies_added_by_xfrm_read_back_identically_with_iproute2(netns):
    for line in POLICIES:
        r = xfrm_k(netns, *line.split())
        assert r.returncode == 0, (line, r.stderr)
    ip_plain = in_ns(netns, "ip", "xfrm", "policy", "list")
    ip_stats = in_ns(netns, "ip", "-s", "xfrm", "policy", "list")
    assert ip_plain.returncode == 0 and ip_plain.stdout.count("dir ") == len(POLICIES), ip_plain.stdout
    ours_plain = xfrm_k(netns, "policy", "list")
    ours_stats = xfrm_k(netns, "-s", "policy", "list")
    assert ours_plain.stdout == ip_plain.stdout
    # -s prints the add time to the second: both listings were made within the same few seconds, compare
    # everything but the timestamps' seconds.
    strip = lambda t: "\n".join(l.split(" use ")[0][:-3] if "add 20" in l else l for l in t.splitlines())
    assert strip(ours_stats.stdout) == strip(ip_stats.stdout)
    assert xfrm_k(netns, "policy", "count").stdout == in_ns(netns, "ip", "xfrm", "policy", "count").stdout


def test_policies_added_by_iproute2_list_identically_with_xfrm_and_get_delete_flush_work(netns):
    for line in POLICIES:
        assert in_ns(netns, "ip", "xfrm", *line.split()).returncode == 0, line
    assert xfrm_k(netns, "policy", "list").stdout == in_ns(netns, "ip", "xfrm", "policy", "list").stdout
    get = ["policy", "get", "src", "198.51.100.0/24", "dst", "203.0.113.0/24", "dir", "out"]
    assert xfrm_k(netns, *get).stdout == in_ns(netns, "ip", "xfrm", *get).stdout
    r = xfrm_k(netns, "policy", "delete", "src", "198.51.100.0/24", "dst", "203.0.113.0/24", "dir", "out")
    assert r.returncode == 0, r.stderr
    again = xfrm_k(netns, "policy", "delete", "src", "198.51.100.0/24", "dst", "203.0.113.0/24", "dir", "out")
    ip_again = in_ns(netns, "ip", "xfrm", "policy", "delete", "src", "198.51.100.0/24", "dst", "203.0.113.0/24",
                     "dir", "out")
    assert (again.returncode, again.stderr) == (ip_again.returncode, ip_again.stderr)
    assert xfrm_k(netns, "policy", "flush").returncode == 0
    assert in_ns(netns, "ip", "xfrm", "policy", "list").stdout == ""


def test_a_state_add_fails_with_the_kernels_own_message_exactly_as_ip_shows_it(netns):
    line = ("state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 reqid 1 mode tunnel "
            "aead rfc4106(gcm(aes)) 0x0102030405060708090a0b0c0d0e0f1011121314 128").split()
    ours = xfrm_k(netns, *line)
    theirs = in_ns(netns, "ip", "xfrm", *line)
    assert theirs.returncode != 0, "this test expects a kernel without ESP states"
    assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)
    assert xfrm_k(netns, "state", "list").stdout == in_ns(netns, "ip", "xfrm", "state", "list").stdout == ""


def test_a_per_cpu_state_without_dir_is_refused_as_the_kernel_refuses_it(netns):
    """XFRMA_SA_PCPU (`pcpu-num`, Linux 6.13) without XFRMA_SA_DIR: verify_newsa_info refuses it before anything
    else, so even this ESP-less kernel answers with that message. The in-process stack answers the same."""
    line = ("state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 reqid 1 mode tunnel "
            "aead rfc4106(gcm(aes)) 0x0102030405060708090a0b0c0d0e0f1011121314 128 pcpu-num 1").split()
    kernel = xfrm_k(netns, *line)
    offline = subprocess.run([os.environ["XFRM_TOOL"], "--offline", *line], capture_output=True, text=True,
                             timeout=60)
    assert kernel.stderr == "Error: SA_PCPU only supported with SA_DIR.\n", kernel.stderr
    assert (offline.returncode, offline.stdout, offline.stderr) == (kernel.returncode, kernel.stdout, kernel.stderr)


def test_default_policies_set_and_read_through_the_kernel(netns):
    assert xfrm_k(netns, "policy", "setdefault", "in", "block", "fwd", "accept", "out", "accept").returncode == 0
    assert xfrm_k(netns, "policy", "getdefault").stdout == in_ns(netns, "ip", "xfrm", "policy", "getdefault").stdout
    assert "in:  block" in in_ns(netns, "ip", "xfrm", "policy", "getdefault").stdout


def test_monitor_shows_the_kernels_events_as_ip_xfrm_monitor_does(netns):
    ours = subprocess.Popen(["ip", "netns", "exec", netns, os.environ["XFRM_TOOL"], "--kernel", "monitor"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    theirs = subprocess.Popen(["ip", "netns", "exec", netns, "ip", "xfrm", "monitor"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # both listeners joined their groups
        for line in POLICIES[:3]:
            assert in_ns(netns, "ip", "xfrm", *line.split()).returncode == 0
        in_ns(netns, "ip", "xfrm", "policy", "delete", "src", "198.51.100.0/24", "dst", "203.0.113.0/24", "dir", "out")
        in_ns(netns, "ip", "xfrm", "policy", "flush")
        time.sleep(1.0)
    finally:
        ours.terminate()
        theirs.terminate()
    out_ours, err_ours = ours.communicate(timeout=10)
    out_theirs, _ = theirs.communicate(timeout=10)
    assert out_theirs.count("dir ") >= 4, out_theirs
    assert out_ours == out_theirs, err_ours
