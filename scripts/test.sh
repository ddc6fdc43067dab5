#!/usr/bin/env bash
# The one test command for swift-xfrm.  On a fresh Debian 12 machine, as root:
#
#     scripts/test.sh
#
# 1. installs what the tests need: tshark (non-interactively), libssl-dev, libipsec-mb-dev, iperf3, strongSwan
#    (its service neither started nor enabled), and a Python virtualenv (.build/interop-venv) with scapy,
#    cryptography, pytest, pytest-xdist;
# 2. builds everything once: `swift build --build-tests`;
# 3. runs the Swift unit tests: `swift test --skip-build --parallel`; then, each in its own scratch directory, the
#    unit tests under the address sanitizer (LeakSanitizer on) and the threaded ones under the thread sanitizer
#    (`-Xswiftc -DXFRM_TSAN`: locks TSan can see); any sanitizer report fails the run (README "Sanitizers");
# 4. runs the interop suite, scapy and tshark as independent ESP peers of esp-tool, once per crypto backend:
#    `python -m pytest -q -n 2 tests/interop` with ESP_TOOL=<bin path>/esp-tool and XFRM_CRYPTO=openssl, then
#    XFRM_CRYPTO=ipsec-mb (each case checks that the backend asked for did the work);
# 5. runs the end-to-end suite of the `xfrm` command (offline stack, pcap mode, simulated NICs, xfrmd's control
#    socket, --kernel in network namespaces) with scapy as the peer: `python -m pytest -q -n 3 tests/e2e` with
#    XFRM_TOOL=<bin path>/xfrm (xfrmd is found beside it). Its test_strongswan_live.py takes strongSwan's charon
#    (kernel-libipsec, userspace ESP) as a live IKEv2 peer of xfrmd; the tests start their own charons inside network
#    namespaces, and the packages' own service never runs (the install keeps it stopped and disabled).
#    test_bridge_libreswan.py runs libreswan's pluto through xfrm-bridge from Debian's .deb unpacked under
#    .build/libreswan (never installed: the package conflicts with strongSwan's).
# 6. runs the kernel comparison: the real Linux kernel (Debian 6.12, booted under qemu with a small initramfs
#    built and cached under .build/kernel-vm/) against `xfrm` for generated state/policy adds, listings and
#    refusals, and ESP both ways: `python -m pytest -q -n 2 tests/kernel` with XFRM_TOOL=<bin path>/xfrm.
# 7. builds xfrm-bench in release mode and runs `xfrm-bench engine --check` and `xfrm-bench stack --check`:
#    0 allocations per packet on the daemon's per-packet path and on the stack's output and input paths.
# 8. builds the libFuzzer harnesses (Fuzz/, with the address sanitizer) and runs each for 10 seconds from its seed
#    corpus: `scripts/fuzz.sh all 5` (leak detection on, Fuzz/lsan.supp; see README "Fuzzing").
#
# Every install step fails loudly.  All test suites always run; the script exits
# non-zero if any failed.  Set SKIP_INSTALL=1 to skip step 1 on a machine that has
# everything (the tools are still checked).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

step() { printf '\n==> %s\n' "$*"; }
die() {
  printf '\ntest.sh: ERROR: %s\n' "$*" >&2
  exit 1
}

# libipsec-mb-dev: the Intel ipsec-mb crypto backend (the default where the CPU has AES-NI).
APT_PACKAGES=(tshark libssl-dev libipsec-mb-dev python3 python3-venv)
# tests/e2e/test_daemon_flood.py: iperf3 carries the legitimate stream under the flood.
APT_PACKAGES+=(iperf3)
# tests/kernel: qemu, the kernel under test (its image and modules), and what goes into the guest's initramfs:
# a dynamic busybox, iproute2, tcpdump, kmod (modprobe/depmod resolve the modules); gcc + libc6-dev build the
# static frame injector.
KERNEL_PACKAGES=(qemu-system-x86 linux-image-6.12-amd64 busybox iproute2 tcpdump kmod gcc libc6-dev)
APT_PACKAGES+=("${KERNEL_PACKAGES[@]}")
# tests/e2e/test_strongswan_live.py: charon with kernel-libipsec (libcharon-extra-plugins), gcm/openssl (standard
# plugins), chapoly (extra plugins), swanctl to drive it (../shared/interop/README.md section 4).
STRONGSWAN_PACKAGES=(strongswan-charon strongswan-swanctl libcharon-extra-plugins libstrongswan-standard-plugins
  libstrongswan-extra-plugins)
