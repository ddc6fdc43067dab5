"""The kernel side of the listing comparison: every generated case in one boot, attributed case by case.

`ip xfrm ... list` ends the `ip` process (iproute2 calls exit() after a dump), and `ip xfrm` also exits when the
kernel refuses a request, so listings cannot be interleaved in one `ip -batch`. Instead the guest adds every case
to one SAD/SPD (in a fresh network namespace) through `ip -force -batch -`, each add line followed by a numbered
marker on stdout (`route get 127.0.A.B`, case A*256+B). When `ip` exits on a refusal, the case after the last
marker is the refused one, what the run wrote to stderr is its error, and the batch resumes after it. Then four
dumps: `ip xfrm state list`, `ip -s xfrm state list`, `ip xfrm policy list`, `ip -s xfrm policy list`; their
entries are attributed to cases by (src, dst, SPI) for states (SPIs are unique across cases) and by the selector's
addresses for policies (unique across cases).

Policy indexes come from a per-namespace generator that every insert without an explicit index advances, so the
host reproduces, for each case, the number of such policies the kernel had inserted before it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from cases import Case

GUEST = r"""
cd /tmp
cat >/tmp/adds.sh <<'EOF'
# adds.sh: runs /data/adds (2 lines a case: the add, then its marker), resuming after each case that makes ip exit
ip link set lo up
N=$(wc -l </data/adds); N=$((N / 2))
: >/tmp/o; : >/tmp/e
row=1
while [ "$row" -le "$N" ]; do
  echo "@@RUN $row" >>/tmp/o; echo "@@RUN $row" >>/tmp/e
  tail -n +$(( (row - 1) * 2 + 1 )) /data/adds | ip -force -batch - >>/tmp/o 2>>/tmp/e
  rc=$?
  echo "@@EXIT $rc" >>/tmp/e
  last=$(awk '/^@@RUN /{m=""} /^local 127\.0\.[0-9]+\.[0-9]+ /{split($2,a,"."); m=a[3]*256+a[4]} END{print m}' /tmp/o)
  [ -n "$last" ] || last=$((row - 1))
  [ "$rc" -ne 0 ] || break
  row=$((last + 2))
done
for f in o e; do echo "@@FILE adds.$f"; cat /tmp/$f; echo "@@ENDFILE"; done
for what in state policy; do
  echo "@@FILE $what"; ip xfrm $what list; echo "@@ENDFILE"
  echo "@@FILE $what-s"; ip -s xfrm $what list; echo "@@ENDFILE"
