"""xfrmd's control socket and `xfrm -S`: the XFRM stack behind a Unix SOCK_SEQPACKET socket speaking XFRM netlink.

Each test starts its own xfrmd, in a network namespace of its own, on a socket in its tmp dir, and stops it with
SIGTERM. The offline stack (`xfrm
--offline -batch`) is the reference for listings: the same command lines must print the same thing."""

import os
import signal
import socket
import stat
import struct
import subprocess
import time

from conftest import xfrmd_path

KEY = "0x0102030405060708090a0b0c0d0e0f1011121314"
LINES = [
    f"state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 reqid 1 mode tunnel aead rfc4106(gcm(aes)) {KEY} 128 "
    "replay-window 64 flag esn",
    "state add src 2001:db8::1 dst 2001:db8::2 proto esp spi 0x200 reqid 2 mode transport enc cbc(aes) "
    "0x00112233445566778899aabbccddeeff auth-trunc hmac(sha256) 0x" + "ab" * 32 + " 128 encap espinudp 4500 4500 ::",
    "policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir out priority 10 tmpl src 192.0.2.1 dst 192.0.2.2 proto esp "
    "reqid 1 mode tunnel",
    "policy add src 10.0.2.0/24 dst 10.0.1.0/24 dir in action block mark 7 mask 0xff",
]


def xfrm_s(sock, *args, check=False):
    return subprocess.run([os.environ["XFRM_TOOL"], "-S", str(sock), *args], capture_output=True, text=True,
                          timeout=60, check=check)


def offline_listing(tmp_path, lines, listing):
    (tmp_path / "ref").write_text("\n".join(lines + [listing]) + "\n")
    r = subprocess.run([os.environ["XFRM_TOOL"], "--offline", "-batch", str(tmp_path / "ref")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_commands_through_the_daemon_list_what_the_offline_stack_lists(daemon, tmp_path):
    sock, _ = daemon
    for line in LINES:
        r = xfrm_s(sock, *line.split())
        assert r.returncode == 0, (line, r.stderr)
    for listing in ["state list", "policy list", "state count", "policy count", "policy getdefault"]:
        assert xfrm_s(sock, *listing.split()).stdout == offline_listing(tmp_path, LINES, listing), listing


def test_a_batch_goes_to_the_daemon_and_errors_are_the_offline_stacks(daemon, tmp_path):
    sock, _ = daemon
    (tmp_path / "b").write_text("\n".join(LINES) + "\n" + LINES[0] + "\n")
    r = subprocess.run([os.environ["XFRM_TOOL"], "-S", str(sock), "-batch", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (2, "RTNETLINK answers: File exists\n")
    assert xfrm_s(sock, "state", "count").stdout == "\t SAD count 2\n"


def test_the_socket_is_private_and_a_second_daemon_refuses_with_one_line(daemon, netns):
    sock, _ = daemon
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    second = subprocess.run(["ip", "netns", "exec", netns, xfrmd_path(), "--socket", str(sock)], capture_output=True,
                            text=True, timeout=30)
    assert second.returncode != 0
    assert second.stderr.strip().splitlines() == [f"xfrmd: another xfrmd is already listening on {sock}: "
                                                  "Address already in use"]


def test_xfrm_says_clearly_when_no_daemon_runs(tmp_path):
    r = xfrm_s(tmp_path / "none.sock", "state", "list")
    assert r.returncode != 0
    assert "no xfrmd is running at" in r.stderr and "--offline" in r.stderr, r.stderr


def test_hostile_datagrams_get_error_replies_and_change_nothing(daemon):
    sock, _ = daemon
    assert xfrm_s(sock, *LINES[0].split()).returncode == 0
    c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c.connect(str(sock))
    c.settimeout(5)
    garbage = [
        b"\x00" * 3,  # shorter than a header
        struct.pack("<IHHII", 16, 16, 5, 1, 0),  # NEWSA without its body
        struct.pack("<IHHII", 16 + 220, 16, 5, 2, 0) + b"\x00" * 220,  # a 32-bit client's xfrm_usersa_info
        struct.pack("<IHHII", 9999, 16, 5, 3, 0) + b"\x00" * 40,  # a length beyond the datagram
        struct.pack("<IHHII", 20, 999, 5, 4, 0) + b"\x00" * 4,  # an unknown type
        os.urandom(512),
    ]
    for g in garbage:
        c.send(g)
        reply = c.recv(65536)
        assert len(reply) >= 20, g
        length, mtype = struct.unpack_from("<IH", reply)
        assert mtype == 2, f"expected an NLMSG_ERROR for {g[:16]!r}, got type {mtype}"
        (err,) = struct.unpack_from("<i", reply, 16)
        assert err < 0
    c.close()
    assert xfrm_s(sock, "state", "count").stdout == "\t SAD count 1\n", "the daemon still answers, unchanged"


def test_monitor_streams_the_daemons_events_in_ip_xfrm_monitor_format(daemon, tmp_path):
    sock, _ = daemon
    mon = subprocess.Popen([os.environ["XFRM_TOOL"], "-S", str(sock), "monitor"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        for line in LINES[2:]:
            assert xfrm_s(sock, *line.split()).returncode == 0
        assert xfrm_s(sock, "policy", "flush").returncode == 0
        time.sleep(0.5)
    finally:
        mon.terminate()
    out, err = mon.communicate(timeout=10)
    expected = offline_listing(tmp_path, ["monitor"] + LINES[2:] + ["policy flush"], "policy count")
    expected = expected[:expected.rindex("\t SPD")]
    assert out == expected, err


def test_sigterm_stops_the_daemon_cleanly_and_removes_its_socket(daemon):
    sock, p = daemon
    assert xfrm_s(sock, *LINES[0].split()).returncode == 0
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 0
    assert not sock.exists()
    log = p.stderr.read()
    assert "stopped" in log and "tun=xfrm0" in log, log
