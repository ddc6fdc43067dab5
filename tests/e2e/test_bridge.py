"""xfrm-bridge: unmodified programs that speak XFRM netlink (iproute2's `ip xfrm`, a Python netlink socket) drive
xfrmd through libxfrmbridge.so (LD_PRELOAD), while everything else they do (NETLINK_ROUTE) stays with the kernel.

Each test starts its own xfrmd in a network namespace of its own (the `daemon` fixture of conftest.py). The kernel of this
host answers XFRM policy requests, so a policy that reached the kernel instead of the daemon would show in the
namespace's own `ip xfrm policy` listing: each test checks that it stays empty."""

import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import running_daemon, xfrmd_path
from test_daemon import KEY, LINES, xfrm_s


def bridge_path() -> str:
    return str(Path(os.environ["XFRM_TOOL"]).with_name("xfrm-bridge"))


def bridged(netns, sock, *argv, check=False, timeout=60):
    return subprocess.run(["ip", "netns", "exec", netns, bridge_path(), "-S", str(sock), *argv], capture_output=True,
                          text=True, timeout=timeout, check=check)


def kernel_xfrm(netns, what):
    return subprocess.run(["ip", "netns", "exec", netns, "ip", "xfrm", what, "list"], capture_output=True, text=True,
                          timeout=30, check=True).stdout


def test_ip_xfrm_through_the_bridge_configures_the_daemon_and_lists_what_xfrm_lists(daemon, netns):
    sock, _ = daemon
    for line in LINES:
        r = bridged(netns, sock, "ip", "xfrm", *line.split())
        assert r.returncode == 0, (line, r.stderr)
    for what in ["state", "policy"]:
        via_ip = bridged(netns, sock, "ip", "xfrm", what, "list")
        assert via_ip.returncode == 0, via_ip.stderr
        assert via_ip.stdout == xfrm_s(sock, what, "list").stdout != "", what
        assert kernel_xfrm(netns, what) == "", f"the kernel got the {what}s"
    r = bridged(netns, sock, "ip", "xfrm", "state", "deleteall")
    assert r.returncode == 0, r.stderr
    assert xfrm_s(sock, "state", "count").stdout == "\t SAD count 0\n"


def test_errors_come_back_as_the_kernel_words_them(daemon, netns):
    sock, _ = daemon
    assert bridged(netns, sock, "ip", "xfrm", *LINES[0].split()).returncode == 0
    r = bridged(netns, sock, "ip", "xfrm", *LINES[0].split())
    assert (r.returncode, r.stderr) == (2, "RTNETLINK answers: File exists\n")
    r = bridged(netns, sock, "ip", "xfrm", "state", "get", "src", "192.0.2.1", "dst", "192.0.2.9", "proto", "esp",
                "spi", "0x999")
    assert (r.returncode, r.stderr) == (2, "RTNETLINK answers: No such process\n")


