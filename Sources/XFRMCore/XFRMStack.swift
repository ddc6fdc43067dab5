// The XFRM framework of one host: SPD, SAD, network model, counters, events, lifetimes, and the two packet paths.
//
// Output (`output`), synchronous, per packet:
//   decode the flow → OUT policy lookup (offloaded policies first) → none: default action / block: drop →
//   for each template in order (nested transforms, innermost first): resolve an SA (none: ACQUIRE + larval SA,
//   drop — never sent in clear) → lifetime check (hard: drop + EXPIRE hard=1; soft: EXPIRE hard=0) → tunnel MTU
//   check (DF/IPv6: ICMP frag-needed / packet-too-big) → ESP under the SA's lock → account → route → transmit.
//
// Input (`input`), synchronous, per packet:
//   classify (ESP, NAT-T, IKE, keepalive) → SPI lookup (none: XfrmInNoStates) → direction/state/encap checks →
//   lifetime check → ESP under the SA's lock (replay, ICV, trailer) → record in the secpath → repeat while the inner
//   packet is ESP for us → IN (local) or FWD (forwarded) policy check against the secpath (the template check) →
//   deliver or forward.
//
// Every drop increments exactly one /proc/net/xfrm_stat counter (and ESP drops also their DropReason counter).

import Foundation
import Synchronization
import XFRMCrypto
import XFRMESP
import XFRMPacket

/// Where a packet goes after `output`.
public enum OutputResult: Equatable, Sendable {
    /// The buffer holds the packet to send on this interface.
    case transmit(ifindex: Int32)
    /// The buffer goes to the offload device on this interface with this metadata: plaintext for packet offload,
    /// unsealed ESP for crypto offload.
    case offload(ifindex: Int32, metadata: OffloadMetadata)
    /// Dropped; the counter says why (nil: dropped by the IP layer, e.g. no route).
    case dropped(XfrmStatCounter?)
    /// Too big for the path with DF set: the buffer now holds the ICMP error for the sender (carrying the MTU).
    case icmpError
    /// Too big for this interface, IPv4 without DF or IPv6 ESP the stack sealed: the IP layer sends it as fragments
    /// of at most `mtu` bytes (≈ ip_fragment from ip_finish_output, ip6_fragment from ip6_finish_output, after
    /// xfrm_output; RFC 4303 §3.3.5). Only for packets that are final: plaintext, or ESP the stack sealed (never ESP
    /// a crypto-offload device has yet to seal).
    case fragment(ifindex: Int32, mtu: Int)
}

/// Where a packet goes after `input`.
public enum InputResult: Equatable, Sendable {
    /// For this host; the buffer holds the (decapsulated) packet.
    case deliver
    /// For another host: passed the FWD policy check; hand it to `output(_:forwarded:)`.
    case forward
    /// IKE traffic on the NAT-T port, for the key manager.
    case ike
    case dropped(XfrmStatCounter?)
}

/// The default action when no policy matches (≈ `ip xfrm policy setdefault`).
public enum DefaultPolicyAction: UInt8, Sendable {
    case accept = 2
    case block = 1
}


/// One host's XFRM framework.
public final class XFRMStack: @unchecked Sendable {
    public let policies = PolicyDatabase()
    public let states = StateDatabase()
    public let network = NetworkModel()
    public let statistics = XfrmStatistics()
    public let events = EventBus()
    public let clock: any XFRMClock
    public let backend: any ESPCryptoBackend

    /// Implementation constants.
    public static let acquireExpirySeconds: UInt64 = 30  // xfrm_acq_expires
    public static let policySoftRepeatSeconds: UInt64 = 30  // XFRM_KM_TIMEOUT

    /// The default action per direction, one byte each (DefaultPolicyAction raw values), read per packet
    /// without a lock (≈ net->xfrm.policy_default[]).
    let defaults = Atomic<UInt32>(0x02_02_02)  // accept (2) in all three directions
    let acquireSequence = Atomic<UInt32>(0)
    let ipIdentification = Atomic<UInt16>(0)
    /// Last POLEXPIRE hard=0 time per policy index (soft expiry repeats every 30 s).
    let policySoftSent = XFRMMutex<[UInt32: (generation: UInt64, at: UInt64)]>([:])
    /// Offload devices by interface index, and device-raised limit events waiting for the core.
    let deviceTable = XFRMMutex<DeviceTable>(DeviceTable())
    /// Bumped by every change that can alter an output decision (SPD, SAD, devices, routes): cache validity.
    let configGeneration = Atomic<UInt64>(1)
    let outputCache = OutputCache()
    let inputCache = InputCache()

