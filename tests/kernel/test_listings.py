"""`ip xfrm state|policy add` lines, generated (seeded) over the whole grammar, against the real kernel.

Truth is the Linux kernel (Debian 6.12 in qemu) with iproute2 6.1: for each case, whether the add is accepted,
the exact error text when it is refused, and the case's entry in `ip xfrm ... list` and `ip -s xfrm ... list`
(byte for byte, except that add/use timestamps only have to agree on being set or not). The host runs the same
line through `xfrm -batch` (the offline stack) and must print the same.

Differences swift-xfrm makes on purpose, for security, are listed in EXPECTED_DIFFERENCES: for those cases the
test asserts the difference (the kernel accepts, swift-xfrm refuses), so they are checked, never skipped.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib

import pytest

import listings
import shared
from cases import Case, all_cases
from hostside import normalize_times, run_case

CASES = all_cases()

# (name, why, predicate): cases where swift-xfrm refuses on purpose what the kernel accepts.
EXPECTED_DIFFERENCES = [
    ("encryption-without-integrity",
     "`enc` without `auth`/`auth-trunc`: RFC 8221 section 5 says ENCR without integrity must not be used and "
     "anti-replay means nothing without it; the kernel accepts it, swift-xfrm refuses it (README)",
     lambda c: "enc-only" in c.tags),
    ("wrapping-sequence-with-aead-or-esn",
     "`extra-flag oseq-may-wrap` with an AEAD (the IV is the sequence number: wrapping reuses nonces) or with ESN; "
     "the kernel accepts it, swift-xfrm refuses it (README)",
     lambda c: "extra-oseq-may-wrap" in c.tags and ("aead" in c.tags or "flag-esn" in c.tags)),
    ("integrity-truncated-below-96-bits",
     "`auth-trunc` shorter than 96 bits (RFC 2404/4868 minimum; 64 bits leaves a forgery chance of 2^-64 per "
     "packet); the kernel accepts any length up to the digest, swift-xfrm refuses it (README)",
     lambda c: "auth-trunc-short" in c.tags),
    ("sub-policies",
     "`ptype sub`: swift-xfrm has one policy type (main); sub policies are refused, a known gap (README)",
     lambda c: "ptype-sub" in c.tags),
]


def _build():
    script, files = listings.guest_script(CASES)

    def parse(output: str):
        return {k: dataclasses.asdict(v) for k, v in listings.parse(output, CASES).items()}

    return script, files, parse


GROUP = "listings"
shared.register(GROUP, hashlib.sha256(listings.adds_file(CASES).encode()).hexdigest()
                + hashlib.sha256(listings.GUEST.encode()).hexdigest(), _build)


@pytest.fixture(scope="session")
def kernel_listings():
    return shared.get(GROUP)["result"]


def _diff(a: str, b: str, what: str) -> str:
    return "".join(difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True),
                                        f"kernel {what}", f"xfrm {what}"))


def _report(case: Case, k: dict, h, problem: str) -> str:
    return (f"{problem}\n  line: ip {case.line}\n"
            f"  kernel: {'accepted' if k['accepted'] else 'refused: ' + k['error'].strip()!s}\n"
            f"  xfrm:   {'accepted' if h.accepted else 'refused: ' + h.error.strip()!s}\n")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_add_and_list_like_the_kernel(case: Case, kernel_listings, tmp_path):
    k = kernel_listings[case.id]
    assert k["accepted"] is not None, f"harness: the kernel run did not report case {case.id}"
    h = run_case(case, k["prior_policies"], tmp_path)
    expected = [(n, why) for n, why, pred in EXPECTED_DIFFERENCES if pred(case)]
    if expected and k["accepted"]:
        if h.accepted:
            pytest.fail(_report(case, k, h, f"expected difference {expected[0][0]} not seen: {expected[0][1]}"),
                        pytrace=False)
        assert h.error.strip(), "swift-xfrm must say why it refuses"
        return
    if k["accepted"] != h.accepted:
        pytest.fail(_report(case, k, h, "accepted/refused differs")
                             + (f"  kernel listing:\n{k['listing']}" if k["accepted"] else "")
                    + (f"  xfrm stdout:\n{h.raw_stdout}\n  xfrm stderr:\n{h.raw_stderr}"), pytrace=False)
    if not k["accepted"]:
        if h.error != k["error"]:
            pytest.fail(_report(case, k, h, "error text differs") + _diff(k["error"], h.error, "stderr"),
                        pytrace=False)
        return
    assert k["listing"] is not None and k["stats_listing"] is not None, \
        f"harness: no kernel dump entry for {case.id}: {k}"
    problems = []
    if h.listing != k["listing"]:
        problems.append(_diff(k["listing"], h.listing, f"ip xfrm {case.kind} list"))
    ks, hs = normalize_times(k["stats_listing"]), normalize_times(h.stats_listing)
    if hs != ks:
        problems.append(_diff(ks, hs, f"ip -s xfrm {case.kind} list"))
    if problems:
        pytest.fail(f"listing differs\n  line: ip {case.line}\n" + "\n".join(problems), pytrace=False)


def test_refusals_end_the_batch_like_ip(kernel_listings, tmp_path):
    """`ip -batch` with a refused `xfrm state|policy add`: iproute2's xfrm code exits on the spot (exit(2) after
    a netlink error, 255 after a parse error), so the batch ends with that status and without a
    "Command failed FILE:LINE" line. One test for all refusals, grouped by what differs."""
    diffs: dict[str, list[str]] = {}
    n = 0
    for case in CASES:
        k = kernel_listings[case.id]
        if k["accepted"] or k["rc"] is None:
            continue
        h = run_case(case, k["prior_policies"], tmp_path)
        if h.accepted:
            continue  # reported by the case's own test
        n += 1
        host_cf = "Command failed" in h.raw_stderr
        if (h.rc, host_cf) != (k["rc"], k["command_failed"]):
            key = (f"ip -batch exits {k['rc']}{' after Command failed' if k['command_failed'] else ''}; "
                   f"xfrm -batch exits {h.rc}{' after Command failed' if host_cf else ''}")
            diffs.setdefault(key, []).append(f"{case.id}: ip {case.line}\n    kernel stderr: {k['error'].strip()}"
                                             f"\n    xfrm stderr: {h.raw_stderr.strip()!r}")
    assert n > 20, f"only {n} refusals to compare: the generator should make more"
    if diffs:
        pytest.fail("\n".join(f"{key} ({len(v)} of {n} refusals), e.g.\n  " + "\n  ".join(v[:2])
                               for key, v in diffs.items()), pytrace=False)
