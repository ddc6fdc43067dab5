import Synchronization
import XFRMCrypto
import XFRMESP
import XFRMPacket

/// The identity of an SA (≈ struct xfrm_id): destination, SPI, protocol.
public struct SAID: Hashable, Sendable {
    public var destination: IPAddress
    public var spi: UInt32
    public var proto: UInt8
    public init(destination: IPAddress, spi: UInt32, proto: UInt8 = 50) {
        self.destination = destination
        self.spi = spi
        self.proto = proto
    }
}

/// SA direction (≈ XFRMA_SA_DIR).
public enum SADirection: UInt8, Sendable {
    case inbound = 1
    case outbound = 2
}

/// Lifecycle state (≈ XFRM_STATE_VOID/ACQ/VALID/ERROR/EXPIRED/DEAD).
public enum SAState: Sendable, Equatable {
    /// Larval: created by an acquire or allocspi, waiting for the key manager.
    case acquiring
    case valid
    /// Hit a hard limit on the data path; deleted at the next timer run.
    case expired
    /// Removed from the database.
    case dead
}

/// Current lifetime counters (≈ xfrm_lifetime_cur).
public struct LifetimeCurrent: Sendable, Equatable {
    public var bytes: UInt64 = 0
    public var packets: UInt64 = 0
    public var addTime: UInt64 = 0
    public var useTime: UInt64 = 0
    public init() {}
}

/// One security association (≈ struct xfrm_state). Configuration is immutable; lifecycle, counters and the ESP
/// transform's sequence/replay state live behind the SA's own lock (≈ x->lock).
public final class SecurityAssociation: @unchecked Sendable {
    /// The configuration's parameters; the values the SA's state changes are read through the SA (`currentConfig`).
    public let config: SAParameters
    /// The ESP transform; nil for a larval (acquiring) SA.
    public let transform: ESPTransform?
    /// `transform` unretained, which the strong `transform` keeps alive as long as the SA: the packet paths borrow it
    /// (`_withUnsafeGuaranteedRef`) instead of counting a reference per packet.
    let transformRef: Unmanaged<ESPTransform>?

    /// The fields are ordered small first, so they pack without holes (one SA in 100,000 counts).
    struct Mutable {
        var state: SAState
        var dying = false
        /// Soft expiry already reported (so it is sent once).
        var softReported = false
        /// NAT-T ports as updated (≈ x->encap); nil without UDP encapsulation.
        var encapsulation: NATTEncapsulation?
        /// The async-event thresholds a key manager may set and read back (x->replay_maxdiff, x->replay_maxage in
        /// jiffies; the kernel's defaults: 2 packets, and 1 s at Debian's HZ of 250). Kept and listed only: no
        /// replay-state events are sent.
        var replayMaxDiff: UInt32 = 2
        var replayMaxAge: UInt32 = SecurityAssociation.jiffiesPerSecond
        var lifetime: LifetimeConfig
        var current = LifetimeCurrent()
        /// The last time a packet used the SA (x->lastused, XFRMA_LASTUSED), refreshed by every packet.
        var lastUsed: UInt64 = 0
        var replayWindowDrops: UInt64 = 0
        var replayDrops: UInt64 = 0
        var integrityFailures: UInt64 = 0
        /// The device binding, while the SA is offloaded (≈ xso).
        var offload: StateOffload?
        /// The device's counters at the last sync, to fold only the increments into the global counters; boxed on
        /// the first sync, since only offloaded SAs ever have any (72 bytes inline in every SA otherwise).
        var lastDeviceCounters: DeviceCountersBox?
    }

    /// A device's counters as last synced, apart from the SA's other state (changed only under the SA's lock).
    final class DeviceCountersBox {
        var value: DeviceSACounters
        init(_ value: DeviceSACounters) { self.value = value }
    }

    /// CONFIG_HZ of the kernel whose units XFRMA_ETIMER_THRESH follows (Debian's: 250).
    static let jiffiesPerSecond: UInt32 = 250
    let mutable: XFRMMutex<Mutable>
    /// The if_id, read per packet without a lock; `update` may set it (≈ xfrm_state_update's if_id copy).
    private let ifIDValue: Atomic<UInt32>
    /// The set-mark (`output-mark`, XFRMA_SET_MARK; ≈ x->props.smark) as configured or updated, as value << 32 |
    /// mask (0: none), for the input path to read without the SA's lock (`markAfterInput`).
    private let setMarkBits: Atomic<UInt64>
    /// Insertion order in the SAD (newer SAs are preferred among equals, and dumps list newest first).
    public internal(set) var generation: UInt64 = 0

