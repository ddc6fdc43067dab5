"""The host side of the listing comparison: one case through `xfrm -batch` (the offline stack)."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cases import Case

TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def normalize_times(text: str) -> str:
    """Add/use times are wall-clock in the guest and simulated on the host: only whether one is set (a date) or
    not (`-`) is compared."""
    return TIME.sub("<TIME>", text)


@dataclass
class HostResult:
    rc: int
    accepted: bool
    error: str  # stderr without the trailing "Command failed FILE:LINE"
    listing: str
    stats_listing: str
    raw_stdout: str
    raw_stderr: str
    batch: str


def host_batch(case: Case, prior_policies: int) -> tuple[str, int]:
    """-> (batch text, line number of the case's add)."""
    lines = []
    if case.kind == "policy" and prior_policies:
        # The kernel's SPD had inserted this many policies before (its index generator moved on; flush does not
        # reset it): insert as many, then flush.
        for i in range(prior_policies):
            lines.append(f"ip xfrm policy add src 192.0.2.0/32 dst 192.0.2.0/32 proto udp sport {i + 1} dir out")
        lines.append("ip xfrm policy flush")
    lines.append("ip " + case.line)
    n = len(lines)
    lines += [f"ip xfrm {case.kind} list", "stat", f"ip -s xfrm {case.kind} list"]
    return "\n".join(lines) + "\n", n


def run_case(case: Case, prior_policies: int, workdir: Path) -> HostResult:
    text, line_no = host_batch(case, prior_policies)
    f = workdir / f"{case.id}.batch"
    f.write_text(text)
    p = subprocess.run([os.environ["XFRM_TOOL"], "--offline", "-batch", f.name], capture_output=True, text=True,
                       cwd=workdir, timeout=60)
    out, err = p.stdout, p.stderr
    if p.returncode != 0:
        lines = err.rstrip("\n").split("\n")
        if lines and lines[-1] == f"Command failed {f.name}:{line_no}":
            return HostResult(p.returncode, False, "\n".join(lines[:-1]) + "\n", "", "", out, err, text)
        # failed elsewhere (a prefix line or a listing): report everything
        return HostResult(p.returncode, False, err, "", "", out, err, text)
    lines = out.splitlines(keepends=True)
    stat_idx = [i for i, line in enumerate(lines) if line.startswith("Xfrm")]
    if not stat_idx:
        raise AssertionError(f"no `stat` output from xfrm to split the listings at:\n{out}")
    plain = "".join(lines[: stat_idx[0]])
    stats = "".join(lines[stat_idx[-1] + 1:])
    return HostResult(0, True, err, plain, stats, out, err, text)
