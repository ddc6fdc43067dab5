import XFRMPacket

/// The limits on the ICMP errors one dispatcher sends (`Dispatcher.Rules.unreachableWhenUnprotected`), as the kernel
/// limits icmp_send:
/// - **globally** (≈ icmp_global_allow): a token bucket of `EngineConstants.icmpErrorsPerSecond` tokens a second
///   holding at most `icmpErrorBurst` (net.ipv4.icmp_msgs_per_sec, icmp_msgs_burst); each error takes one token
///   (the kernel takes 0–2 at random, against the SAD DNS side channel on port-unreachable replies, which these
///   errors are not);
/// - **per sender** (≈ icmpv4_xrlim_allow, inet_peer_xrlim_allow): one error a second to each sender after a burst
///   of six (net.ipv4.icmp_ratelimit 1000 ms, XRLIM_BURST_FACTOR), except to this host's own addresses, as the kernel
///   exempts errors routed to the loopback device. Senders share `peerSlots` slots by hash: a sender that takes
///   another's slot starts with a full burst, and the global bucket still bounds the total.
/// Times are nanoseconds of a monotonic clock, given by the caller (tests pass their own).
struct ICMPRateLimit {
    static let tick = 1_000_000_000 / UInt64(EngineConstants.icmpErrorsPerSecond)
    static let peerInterval: UInt64 = 1_000_000_000
    static let peerBurst: UInt64 = 6
    static let peerSlots = 64

    private(set) var tokens = EngineConstants.icmpErrorBurst
    /// The time up to which tokens have been earned.
    private var stamp: UInt64
    /// A sender's credit: nanoseconds of its interval earned (up to `peerBurst` intervals) and when last counted.
    private struct Peer {
        var address: IPAddress
        var credit: UInt64
        var last: UInt64
    }
    private var peers: [Peer?]

    init(now: UInt64) {
        self.stamp = now
        self.peers = Array(repeating: nil, count: Self.peerSlots)
    }

    /// Whether an error to `peer` (nil: one of this host's addresses, exempt from the per-sender limit) may go now;
    /// when it may, its tokens are taken.
    mutating func allow(now: UInt64, peer: IPAddress?) -> Bool {
        let burst = EngineConstants.icmpErrorBurst
        if now > self.stamp {
            let earned = (now - self.stamp) / Self.tick
            if self.tokens + Int(min(earned, UInt64(burst))) >= burst {
                self.tokens = burst
                self.stamp = now
            } else {
                self.tokens += Int(earned)
                self.stamp += earned * Self.tick
            }
        }
        guard self.tokens > 0 else { return false }
        if let peer {
            let slot = abs(peer.hashValue % Self.peerSlots)
            let full = Self.peerBurst * Self.peerInterval
            var entry = self.peers[slot].flatMap { $0.address == peer ? $0 : nil }
                ?? Peer(address: peer, credit: full, last: now)
            entry.credit = min(entry.credit + (now > entry.last ? now - entry.last : 0), full)
            entry.last = now
            let allowed = entry.credit >= Self.peerInterval
            if allowed { entry.credit -= Self.peerInterval }
            self.peers[slot] = entry
            guard allowed else { return false }
        }
        self.tokens -= 1
        return true
    }
}