    /// Builds an SA; a config without crypto makes a larval one.
    public init(_ config: SAConfig, addTime: UInt64, backend: any ESPCryptoBackend = CryptoBackends.preferred)
        throws(ESPConfigError)
    {
        self.config = config.parameters
        if let crypto = config.crypto {
            // A deliberate difference from Linux, which accepts `enc` alone: RFC 8221 §5 says ESP encryption
            // without integrity must not be used, and anti-replay means nothing when anyone can forge a packet.
            if crypto.lacksIntegrity { throw ESPConfigError(Self.noIntegrityMessage) }
            var flags: ESPFlags = []
            if config.flags & 1 != 0 { flags.insert(.noECN) }
            if config.flags & 2 != 0 { flags.insert(.decapDSCP) }
            if config.flags & 4 != 0 { flags.insert(.noPMTUDiscovery) }
            if config.extraFlags & 1 != 0 { flags.insert(.dontEncapDSCP) }
            if config.extraFlags & 2 != 0 { flags.insert(.outboundSequenceMayWrap) }
            let esp = ESPConfig(
                spi: config.id.spi, mode: config.mode, crypto: crypto, tunnelSource: config.source,
                tunnelDestination: config.id.destination, encapsulation: config.encapsulation, esn: config.esn,
                replayWindow: config.replayWindow, flags: flags, outboundSequence: config.outboundSequence,
                inboundSequence: config.inboundSequence, inboundBitmap: config.replayBitmap)
            self.transform = try ESPTransform(esp, backend: backend, statistics: false)  // the SA counts
        } else {
            self.transform = nil
        }
        self.transformRef = self.transform.map { Unmanaged.passUnretained($0) }
        var m = Mutable(state: config.crypto == nil ? .acquiring : .valid, lifetime: config.lifetime)
        m.encapsulation = config.encapsulation
        self.ifIDValue = Atomic(config.ifID)
        self.setMarkBits = Atomic(Self.packed(config.outputMark))
        m.current.addTime = addTime
        self.mutable = XFRMMutex(m)
    }

    public var id: SAID { self.config.id }

    /// The configuration as it stands: the kept parameters with the state's if_id, lifetime, NAT-T ports, output mark
    /// and sequence numbers (≈ what the kernel hands a driver's xdo_dev_state_add, or copies into a state it clones).
    /// The sequence numbers and replay bitmap are the transform's, or the device's for packet offload (as listings
    /// show them); a larval SA (no transform: made by an acquire or ALLOCSPI, never by NEWSA) has none, and lists 0
    /// as the kernel does.
    public var currentConfig: SAConfig {
        let (lifetime, encapsulation, offload) = self.mutable.withLock { m in (m.lifetime, m.encapsulation, m.offload) }
        var parameters = self.config
        parameters.ifID = self.ifID
        var outbound: UInt64 = 0
        var inbound: UInt64 = 0
        var bitmap: ReplayBitmap? = nil
        if offload?.type == .packet {
            let d = self.deviceCounters
            (outbound, inbound) = (d.outboundSequence, d.inboundSequence)
        } else if let t = self.transform {
            self.withLock {
                outbound = t.outboundSequence
                inbound = t.replay.top
                if inbound != 0 { bitmap = .ring(t.replay.ringBitmap) }
            }
        }
        return SAConfig(parameters, lifetime: lifetime, encapsulation: encapsulation, outputMark: self.outputMark,
                        outboundSequence: outbound, inboundSequence: inbound, replayBitmap: bitmap)
    }

    /// The refusal of an encryption-only SA (EINVAL through the user API).
    public static let noIntegrityMessage =
        "Encryption without integrity is refused (RFC 8221 section 5): add auth or auth-trunc, or use an AEAD"

    /// State, dying mark and offload binding under one lock acquisition (for per-packet resolution).
    @inline(__always)
    var resolutionView: (state: SAState, dying: Bool, offloadType: OffloadType?, offloadIfindex: Int32) {
        self.mutable.withLock { m in (m.state, m.dying, m.offload?.type, m.offload?.ifindex ?? 0) }
    }
    public var state: SAState { self.mutable.withLock { $0.state } }
    public var isDying: Bool { self.mutable.withLock { $0.dying } }
    public var lifetime: LifetimeConfig { self.mutable.withLock { $0.lifetime } }
    public var current: LifetimeCurrent { self.mutable.withLock { $0.current } }

    /// Per-SA stats (≈ xfrm_stats): replay-window, replay, integrity failures.
    public var stats: (replayWindow: UInt64, replay: UInt64, failed: UInt64) {
        self.mutable.withLock { m in (m.replayWindowDrops, m.replayDrops, m.integrityFailures) }
    }

