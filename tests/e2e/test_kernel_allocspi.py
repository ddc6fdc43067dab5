"""ALLOCSPI against this machine's kernel (6.18: XFRM without ESP). An SPI allocation needs no transform: the kernel
makes a larval SA (xfrm_find_acq) and gives it an SPI from the range (xfrm_alloc_spi), so the SAs it holds can be
listed, fetched, counted, deleted and flushed — the one way to see the kernel's own state listings here, per-CPU
SAs (XFRMA_SA_PCPU, Linux 6.13; iproute2 6.1 cannot send it, `xfrm --kernel` can) and SA directions included.

The same commands go to the kernel (`xfrm --kernel`, a namespace of its own) and to an xfrmd (`xfrm -S`), one by
one: each command's exit status, output and error must be the same, and so must the listings after them (`-s`
listings but for the add time's seconds). Every range is one SPI wide, or exhausted, so the SPIs are the same too.
The kernel's listings must also be iproute2's, but for the lines iproute2 6.1 does not know (`dir`, `pcpu-num`)."""

import os
import subprocess
import time

import pytest

from kernelsides import kernel_and_xfrmd, run, time_blind, stop

V4 = "src 192.0.2.1 dst 192.0.2.2"
V6 = "src 2001:db8::1 dst 2001:db8::2"

COMMANDS = [
    f"state allocspi {V4} proto esp mode tunnel reqid 5 min 0x100 max 0x100",
    # The same request again finds that larval SA (xfrm_find_acq), which has its SPI already.
    f"state allocspi {V4} proto esp mode tunnel reqid 5 min 0x100 max 0x100",
    # Another reqid is another larval SA, and its only SPI is taken.
    f"state allocspi {V4} proto esp mode tunnel reqid 6 min 0x100 max 0x100",
    f"state allocspi {V4} proto esp mode tunnel reqid 6 min 0x101 max 0x101",
    f"state allocspi {V4} proto esp mode tunnel reqid 7 min 0x200 max 0x1ff",
    # Directions and per-CPU SAs (RFC 9611): ALLOCSPI takes XFRMA_SA_PCPU with or without a direction, and refuses
    # a CPU that does not exist.
    f"state allocspi {V4} proto esp mode tunnel reqid 8 dir out pcpu-num 1 min 0x300 max 0x300",
    f"state allocspi {V4} proto esp mode tunnel reqid 8 dir out pcpu-num 0 min 0x301 max 0x301",
    f"state allocspi {V4} proto esp mode tunnel reqid 9 pcpu-num 1 min 0x302 max 0x302",
    f"state allocspi {V4} proto esp mode tunnel reqid 9 dir out pcpu-num 4096 min 0x303 max 0x303",
    f"state allocspi {V4} proto esp mode tunnel reqid 10 dir in min 0x400 max 0x400",
    f"state allocspi {V6} proto esp mode transport reqid 11 mark 7 mask 0xff min 0x500 max 0x500",
    f"state allocspi {V4} proto esp mode tunnel reqid 16 seq 0x77 min 0x700 max 0x700",
    # Any range (an SPI below 256 too); SPI 0 is never handed out (the larval SA made for it stays, SPI-less).
    f"state allocspi {V4} proto esp mode tunnel reqid 17 min 0x10 max 0x10",
    f"state allocspi {V4} proto esp mode tunnel reqid 18 min 0 max 0",
    f"state get {V4} proto esp spi 0",
    "state count",
    "state list",
    "-s state list",
    f"state get {V4} proto esp spi 0x100",
    f"state get {V4} proto esp spi 0x300",
    f"state get {V4} proto esp spi 0x999",
    f"state list {V4} reqid 8",
    "state list dir out",
    f"state delete {V4} proto esp spi 0x300",
    f"state delete {V4} proto esp spi 0x300",
    f"state list {V4} proto esp",
    f"state deleteall {V6}",
    "state list",
    "state count",
    "state flush",
    "state list",
    "state count",
]


def iproute2_lines(text):
    """A listing without the lines iproute2 6.1 does not print (XFRMA_SA_DIR, XFRMA_SA_PCPU)."""
    return "".join(l for l in text.splitlines(keepends=True) if not l.startswith(("\tdir ", "\tpcpu-num ")))


@pytest.fixture
def sides(tmp_path):
    with kernel_and_xfrmd(tmp_path, "xfrmspi") as s:
        yield s


def test_allocspi_larval_sas_list_get_delete_and_flush_as_in_the_kernel(sides):
    kernel, ours, sock = sides
    tool = os.environ["XFRM_TOOL"]
    kernel_said = []
    mismatches = []
    # The events the commands cause (deletes, flushes; ALLOCSPI sends none), as each side's monitor prints them.
    monitors = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv in (
        ["ip", "netns", "exec", kernel, tool, "--kernel", "monitor"],
        ["ip", "netns", "exec", ours, tool, "-S", str(sock), "monitor"])]
    time.sleep(1.0)  # both monitors joined their groups
    for line in COMMANDS:
        argv = line.split()
        theirs = run("ip", "netns", "exec", kernel, tool, "--kernel", *argv, check=False)
        mine = run("ip", "netns", "exec", ours, tool, "-S", str(sock), *argv, check=False)
        got = (mine.returncode, time_blind(mine.stdout), mine.stderr)
        want = (theirs.returncode, time_blind(theirs.stdout), theirs.stderr)
        if got != want:
            mismatches.append(f"`xfrm {line}`:\n xfrmd      {got!r}\n the kernel {want!r}")
        kernel_said.append(want)
        if argv[-2:] == ["state", "list"]:
            ip = run("ip", "netns", "exec", kernel, "ip", *argv[:-2], "xfrm", *argv[-2:])
            assert time_blind(ip.stdout) == iproute2_lines(want[1]), f"`ip xfrm {line}`"
    time.sleep(0.5)
    kernel_events, our_events = ([stop(m)] for m in monitors)
    assert not mismatches, "\n".join(mismatches)
    assert "Deleted src 192.0.2.1 dst 192.0.2.2" in kernel_events[0] and "Flushed state" in kernel_events[0], \
        kernel_events[0]
    assert our_events == kernel_events
    # What the comparison went through: the kernel held per-CPU and directed larval SAs, and refused a CPU past
    # its last one.
    listing = kernel_said[COMMANDS.index("state list")][1]
    assert "\tdir out\n\tpcpu-num 1\n" in listing and "\tpcpu-num 0\n" in listing and "\tdir in\n" in listing, listing
    refused = kernel_said[COMMANDS.index(next(c for c in COMMANDS if "pcpu-num 4096" in c))]
    assert refused[0] != 0 and "pCPU number too big" in refused[2], refused
