#!/usr/bin/env bash
# Runs one libFuzzer harness (or all) with its seed corpus:
#
#     scripts/fuzz.sh TARGET SECONDS      TARGET: esp-input input-runs control batch pcap daemon-intake replay
#                                         reassembly, or all
#
# Builds the harnesses once (Fuzz/, a package of their own, into .build/fuzz; later calls rebuild only what
# changed), copies the checked-in seeds (Fuzz/Corpus/TARGET) into a working corpus (.build/fuzz-corpus/TARGET,
# which keeps what libFuzzer finds between runs), runs SECONDS seconds and prints the executions. A crash, a leak
# the address sanitizer reports or a harness's own check (a trap) fails the script; the input is kept as
# .build/fuzz-artifacts/TARGET-crash-*. FUZZ_RUNS=N stops after N executions instead (the campaign, in fork mode); FUZZ_ARGS
# passes more libFuzzer options. FUZZ_CONFIG=debug builds without optimisation (a faster build, slower
# executions: what CI's short runs use); the default, release, is for campaigns. `all` runs FUZZ_JOBS harnesses at
# a time (default 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
TARGETS=(esp-input input-runs control batch pcap daemon-intake replay reassembly)
# `scripts/fuzz.sh build` builds the harnesses and runs nothing (scripts/test.sh builds them in the background).
if [ "${1:-}" = build ] && [ $# -eq 1 ]; then
  set -- build 0
fi
[ $# -eq 2 ] || { echo "usage: scripts/fuzz.sh TARGET|all SECONDS, or scripts/fuzz.sh build  (TARGET: ${TARGETS[*]})" >&2; exit 2; }
target=$1
seconds=$2
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "fuzz.sh: SECONDS must be a whole number, got \"$seconds\"" >&2; exit 2; }
if [ "$target" != all ] && [ "$target" != build ] && [[ ! " ${TARGETS[*]} " == *" $target "* ]]; then
  echo "fuzz.sh: unknown target \"$target\" (${TARGETS[*]}, all)" >&2
  exit 2
fi

# `--sanitize fuzzer --sanitize address` alone gives swiftc two -sanitize= options, and the last one wins: the Swift
# code would get ASan but no coverage instrumentation (libFuzzer then sees 1 edge). The combined -Xswiftc option
# comes last and gives both.
config=${FUZZ_CONFIG:-release}
[[ "$config" =~ ^(debug|release)$ ]] || { echo "fuzz.sh: FUZZ_CONFIG must be debug or release, got \"$config\"" >&2; exit 2; }
[ "${FUZZ_SKIP_BUILD:-0}" = 1 ] ||
  echo "==> building the fuzz harnesses (swift build --package-path Fuzz, $config, fuzzer + address sanitizer)"
# FUZZ_DEBUG_INFO=none (scripts/test.sh): no DWARF for the Swift code (-Xswiftc -gnone: a faster build; reports
# still name the functions).
nodebug=()
[ "${FUZZ_DEBUG_INFO:-}" != none ] || nodebug=(-Xswiftc -gnone)
BIN="$ROOT/.build/fuzz/$config"
# FUZZ_SKIP_BUILD=1 (scripts/test.sh, after its background build succeeded): run what is built. SwiftPM rebuilds
# everything when a call's environment differs from the last one's, which cost CI a minute.
if [ "${FUZZ_SKIP_BUILD:-0}" = 1 ]; then
  echo "==> the fuzz harnesses already built in $BIN (FUZZ_SKIP_BUILD=1)"
  for t in "${TARGETS[@]}"; do
    [ -x "$BIN/fuzz-$t" ] || { echo "fuzz.sh: FUZZ_SKIP_BUILD=1 but $BIN/fuzz-$t is not built" >&2; exit 1; }
  done
else
  nice -n 10 swift build --package-path Fuzz --scratch-path "$ROOT/.build/fuzz" -c "$config" \
    --sanitize fuzzer --sanitize address -Xswiftc -sanitize=fuzzer,address "${nodebug[@]}"
fi
[ "$target" != build ] || exit 0

run_one() {
  local t=$1
  local corpus="$ROOT/.build/fuzz-corpus/$t" artifacts="$ROOT/.build/fuzz-artifacts"
  mkdir -p "$corpus" "$artifacts"
  cp -n "$ROOT/Fuzz/Corpus/$t/"* "$corpus/" 2>/dev/null || true
  local limits=(-max_total_time="$seconds")
  # A campaign runs in libFuzzer's fork mode: one job after another in a fresh process, merging into the corpus.
  # One long-lived process slows down (daemon-intake fell from ~2,000 to ~600 executions a second within half an
  # hour; fresh jobs from the same corpus keep ~2,000). FUZZ_FORK=0 keeps one process.
  if [ -n "${FUZZ_RUNS:-}" ]; then
    limits=(-runs="$FUZZ_RUNS")
    if [ "${FUZZ_FORK:-1}" != 0 ] && [[ " ${FUZZ_ARGS:-} " != *" -fork="* ]]; then
      limits+=(-fork=1 -ignore_crashes=0)
    fi
  fi
  local extra=()
  # A replay input of 1 KiB is ~340 steps: longer ones only slow the differential down.
  [ "$t" != replay ] || extra=(-max_len=1024)
  echo "==> fuzz-$t ${limits[*]}"
  local log="$ROOT/.build/fuzz-$t.log" rc=0
  # SWIFT_BACKTRACE=enable=no: a backtracer left behind by a crash can hold the output pipe open. Fuzz/lsan.supp:
  # LeakSanitizer's one known false positive (a pointer hidden in a Swift enum's spare bits; see the file).
  LSAN_OPTIONS="suppressions=$ROOT/Fuzz/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}" \
    SWIFT_BACKTRACE=enable=no nice -n 10 "$BIN/fuzz-$t" "${limits[@]}" "${extra[@]}" ${FUZZ_ARGS:-} \
    -print_final_stats=1 -artifact_prefix="$artifacts/$t-" "$corpus" >"$log" 2>&1 || rc=$?
  local execs rate
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  if [ -z "$execs" ]; then  # fork mode: the parent's last progress line, "#EXECUTIONS: cov: … exec/s: N …"
    execs=$(sed -n 's/^#\([0-9]*\): .*/\1/p' "$log" | tail -n 1)
    local secs
    secs=$(sed -n 's/^#[0-9]*: .* time: \([0-9]*\)s .*/\1/p' "$log" | tail -n 1)
    [ -z "$execs" ] || [ -z "$secs" ] || [ "$secs" -eq 0 ] || rate=$((execs / secs))
  fi
  echo "fuzz-$t: ${execs:-?} executions, ${rate:-?} exec/s, corpus $(ls "$corpus" | wc -l) inputs"
  if [ $rc -ne 0 ]; then
    grep -E "ERROR|Fatal error|SUMMARY|Test unit written" "$log" >&2 || tail -n 20 "$log" >&2
    echo "fuzz.sh: fuzz-$t FAILED (exit $rc; log $log)" >&2
    return 1
  fi
}

status=0
if [ "$target" = all ]; then
  # FUZZ_JOBS harnesses at a time (default 2, one per core here): each is one process with its own log.
  jobs=${FUZZ_JOBS:-2}
  for ((i = 0; i < ${#TARGETS[@]}; i += jobs)); do
    group=("${TARGETS[@]:i:jobs}")
    pids=()
    for t in "${group[@]}"; do
      run_one "$t" >"$ROOT/.build/fuzz-$t.out" 2>&1 &
      pids+=($!)
    done
    for k in "${!group[@]}"; do
      wait "${pids[$k]}" || status=1
      cat "$ROOT/.build/fuzz-${group[$k]}.out"
    done
  done
else
  run_one "$target" || status=1
fi
exit $status