    /// The configuration generation output decisions were made in (stack objects + routes and interfaces).
    var currentGeneration: UInt64 {
        @inline(__always) get {
            self.configGeneration.load(ordering: .acquiring) &+ self.states.generation &+ self.network.generation
        }
    }

    /// Invalidates cached output decisions.
    @inline(__always) func configurationChanged() { self.configGeneration.wrappingAdd(1, ordering: .releasing) }
    /// `xfrm policy set offload-priority strict`: refuse inserts that would let a software policy outrank an
    /// offloaded one (the originally posted design) instead of consulting offloaded policies first.
    public let strictOffloadPriority = Atomic<Bool>(false)
    /// The UDP port on which input looks for ESP-in-UDP (RFC 3948; the daemon's `--udp-port`).
    public let nattPort = Atomic<UInt16>(4500)
    /// ICMP errors come from the address the quoted packet was for, not from one of this host's (xfrmd: they go back
    /// in through the TUN, where the kernel drops a packet whose source is one of its own addresses or loopback as
    /// a martian — ip_route_input_slow's martian_source, ip6_rcv_core — so a PMTU error from the host's own address
    /// never reached the sender). They read as coming from the first hop of the path the packet could not take; the
    /// kernel's reverse-path check passes, since that destination is routed into the TUN.
    public let icmpErrorsFromDestination = Atomic<Bool>(false)
    /// The host's XFRM interfaces, when the stack stands for a real host's (xfrmd): bit 32 set, the low half the one
    /// interface's if_id (0: none). Unset (the simulated hosts and `xfrm --offline`), decapsulated traffic simply
    /// takes its SA's if_id into the IN policy check.
    private let xfrmInterfaceState = Atomic<UInt64>(0)

    /// Says which XFRM interface the host has (`xfrmd --if-id`; 0: none): from now on decapsulated traffic is
    /// checked with its SA's if_id only when that interface has it, else with 0, as the kernel's xfrmi_rcv_cb takes a
    /// packet into an XFRM interface only when one has the SA's if_id (otherwise it stays on the underlying device,
    /// whose policy check uses if_id 0).
    public func setXFRMInterface(ifID: UInt32) {
        self.xfrmInterfaceState.store(1 << 32 | UInt64(ifID), ordering: .relaxed)
        self.configurationChanged()
    }

    /// The if_id decapsulated traffic of an SA with `saIfID` is checked with (see `setXFRMInterface`).
    @inline(__always)
    func inputIfID(_ saIfID: UInt32) -> UInt32 {
        let s = self.xfrmInterfaceState.load(ordering: .relaxed)
        guard s >> 32 != 0 else { return saIfID }
        return saIfID == UInt32(truncatingIfNeeded: s) ? saIfID : 0
    }
    /// How many CPUs per-CPU SAs may name (≈ num_possible_cpus(): `pcpu-num` must be below it). The machine's
    /// processor count by default; xfrmd raises it to its worker count, since its CPUs are its workers.
    public let possibleCPUs = Atomic<UInt32>(UInt32(clamping: ProcessInfo.processInfo.processorCount))

    public init(clock: any XFRMClock = SystemClock(), backend: any ESPCryptoBackend = CryptoBackends.preferred) {
        self.clock = clock
        self.backend = backend
    }

    // MARK: - Defaults

    public func setDefault(_ action: DefaultPolicyAction, for direction: PolicyDirection) {
        self.configurationChanged()  // cached plain-route decisions depend on the default
        defer { self.configurationChanged() }
        let shift = 8 * UInt32(direction.rawValue)
        var old = self.defaults.load(ordering: .relaxed)
        while true {
            let new = old & ~(0xff << shift) | UInt32(action.rawValue) << shift
            let (done, now) = self.defaults.compareExchange(expected: old, desired: new, ordering: .acquiringAndReleasing)
            if done { break }
            old = now
        }
    }

    @inline(__always)
    public func defaultAction(_ direction: PolicyDirection) -> DefaultPolicyAction {
        let byte = UInt8(truncatingIfNeeded: self.defaults.load(ordering: .acquiring) >> (8 * UInt32(direction.rawValue)))
        return DefaultPolicyAction(rawValue: byte) ?? .accept
    }