APT_PACKAGES+=("${STRONGSWAN_PACKAGES[@]}")
# tests/e2e/test_bridge_libreswan.py: libreswan's pluto through xfrm-bridge. Debian's libreswan package conflicts with
# strongSwan's (strongswan-starter, strongswan-libcharon), so it is never installed: its .deb is unpacked under
# .build/libreswan (install_libreswan) and only the libraries pluto, whack and addconn link are installed, with
# certutil (libnss3-tools) for the tests' NSS databases.
LIBRESWAN_LIBS=(libnss3-tools libnss3 libnspr4 libldns3 libunbound8 libevent-core-2.1-7 libevent-pthreads-2.1-7
  libcurl3-nss libcap-ng0 libaudit1 libldap-2.5-0 libpam0g libselinux1 libsystemd0 libcrypt1)
APT_PACKAGES+=("${LIBRESWAN_LIBS[@]}")
LIBRESWAN_ROOT="$ROOT/.build/libreswan"
# scapy is pinned: the interop tests work around known bugs of this exact release
# (../shared/interop/README.md).
PIP_PACKAGES=("scapy==2.8.0" "cryptography" "pytest" "pytest-xdist")
VENV="$ROOT/.build/interop-venv"
PY="$VENV/bin/python"

SECONDS=0

# --------------------------------------------------------------------------- install
install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "Debian packages already installed: ${APT_PACKAGES[*]}"
    return
  fi
  [ "$(id -u)" -eq 0 ] || die "need root to apt-get install: ${missing[*]}"
  step "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # tshark's package asks whether non-root users may capture; answer no, up front.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections ||
    die "debconf-set-selections failed"
  apt-get update || die "apt-get update failed"
  # strongswan-charon pulls in strongswan-starter, whose postinst starts the host's IPsec service (`invoke-rc.d ipsec
  # start`, deb-systemd-invoke for strongswan-starter.service). Both ask /usr/sbin/policy-rc.d first, and its exit
  # status 101 means "do not start": one is put in place for the install if the machine has none.
  local guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# scripts/test.sh: no service starts while packages install\nexit 101\n' >/usr/sbin/policy-rc.d &&
      chmod 755 /usr/sbin/policy-rc.d && guard=1 || die "could not write /usr/sbin/policy-rc.d"
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # gone even if the install is interrupted
  fi
  local rc=0
  apt-get install -y --no-install-recommends "${missing[@]}" || rc=$?
  [ -z "$guard" ] || { rm -f /usr/sbin/policy-rc.d; trap - EXIT; }
  [ $rc -eq 0 ] || die "apt-get install ${missing[*]} failed"
  # Nor may that service come up at the next boot: the tests run their own charons in network namespaces.
  if [[ " ${missing[*]} " == *" strongswan-"* ]]; then
    deb-systemd-helper disable strongswan-starter.service >/dev/null 2>&1 || true
    [ ! -x /etc/init.d/ipsec ] || update-rc.d ipsec disable >/dev/null 2>&1 ||
      die "could not disable the ipsec init script (update-rc.d ipsec disable)"
  fi
}

install_libreswan() {
  if [ -x "$LIBRESWAN_ROOT/usr/libexec/ipsec/pluto" ]; then
    echo "libreswan already unpacked in $LIBRESWAN_ROOT"
    return
  fi
  step "apt-get download libreswan; dpkg-deb -x into $LIBRESWAN_ROOT (not installed: it conflicts with strongSwan)"
  local tmp
  tmp=$(mktemp -d) || die "mktemp failed"
  chown _apt "$tmp" 2>/dev/null || true  # apt downloads as _apt where it can
  (cd "$tmp" && apt-get download libreswan) || { apt-get update && (cd "$tmp" && apt-get download libreswan); } ||
    die "apt-get download libreswan failed"
  mkdir -p "$LIBRESWAN_ROOT" && dpkg-deb -x "$tmp"/libreswan_*.deb "$LIBRESWAN_ROOT" ||
    die "could not unpack the libreswan package into $LIBRESWAN_ROOT"
  rm -rf "$tmp"
}