    /// What the data path must do after a lifetime check.
    public enum ExpiryCheck: Equatable {
        case ok
        /// Hard limit reached: drop the packet; the SA is now expired.
        case hardExpired
        /// Soft limit crossed just now: send one EXPIRE hard=0 (the packet still goes).
        case softExpired
    }

    /// ≈ xfrm_state_check_expire: called per packet before it uses the SA. Sets the use time on first use.
    @inline(__always)
    public func checkExpire(now: UInt64) -> ExpiryCheck {
        self.mutable.withLock { m in m.checkExpire(now: now) }
    }

    /// Adds a packet of `bytes` to curlft and refreshes the last-used time (≈ x->curlft.bytes += skb->len;
    /// packets++; x->lastused = now).
    @inline(__always)
    public func account(bytes: Int, now: UInt64) {
        self.mutable.withLock { m in m.account(bytes: bytes, now: now) }
    }

    /// When a packet last used the SA (XFRMA_LASTUSED); 0 if never.
    public var lastUsed: UInt64 { self.mutable.withLock { $0.lastUsed } }

    /// Counts a replay or integrity drop in the SA's stats.
    @inline(__always)
    func countDrop(_ reason: DropReason) {
        self.mutable.withLock { m in m.countDrop(reason) }
    }

    /// What the timer decided (≈ xfrm_timer_handler).
    public enum TimerAction: Equatable {
        case none
        case soft
        case hard
    }

    /// Checks time limits at `now`; marks the SA dying on a soft limit (once) or expired on a hard one.
    func timerCheck(now: UInt64) -> TimerAction {
        self.mutable.withLock { m in
            if m.state == .expired || m.state == .dead { return m.state == .expired ? .hard : .none }
            let l = m.lifetime
            if l.hardAddExpiresSeconds != 0 && deadline(m.current.addTime, l.hardAddExpiresSeconds) <= now {
                // ≈ xfrm_timer_handler's XFRM_SOFT_EXPIRE workaround: the clock jumped past both deadlines (a time
                // set on a box without a clock, a resumed VM) before the soft one was told. The soft EXPIRE goes now
                // and the add time moves so that the hard one comes as long after as the limits are apart: a key
                // manager rekeys instead of losing the SA at once.
                if !m.dying, l.softAddExpiresSeconds != 0, l.softAddExpiresSeconds < l.hardAddExpiresSeconds,
                    now >= l.softAddExpiresSeconds
                {
                    m.current.addTime = now - l.softAddExpiresSeconds
                    m.dying = true
                    return .soft
                }
                m.state = .expired
                return .hard
            }
            if l.hardUseExpiresSeconds != 0 && m.current.useTime != 0
                && deadline(m.current.useTime, l.hardUseExpiresSeconds) <= now {
                m.state = .expired
                return .hard
            }
            if m.dying { return .none }
            if l.softAddExpiresSeconds != 0 && deadline(m.current.addTime, l.softAddExpiresSeconds) <= now {
                m.dying = true
                return .soft
            }
            if l.softUseExpiresSeconds != 0 && m.current.useTime != 0
                && deadline(m.current.useTime, l.softUseExpiresSeconds) <= now {
                m.dying = true
                return .soft
            }
            return .none
        }
    }

    /// ≈ xfrm_state_update on a valid SA: new limits and NAT-T ports (the caller checked that the encapsulation's
    /// presence and type are unchanged), not dying any more; then, if the SA was used, the new limits are checked
    /// at once (xfrm_state_check_expire): lowering a hard limit below the current count expires it now.
    func update(lifetime l: LifetimeConfig, encapsulation: NATTEncapsulation?, outputMark: Mark?, ifID: UInt32)
        -> ExpiryCheck
    {
        // As the kernel: a given output mark and a non-zero if_id replace the SA's.
        if ifID != 0 { self.ifIDValue.store(ifID, ordering: .releasing) }
        return self.mutable.withLock { m in
            if let o = outputMark, o.value != 0 || o.mask != 0 {
                self.setMarkBits.store(Self.packed(o), ordering: .relaxed)
            }
            m.lifetime = l
            m.dying = false
            m.softReported = false
            if let e = encapsulation {
                m.encapsulation = e
                self.transform?.updateEncapsulation(e)
            }
            guard m.current.useTime != 0 else { return .ok }
            if m.current.bytes >= l.hardByteLimit || m.current.packets >= l.hardPacketLimit {
                m.state = .expired
                return .hardExpired
            }
            if m.current.bytes >= l.softByteLimit || m.current.packets >= l.softPacketLimit {
                m.dying = true
                m.softReported = true
                return .softExpired
            }
            return .ok
        }
    }