    // MARK: - Control plane

    /// Creates an SA object (keys checked, cipher keyed) for `config`, stamped with the current time.
    public func makeSA(_ config: SAConfig) throws(ESPConfigError) -> SecurityAssociation {
        try SecurityAssociation(config, addTime: self.clock.now, backend: self.backend)
    }

    /// Adds an SA (EEXIST on a duplicate); removes a matching larval entry. With `offload`, binds the SA to a
    /// device first (≈ xfrm_dev_state_add; see `bindToDevice` for the fallback rules). Publishes the event.
    public func addState(_ sa: SecurityAssociation, offload: OffloadRequest? = nil) throws(StateDatabaseError) {
        // A duplicate is refused before any device is programmed: a second device entry with the same key would
        // number packets from the start again (nonce reuse).
        if self.states.exists(sa.id, mark: sa.config.mark) { throw StateDatabaseError(17, "File exists") }
        if let offload { try self.bindToDevice(sa, offload) }
        do throws(StateDatabaseError) {
            if let larval = try self.states.add(sa) { self.releaseFromDevice(larval) }
        } catch {
            self.releaseFromDevice(sa)  // undo the device add (≈ xdo_dev_state_delete + free on EEXIST)
            throw error
        }
        self.events.publish(.stateAdded(sa, update: false))
    }

    /// Updates an SA (ESRCH when absent). A larval (allocspi/acquire) entry is replaced by the full SA, which is
    /// offloaded then if asked; a valid SA keeps its keys, sequence numbers and device binding and takes the new
    /// lifetimes (≈ xfrm_state_update). Publishes the event.
    @discardableResult
    public func updateState(_ sa: SecurityAssociation, offload: OffloadRequest? = nil) throws(StateDatabaseError)
        -> SecurityAssociation
    {
        guard let old = self.states.getExact(sa.id, mark: sa.config.mark) else {
            throw StateDatabaseError(3, "No such process")
        }
        let replacing = old.state == .acquiring
        if replacing, let offload { try self.bindToDevice(sa, offload) }
        let kept: SecurityAssociation
        do throws(StateDatabaseError) {
            kept = try self.states.update(sa)
        } catch {
            if replacing { self.releaseFromDevice(sa) }
            throw error
        }
        if kept === sa && old !== sa { self.releaseFromDevice(old) }
        if kept !== sa && replacing { self.releaseFromDevice(sa) }
        var check = SecurityAssociation.ExpiryCheck.ok
        if kept !== sa {
            check = kept.update(lifetime: sa.lifetime, encapsulation: sa.encapsulation, outputMark: sa.outputMark,
                                ifID: sa.config.ifID)
        }
        self.configurationChanged()
        self.events.publish(.stateAdded(kept, update: true))
        switch check {
        case .ok: break
        case .softExpired: self.events.publish(.expire(kept, hard: false))
        case .hardExpired: self.expireHard(kept)
        }
        // ≈ xfrm_state_update: new limits apply at once to an SA that was already used.
        if kept.offload != nil { self.syncDeviceStats() }
        return kept
    }

    @discardableResult
    public func deleteState(_ id: SAID, mark: Mark) throws(StateDatabaseError) -> SecurityAssociation {
        let sa = try self.states.delete(id, mark: mark)
        self.releaseFromDevice(sa)
        self.events.publish(.stateDeleted(sa))
        return sa
    }

    /// `ip xfrm state flush [proto P]` (0 or 255 = every protocol).
    @discardableResult
    public func flushStates(proto: UInt8) -> [SecurityAssociation] {
        let gone = self.states.flush { proto == 0 || proto == 255 || $0.id.proto == proto }
        for sa in gone { self.releaseFromDevice(sa) }
        // ≈ xfrm_flush_sa: an empty flush (ESRCH inside the kernel) is not an event.
        if !gone.isEmpty { self.events.publish(.statesFlushed(proto: proto)) }
        return gone
    }

