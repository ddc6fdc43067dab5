"""XFRM_MSG_MAPPING through xfrmd: a NAT between the peers moved A's NAT-T port. scapy (an ESP implementation nobody
here wrote) seals a packet with A's SA and sends it from 192.0.2.1 port 31337 instead of 4500; B's xfrmd delivers it
and tells the key manager, whose monitor prints the change as `ip xfrm monitor` prints the kernel's
(xfrm_mapping_print). Packets from the SA's own endpoint tell nothing."""

import os
import re
import signal
import subprocess
import sys
import time

from daemonlib import K1

SEND = """
import sys
from scapy.all import IP, UDP, ICMP, Raw, send
from scapy.layers.ipsec import ESP, SecurityAssociation
sa = SecurityAssociation(ESP, spi=0x1001, crypt_algo="AES-GCM", crypt_key=bytes.fromhex(sys.argv[1]),
                         tunnel_header=IP(src="192.0.2.1", dst="192.0.2.2"),
                         nat_t_header=UDP(sport=int(sys.argv[2]), dport=4500))
for seq in range(int(sys.argv[3]), int(sys.argv[3]) + 2):
    inner = IP(src="10.0.1.1", dst="10.0.2.1") / ICMP(id=7, seq=seq) / Raw(b"moved mapping")
    send(sa.encrypt(inner, seq_num=seq), verbose=False)
"""


def test_a_nat_t_peer_at_a_new_port_is_told_to_the_key_manager(pair, tmp_path):
    pair.configure(natt=True)
    monitor = subprocess.Popen(["ip", "netns", "exec", pair.ns["b"], os.environ["XFRM_TOOL"], "-S",
                                str(pair.sock["b"]), "monitor"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        time.sleep(1.0)
        # A's own packets (from port 4500) first: no mapping change.
        ping = pair.exec("a", "busybox", "ping", "-c", "2", "-W", "2", "-I", "10.0.1.1", "10.0.2.1", check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        before = pair.xfrm("b", "-s state list")
        r = pair.exec("a", sys.executable, "-c", SEND, K1[2:], "31337", "1000", check=False)
        assert r.returncode == 0, r.stderr
        time.sleep(1.0)
    finally:
        monitor.send_signal(signal.SIGTERM)
        out, err = monitor.communicate(timeout=10)
    change = "Mapping change 192.0.2.1:4500 -> 192.0.2.1:31337\n\tdst 192.0.2.2  reqid 0x1 protocol esp  SPI 0x1001\n"
    assert out.count(change) == 2, out + err
    assert out.count("Mapping change") == 2, "A's own packets told nothing\n" + out
    # Both of scapy's packets were delivered through the SA (its counters moved by two packets).
    after = pair.xfrm("b", "-s state list")
    def packets(listing):
        block = listing[listing.index("spi 0x00001001"):]
        return int(re.search(r"lifetime current:\n\t  \d+\(bytes\), (\d+)\(packets\)", block)[1])
    assert packets(after) == packets(before) + 2, (before, after)