install_python() {
  if [ ! -x "$PY" ]; then
    step "python3 -m venv $VENV"
    mkdir -p "$ROOT/.build"
    python3 -m venv "$VENV" || die "could not create a virtualenv with $(command -v python3) (is python3-venv installed?)"
  fi
  if "$PY" -c 'import scapy, cryptography, pytest, xdist; assert scapy.__version__ == "2.8.0"' 2>/dev/null; then
    echo "Python packages already installed in $VENV"
    return
  fi
  step "pip install ${PIP_PACKAGES[*]}"
  "$PY" -m pip install --disable-pip-version-check --quiet "${PIP_PACKAGES[@]}" ||
    die "pip install ${PIP_PACKAGES[*]} failed"
}

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  install_apt
  install_libreswan
  install_python
fi

step "checking the tools"
command -v swift >/dev/null || die "swift is not on PATH (Swift 6.2+ toolchain needed)"
command -v tshark >/dev/null || die "tshark is missing after install"
tshark --version >/dev/null 2>&1 || die "tshark is installed but does not run"
[ -x "$PY" ] || die "no Python virtualenv at $VENV (run without SKIP_INSTALL=1)"
"$PY" -c 'import scapy' || die "python cannot import scapy after install"
"$PY" -c 'import cryptography, pytest, xdist
from scapy.config import conf
from scapy.layers.ipsec import SecurityAssociation
assert conf.crypto_valid, "scapy cannot use cryptography"' || die "the Python test dependencies do not work"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is missing after install"
compgen -G '/boot/vmlinuz-6.12*' >/dev/null || die "no /boot/vmlinuz-6.12* after installing linux-image-6.12-amd64"
for t in busybox tcpdump modprobe depmod cc iperf3; do
  command -v "$t" >/dev/null || PATH=$PATH:/usr/sbin:/sbin command -v "$t" >/dev/null || die "$t is missing after install"
done
command -v swanctl >/dev/null || PATH=$PATH:/usr/sbin command -v swanctl >/dev/null || die "swanctl is missing after install"
[ -x /usr/lib/ipsec/charon ] || die "/usr/lib/ipsec/charon is missing after install (strongswan-charon)"
for plugin in kernel-libipsec gcm openssl chapoly curve25519 vici; do
  [ -e "/usr/lib/ipsec/plugins/libstrongswan-$plugin.so" ] ||
    die "strongSwan plugin $plugin is missing after install (${STRONGSWAN_PACKAGES[*]})"
done
# No strongSwan daemon may run in the host's network namespace (the tests' charons live in their own namespaces).
for pid in $(for name in charon charon-systemd starter; do pgrep -x "$name" || true; done); do
  [ "$(readlink "/proc/$pid/ns/net" 2>/dev/null)" != "$(readlink /proc/self/ns/net)" ] ||
    die "a strongSwan daemon runs on the host (pid $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline")); stop it and disable" \
      "strongswan-starter.service / the ipsec init script"
done
[ -x "$LIBRESWAN_ROOT/usr/libexec/ipsec/pluto" ] ||
  die "no libreswan under $LIBRESWAN_ROOT (run without SKIP_INSTALL=1: it unpacks Debian's libreswan .deb there)"
"$LIBRESWAN_ROOT/usr/libexec/ipsec/pluto" --version 2>&1 | grep -q 'Libreswan 4' ||
  die "$LIBRESWAN_ROOT/usr/libexec/ipsec/pluto does not run: $("$LIBRESWAN_ROOT/usr/libexec/ipsec/pluto" --version 2>&1 | head -n3)"
command -v certutil >/dev/null || die "certutil is missing after install (libnss3-tools)"
echo "swift: $(swift --version 2>/dev/null | head -n1)"
echo "qemu: $(qemu-system-x86_64 --version | head -n1); kernel: $(ls /boot/vmlinuz-6.12* | sort -V | tail -n1)"
echo "tshark: $(tshark --version 2>/dev/null | head -n1)"
echo "strongSwan: $(dpkg-query -W -f='${Version}' strongswan-charon)"
echo "libreswan: $("$LIBRESWAN_ROOT/usr/libexec/ipsec/pluto" --version 2>&1 | head -n1) (unpacked in $LIBRESWAN_ROOT)"
echo "python: $("$PY" -c 'import sys, scapy, cryptography; print(sys.version.split()[0], "scapy", scapy.__version__, "cryptography", cryptography.__version__)')"
echo "install + checks took ${SECONDS}s"