    /// ≈ xfrm_alloc_userspi after its checks (EINVAL "Invalid SPI range" for `min > max`): gives an SPI from [min, max] to the larval SA `seq` names, or to one waiting for the same
    /// tunnel, or to a new one (`StateDatabase.allocateSPI`). A new larval SA is built as xfrm_find_acq builds it:
    /// `config`'s addresses, protocol, mode, reqid, mark, if_id and CPU; a selector of exactly its two addresses
    /// with no family (AF_UNSPEC, as the kernel leaves it); no limits but the 30 s before it expires
    /// (xfrm_acq_expires); no key-manager sequence number. `config`'s direction goes to whichever SA gets the SPI.
    public func allocateSPI(_ config: SAConfig, seq: UInt32 = 0, min: UInt32, max: UInt32)
        throws(StateDatabaseError) -> SecurityAssociation
    {
        guard min <= max else { throw StateDatabaseError(22, "Invalid SPI range") }
        var c = config
        c.crypto = nil
        c.kmSequence = 0
        let host: UInt8 = c.id.destination.version == 4 ? 32 : 128
        c.selector = Selector(family: 0, source: IPPrefix(c.source, length: host),
                              destination: IPPrefix(c.id.destination, length: host))
        c.lifetime = LifetimeConfig()
        c.lifetime.hardAddExpiresSeconds = Self.acquireExpirySeconds
        c.id.spi = 0
        let fresh = try! SecurityAssociation(c, addTime: self.clock.now)
        let (sa, replaced) = try self.states.allocateSPI(fresh, seq: seq, direction: config.direction, min: min,
                                                         max: max)
        // A packet-offload ACQUIRE's larval SA is on its device (XFRM_DEV_OFFLOAD_FLAG_ACQ): the device gets the SA
        // that replaced it, under its SPI, and lets the old one go.
        if let old = replaced, var o = old.offload {
            self.releaseFromDevice(old)
            if let dev = self.device(ifindex: o.ifindex), dev.callbacks.contains(.stateAdd) {
                do throws(DeviceError) {
                    o.handle = try dev.stateAdd(sa, offload: o)
                    sa.setOffload(o)
                } catch {}  // refused: the larval SA stays in software, as an unbound one
            }
        }
        return sa
    }

    @discardableResult
    public func addPolicy(_ p: Policy, update: Bool) throws(PolicyDatabaseError) -> Policy {
        self.configurationChanged()
        defer { self.configurationChanged() }
        var p = p
        p.addTime = self.clock.now
        try self.checkOffloadPriority(p)
        // ≈ xfrm_dev_policy_add before the SPD insert (the kernel's order): traffic never finds the flow without a
        // policy, and a refused device add changes nothing.
        if let o = p.offload { try self.offloadPolicy(p, o) }
        let old = update ? self.policies.get(key: p.key) : nil
        let stored: Policy
        do throws(PolicyDatabaseError) {
            stored = try self.policies.insert(p, update: update)
        } catch {
            if p.offload != nil { self.releasePolicyFromDevice(p) }
            throw error
        }
        if let old { self.releasePolicyFromDevice(old) }
        self.events.publish(.policyAdded(stored, update: update))
        return stored
    }

    @discardableResult
    public func deletePolicy(key: Policy.Key) throws(PolicyDatabaseError) -> Policy {
        self.configurationChanged()
        defer { self.configurationChanged() }
        let p = try self.policies.delete(key: key)
        self.releasePolicyFromDevice(p)
        self.events.publish(.policyDeleted(p))
        return p
    }

    @discardableResult
    public func deletePolicy(index: UInt32, direction: PolicyDirection) throws(PolicyDatabaseError) -> Policy {
        self.configurationChanged()
        defer { self.configurationChanged() }
        let p = try self.policies.delete(index: index, direction: direction)
        self.releasePolicyFromDevice(p)
        self.events.publish(.policyDeleted(p))
        return p
    }

    public func flushPolicies() {
        self.configurationChanged()
        defer { self.configurationChanged() }
        let gone = self.policies.flush()
        for p in gone { self.releasePolicyFromDevice(p) }
        // ≈ xfrm_flush_policy: nothing flushed, nothing announced.
        if !gone.isEmpty { self.events.publish(.policiesFlushed) }
    }
}

/// `start + seconds`, saturating: a lifetime of 2^64 - 1 seconds never expires instead of trapping.
@inline(__always)
func deadline(_ start: UInt64, _ seconds: UInt64) -> UInt64 {
    let (sum, overflow) = start.addingReportingOverflow(seconds)
    return overflow ? .max : sum
}
