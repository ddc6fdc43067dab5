import XFRMPacket

/// The limits on the ICMP errors one dispatcher sends (`Dispatcher.Rules.unreachableWhenUnprotected`), as the kernel
/// limits icmp_send:
/// - **globally** (≈ icmp_global_allow): a token bucket of `EngineConstants.icmpErrorsPerSecond` tokens a second
///   holding at most `icmpErrorBurst` (net.ipv4.icmp_msgs_per_sec, icmp_msgs_burst); each error takes one token
///   (the kernel takes 0–2 at random, against the SAD DNS side channel on port-unreachable replies, which these
///   errors are not);
/// - **per sender** (≈ icmpv4_xrlim_allow, inet_peer_xrlim_allow): one error a second to each sender after a burst
///   of six (net.ipv4.icmp_ratelimit 1000 ms, XRLIM_BURST_FACTOR), except to this host's own addresses, as the kernel
///   exempts errors routed to the loopback device. The last `peerSlots` senders are remembered; a new one beyond
///   them takes the place of the one heard from longest ago (it starts with a full burst, as a sender the kernel's
///   inet_peer cache has forgotten), and the global bucket still bounds the total.
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
    private var peers: [Peer]

    init(now: UInt64) {
        self.stamp = now
        self.peers = []
        self.peers.reserveCapacity(Self.peerSlots)
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
            let full = Self.peerBurst * Self.peerInterval
            // A linear search: at most `peerSlots` senders, and only while errors are being made.
            let slot: Int
            if let i = self.peers.firstIndex(where: { $0.address == peer }) {
                slot = i
            } else if self.peers.count < Self.peerSlots {
                self.peers.append(Peer(address: peer, credit: full, last: now))
                slot = self.peers.count - 1
            } else {
                var oldest = 0
                for i in 1..<self.peers.count where self.peers[i].last < self.peers[oldest].last { oldest = i }
                self.peers[oldest] = Peer(address: peer, credit: full, last: now)
                slot = oldest
            }
            var entry = self.peers[slot]
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
