#!/usr/bin/env bash
# The IPsec modes between two daemons with real sockets (the live counterpart of `xfrm-bench modes`, which runs
# simulated hosts): iperf3 TCP, 1 and 4 streams, between two network namespaces over a veth, for
#   no-ipsec  the same veth and the same TUN MTU, routed by the kernel with no tunnel (no daemon can carry plaintext:
#             xfrmd sends only what an SA transformed, so the baseline is the plain path the tunnel replaces)
#   software  two xfrmd, ESP in UDP 4500 (AES-GCM-128, tunnel mode), ESP in the daemons' threads
#   crypto    `xfrmd --offload both`, SAs with `offload crypto dev xfrm0`: the simulated NIC's engine does the AEAD
#   packet    the same with `offload packet` (SAs and policies): the NIC's engine does all of ESP
# Host CPU per packet: the CPU time (utime + stime, /proc/PID/task/*/stat) of the two iperf3 processes and of every
# daemon thread except the simulated NIC's engine threads (named "<dev>-engine<N>"), over the run, divided by the
# packets — the bytes iperf3 received over 1,400 (one TUN-MTU inner packet each; the veth's own counters count GSO
# frames, not packets). The ratio is to no-ipsec with the same streams. Prints a table, one JSON line per row
# ({"mode", "streams", "gbps", "cpu_ns_per_packet", "ratio"}) and writes an SVG chart (python3, the layout of
# `xfrm-bench modes --svg`) to $MODES_SVG (default docs/modes-live.svg).
#
#   scripts/bench-modes.sh [SECONDS]   (as root; builds xfrm and xfrmd in release mode first)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECS=${1:-5}
SVG=${MODES_SVG:-docs/modes-live.svg}
command -v iperf3 >/dev/null || { echo "bench-modes: iperf3 is missing" >&2; exit 1; }
swift build -c release --product xfrm >/dev/null
swift build -c release --product xfrmd >/dev/null
BIN=$(swift build -c release --show-bin-path)
TAG=bm$$
A=${TAG}a
B=${TAG}b
WORK=$(mktemp -d)
PIDS=""
stop_daemons() {
  [ -n "$PIDS" ] && kill $PIDS 2>/dev/null && wait $PIDS 2>/dev/null || true
  PIDS=""
}
cleanup() {
  stop_daemons
  ip netns del "$A" 2>/dev/null || true
  ip netns del "$B" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ip netns add "$A"
ip netns add "$B"
ip link add va netns "$A" type veth peer name vb netns "$B"
ip -n "$A" addr add 192.0.2.1/24 dev va
ip -n "$B" addr add 192.0.2.2/24 dev vb
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set va up
ip -n "$B" link set vb up

# CPU ticks (utime + stime) of the given processes' threads, engine threads excluded.
ticks() {
  python3 - "$@" <<'PY'
import glob, sys
total = 0
for pid in sys.argv[1:]:
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            comm = open(task + "/comm").read().strip()
            fields = open(task + "/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if "-engine" in comm:
            continue
        total += int(fields[11]) + int(fields[12])
print(total)
PY
}

# iperf3 from A (SOURCE) to B (DESTINATION) with STREAMS streams; prints "Gbit/s bytes cpu_ticks" where cpu_ticks
# covers the iperf3 processes and the daemons' host threads (DAEMON_PIDS) over the run.
measure() {
  local src=$1 dst=$2 streams=$3
  ip netns exec "$B" iperf3 -s -B "$dst" -1 >/dev/null 2>&1 &
  local server=$!
  sleep 0.5
  ip netns exec "$A" iperf3 -c "$dst" -B "$src" -t "$SECS" -P "$streams" -J >"$WORK/iperf.json" &
  local client=$!
  sleep 0.2
  local sp cp
  sp=$(pgrep -P "$server" iperf3 || echo "$server")
  cp=$(pgrep -P "$client" iperf3 || echo "$client")
  local t0 t1
  t0=$(ticks $sp $cp $DAEMON_PIDS)
  # The last sample taken while every process still counts (an exited process is a zombie with no tasks until it
  # is reaped, so the largest sample is the last good one; up to 0.2 s at the end go uncounted).
  t1=$t0
  while kill -0 "$client" 2>/dev/null; do
    local t
    t=$(ticks $sp $cp $DAEMON_PIDS)
    [ "$t" -gt "$t1" ] && t1=$t
    sleep 0.2
  done
  wait $client || true
  wait $server || true
  python3 -c 'import json,sys; e = json.load(open(sys.argv[1]))["end"]["sum_received"]; print("%.3f %d %d" % (e["bits_per_second"] / 1e9, e["bytes"], int(sys.argv[2]) - int(sys.argv[3])))' \
    "$WORK/iperf.json" "$t1" "$t0"
}

ROWS=()
HZ=$(getconf CLK_TCK)

# no-ipsec: the inner subnets routed straight over the veth (a TUN-sized MTU on the route), no daemon.
DAEMON_PIDS=""
ip -n "$A" addr add 10.0.1.1/32 dev lo
ip -n "$B" addr add 10.0.2.1/32 dev lo
ip -n "$A" route add 10.0.2.0/24 via 192.0.2.2 src 10.0.1.1 mtu 1400
ip -n "$B" route add 10.0.1.0/24 via 192.0.2.1 src 10.0.2.1 mtu 1400
for streams in 1 4; do ROWS+=("no-ipsec $streams $(measure 10.0.1.1 10.0.2.1 $streams)"); done
ip -n "$A" route del 10.0.2.0/24
ip -n "$B" route del 10.0.1.0/24
ip -n "$A" addr del 10.0.1.1/32 dev lo
ip -n "$B" addr del 10.0.2.1/32 dev lo

K1=0x0102030405060708090a0b0c0d0e0f1011121314
K2=0x1112131415161718191a1b1c1d1e1f2021222324
for mode in software crypto packet; do
  args=""; [ $mode != software ] && args="--offload both"
  ip netns exec "$A" "$BIN/xfrmd" --socket "$WORK/a.sock" $args ${XFRMD_ARGS:-} >"$WORK/a.log" 2>&1 &
  PIDS="$!"
  ip netns exec "$B" "$BIN/xfrmd" --socket "$WORK/b.sock" $args ${XFRMD_ARGS:-} >"$WORK/b.log" 2>&1 &
  PIDS="$PIDS $!"
  for s in "$WORK/a.sock" "$WORK/b.sock"; do
    for _ in $(seq 100); do [ -S "$s" ] && break; sleep 0.05; done
  done
  for ns in "$A" "$B"; do
    ip -n "$ns" link show xfrm0 >/dev/null 2>&1 || { echo "bench-modes: no daemon in $ns ($mode)" >&2; cat "$WORK"/*.log >&2; exit 1; }
  done
  DAEMON_PIDS=""
  for p in $PIDS; do DAEMON_PIDS="$DAEMON_PIDS $(pgrep -P "$p" xfrmd || echo "$p")"; done
  ip -n "$A" addr add 10.0.1.1/32 dev xfrm0
  ip -n "$B" addr add 10.0.2.1/32 dev xfrm0
  ip -n "$A" link set xfrm0 mtu 1400
  ip -n "$B" link set xfrm0 mtu 1400
  ip -n "$A" route add 10.0.2.0/24 dev xfrm0 src 10.0.1.1
  ip -n "$B" route add 10.0.1.0/24 dev xfrm0 src 10.0.2.1
  for side in a b; do
    s=$WORK/$side.sock
    ns=$A; [ $side = b ] && ns=$B
    out1=""; in1=" replay-window 1024"; out2=" replay-window 1024"; in2=""
    if [ $mode != software ]; then
      # The sender's SA is `dir out` (no replay window), the receiver's `dir in`.
      if [ $side = a ]; then out1=" offload $mode dev xfrm0 dir out"; in1=""; out2=" replay-window 128 offload $mode dev xfrm0 dir in"
      else out1=" replay-window 128 offload $mode dev xfrm0 dir in"; in1=""; out2=" offload $mode dev xfrm0 dir out"; fi
    fi
    # In the daemon's namespace: `offload dev xfrm0` names that host's device.
    ip netns exec "$ns" "$BIN/xfrm" -S "$s" state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x1001 reqid 1 mode tunnel \
      aead 'rfc4106(gcm(aes))' $K1 128 encap espinudp 4500 4500 0.0.0.0 $out1$in1
    ip netns exec "$ns" "$BIN/xfrm" -S "$s" state add src 192.0.2.2 dst 192.0.2.1 proto esp spi 0x2002 reqid 2 mode tunnel \
      aead 'rfc4106(gcm(aes))' $K2 128 encap espinudp 4500 4500 0.0.0.0 $out2$in2
  done
  pol=""; [ $mode = packet ] && pol=" offload packet dev xfrm0"
  AB="tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel"
  BA="tmpl src 192.0.2.2 dst 192.0.2.1 proto esp reqid 2 mode tunnel"
  ip netns exec "$A" "$BIN/xfrm" -S "$WORK/a.sock" policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir out $AB$pol
  ip netns exec "$A" "$BIN/xfrm" -S "$WORK/a.sock" policy add src 10.0.2.0/24 dst 10.0.1.0/24 dir in $BA$pol
  ip netns exec "$B" "$BIN/xfrm" -S "$WORK/b.sock" policy add src 10.0.2.0/24 dst 10.0.1.0/24 dir out $BA$pol
  ip netns exec "$B" "$BIN/xfrm" -S "$WORK/b.sock" policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir in $AB$pol
  before=$(ip netns exec "$B" awk '/vb:/ {print $2}' /proc/net/dev)
  for streams in 1 4; do ROWS+=("$mode $streams $(measure 10.0.1.1 10.0.2.1 $streams)"); done
  after=$(ip netns exec "$B" awk '/vb:/ {print $2}' /proc/net/dev)
  carried=$(( (after - before) / 1000000 ))
  [ "$carried" -gt 10 ] || { echo "bench-modes: the veth carried only ${carried} MB in mode $mode" >&2; exit 1; }
  stop_daemons
done

printf '%s\n' "${ROWS[@]}" >"$WORK/rows"
python3 - "$HZ" "$SVG" "$SECS" "$WORK/rows" <<'PY'
import json, sys
hz, svg_path, secs = int(sys.argv[1]), sys.argv[2], sys.argv[3]
rows = []
for line in open(sys.argv[4]).read().split("\n"):
    if not line.strip():
        continue
    mode, streams, gbps, nbytes, ticks = line.split()
    packets = max(int(nbytes) / 1400, 1)
    rows.append({"mode": mode, "streams": int(streams), "gbps": float(gbps),
                 "cpu_ns_per_packet": round(int(ticks) / hz * 1e9 / packets, 1)})
for r in rows:
    base = next(b for b in rows if b["mode"] == "no-ipsec" and b["streams"] == r["streams"])
    r["ratio"] = round(r["cpu_ns_per_packet"] / base["cpu_ns_per_packet"], 2)
print("%-10s %8s %8s %18s %8s" % ("mode", "streams", "Gbit/s", "host CPU ns/packet", "ratio"))
for r in rows:
    print("%-10s %8d %8.3f %18.1f %8.2f" % (r["mode"], r["streams"], r["gbps"], r["cpu_ns_per_packet"], r["ratio"]))
for r in rows:
    print(json.dumps(r))
# The chart: one group per stream count, one bar per mode (host CPU ns per packet), labels as xfrm-bench's.
colors = {"no-ipsec": "#7f8c8d", "software": "#c0392b", "crypto": "#e67e22", "packet": "#2e86c1"}
W, H, left, right, top, bottom = 1000.0, 580.0, 80.0, 30.0, 110.0, 70.0
ymax = max(r["cpu_ns_per_packet"] for r in rows) * 1.25
step = 10 ** len(str(int(ymax / 6))) / 10
while ymax / step > 6:
    step *= 2
groups = sorted({r["streams"] for r in rows})
esc = lambda s: s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W:.0f}" height="{H:.0f}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W:.0f}" height="{H:.0f}" fill="white"/>',
       '<text x="20" y="28" font-size="18" font-weight="bold">Host CPU per packet by IPsec mode (two xfrmd, real sockets)</text>',
       f'<text x="20" y="50">iperf3 TCP A→B over a veth, TUN MTU 1400, ESP in UDP 4500, rfc4106(gcm(aes)) 128; {secs} s per row.</text>',
       '<text x="20" y="68">Bars: CPU of the iperf3 processes and the daemons\' threads (the simulated NIC\'s engine threads excluded)</text>',
       '<text x="20" y="86">per 1,400 bytes received, with the ratio to no-ipsec and the throughput.</text>']
plot_h = H - top - bottom
y = lambda v: top + plot_h * (1 - v / ymax)
v = 0.0
while v <= ymax:
    out.append(f'<line x1="{left}" x2="{W - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
    out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
    v += step
out.append(f'<text transform="translate(20 {top + plot_h / 2:.0f}) rotate(-90)" text-anchor="middle">host CPU ns / packet (lower is better)</text>')
gw = (W - left - right) / len(groups)
for gi, g in enumerate(groups):
    bars = [r for r in rows if r["streams"] == g]
    bw = gw * 0.8 / len(bars)
    for bi, r in enumerate(bars):
        x = left + gi * gw + gw * 0.1 + bi * bw
        val = r["cpu_ns_per_packet"]
        out.append(f'<rect x="{x + 4:.1f}" y="{y(val):.1f}" width="{bw - 8:.1f}" height="{y(0) - y(val):.1f}" fill="{colors[r["mode"]]}"/>')
        for li, label in enumerate([f'{val:.0f} ns', f'×{r["ratio"]:.2f}', f'{r["gbps"]:.2f} Gbps']):
            out.append(f'<text x="{x + bw / 2:.1f}" y="{y(val) - 36 + 14 * li:.1f}" text-anchor="middle">{esc(label)}</text>')
    out.append(f'<text x="{left + gi * gw + gw / 2:.1f}" y="{H - bottom + 20:.1f}" text-anchor="middle">{g} stream{"s" if g > 1 else ""}</text>')
for i, (name, color) in enumerate(colors.items()):
    out.append(f'<rect x="{left + i * 150}" y="{H - 30}" width="14" height="14" fill="{color}"/>')
    out.append(f'<text x="{left + i * 150 + 20}" y="{H - 19}">{name}</text>')
out.append("</svg>")
open(svg_path, "w").write("\n".join(out) + "\n")
print(f"bench-modes: chart written to {svg_path}", file=sys.stderr)
PY