    /// The SA's if_id (the configured one, or what an update set).
    @inline(__always)
    public var ifID: UInt32 { self.ifIDValue.load(ordering: .acquiring) }

    /// The output mark (`output-mark`), as configured or updated.
    /// A mark of value and mask 0 is none (as xfrm_smark_put lists it: only when either is set).
    public var outputMark: Mark? {
        let b = self.setMarkBits.load(ordering: .relaxed)
        return b == 0 ? nil : Mark(value: UInt32(truncatingIfNeeded: b >> 32), mask: UInt32(truncatingIfNeeded: b))
    }

    private static func packed(_ m: Mark?) -> UInt64 { m.map { UInt64($0.value) << 32 | UInt64($0.mask) } ?? 0 }

    /// The mark a packet has after this SA decapsulated it (≈ xfrm_input's skb->mark = xfrm_smark_get(skb->mark, x)):
    /// the set-mark's masked bits replace the packet's. Nested lookups and the policy check see this mark, so an IN
    /// policy with a mark (strongSwan's `set_mark_in`) matches what came through such an SA.
    @inline(__always)
    public func markAfterInput(_ mark: UInt32) -> UInt32 {
        let b = self.setMarkBits.load(ordering: .relaxed)
        let m = UInt32(truncatingIfNeeded: b)
        return UInt32(truncatingIfNeeded: b >> 32) & m | mark & ~m
    }

    /// The NAT-T encapsulation in use (the configured one, with ports an update may have changed).
    public var encapsulation: NATTEncapsulation? { self.mutable.withLock { $0.encapsulation } }

    func markDead() { self.mutable.withLock { $0.state = .dead } }

    /// The device binding (crypto or packet offload), or nil for a software SA.
    public var offload: StateOffload? { self.mutable.withLock { $0.offload } }

    func setOffload(_ o: StateOffload?) { self.mutable.withLock { $0.offload = o } }

    /// The device's counters as of the last sync (for packet offload: its sequence numbers and counts).
    public var deviceCounters: DeviceSACounters {
        self.mutable.withLock { $0.lastDeviceCounters?.value ?? DeviceSACounters() }
    }

    /// Takes the device's counters (≈ xdo_dev_state_update_stats): for packet offload the device's byte and packet
    /// counts become curlft; device-side drops are added to the SA's stats. Returns the new drops since the last
    /// sync, for the global counters, and the expiry verdict on the new counts.
    func applyDeviceCounters(_ c: DeviceSACounters, packetOffload: Bool, now: UInt64)
        -> (delta: DeviceSACounters, check: ExpiryCheck)
    {
        self.mutable.withLock { m in
            var d = DeviceSACounters()
            let last = m.lastDeviceCounters?.value ?? DeviceSACounters()
            d.replayWindow = c.replayWindow &- last.replayWindow
            d.replay = c.replay &- last.replay
            d.integrityFailed = c.integrityFailed &- last.integrityFailed
            d.headerErrors = c.headerErrors &- last.headerErrors
            d.sequenceZero = c.sequenceZero &- last.sequenceZero
            d.packets = c.packets &- last.packets
            d.bytes = c.bytes &- last.bytes
            if let box = m.lastDeviceCounters { box.value = c } else { m.lastDeviceCounters = DeviceCountersBox(c) }
            m.replayWindowDrops &+= d.replayWindow
            m.replayDrops &+= d.replay
            m.integrityFailures &+= d.integrityFailed
            guard packetOffload else { return (d, .ok) }
            m.current.bytes = c.bytes
            m.current.packets = c.packets
            if c.packets > 0 && m.current.useTime == 0 { m.current.useTime = now }
            if d.packets > 0 { m.lastUsed = now }
            if m.state == .expired { return (d, .hardExpired) }
            if c.bytes >= m.lifetime.hardByteLimit || c.packets >= m.lifetime.hardPacketLimit {
                m.state = .expired
                return (d, .hardExpired)
            }
            if !m.dying && (c.bytes >= m.lifetime.softByteLimit || c.packets >= m.lifetime.softPacketLimit) {
                m.dying = true
                return (d, .softExpired)
            }
            return (d, .ok)
        }
    }

    /// Runs `body` with the SA's lock held (for the ESP transform's sequence and replay state).
    @inline(__always)
    public func withLock<R>(_ body: () -> R) -> R {
        self.mutable.withLock { _ in body() }
    }
}
