#!/usr/bin/env bash
# Soak test (issue 10; not in CI): numbered UDP both ways between two xfrmd peers for DURATION seconds (default
# 1800) with a rekey every 10 s through `xfrm -S`; reports memory over time, packets lost (must be 0), counters.
#
#     scripts/soak.sh [DURATION] [--rekey SECONDS] [--rate PPS] [--sample SECONDS] [--natt]
#
# Root; needs a build (swift build; `XFRM_TOOL=.../release/xfrm` for the release binaries) and python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export XFRM_TOOL=${XFRM_TOOL:-$(swift build --show-bin-path)/xfrm}
[ -x "$XFRM_TOOL" ] || { echo "soak: no $XFRM_TOOL (swift build)" >&2; exit 1; }
exec python3 scripts/soak.py "$@"
