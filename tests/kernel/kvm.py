"""The real Linux kernel as a reference, booted under qemu.

`ensure_initramfs()` builds (once, cached under .build/kernel-vm/) a small initramfs for the Debian kernel in
/boot: the host's dynamic busybox (not busybox-static, whose shell prefers its own applets to $PATH, so `ip` would
be busybox's toy `ip`), the host's iproute2 `ip` and tcpdump with their libraries and loader, and the kernel
modules XFRM/ESP and its crypto need, resolved with `modprobe -S KVER --show-depends` and decompressed. The cpio
archive is written here, in Python (newc format), so nothing but busybox/ip/tcpdump/modprobe/depmod is needed on
the host besides qemu.

`run(script, files)` boots the kernel with that initramfs plus a second cpio member holding `/test.sh` and the
given files under `/data/`; the guest's /init loads the modules, runs `sh /test.sh` with its stdout and stderr on
the second serial port (ttyS1, a plain file on the host: the kernel's console on ttyS0 never mixes in) and powers
off. It returns the script's exit status and output. Under TCG (`-cpu max`; this machine's /dev/kvm is nested
kvm-pvm, on which an unmodified kernel does not boot) a boot costs ~6-8 s, so callers batch hundreds of commands
into one run.

Every missing piece raises `KernelVMError` (the tests fail; they never skip).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORK = Path(os.environ.get("KERNEL_VM_WORK", REPO / ".build" / "kernel-vm"))

# Modules to load in the guest, in this order (their dependencies come first, from modprobe --show-depends).
# REQUIRED ones must exist for the kernel under test; the others are loaded when the kernel has them as modules.
REQUIRED_MODULES = ["xfrm_user", "esp4", "esp6", "veth", "dummy"]
OPTIONAL_MODULES = [
    "xfrm_algo", "xfrm_interface", "esp4_offload", "esp6_offload", "cryptd", "crypto_simd", "gf128mul",
    "aesni_intel", "crypto_null", "gcm", "ghash_generic", "ghash_clmulni_intel", "ctr", "libchacha",
    "chacha_generic", "chacha_x86_64", "libpoly1305", "poly1305_generic", "poly1305_x86_64", "chacha20poly1305",
    "authenc", "authencesn", "geniv", "seqiv", "echainiv", "sha1_ssse3", "sha256_ssse3", "sha512_ssse3",
    "udp_tunnel", "ip6_udp_tunnel",
    "virtio_net",  # the live-peer test's NIC (test_live_peer.py); the other tests boot with -nic none
]

BEGIN = "@@KERNEL-VM-BEGIN@@"
END = "@@KERNEL-VM-END rc="


class KernelVMError(RuntimeError):
    pass


def kernel_version() -> str:
    kver = os.environ.get("KERNEL_VM_KVER")
    if kver:
        return kver
    images = sorted(Path("/boot").glob("vmlinuz-6.12*"), key=lambda p: [int(x) if x.isdigit() else x
                                                                          for x in re.split(r"(\d+)", p.name)])
    if not images:
        raise KernelVMError("no /boot/vmlinuz-6.12.* kernel image: apt-get install linux-image-6.12-amd64")
    return images[-1].name[len("vmlinuz-"):]


def _which(name: str, package: str) -> str:
    p = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not p:
        raise KernelVMError(f"{name} is missing: apt-get install {package}")
    return p


# --------------------------------------------------------------------------------------------------- cpio (newc)

class Cpio:
    """Writes a newc cpio archive (what the kernel's initramfs unpacker reads)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0))
        self.ino += 1
        self.buf.write(hdr.encode() + name_b)
        self.buf.write(b"\0" * (-(110 + len(name_b)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def mkdir(self, path: str) -> None:
        path = path.strip("/")
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.dirs:
                self.dirs.add(d)
                self._entry(d, stat.S_IFDIR | 0o755)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        if "/" in path:
            self.mkdir(path.rsplit("/", 1)[0])
        self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        if "/" in path:
            self.mkdir(path.rsplit("/", 1)[0])
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def bytes(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


# --------------------------------------------------------------------------------------------------- initramfs

INIT = r"""#!/bin/busybox sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo 1 >/proc/sys/kernel/printk
K=$(uname -r)
while read -r m; do
  [ -n "$m" ] || continue
  n=${m##*/}; n=${n%.ko}; n=$(echo "$n" | tr - _)
  [ -d "/sys/module/$n" ] && continue
  insmod "/lib/modules/$K/$m" 2>/dev/null || echo "init: insmod $m failed" >/dev/ttyS0
done </etc/modules.load
ip link set lo up
stty -F /dev/ttyS1 raw -echo 2>/dev/null
cd /tmp
{
  echo "@@KERNEL-VM-BEGIN@@"
  sh /test.sh 2>&1
  rc=$?
  echo "@@KERNEL-VM-END rc=$rc@@"
} >/dev/ttyS1 2>&1
sync
poweroff -f
"""


def _ldd_libs(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)", line)
        if m:
            libs.append(m.group(1))
    return libs


def _modules(kver: str) -> list[tuple[str, bytes]]:
    """(relative path, decompressed bytes) of each module to load, dependencies first."""
    moddir = f"/lib/modules/{kver}/"
    modprobe = _which("modprobe", "kmod")
    seen: list[str] = []
    data: dict[str, bytes] = {}
    for m in REQUIRED_MODULES + OPTIONAL_MODULES:
        p = subprocess.run([modprobe, "-S", kver, "--show-depends", m], capture_output=True, text=True)
        if p.returncode != 0:
            if m in REQUIRED_MODULES:
                raise KernelVMError(f"module {m} not available for kernel {kver}: {p.stderr.strip()}")
            continue
        for line in p.stdout.splitlines():
            w = line.split()
            if len(w) < 2 or w[0] != "insmod":
                continue
            path = w[1]
            rel = path[len(moddir):] if path.startswith(moddir) else path.lstrip("/")
            for ext, dec in ((".xz", lzma.decompress), (".gz", gzip.decompress)):
                if rel.endswith(ext):
                    rel = rel[: -len(ext)]
                    raw = dec(Path(path).read_bytes())
                    break
            else:
                if rel.endswith(".zst"):
                    rel = rel[:-4]
                    raw = subprocess.run([_which("zstd", "zstd"), "-qdc", path], capture_output=True,
                                         check=True).stdout
                else:
                    raw = Path(path).read_bytes()
            if rel not in data:
                data[rel] = raw
                seen.append(rel)
    return [(r, data[r]) for r in seen]


HELPER_SRC = Path(__file__).resolve().parent / "pcapinject.c"


def _build_helper() -> bytes:
    """The static pcapinject helper (pcapinject.c), compiled for the guest."""
    cc = _which("cc", "gcc libc6-dev")
    out = WORK / "pcapinject"
    p = subprocess.run([cc, "-static", "-O2", "-Wall", "-Werror", "-o", str(out), str(HELPER_SRC)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise KernelVMError(f"cannot build the static pcapinject helper (needs gcc and libc6-dev):\n{p.stderr}")
    return out.read_bytes()


def _inputs_stamp(kver: str, tools: list[str]) -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(HELPER_SRC.read_bytes())
    h.update(kver.encode())
    for t in [f"/boot/vmlinuz-{kver}"] + tools:
        st = os.stat(t)
        h.update(f"{t} {st.st_size} {st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def ensure_initramfs() -> tuple[Path, Path]:
    """Returns (kernel image, base initramfs), building the initramfs if its inputs changed. Safe across
    processes (pytest-xdist workers): one builds, the others wait on the lock."""
    kver = kernel_version()
    kernel = Path(f"/boot/vmlinuz-{kver}")
    if not os.access(kernel, os.R_OK):
        raise KernelVMError(f"cannot read {kernel}")
    if not Path(f"/lib/modules/{kver}").is_dir():
        raise KernelVMError(f"no module tree /lib/modules/{kver}")
    busybox = _which("busybox", "busybox")
    ldd = subprocess.run(["ldd", busybox], capture_output=True, text=True)
    if "not a dynamic executable" in ldd.stdout + ldd.stderr:
        raise KernelVMError(f"{busybox} is static (busybox-static); install the dynamic `busybox` package")
    ip = _which("ip", "iproute2")
    tcpdump = _which("tcpdump", "tcpdump")
    _which("qemu-system-x86_64", "qemu-system-x86")
    WORK.mkdir(parents=True, exist_ok=True)
    out = WORK / f"initramfs-{kver}.cpio.gz"
    stamp = _inputs_stamp(kver, [busybox, ip, tcpdump])
    with open(WORK / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp_file = out.with_suffix(".stamp")
        if out.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
            return kernel, out
        c = Cpio()
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "lib", "lib64", "etc", "proc", "sys", "dev", "tmp", "run",
                  "root", "data", "var/run", "run/netns"):
            c.mkdir(d)
        libs: set[str] = set()
        for b, dest in ((busybox, "bin/busybox"), (ip, "usr/sbin/ip"), (tcpdump, "usr/sbin/tcpdump")):
            c.file(dest, Path(b).read_bytes(), 0o755)
            libs.update(_ldd_libs(b))
        for lib in sorted(libs):
            c.file(lib, Path(lib).read_bytes(), 0o755)
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
        for a in applets:
            if a in ("ip", "tcpdump", "busybox"):
                continue
            c.symlink(f"bin/{a}", "busybox")
        for src in ("/etc/iproute2", "/usr/share/iproute2"):
            for p in sorted(Path(src).rglob("*")) if Path(src).is_dir() else []:
                if p.is_file():
                    c.file(str(p), p.read_bytes())
        for f in ("/etc/protocols", "/etc/services"):
            if Path(f).is_file():
                c.file(f, Path(f).read_bytes())
        c.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\ntcpdump:x:0:0::/:/bin/sh\n")
        c.file("etc/group", b"root:x:0:\n")
        # Modules, plus a modules.dep for busybox modprobe / kernel autoload (depmod over a scratch tree).
        mods = _modules(kver)
        with tempfile.TemporaryDirectory(dir=WORK) as tmp:
            mroot = Path(tmp) / "lib" / "modules" / kver
            for rel, raw in mods:
                (mroot / rel).parent.mkdir(parents=True, exist_ok=True)
                (mroot / rel).write_bytes(raw)
                c.file(f"lib/modules/{kver}/{rel}", raw)
            for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
                src = Path(f"/lib/modules/{kver}/{f}")
                if src.exists():
                    shutil.copy(src, mroot / f)
            subprocess.run([_which("depmod", "kmod"), "-b", tmp, kver], check=True, capture_output=True)
            for f in sorted(mroot.iterdir()):
                if f.is_file() and f.name.startswith("modules."):
                    c.file(f"lib/modules/{kver}/{f.name}", f.read_bytes())
        c.file("etc/modules.load", "".join(rel + "\n" for rel, _ in mods).encode())
        c.symlink("sbin/modprobe", "../bin/busybox")
        c.file("usr/bin/pcapinject", _build_helper(), 0o755)
        c.file("init", INIT.encode(), 0o755)
        tmp_out = out.with_suffix(f".tmp{os.getpid()}")
        tmp_out.write_bytes(gzip.compress(c.bytes(), compresslevel=6))
        tmp_out.replace(out)
        stamp_file.write_text(stamp)
        return kernel, out


# --------------------------------------------------------------------------------------------------- run

def run(script: str, files: dict[str, bytes] | None = None, timeout: float = 600.0) -> tuple[int, str, float]:
    """Boots the kernel, runs `script` as /test.sh (files under /data/), returns (exit status, output, seconds)."""
    kernel, base = ensure_initramfs()
    qemu = _which("qemu-system-x86_64", "qemu-system-x86")
    with tempfile.TemporaryDirectory(dir=WORK, prefix="run.") as t:
        tdir = Path(t)
        c = Cpio()
        c.file("test.sh", script.encode(), 0o755)
        c.mkdir("data")
        for name, data in (files or {}).items():
            c.file(f"data/{name}", data)
        initrd = tdir / "initrd.cpio.gz"
        initrd.write_bytes(base.read_bytes() + gzip.compress(c.bytes(), compresslevel=1))
        out_path = tdir / "ttyS1"
        console = tdir / "console"
        cmd = [qemu, "-accel", "tcg", "-cpu", "max", "-m", "768M", "-smp", "1", "-kernel", str(kernel),
               "-initrd", str(initrd), "-append", "console=ttyS0 quiet panic=-1 cryptomgr.notests=1",
               "-display", "none", "-no-reboot", "-nic", "none",
               "-chardev", f"file,id=con,path={console}", "-serial", "chardev:con",
               "-chardev", f"file,id=out,path={out_path}", "-serial", "chardev:out",
               "-monitor", "none"]
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise KernelVMError(f"qemu did not finish within {timeout}s; console tail:\n"
                                + _tail(console) + "\noutput tail:\n" + _tail(out_path))
        elapsed = time.monotonic() - t0
        raw = out_path.read_bytes().decode("utf-8", "replace") if out_path.exists() else ""
        raw = raw.replace("\r", "")
        i = raw.find(BEGIN + "\n")
        j = raw.rfind(END)
        if i < 0 or j < 0:
            raise KernelVMError(f"the guest did not finish its script (qemu rc {p.returncode}, {elapsed:.1f}s)\n"
                                f"qemu stderr: {p.stderr[-2000:]}\nconsole tail:\n{_tail(console)}\n"
                                f"output tail:\n{raw[-3000:]}")
        m = re.match(r"(\d+)@@", raw[j + len(END):])
        rc = int(m.group(1)) if m else 125
        return rc, raw[i + len(BEGIN) + 1: j], elapsed


def _tail(p: Path, n: int = 3000) -> str:
    try:
        return p.read_bytes()[-n:].decode("utf-8", "replace")
    except OSError:
        return "(none)"
