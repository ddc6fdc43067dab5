"""The real kernel as a live network peer: qemu with a virtio NIC on a TAP device inside a host network namespace,
and a shell in the guest driven line by line from the host over a serial port.

`LiveVM(ns, workdir)` boots the kernel of kvm.ensure_initramfs() (the same initramfs as the other kernel tests;
virtio_net is among its modules) under `ip netns exec NS qemu-system-x86_64 ... -netdev tap,ifname=TAP`, so the
TAP device is created inside the namespace (the guest's eth0 is its other end). The guest's /test.sh is a command
loop on ttyS2 (a Unix socket on the host): each line the host sends runs as `sh -c LINE` with stdin /dev/null,
its stdout and stderr come back, followed by a line `@@rc=N@@`. `sh(line)` does one round trip and returns
(status, output). ttyS0 (kernel console) and ttyS1 (the init's own output) are files in workdir, for failures.

Every missing piece (qemu, kernel, the TAP, the guest's answer) raises kvm.KernelVMError: tests fail, never skip.
"""

from __future__ import annotations

import gzip
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import kvm

# The tty stays open from before `stty` to the end: input that arrives while no one has it open is dropped.
GUEST_LOOP = r"""
exec 3<>/dev/ttyS2
stty raw -echo <&3
echo "@@ready@@" >&3
while IFS= read -r line <&3; do
  [ "$line" = "@@quit@@" ] && break
  sh -c "$line" </dev/null >&3 2>&1 3>&-
  echo "@@rc=$?@@" >&3
done
echo "@@bye@@" >&3
"""

_RC = re.compile(rb"@@rc=(\d+)@@\n")


class LiveVM:
    def __init__(self, ns: str, workdir: Path, tap: str = "tapk", mac: str = "52:54:00:00:02:02",
                 boot_timeout: float = 180.0) -> None:
        kernel, base = kvm.ensure_initramfs()
        qemu = kvm._which("qemu-system-x86_64", "qemu-system-x86")
        self.ns, self.tap, self.workdir = ns, tap, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        c = kvm.Cpio()
        c.file("test.sh", GUEST_LOOP.encode(), 0o755)
        initrd = workdir / "initrd.cpio.gz"
        initrd.write_bytes(base.read_bytes() + gzip.compress(c.bytes(), compresslevel=1))
        self.console = workdir / "console"
        self.initout = workdir / "ttyS1"
        self.ctl_path = workdir / "ctl.sock"
        cmd = ["ip", "netns", "exec", ns, qemu, "-accel", "tcg", "-cpu", "max", "-m", "768M", "-smp", "1",
               "-kernel", str(kernel), "-initrd", str(initrd),
               "-append", "console=ttyS0 quiet panic=-1 cryptomgr.notests=1",
               "-display", "none", "-no-reboot",
               "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
               "-device", f"virtio-net-pci,netdev=n0,mac={mac}",
               "-chardev", f"file,id=con,path={self.console}", "-serial", "chardev:con",
               "-chardev", f"file,id=out,path={self.initout}", "-serial", "chardev:out",
               "-chardev", f"socket,id=ctl,path={self.ctl_path},server=on,wait=off", "-serial", "chardev:ctl",
               "-monitor", "none"]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.sock: socket.socket | None = None
        self.buf = b""
        self.transcript: list[str] = []
        deadline = time.monotonic() + 30
        while not self.ctl_path.exists():
            self._check_alive("before creating its control socket")
            if time.monotonic() > deadline:
                self.close()
                raise kvm.KernelVMError("qemu did not create its control socket within 30 s")
            time.sleep(0.05)
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(self.ctl_path))
            self._read_until(b"@@ready@@\n", boot_timeout)
        except BaseException:
            self.close()
            raise
        self.boot_seconds = time.monotonic() - self.t0

    def _check_alive(self, when: str) -> None:
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode("utf-8", "replace") if self.proc.stderr else ""
            raise kvm.KernelVMError(f"qemu exited ({self.proc.returncode}) {when}: {err[-2000:]}\n"
                                    f"console tail:\n{kvm._tail(self.console)}\ninit output:\n"
                                    f"{kvm._tail(self.initout)}")

    def _read_until(self, marker: bytes | re.Pattern, timeout: float) -> tuple[bytes, re.Match | None]:
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        while True:
            if isinstance(marker, bytes):
                i = self.buf.find(marker)
                if i >= 0:
                    out, self.buf = self.buf[:i], self.buf[i + len(marker):]
                    return out, None
            else:
                m = marker.search(self.buf)
                if m:
                    out, self.buf = self.buf[:m.start()], self.buf[m.end():]
                    return out, m
            left = deadline - time.monotonic()
            if left <= 0:
                raise kvm.KernelVMError(f"no answer from the guest within {timeout:.0f} s; got so far:\n"
                                        f"{self.buf[-3000:].decode('utf-8', 'replace')}\nconsole tail:\n"
                                        f"{kvm._tail(self.console)}")
            self._check_alive("while the host waited for the guest")
            self.sock.settimeout(min(left, 1.0))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                self._check_alive("(control socket closed)")
                raise kvm.KernelVMError("the guest's control socket closed")
            self.buf += chunk

    def sh(self, line: str, timeout: float = 60.0) -> tuple[int, str]:
        """Runs one shell line in the guest; returns (exit status, stdout+stderr)."""
        assert "\n" not in line and len(line) < 3500, "one line, within the tty's buffer"
        assert self.sock is not None
        self.sock.sendall(line.encode() + b"\n")
        out, m = self._read_until(_RC, timeout)
        text = out.decode("utf-8", "replace")
        self.transcript.append(f"# {line}\n{text}@@rc={m.group(1).decode()}@@")
        return int(m.group(1)), text

    def check(self, line: str, timeout: float = 60.0) -> str:
        rc, out = self.sh(line, timeout)
        if rc != 0:
            raise AssertionError(f"guest: `{line}` failed ({rc}):\n{out}")
        return out

    def close(self) -> None:
        try:
            if self.sock is not None and self.proc.poll() is None:
                try:
                    self.sock.sendall(b"@@quit@@\n")
                    self._read_until(b"@@bye@@\n", 5)
                except Exception:
                    pass
        finally:
            if self.sock is not None:
                self.sock.close()
            if self.proc.poll() is None:
                self.proc.terminate()  # `ip netns exec` execs qemu: this is qemu's pid
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            for s in (self.proc.stdout, self.proc.stderr):
                if s is not None:
                    s.close()
