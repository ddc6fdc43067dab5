"""Kernel results shared by all pytest-xdist workers of one run.

A *group* is one VM boot (its guest script and files) whose parsed result every test of the group reads. The
first worker that needs a group boots it under an exclusive lock and stores the result as JSON under
.build/kernel-vm/results/; the others wait on the lock and read it. At session start each worker also starts, in
a background thread, the groups in an order rotated by its worker number, so with two workers the two boots run
side by side from the first second.

Results are keyed by a hash of the group's inputs and a run token the controller process sets (env
KERNEL_VM_RUN), so every pytest run boots the kernel afresh; KERNEL_VM_REUSE=1 keeps results across runs whose
inputs are unchanged (for working on the harness).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from typing import Callable

import kvm

RESULTS = kvm.WORK / "results"
_groups: dict[str, tuple[str, Callable[[], tuple[str, dict[str, bytes], Callable[[str], object]]]]] = {}
_memo: dict[str, object] = {}
_sessions: dict[str, Callable[[], dict]] = {}
_mutex = threading.Lock()


def register(name: str, key: str,
             build: Callable[[], tuple[str, dict[str, bytes], Callable[[str], object]]]) -> None:
    """key: what the result depends on (besides the initramfs); build() -> (guest script, files,
    parse(output) -> JSON-able result), called only by the worker that boots the group."""
    _groups[name] = (key, build)


def register_session(name: str, key: str, runner: Callable[[], dict]) -> None:
    """A group that is not one guest script but a whole session the host drives (test_live_peer.py: the kernel
    as a live ESP peer of xfrmd). runner() -> {"rc", "seconds", "output", "result"} as stored for the others; it
    should record its failures in the result rather than raise (a raise leaves no result, so the next test that
    needs the group runs the session again)."""
    _groups[name] = (key, lambda: ("", {}, lambda _: None))
    _sessions[name] = runner


def _token() -> str:
    return "reuse" if os.environ.get("KERNEL_VM_REUSE") == "1" else os.environ.get("KERNEL_VM_RUN", "solo")


def get(name: str) -> object:
    with _mutex:
        if name in _memo:
            return _memo[name]
    key, build = _groups[name]
    kernel, initramfs = kvm.ensure_initramfs()
    h = hashlib.sha256()
    h.update(key.encode())
    h.update(initramfs.with_suffix(".stamp").read_bytes())
    h.update(_token().encode())
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{h.hexdigest()[:16]}.json"
    with open(RESULTS / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            data = json.loads(path.read_text())
        elif name in _sessions:
            data = _sessions[name]()
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(data))
            tmp.replace(path)
        else:
            script, files, parse = build()
            rc, output, seconds = kvm.run(script, files)
            data = {"rc": rc, "seconds": seconds, "output": output, "result": parse(output)}
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(data))
            tmp.replace(path)
            for old in RESULTS.glob(f"{name}-*.json"):  # earlier runs' results of this group
                if old != path and old.stat().st_mtime < path.stat().st_mtime - 3600:
                    old.unlink(missing_ok=True)
    with _mutex:
        _memo[name] = data
    return data


def prefetch(worker_index: int, names: list[str]) -> None:
    """Starts the named groups in the background, beginning with number worker_index (mod the count)."""
    if not names:
        return
    i = worker_index % len(names)
    order = names[i:] + names[:i]

    def work() -> None:
        for n in order:
            try:
                get(n)
            except Exception:  # the test that needs the group reports it (it calls get() again)
                pass

    threading.Thread(target=work, name="kernel-vm-prefetch", daemon=True).start()