# --------------------------------------------------------------------------- build
step "swift build --build-tests"
swift build --build-tests || die "swift build failed"
BIN=$(swift build --show-bin-path)
ESP_TOOL="$BIN/esp-tool"
XFRM_TOOL="$BIN/xfrm"
[ -x "$ESP_TOOL" ] || die "the build did not produce $ESP_TOOL"
[ -x "$XFRM_TOOL" ] || die "the build did not produce $XFRM_TOOL"
[ -x "$BIN/xfrmd" ] || die "the build did not produce $BIN/xfrmd"
echo "build done at ${SECONDS}s"

# --------------------------------------------------------------------------- test
status=0

step "swift test --skip-build --parallel"
swift test --skip-build --parallel || { status=1; echo "test.sh: swift test FAILED" >&2; }
echo "swift test done at ${SECONDS}s"

# The two builds only the last steps need (the release xfrm-bench, the fuzz harnesses) run in the background under
# SCHED_IDLE from here on: they take only CPU time nothing else wants (a suite's process always runs first): the
# sanitizer builds' serial compiles and links, and the suites below waiting on daemons, sockets, captures and qemu.
# The steps that need them wait for them. They start after `swift test --skip-build`, the last step here that uses
# .build itself (SwiftPM locks a scratch directory; the sanitizers have their own).
step "background, SCHED_IDLE: swift build -c release --product xfrm-bench; FUZZ_CONFIG=debug scripts/fuzz.sh build"
( chrt --idle 0 swift build -c release --product xfrm-bench >.build/background-release.log 2>&1 &&
  echo "release build done at ${SECONDS}s" >>.build/background-release.log
  FUZZ_CONFIG=debug FUZZ_DEBUG_INFO=none chrt --idle 0 scripts/fuzz.sh build >.build/background-fuzz.log 2>&1 &&
  echo "fuzz build done at ${SECONDS}s" >>.build/background-fuzz.log ) &
background=$!
# A run that stops early (die, Ctrl-C) leaves no build behind holding .build's lock.
trap 'kill "$background" 2>/dev/null || true' EXIT

# Sanitizers (issue 10). Each builds only the test bundle (swift-xfrmPackageTests: no executables, no daemon
# dependencies) in its own scratch directory, so the normal build above stays as the later suites need it.
# Both build without DWARF (-debug-info-format none: about a fifth less build time; reports still name functions).
# Skipped in both: the two scale tests (100,000 policies with a 30 s bound, 20,000 SAs against a full scan): single-
# threaded, over code the other tests cover, and 2-3 minutes each under a sanitizer.
SAN_SKIP='PolicyDatabaseTests/scale\(\)|StateIndexTests/indexAgreesWithScan\(\)'
# The address sanitizer (with LeakSanitizer) over every other unit test; any report fails the run.
step "address sanitizer: swift test --sanitize=address (all unit tests but the two scale tests)"
{ swift build --product swift-xfrmPackageTests --sanitize=address --scratch-path .build/asan -debug-info-format none &&
  SWIFT_BACKTRACE=enable=no ASAN_OPTIONS=detect_leaks=1 swift test --skip-build --sanitize=address \
    --scratch-path .build/asan -debug-info-format none --disable-xctest --skip "$SAN_SKIP"; } ||
  { status=1; echo "test.sh: unit tests FAILED under the address sanitizer" >&2; }
echo "address sanitizer done at ${SECONDS}s"
# The thread sanitizer over the threaded tests: the SPD under concurrent change (Left-Right lookups), the policy
# database's concurrent use, SAs replaced while batches run (the input memo lends its SA), the engine's rings and
# workers, the simulated NIC's engines (every NIC test runs them).
# -DXFRM_TSAN maps XFRMMutex to a pthread mutex, which TSan sees (the stdlib Mutex it does not: see README).
TSAN_TESTS='PolicyDatabaseConcurrencyTests|PolicyDatabaseTests/concurrentUse\(\)|BatchMemoTests/saReplacedWhileBatchesRun\(\)|XFRMEngineTests|XFRMSimulatedNICTests'
step "thread sanitizer: swift test --sanitize=thread -Xswiftc -DXFRM_TSAN (the threaded tests)"
{ swift build --product swift-xfrmPackageTests --sanitize=thread -Xswiftc -DXFRM_TSAN --scratch-path .build/tsan \
    -debug-info-format none &&
  SWIFT_BACKTRACE=enable=no TSAN_OPTIONS=halt_on_error=0 swift test --skip-build --sanitize=thread \
    -Xswiftc -DXFRM_TSAN --scratch-path .build/tsan -debug-info-format none --disable-xctest --filter "$TSAN_TESTS"; } ||
  { status=1; echo "test.sh: threaded tests FAILED (or raced) under the thread sanitizer" >&2; }
