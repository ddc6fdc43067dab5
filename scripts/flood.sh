#!/usr/bin/env bash
# Flood test (issue 10, "Load"): garbage and replayed ESP at one xfrmd's UDP 4500 and raw ESP sockets while an iperf3
# TCP stream runs between two xfrmd peers in network namespaces. Prints a table, one JSON line and PASS/FAIL
# (the stream keeps >= half its unloaded throughput, and both accounting identities hold; see tests/e2e/floodlib.py).
#
#     scripts/flood.sh [--count N] [--seconds S] [--stream-seconds S] [--daemon-args '...']
#
# Root; needs a build (swift build) and the test virtualenv (scripts/test.sh makes it), iperf3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v iperf3 >/dev/null || { echo "flood: iperf3 is missing (apt-get install iperf3)" >&2; exit 1; }
PY=${PY:-.build/interop-venv/bin/python}
[ -x "$PY" ] || { echo "flood: no virtualenv at $PY (run scripts/test.sh once)" >&2; exit 1; }
export XFRM_TOOL=${XFRM_TOOL:-$(swift build --show-bin-path)/xfrm}
[ -x "$XFRM_TOOL" ] || { echo "flood: no $XFRM_TOOL (swift build)" >&2; exit 1; }
exec "$PY" tests/e2e/floodlib.py "$@"