def test_monitor_through_the_bridge_sees_what_another_client_changes(daemon, netns):
    sock, _ = daemon
    mon = subprocess.Popen(["ip", "netns", "exec", netns, bridge_path(), "-S", str(sock), "ip", "xfrm", "monitor"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # let it join the groups
        add = ["state", "add", "src", "192.0.2.1", "dst", "192.0.2.3", "proto", "esp", "spi", "0x301", "reqid", "3",
               "mode", "tunnel", "aead", "rfc4106(gcm(aes))", KEY, "128"]
        assert xfrm_s(sock, *add).returncode == 0
        assert xfrm_s(sock, "state", "delete", "src", "192.0.2.1", "dst", "192.0.2.3", "proto", "esp", "spi",
                      "0x301").returncode == 0
        time.sleep(0.5)
    finally:
        mon.terminate()
        out, err = mon.communicate(timeout=10)
    listing = xfrm_s(sock, *add[:1], "list").stdout  # nothing left
    assert listing == ""
    assert out.count("proto esp spi 0x00000301 reqid 3 mode tunnel") == 2, (out, err)
    assert "\nDeleted src 192.0.2.1 dst 192.0.2.3\n" in "\n" + out, out


NETLINK_PROBE = r"""
import socket, struct
SOL_NETLINK, ADD, DROP, EXT_ACK = 270, 1, 2, 11
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 6)
s.bind((0, 1 << 1))                       # group 2 (EXPIRE) by the legacy bitmask
pid, groups = s.getsockname()
s.setsockopt(SOL_NETLINK, ADD, 3)         # and group 3 (SA)
s.setsockopt(SOL_NETLINK, DROP, 2)
s.setsockopt(SOL_NETLINK, EXT_ACK, 1)
print(pid == __import__("os").getpid(), groups, s.getsockname()[1], s.getsockopt(SOL_NETLINK, EXT_ACK),
      s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN), s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL))
# XFRM_MSG_GETSA dump (type 0x12, NLM_F_REQUEST|NLM_F_DUMP), header pid 0: the answer carries our port id.
s.sendto(struct.pack("=IHHII", 16, 0x12, 0x301, 77, 0), (0, 0))
data, addr = s.recvfrom(65536)
length, kind, flags, seq, rpid = struct.unpack("=IHHII", data[:16])
print(addr, kind, seq, rpid == pid)
other = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 6)
other.bind((0, 0))
print(other.getsockname()[0] not in (0, pid))
try:
    s.sendto(struct.pack("=IHHII", 16, 0x12, 0x301, 78, 0), (4242, 0))
    print("sent to a user port")
except ConnectionRefusedError:
    print("refused")
"""


def test_a_netlink_socket_keeps_netlink_semantics_through_the_bridge(daemon, netns):
    sock, _ = daemon
    assert bridged(netns, sock, "ip", "xfrm", *LINES[0].split()).returncode == 0
    r = bridged(netns, sock, "python3", "-c", NETLINK_PROBE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "True 2 4 1 16 6",          # pid = process id; groups 2 → 2|3 → 3 only (mask 4); EXT_ACK kept; netlink, XFRM
        "(0, 0) 16 77 True",        # from the kernel's address; XFRM_MSG_NEWSA (16) answering seq 77 to our port
        "True",                     # a second socket gets another port id
        "refused",                  # only port 0 (the kernel) can be sent to
    ], r.stdout


# Asks ethtool (SIOCETHTOOL on a NETLINK_XFRM socket, as strongSwan's and libreswan's offload checks do) whether each
# interface in argv has esp-hw-offload active: prints "NAME 0|1" per interface.
ETHTOOL_PROBE = r"""
import ctypes, fcntl, socket, struct, sys
SIOCETHTOOL, GSSET_INFO, GSTRINGS, GFEATURES, ETH_SS_FEATURES = 0x8946, 0x37, 0x1b, 0x3a, 4
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 6)
def ethtool(name, request):
    data = ctypes.create_string_buffer(request, len(request))
    fcntl.ioctl(s.fileno(), SIOCETHTOOL, struct.pack("16sQ16x", name.encode(), ctypes.addressof(data)))
    return data.raw
count = struct.unpack_from("I", ethtool("lo", struct.pack("IIQI", GSSET_INFO, 0, 1 << ETH_SS_FEATURES, 0)), 16)[0]
names = ethtool("lo", struct.pack("III", GSTRINGS, ETH_SS_FEATURES, 0) + bytes(32 * count))
bit = [names[12 + 32 * i:44 + 32 * i].rstrip(b"\0") for i in range(count)].index(b"esp-hw-offload")
blocks = (count + 31) // 32
for name in sys.argv[1:]:
    features = ethtool(name, struct.pack("II", GFEATURES, blocks) + bytes(16 * blocks))
    active = struct.unpack_from("I", features, 8 + 16 * (bit // 32) + 8)[0]
    print(name, (active >> (bit % 32)) & 1)
"""


def test_ethtool_through_the_bridge_shows_esp_offload_where_the_daemon_has_its_nic(tmp_path, netns):
    """A key manager offers an SA to a device only when ethtool says the interface of its outer address has
    esp-hw-offload; on a bridged socket the bridge adds that feature exactly where xfrmd has an offload device (its
    --offload-dev), and the kernel's answer stands everywhere else."""
    subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "add", "dum0", "type", "veth", "peer", "name", "dum1"],
                   check=True)
    plain = subprocess.run(["ip", "netns", "exec", netns, "python3", "-c", ETHTOOL_PROBE, "dum0", "dum1", "lo"],
                           capture_output=True, text=True, timeout=30)
    assert (plain.returncode, plain.stdout) == (0, "dum0 0\ndum1 0\nlo 0\n"), plain.stderr  # the kernel's answer
    with running_daemon(netns, tmp_path / "nic.sock", "--offload", "crypto", "--offload-dev", "dum0") as (sock, _):
        r = bridged(netns, sock, "python3", "-c", ETHTOOL_PROBE, "dum0", "dum1", "lo")
        assert (r.returncode, r.stdout) == (0, "dum0 1\ndum1 0\nlo 0\n"), r.stderr
    with running_daemon(netns, tmp_path / "plain.sock") as (sock, _):  # no NIC: the daemon offloads nowhere
        r = bridged(netns, sock, "python3", "-c", ETHTOOL_PROBE, "dum0", "xfrm0")
        assert (r.returncode, r.stdout) == (0, "dum0 0\nxfrm0 0\n"), r.stderr
    # The options' misuses are refused with one clear line, before anything is set up.
    for args, words in [(["--offload-dev", "dum0"], "--offload-dev names the interface of the simulated NIC: it "
                                                    "needs --offload"),
                        (["--offload", "crypto", "--offload-promote"], "--offload-promote serves requests in packet "
                                                                       "mode: it needs --offload packet or both"),
                        (["--offload", "crypto", "--offload-dev", "nosuch0"], "--offload-dev nosuch0: no such "
                                                                              "interface")]:
        r = subprocess.run(["ip", "netns", "exec", netns, xfrmd_path(), "--socket", str(tmp_path / "bad.sock"), *args],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and words in r.stderr, (args, r.stderr)


def test_route_netlink_and_other_sockets_stay_with_the_kernel(daemon, netns):
    sock, _ = daemon
    plain = subprocess.run(["ip", "netns", "exec", netns, "ip", "-o", "link", "show"], capture_output=True, text=True,
                           timeout=30, check=True).stdout
    via = bridged(netns, sock, "ip", "-o", "link", "show")
    assert via.returncode == 0 and via.stdout == plain != "", via.stderr
    assert "xfrm0" in via.stdout  # the daemon's TUN device, seen through the kernel's NETLINK_ROUTE


def test_the_bridge_says_in_one_line_when_no_daemon_is_there(tmp_path):
    r = subprocess.run([bridge_path(), "-S", str(tmp_path / "none.sock"), "ip", "xfrm", "state", "list"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.startswith(f"xfrm-bridge: no xfrmd is running at {tmp_path / 'none.sock'} (") and \
        r.stderr.count("\n") == 1, r.stderr
    r = subprocess.run([bridge_path()], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stderr) == (2, "usage: xfrm-bridge [-S PATH] [--share-natt-port] [--natt-port N] COMMAND "
                                           "[ARG...]\n")


def test_a_restarted_daemon_is_connected_to_again_and_a_listener_keeps_listening(tmp_path, netns):
    """A netlink socket never reads as end of file (charon's loops would spin on one): when xfrmd goes away the bridge
    connects again, joins the same groups, and the program reads ENOBUFS (missed messages). `ip xfrm monitor` through
    the bridge hears a change made after the daemon's restart; with no daemon at all it stays silent, it does not spin."""
    sock = tmp_path / "r.sock"

    def start():
        p = subprocess.Popen(["ip", "netns", "exec", netns, xfrmd_path(), "--socket", str(sock)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 30
        while not sock.exists():
            assert p.poll() is None and time.time() < deadline, p.stderr.read()
            time.sleep(0.05)
        return p

    def stop(p):
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=10)

    daemon_proc = start()
    mon = subprocess.Popen(["ip", "netns", "exec", netns, bridge_path(), "-S", str(sock), "ip", "xfrm", "monitor"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        stop(daemon_proc)
        daemon_proc = start()
        time.sleep(1.0)  # the bridge connects again (it retries every 0.1 s)
        add = ["state", "add", "src", "192.0.2.1", "dst", "192.0.2.7", "proto", "esp", "spi", "0x707", "reqid", "7",
               "mode", "tunnel", "aead", "rfc4106(gcm(aes))", KEY, "128"]
        assert xfrm_s(sock, *add).returncode == 0
        time.sleep(0.5)
        stop(daemon_proc)
        time.sleep(6.0)  # gives up after 5 s and stays silent
        cpu = float(subprocess.run(["ps", "-o", "time=", "-p", str(mon.pid)], capture_output=True, text=True)
                    .stdout.strip().replace(":", "") or 0)
        assert mon.poll() is None, ("ip xfrm monitor exited when the daemon went away", mon.communicate()[1])
    finally:
        mon.terminate()
        out, err = mon.communicate(timeout=10)
        if daemon_proc.poll() is None:
            stop(daemon_proc)
    assert "proto esp spi 0x00000707 reqid 7 mode tunnel" in out, (out, err)
    assert "xfrm-bridge: xfrmd at" in err and "connected again" in err and "stays silent" in err, err
    assert cpu < 2, f"the monitor used {cpu} s of CPU while the daemon was away"
