"""XFRMA_MTIMER_THRESH (the NAT-T mapping rate limit) against this machine's kernel: `ip xfrm` has no keyword for it,
so the same raw XFRM_MSG_NEWSA bytes go to the kernel (NETLINK_XFRM, extended ACKs on) and to an xfrmd's control
socket, and both must refuse it alike: without an encapsulation, and on an output SA, with the same errno and the
same extack text (verify_mtimer_thresh). A NAT-T input SA with the attribute is taken by xfrmd, which lists it back;
this kernel, which has no ESP, refuses that one later, for want of ESP, which is no comparison."""

import socket
import struct
import subprocess

from kernelsides import kernel_and_xfrmd

NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
XFRM_MSG_NEWSA, XFRM_MSG_GETSA = 16, 18
XFRMA_ENCAP, XFRMA_ALG_AEAD, XFRMA_MTIMER_THRESH, XFRMA_SA_DIR = 4, 18, 32, 33
KEY = bytes(range(1, 21))  # AES-128 key and salt


def attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("<HH", n, kind) + payload + b"\0" * (-n % 4)


def newsa(encap: bool, out: bool, mtimer: int | None = 20) -> bytes:
    """XFRM_MSG_NEWSA for ESP 192.0.2.1 -> 192.0.2.2, SPI 0xc0ffee, reqid 7, tunnel, AES-GCM-128."""
    sel = b"\0" * 56
    xid = socket.inet_aton("192.0.2.2") + b"\0" * 12 + struct.pack(">I", 0xC0FFEE) + bytes([50, 0, 0, 0])
    saddr = socket.inet_aton("192.0.2.1") + b"\0" * 12
    inf = 0xFFFFFFFFFFFFFFFF
    lft = struct.pack("<8Q", inf, inf, inf, inf, 0, 0, 0, 0)
    body = sel + xid + saddr + lft + b"\0" * 32 + b"\0" * 12
    body += struct.pack("<IIHBBB", 0, 7, socket.AF_INET, 1, 0 if out else 32, 0) + b"\0" * 7
    assert len(body) == 224
    attrs = attr(XFRMA_ALG_AEAD, b"rfc4106(gcm(aes))".ljust(64, b"\0") + struct.pack("<II", 160, 128) + KEY)
    if encap:
        attrs += attr(XFRMA_ENCAP, struct.pack("<H", 2) + struct.pack(">HH", 4500, 4500) + b"\0" * 18)
    if out:
        attrs += attr(XFRMA_SA_DIR, bytes([2]))
    if mtimer is not None:
        attrs += attr(XFRMA_MTIMER_THRESH, struct.pack("<I", mtimer))
    payload = body + attrs
    return struct.pack("<IHHII", 16 + len(payload), XFRM_MSG_NEWSA, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + payload


def answer(reply: bytes) -> tuple[int, str]:
    """(errno, extack text) of an NLMSG_ERROR."""
    length, kind, flags = struct.unpack_from("<IHH", reply)
    assert kind == 2, f"not an NLMSG_ERROR: type {kind}"
    (err,) = struct.unpack_from("<i", reply, 16)
    # NLM_F_CAPPED (0x100): the request is echoed without its payload; NLM_F_ACK_TLVS (0x200): attributes follow.
    off = 20 + (16 if flags & 0x100 else struct.unpack_from("<I", reply, 20)[0])
    text = ""
    while flags & 0x200 and off + 4 <= length:
        n, t = struct.unpack_from("<HH", reply, off)
        if t == 1:  # NLMSGERR_ATTR_MSG
            text = reply[off + 4:off + n].rstrip(b"\0").decode()
        off += (n + 3) & ~3
    return err, text


KERNEL_SEND = r"""
import socket, sys
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 6)  # NETLINK_XFRM
s.setsockopt(270, 11, 1)  # SOL_NETLINK, NETLINK_EXT_ACK
s.setsockopt(270, 10, 1)  # NETLINK_CAP_ACK
s.bind((0, 0))
s.send(bytes.fromhex(sys.argv[1]))
print(s.recv(65536).hex())
"""


def kernel(ns: str, message: bytes) -> tuple[int, str]:
    p = subprocess.run(["ip", "netns", "exec", ns, "python3", "-c", KERNEL_SEND, message.hex()],
                       capture_output=True, text=True, timeout=30, check=True)
    return answer(bytes.fromhex(p.stdout.strip()))


def xfrmd(sock, message: bytes) -> tuple[int, str]:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c.connect(str(sock))
    c.settimeout(5)
    c.send(message)
    reply = c.recv(65536)
    c.close()
    return answer(reply)


def test_mtimer_thresh_is_refused_as_the_kernel_refuses_it_and_kept_on_a_nat_t_input_sa(tmp_path):
    with kernel_and_xfrmd(tmp_path, "xmt") as (kns, _, sock):
        refusals = {
            "no encap": newsa(encap=False, out=False),
            "output SA": newsa(encap=True, out=True),
        }
        for what, m in refusals.items():
            theirs, ours = kernel(kns, m), xfrmd(sock, m)
            assert theirs[0] == -22 and "MTIMER_THRESH" in theirs[1], (what, theirs)
            assert ours == theirs, (what, ours, theirs)
        # Taken where it belongs; xfrmd lists it back (GETSA's reply carries XFRMA_MTIMER_THRESH 20).
        assert xfrmd(sock, newsa(encap=True, out=False)) == (0, "")
        sa_id = socket.inet_aton("192.0.2.2") + b"\0" * 12 + struct.pack(">I", 0xC0FFEE) + struct.pack("<HB", 2, 50)
        get = struct.pack("<IHHII", 16 + 24, XFRM_MSG_GETSA, NLM_F_REQUEST, 2, 0) + sa_id + b"\0"
        c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        c.connect(str(sock))
        c.settimeout(5)
        c.send(get)
        reply = c.recv(65536)
        c.close()
        assert struct.unpack_from("<H", reply, 4)[0] == XFRM_MSG_NEWSA, reply[:32].hex()
        assert attr(XFRMA_MTIMER_THRESH, struct.pack("<I", 20)) in reply[16 + 224:], reply.hex()
