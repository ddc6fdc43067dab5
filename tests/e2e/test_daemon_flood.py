"""A bounded flood (issue 10, "Load"; the full run is scripts/flood.sh): garbage and replayed ESP at A's UDP 4500 and
raw ESP sockets while an iperf3 stream runs B → A through the tunnel. Every packet is accounted for, A's memory
stays flat, and the tunnel keeps carrying the stream (see floodlib.py for the two identities)."""

import json

from floodlib import experiment, table


def test_flood_every_packet_is_delivered_or_counted_and_memory_stays_flat(pair, tmp_path):
    pair.configure(natt=False)
    r = experiment(pair, tmp_path, count=120_000, flood_seconds=3, stream_seconds=4)
    print(table(r))
    print(json.dumps(r))
    assert all(n > 1000 for n in r["flood_by_kind"].values()), r["flood_by_kind"]
    # 1. A's daemon: everything it read was delivered into the TUN or counted in one drop counter.
    assert r["daemon_identity"], r
    # 2. The wire: everything sent at A was read by the daemon or counted by A's kernel on the way.
    assert r["wire_identity"], r
    # The flood itself is entirely in drop counters (none of it was delivered: the stream's packets are exactly
    # what B's daemon sent that A's kernel did not drop).
    assert r["delivered"] <= r["peer_wire_sent"]
    assert r["counted_drops"] + r["wire_lost_in_kernel"] >= r["flooded"], r
    # The replays were seen as replays, the garbage as unknown SAs or bad headers, the wrong encapsulation as such.
    stat = r["xfrm_stat_delta"]
    assert stat.get("XfrmInStateSeqError", 0) > 0 and stat.get("XfrmInNoStates", 0) > 0, stat
    assert stat.get("XfrmInStateMismatch", 0) > 0, stat
    # Flat memory: the pool is preallocated, so the flood costs no more than a few pages.
    assert r["rss_max_kib"] - r["rss_before_kib"] < 4096, r
    # The stream survived (its throughput ratio is asserted by scripts/flood.sh, not here: CI shares its cores).
    assert r["loaded_gbps"] > 0.01, r
