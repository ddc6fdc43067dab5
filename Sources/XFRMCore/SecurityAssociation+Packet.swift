import XFRMESP

// What one packet does to an SA, under a single acquisition of the SA's lock (≈ the x->lock section of
// xfrm_output_one and xfrm_input): the state check, the lifetime check (xfrm_state_check_expire), the ESP transform
// (sequence number or replay window, and the crypto) and curlft accounting. Everything else a packet reads of the
// SA is immutable (config, transform) or atomic (if_id).

extension SecurityAssociation.Mutable {
    /// ≈ xfrm_state_check_expire: sets the use time on first use, expires the SA at a hard limit and marks it dying
    /// (once) at a soft one.
    @inline(__always)
    mutating func checkExpire(now: UInt64) -> SecurityAssociation.ExpiryCheck {
        if self.current.useTime == 0 { self.current.useTime = now }
        if self.state == .expired { return .hardExpired }
        if self.current.bytes >= self.lifetime.hardByteLimit
            || self.current.packets >= self.lifetime.hardPacketLimit {
            self.state = .expired
            return .hardExpired
        }
        if !self.dying && (self.current.bytes >= self.lifetime.softByteLimit
            || self.current.packets >= self.lifetime.softPacketLimit) {
            self.dying = true
            self.softReported = true
            return .softExpired
        }
        return .ok
    }

    /// Whether `checkExpire` would expire the SA or mark it dying now (no side effects).
    @inline(__always)
    var lifetimeLimitReached: Bool {
        self.current.bytes >= self.lifetime.hardByteLimit || self.current.packets >= self.lifetime.hardPacketLimit
            || (!self.dying && (self.current.bytes >= self.lifetime.softByteLimit
                || self.current.packets >= self.lifetime.softPacketLimit))
    }

    @inline(__always)
    mutating func account(bytes: Int, now: UInt64) {
        self.current.bytes &+= UInt64(bytes)
        self.current.packets &+= 1
        self.lastUsed = now
    }

    @inline(__always)
    mutating func countDrop(_ reason: DropReason) {
        switch reason {
        case .replayTooOld: self.replayWindowDrops &+= 1
        case .replayDuplicate: self.replayDrops &+= 1
        case .icvFailed: self.integrityFailures &+= 1
        default: break
        }
    }
}

extension SecurityAssociation {
    /// An outbound packet's use of the SA.
    enum OutputUse {
        /// The SA is not valid (dead, expired, larval): no sequence number was taken.
        case notValid
        /// A hard limit was reached: the SA is now expired and the packet must be dropped.
        case hardExpired
        /// The transform ran: `reason` is its drop, nil when the packet is protected (and counted). `softExpired`:
        /// this packet crossed the soft limit (one EXPIRE hard=0 to send).
        case used(DropReason?, softExpired: Bool)
    }

    /// ≈ xfrm_output_one's locked section: state, lifetime, `transform` (the ESP work), which returns its drop
    /// reason and the bytes curlft counts (what ESP carries), accounted when it succeeded.
    @inline(__always)
    func useForOutput(now: UInt64, _ transform: () -> (DropReason?, countedBytes: Int)) -> OutputUse {
        self.mutable.withLock { m -> OutputUse in
            guard m.state == .valid else { return .notValid }
            let check = m.checkExpire(now: now)
            if check == .hardExpired { return .hardExpired }
            let (reason, bytes) = transform()
            if reason == nil { m.account(bytes: bytes, now: now) }
            return .used(reason, softExpired: check == .softExpired)
        }
    }

    /// `useForOutput` for a run of packets through the SA in one acquisition of its lock (the batch path):
    /// `transform(k)` protects the run's k-th packet, or returns nil when that packet may not go in the run (the
    /// configuration changed). The run stops before a packet that needs more than ESP and accounting — the SA no
    /// longer valid, or a lifetime limit due (that packet takes `useForOutput`, which reports the expiry as for any
    /// packet) — and at a packet the transform refused, whose reason is returned (not accounted; the caller counts
    /// it). `protected`: how many packets were protected and accounted.
    @inline(__always)
    func useForOutputRun(now: UInt64, count: Int, _ transform: (Int) -> (DropReason?, countedBytes: Int)?)
        -> (protected: Int, refused: DropReason?)
    {
        self.mutable.withLock { m -> (protected: Int, refused: DropReason?) in
            guard m.state == .valid else { return (0, nil) }
            for k in 0..<count {
                if m.lifetimeLimitReached { return (k, nil) }
                guard let (reason, bytes) = transform(k) else { return (k, nil) }
                if m.current.useTime == 0 { m.current.useTime = now }
                if let reason { return (k, reason) }
                m.account(bytes: bytes, now: now)
            }
            return (count, nil)
        }
    }