echo "thread sanitizer done at ${SECONDS}s"

for backend in openssl ipsec-mb; do
  step "interop: pytest -n 2 tests/interop (ESP_TOOL=$ESP_TOOL XFRM_CRYPTO=$backend)"
  XFRM_CRYPTO=$backend ESP_TOOL="$ESP_TOOL" "$PY" -m pytest -q -n 2 -p no:cacheprovider tests/interop ||
    { status=1; echo "test.sh: interop tests FAILED with XFRM_CRYPTO=$backend" >&2; }
done

# Three workers: the suite mostly waits on daemons, transfers and captures (~200 s instead of ~280 s with two). An SA
# deleted by a rekey between a packet's lookup and its lock or device, which three workers made frequent enough to
# fail the charon rekey tests, sends the packet through the lookups again since the fifth session (README
# "Deliberate differences from Linux").
step "end to end: pytest -n 3 tests/e2e (XFRM_TOOL=$XFRM_TOOL)"
XFRM_TOOL="$XFRM_TOOL" "$PY" -m pytest -q -n 3 -p no:cacheprovider tests/e2e ||
  { status=1; echo "test.sh: end-to-end tests FAILED" >&2; }

step "kernel: pytest -n 2 tests/kernel (XFRM_TOOL=$XFRM_TOOL; Linux $(ls /boot/vmlinuz-6.12* | sort -V | tail -n1 | sed 's#.*/vmlinuz-##') in qemu)"
XFRM_TOOL="$XFRM_TOOL" "$PY" -m pytest -q -n 2 -p no:cacheprovider tests/kernel ||
  { status=1; echo "test.sh: kernel comparison tests FAILED" >&2; }
echo "kernel tests done at ${SECONDS}s"

# Allocations are only meaningful optimized: the one release build is the benchmark's, and it checks that the
# daemon's per-packet path (both dispatchers: lookup, SA, ESP, accounting, routing) allocates nothing.
# Under set -e a failed background build must not end the run here: the steps below build again and say why.
wait "$background" || echo "test.sh: a background build failed (.build/background-*.log); the steps below build again"
echo "background builds waited for at ${SECONDS}s: $(tail -n1 .build/background-release.log); $(tail -n1 .build/background-fuzz.log)"
step "allocation check: xfrm-bench engine --check and stack --check (release build of xfrm-bench)"
{ swift build -c release --product xfrm-bench &&
  "$(swift build -c release --show-bin-path)/xfrm-bench" engine --check --rounds 2 --seconds 0.2 &&
  "$(swift build -c release --show-bin-path)/xfrm-bench" stack --check --rounds 2 --seconds 0.2; } ||
  { status=1; echo "test.sh: the engine or stack path allocates per packet (or did not build)" >&2; }
echo "allocation check done at ${SECONDS}s"

# libFuzzer harnesses (Fuzz/, README "Fuzzing"): each runs a short fixed time from its checked-in corpus, so that a
# change that makes one of them crash, leak or trap fails CI. Their build is the debug + ASan + coverage build of
# the modules they use, in .build/fuzz (FUZZ_CONFIG=debug: ~40 s less build than release; 5 s runs need no speed).
# Leak detection is on, with Fuzz/lsan.supp (README "Fuzzing": LeakSanitizer cannot see a pointer a Swift enum keeps
# its case tag in, and reported the SAs' chains the harnesses' global stacks hold).
step "fuzz: scripts/fuzz.sh all 5 (each harness 5 s, leak detection on)"
fuzz_start=$SECONDS
# The background build made them: no second build (SwiftPM would redo it all if the environment differed).
fuzz_built=0
! grep -q "^fuzz build done" .build/background-fuzz.log 2>/dev/null || fuzz_built=1
FUZZ_CONFIG=debug FUZZ_DEBUG_INFO=none FUZZ_SKIP_BUILD=$fuzz_built scripts/fuzz.sh all 5 ||
  { status=1; echo "test.sh: a fuzz harness FAILED" >&2; }
echo "fuzz done at ${SECONDS}s ($((SECONDS - fuzz_start))s with the build)"

echo "total ${SECONDS}s"
if [ $status -ne 0 ]; then
  echo "test.sh: FAILED (see above)" >&2
  exit 1
fi
echo "test.sh: all tests passed"