done
EOF
unshare -n sh /tmp/adds.sh
"""


def adds_file(cases: list[Case]) -> str:
    lines = []
    for k, c in enumerate(cases, 1):
        assert k < 65536
        lines += [c.line, f"route get 127.0.{k >> 8}.{k & 255}"]
    return "\n".join(lines) + "\n"


def guest_script(cases: list[Case]) -> tuple[str, dict[str, bytes]]:
    return GUEST, {"adds": adds_file(cases).encode()}


@dataclass
class KernelResult:
    accepted: bool | None = None  # None: not seen (a harness bug)
    error: str = ""  # what `ip` wrote to stderr for the add line
    listing: str | None = None  # the case's entry in `ip xfrm state|policy list`
    stats_listing: str | None = None  # the same with -s
    prior_policies: int = 0  # policies the kernel inserted (without explicit index) before this case
    rc: int | None = None  # for a refusal that ended `ip -batch`: its exit status
    command_failed: bool = False  # whether ip printed "Command failed" for it (a command that returned)


MARKER = re.compile(r"^local 127\.0\.(\d+)\.(\d+) ")
FAILED = re.compile(r"^Command failed -:(\d+)$")


def state_blocks(listing: str) -> dict[int, str]:
    """An `ip xfrm state` listing split into its entries, by SPI."""
    out = {}
    for block in re.split(r"(?m)^(?=src )", listing):
        m = re.search(r"spi 0x([0-9a-f]{8})", block)
        if m:
            out[int(m.group(1), 16)] = block
    return out


def files_of(output: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in re.finditer(r"^@@FILE (\S+)\n(.*?)^@@ENDFILE$", output, re.S | re.M):
        out[m.group(1)] = m.group(2)
    return out


def norm_addr(a: str) -> str:
    a = a.split("/")[0]
    return str(ipaddress.ip_address(a))


def case_key(c: Case) -> tuple:
    w = c.words
    if c.kind == "state":
        spi = w[w.index("spi") + 1]
        return ("state", norm_addr(w[w.index("src") + 1]), norm_addr(w[w.index("dst") + 1]), int(spi, 0))
    # the selector's addresses come before any `tmpl`
    sel = w[: w.index("tmpl")] if "tmpl" in w else w
    v6 = any(":" in x for x in sel)
    any_ = "::" if v6 else "0.0.0.0"
    src = norm_addr(sel[sel.index("src") + 1]) if "src" in sel else any_
    dst = norm_addr(sel[sel.index("dst") + 1]) if "dst" in sel else any_
    return ("policy", src, dst)


def split_entries(kind: str, text: str) -> dict[tuple, str]:
    """Splits a dump into entries (each starts at an unindented line) keyed like case_key."""
    out: dict[tuple, str] = {}
    entries: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if not line.startswith(("\t", " ")) or not entries:
            entries.append([])
        entries[-1].append(line)
    for e in entries:
        first = e[0].split()
        try:
            src, dst = norm_addr(first[first.index("src") + 1]), norm_addr(first[first.index("dst") + 1])
        except (ValueError, IndexError):
            out[("unparsed", len(out))] = "".join(e)
            continue
        if kind == "state":
            m = re.search(r"spi 0x([0-9a-f]{8})", e[1] if len(e) > 1 else "")
            key = ("state", src, dst, int(m.group(1), 16) if m else None)
        else:
            key = ("policy", src, dst)
        if key in out:
            key = key + (len(out),)
        out[key] = "".join(e)
    return out


def parse(output: str, cases: list[Case]) -> dict[str, KernelResult]:
    files = files_of(output)
    for f in ("adds.o", "adds.e", "state", "state-s", "policy", "policy-s"):
        if f not in files:
            raise AssertionError(f"the guest did not report {f}; output tail:\n{output[-3000:]}")
    n = len(cases)
    res = {c.id: KernelResult() for c in cases}
    done: set[int] = set()
    errors: dict[int, str] = {}
    runs_out = re.split(r"^@@RUN (\d+)\n", files["adds.o"], flags=re.M)
    runs_err = re.split(r"^@@RUN (\d+)\n", files["adds.e"], flags=re.M)
    err_by_run = {int(runs_err[i]): runs_err[i + 1] for i in range(1, len(runs_err), 2)}
    failed: set[int] = set()
    rcs: dict[int, int] = {}
    command_failed: set[int] = set()
    for i in range(1, len(runs_out), 2):
        row = int(runs_out[i])
        last = row - 1
        for line in runs_out[i + 1].splitlines():
            m = MARKER.match(line)
            if m:
                last = int(m.group(1)) * 256 + int(m.group(2))
                done.add(last)
        err = err_by_run.get(row, "")
        m = re.search(r"^@@EXIT (\d+)$", err, re.M)
        rc = int(m.group(1)) if m else -1
        err = err[: m.start()] if m else err
        pending: list[str] = []
        for line in err.splitlines(keepends=True):
            f = FAILED.match(line.rstrip("\n"))
            if f:  # a command that returned an error (the batch went on): line L of this run
                k = row + (int(f.group(1)) - 1) // 2
                errors[k] = errors.get(k, "") + "".join(pending)
                failed.add(k)
                command_failed.add(k)
                pending = []
            else:
                pending.append(line)
        if rc != 0 and last < n:
            k = last + 1  # made ip exit
            errors[k] = errors.get(k, "") + "".join(pending)
            failed.add(k)
            rcs[k] = rc
        elif pending:
            errors[max(last, 1)] = errors.get(max(last, 1), "") + "".join(pending)
    entries = {kind: (split_entries(kind, files[kind]), split_entries(kind, files[kind + "-s"]))
               for kind in ("state", "policy")}
    prior = 0
    for k, c in enumerate(cases, 1):
        r = res[c.id]
        r.error = errors.get(k, "")
        r.prior_policies = prior
        r.rc = rcs.get(k)
        r.command_failed = k in command_failed
        if k in failed:
            r.accepted = False
        elif k in done:
            r.accepted = True
            plain, stats = entries[c.kind]
            key = case_key(c)
            r.listing = plain.pop(key, None)
            r.stats_listing = stats.pop(key, None)
            if c.kind == "policy" and "index" not in c.words:
                prior += 1
    leftovers = {kind: [v for v in p.values()] + [v for v in s.values()] for kind, (p, s) in entries.items()}
    if any(leftovers.values()):
        raise AssertionError(f"dump entries not attributed to any case: {leftovers}")
    return res