    /// What one packet of an input run came to (`useForInputRun`).
    enum InputRunStep {
        /// Not a packet the run may take: it and the rest go the per-packet way.
        case stop
        /// Opened and verified: curlft counts `countedBytes`.
        case opened(countedBytes: Int)
        /// Opened and verified, and the run ends after it: what came out may be ESP again (a nested layer may go
        /// through this SA, which must see it before the next outer packet).
        case openedLast(countedBytes: Int)
        /// Refused by the transform (replay, ICV, a malformed trailer, a bad inner packet): counted in the SA's stats;
        /// curlft counts `countedBytes` when the reason comes after accounting (`DropReason.afterAccounting`).
        case refused(DropReason, countedBytes: Int)
    }

    /// `useForInput` for a run of received packets through the SA in one acquisition of its lock (the batch path,
    /// software decryption only): `step(k)` checks that the run's k-th packet is ESP for this SA and removes it.
    /// The run stops before a packet `step` refuses to take and before any packet when a lifetime limit is due
    /// (that packet takes `useForInput`, which screens, expires and reports as for any packet). Returns how many
    /// packets it took.
    @inline(__always)
    func useForInputRun(now: UInt64, count: Int, _ step: (Int) -> InputRunStep) -> Int {
        self.mutable.withLock { m -> Int in
            guard m.offload?.type != .packet, m.state == .valid else { return 0 }
            for k in 0..<count {
                if m.lifetimeLimitReached { return k }
                switch step(k) {
                case .stop: return k
                case .opened(let bytes): m.account(bytes: bytes, now: now)
                case .refused(let reason, let bytes):
                    m.countDrop(reason)
                    if reason.afterAccounting { m.account(bytes: bytes, now: now) }
                case .openedLast(let bytes):
                    m.account(bytes: bytes, now: now)
                    if m.current.useTime == 0 { m.current.useTime = now }
                    return k + 1
                }
                if m.current.useTime == 0 { m.current.useTime = now }
            }
            return count
        }
    }

    /// A received packet's use of the SA.
    enum InputUse {
        /// A packet-offload SA: only its device may use it (spec §7).
        case packetOffloaded
        /// The device decrypted with another SA than this one.
        case mismatch
        /// Not valid: larval (`acquiring`, XfrmAcquireError) or expired/dead (XfrmInStateInvalid), as xfrm_input
        /// counts a state that is not XFRM_STATE_VALID.
        case notValid(larval: Bool)
        case hardExpired
        /// Crypto offload RX: the device found the ICV bad (counted in the SA's stats).
        case deviceICVFailed(softExpired: Bool)
        /// The transform ran: `reason` is its drop (counted in the SA's stats), nil when the packet was opened and
        /// counted. `highMoved`: the ESN high half of the window moved (a crypto-offload device must learn it; only
        /// reported for a packet the device decrypted on an ESN SA, the one case that needs it);
        /// `offload` is the SA's device binding.
        case used(DropReason?, softExpired: Bool, highMoved: Bool, offload: StateOffload?)
    }

    /// ≈ xfrm_input's locked section for ESP: the device binding and state checks, `screen` (the encapsulation
    /// and replay checks) before the lifetime check as the kernel orders them, then `transform` (replay recheck,
    /// ICV, decryption, window advance), which returns its drop reason and the bytes curlft counts when it
    /// succeeded (or failed only in its inner packet, `DropReason.afterAccounting`). `screen` runs only when a
    /// lifetime limit is due, the one case where the order shows.
    @inline(__always)
    func useForInput(now: UInt64, metadata: OffloadMetadata?, cryptoDone: Bool, screen: () -> DropReason?,
                     _ transform: () -> (DropReason?, countedBytes: Int)) -> InputUse {
        self.mutable.withLock { m -> InputUse in
            let bound = m.offload
            if bound?.type == .packet { return .packetOffloaded }
            if cryptoDone && (bound?.type != .crypto || bound?.handle != metadata?.handle) { return .mismatch }
            guard m.state == .valid else { return .notValid(larval: m.state == .acquiring) }
            let check: ExpiryCheck
            if m.lifetimeLimitReached {
                if let reason = screen() {
                    m.countDrop(reason)
                    return .used(reason, softExpired: false, highMoved: false, offload: bound)
                }
                check = m.checkExpire(now: now)
                if check == .hardExpired { return .hardExpired }
            } else {
                // No limit due (the usual packet): all `checkExpire` would do is set the first use time.
                if m.current.useTime == 0 { m.current.useTime = now }
                check = .ok
            }
            if cryptoDone && !(metadata?.cryptoSuccess ?? false) {
                m.countDrop(.icvFailed)
                return .deviceICVFailed(softExpired: check == .softExpired)
            }
            // Only a crypto-offload device with ESN needs to hear that the window's high half moved.
            let trackHigh = cryptoDone && self.config.esn
            let before = trackHigh ? self.transform?.replayTop ?? 0 : 0
            let (reason, bytes) = transform()
            let highMoved = trackHigh && (self.transform?.replayTop ?? 0) >> 32 != before >> 32
            if let reason { m.countDrop(reason) }
            if reason == nil || reason?.afterAccounting == true { m.account(bytes: bytes, now: now) }
            return .used(reason, softExpired: check == .softExpired, highMoved: highMoved, offload: bound)
        }
    }
}
