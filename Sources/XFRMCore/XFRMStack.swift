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

/// The SAs a received packet came through, outermost first (≈ struct sec_path; at most XFRM_MAX_DEPTH = 6).
struct SecPath: ~Copyable {
    var entries: (SecurityAssociation?, SecurityAssociation?, SecurityAssociation?, SecurityAssociation?,
                  SecurityAssociation?, SecurityAssociation?) = (nil, nil, nil, nil, nil, nil)
    var count = 0
    static let capacity = 6

    mutating func append(_ sa: SecurityAssociation) -> Bool {
        guard self.count < Self.capacity else { return false }
        switch self.count {
        case 0: self.entries.0 = sa
        case 1: self.entries.1 = sa
        case 2: self.entries.2 = sa
        case 3: self.entries.3 = sa
        case 4: self.entries.4 = sa
        default: self.entries.5 = sa
        }
        self.count += 1
        return true
    }

    subscript(i: Int) -> SecurityAssociation {
        switch i {
        case 0: self.entries.0!
        case 1: self.entries.1!
        case 2: self.entries.2!
        case 3: self.entries.3!
        case 4: self.entries.4!
        default: self.entries.5!
        }
    }
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
    private let defaults = Atomic<UInt32>(0x02_02_02)  // accept (2) in all three directions
    private let acquireSequence = Atomic<UInt32>(0)
    private let ipIdentification = Atomic<UInt16>(0)
    /// Last POLEXPIRE hard=0 time per policy index (soft expiry repeats every 30 s).
    private let policySoftSent = XFRMMutex<[UInt32: UInt64]>([:])
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
            check = kept.update(lifetime: sa.config.lifetime, encapsulation: sa.config.encapsulation,
                                outputMark: sa.config.outputMark, ifID: sa.config.ifID)
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

    /// ≈ xfrm_alloc_spi: a larval SA with a free SPI in [min, max] for (destination, protocol). ENOENT if none is free.
    public func allocateSPI(_ config: SAConfig, min: UInt32, max: UInt32) throws(StateDatabaseError) -> SecurityAssociation {
        guard min <= max, max >= 256 || min == max else { throw StateDatabaseError(22, "Invalid SPI range") }
        var candidate = min
        let span = UInt64(max) - UInt64(min) + 1
        var tries: UInt64 = 0
        while tries < Swift.min(span, 65536) {
            // Random, as xfrm_alloc_spi's get_random_u32_inclusive: two hosts (or daemons) asking in the same second
            // must not get the same SPI, and nobody may predict the next one.
            if span > 1 { candidate = UInt32(truncatingIfNeeded: UInt64(min) + UInt64.random(in: 0..<span)) }
            if self.states.isFree(destination: config.id.destination, spi: candidate, proto: config.id.proto) {
                var c = config
                c.id.spi = candidate
                c.crypto = nil
                c.lifetime.hardAddExpiresSeconds = Self.acquireExpirySeconds
                let sa = try! SecurityAssociation(c, addTime: self.clock.now)
                self.states.insertLarval(sa)
                return sa
            }
            tries += 1
            if span == 1 { break }
        }
        throw StateDatabaseError(2, "No such file or directory")
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

    // MARK: - Timers (≈ xfrm_timer_handler, xfrm_policy_timer)

    /// Runs every lifetime timer at the clock's current time: soft/hard add and use time for SAs, larval expiry,
    /// and policy lifetimes. Call it when the clock moves (the daemon: every second).
    public func runTimers() {
        self.outputCache.dropStale(generation: self.currentGeneration)
        self.inputCache.dropStale(generation: self.currentGeneration)
        let states = self.states.list()
        self.syncDeviceStats(states)
        let now = self.clock.now
        for sa in states.reversed() {
            switch sa.timerCheck(now: now) {
            case .none: continue
            case .soft:
                self.events.publish(.expire(sa, hard: false))
                self.configurationChanged()  // as on the data path: cached bundles resolve again (a dying SA yields)
            case .hard: self.expireHard(sa)
            }
        }
        for p in self.policies.timedList().reversed() {
            let l = p.lifetime
            let use = self.policies.lastUse(index: p.index, direction: p.direction) ?? 0
            let useBase = use == 0 ? p.addTime : use
            let hard = (l.hardAddExpiresSeconds != 0 && deadline(p.addTime, l.hardAddExpiresSeconds) <= now)
                || (l.hardUseExpiresSeconds != 0 && deadline(useBase, l.hardUseExpiresSeconds) <= now)
            if hard {
                // Only this very policy: a replacement that reused its index (update, delete + add) is not its
                // lifetime's to end.
                if (try? self.policies.delete(index: p.index, direction: p.direction, generation: p.generation)) != nil {
                    self.configurationChanged()
        defer { self.configurationChanged() }
                    self.releasePolicyFromDevice(p)
                    self.events.publish(.policyExpire(p, hard: true))
                }
                continue
            }
            let soft = (l.softAddExpiresSeconds != 0 && deadline(p.addTime, l.softAddExpiresSeconds) <= now)
                || (l.softUseExpiresSeconds != 0 && deadline(useBase, l.softUseExpiresSeconds) <= now)
            if soft {
                let due = self.policySoftSent.withLock { sent -> Bool in
                    if let last = sent[p.index], deadline(last, Self.policySoftRepeatSeconds) > now { return false }
                    sent[p.index] = now
                    return true
                }
                if due { self.events.publish(.policyExpire(p, hard: false)) }
            }
        }
    }

    /// Whether timer runs can change anything while the clock moves and no packet flows: an SA or a policy with a
    /// time limit (larval entries have one), an offloaded SA (its device's counters), or an SA that hit a hard limit
    /// and waits for the next run. False: one run after any stretch of time does what a run every second would.
    public var timersArmed: Bool {
        if self.policies.hasTimedPolicies { return true }
        return self.states.list().contains { sa in
            sa.offload != nil || sa.lifetime.hasTimeLimit || sa.state != .valid
        }
    }

    /// Deletes an SA that hit a hard limit and reports EXPIRE hard=1 — a larval acquire entry too, with SPI 0
    /// (≈ xfrm_timer_handler's `expired:` path), so the key manager knows its negotiation timed out.
    func expireHard(_ sa: SecurityAssociation) {
        self.configurationChanged()
        defer { self.configurationChanged() }
        guard self.states.remove(sa) else { return }
        self.releaseFromDevice(sa)
        self.events.publish(.expire(sa, hard: true))
    }

    // MARK: - Output path

    /// Runs a locally generated (or, with `forwarded`, a routed) IP packet through the OUT policy and its SAs, then
    /// routes it. See the pipeline at the top of this file.
    /// `ifID` is the XFRM interface id the traffic was routed into (0: ordinary traffic; only policies with that
    /// exact if_id apply). `cpu` is the CPU the output runs on — the engine worker's index — which picks among
    /// per-CPU SAs (RFC 9611, `pcpu-num`); callers outside an engine run on CPU 0.
    public func output(_ packet: inout PacketBuffer, mark: UInt32 = 0, ifID: UInt32 = 0, forwarded: Bool = false,
                       cpu: UInt32 = 0) -> OutputResult
    {
        var transformed = false
        return self.output(&packet, mark: mark, ifID: ifID, forwarded: forwarded, cpu: cpu, transformed: &transformed)
    }

    /// `output`, also saying whether an SA transformed the packet: a `.transmit` with `transformed` false is the
    /// packet as it came (no policy, a bypass policy, only optional templates without SAs) — what a daemon whose
    /// outer side carries nothing but ESP must not send.
    public func output(_ packet: inout PacketBuffer, mark: UInt32 = 0, ifID: UInt32 = 0, forwarded: Bool = false,
                       cpu: UInt32 = 0, transformed: inout Bool) -> OutputResult
    {
        var memo = OutputMemo()
        return self.output(&packet, mark: mark, ifID: ifID, forwarded: forwarded, cpu: cpu, now: self.clock.now,
                           transformed: &transformed, memo: &memo)
    }

    /// `output` with the bundle of the previous packet of a batch: a packet of the same flow, in the same
    /// configuration generation, goes straight to it (no cache lookup); `memo` is updated for the next packet.
    /// `now`: the clock, read once per batch.
    func output(_ packet: inout PacketBuffer, mark: UInt32, ifID: UInt32, forwarded: Bool, cpu: UInt32, now: UInt64,
                transformed: inout Bool, memo: inout OutputMemo) -> OutputResult
    {
        transformed = false
        guard var flow = Flow.parse(packet.data, count: packet.count, mark: mark) else {
            self.statistics.count(.badOutputPacket)
            return .dropped(.outError)
        }
        flow.ifID = ifID
        let generation = self.currentGeneration
        // With per-CPU SAs a flow's bundle depends on the CPU too (≈ the kernel's per-CPU state cache), so each
        // CPU keeps its own entry; without them every CPU shares one.
        let tag: UInt = self.states.hasPerCPUStates ? UInt(cpu) &+ 1 &<< 4 : 0
        if memo.matches(flow, tag: tag, generation: generation) {
            // The memo holds its bundle strongly; borrowing it here costs no reference count per packet.
            let r = memo.withBundle { self.outputCachedBundle(&packet, $0, now: now, transformed: &transformed) }
            if let r { return r }
            memo.clear()  // the SA is no longer valid: resolve again below
        }
        if let (hit, touch) = self.outputCache.lookup(flow, tag: tag, generation: generation, now: now) {
            switch hit.value {
            case .plain(let ifindex, let mtu):
                return self.transmit(&packet, ifindex: ifindex, mtu: mtu, transformed: false)
            case .packetOffload(let policyIndex, let sa, let device, let offload, let limit, let tunnel):
                if touch { self.policies.markUsed(index: policyIndex, direction: .outbound, at: now) }
                return self.packetOffloadChecks(&packet, sa: sa, device: device, offload: offload, limit: limit,
                                                tunnel: tunnel)
            case .bundle(let policyIndex, let bundle):
                if touch { self.policies.markUsed(index: policyIndex, direction: .outbound, at: now) }
                memo.set(flow, tag: tag, generation: generation, bundle: bundle)
                if let r = self.outputCachedBundle(&packet, bundle, now: now, transformed: &transformed) { return r }
                memo.clear()
                // The SA is no longer valid: resolve again below.
            }
        }
        // ≈ flowi_oif: the policy lookup sees the interface the route leads to (selectors with `dev IFNAME`).
        let cacheKey = flow
        let route = self.network.egress(to: flow.destination)
        flow.ifindex = route?.ifindex ?? 0
        if let policy = self.policies.lookup(.outbound, flow, usedAt: now) {
            if policy.action == .block {
                self.statistics.increment(.outPolBlock)
                return .dropped(.outPolBlock)
            }
            if let po = policy.offload {
                return self.outputPacketOffload(&packet, flow: flow, cacheKey: cacheKey, tag: tag, policy: policy,
                                                device: po.ifindex, mark: mark, cpu: cpu, generation: generation,
                                                now: now)
            }
            var crypto: (OffloadMetadata, Int32)? = nil
            let single = policy.templates.count == 1
            var cacheable: (sa: SecurityAssociation, device: (any XfrmOffloadDevice, StateOffload)?)? = nil
            // ≈ xfrm_tmpl_resolve_one: a transport template takes its addresses from the flow or from the previous
            // tunnel's endpoints; a tunnel template from itself, its missing source from the route (xfrm_get_saddr).
            var daddr = flow.destination
            var saddr = flow.source
            var applied = 0
            for template in policy.templates {
                guard let (source, destination) = self.templateAddresses(template, daddr: daddr, saddr: saddr) else {
                    self.statistics.increment(.outPolError)  // no route to the tunnel's peer: no source address
                    return .dropped(.outPolError)
                }
                let query = StateQuery(
                    template: template, flow: flow, source: source, destination: destination,
                    policyMark: policy.mark.value & policy.mark.mask, ifID: policy.ifID, cpu: cpu,
                    cpuAcquire: policy.flags & Policy.cpuAcquireFlag != 0)
                var resolution = self.states.resolve(query)
                // ≈ xfrm_state_find's state cache: with XFRM_POLICY_CPU_ACQUIRE only the CPU's own SA is remembered.
                var stopgap = false
                if case .found(let sa) = resolution, query.cpuAcquire, sa.config.pcpuNum != cpu { stopgap = true }
                if case .fallback(let sa) = resolution {
                    // ≈ xfrm_state_find with XFRM_POLICY_CPU_ACQUIRE: ask for this CPU's SA, meanwhile use `sa`
                    // (not cached: the CPU's own SA is to take over).
                    self.acquire(template, flow: flow, policy: policy, source: source, destination: destination,
                                 pcpu: cpu)
                    resolution = .found(sa)
                    stopgap = true
                }
                switch resolution {
                case .fallback: fatalError("resolved above")
                case .found(let sa):
                    daddr = destination
                    saddr = source
                    applied += 1
                    // Crypto offload: a single-transform bundle whose route leads to the SA's device, if the device
                    // takes the packet; otherwise the SA silently works in software (≈ xfrm_dev_offload_ok).
                    if single, let o = sa.offload, o.type == .crypto, let dev = self.device(ifindex: o.ifindex),
                        let egress = self.network.egress(to: sa.id.destination), egress.ifindex == o.ifindex,
                        !dev.callbacks.contains(.offloadOK) || dev.offloadOK(packet, sa: sa, offload: o)
                    {
                        var layout = ESPLayout()
                        if case .done(let r) = self.apply(sa, to: &packet, now: now, deviceLayout: &layout) {
                            return r
                        }
                        // ≈ xfrm_replay_overflow_offload_esn: the high half moved on, so the device must learn it.
                        if sa.config.esn && layout.sequence & 0xffff_ffff == 0 { dev.advanceESN(sa, offload: o) }
                        var meta = OffloadMetadata()
                        meta.espOffset = layout.espOffset
                        meta.cryptLength = layout.cryptLength
                        meta.esnHigh = layout.esnHigh
                        meta.handle = o.handle
                        crypto = (meta, o.ifindex)
                        if !stopgap { cacheable = (sa, (dev, o)) }
                        continue
                    }
                    // A software SA's bundle is cached; a crypto-offload SA that went to software for this packet
                    // is not (the device may take the next one).
                    if single && sa.offload == nil && !stopgap { cacheable = (sa, nil) }
                    var unused = ESPLayout()
                    if case .done(let r) = self.apply(sa, to: &packet, now: now, deviceLayout: &unused, seal: true) {
                        return r
                    }
                case .acquiring:
                    if template.optional { continue }
                    self.statistics.increment(.outNoStates)
                    return .dropped(.outNoStates)
                case .none:
                    // xfrm_state_find queries the key manager for optional templates too; the packet then goes on
                    // without that transform.
                    self.acquire(template, flow: flow, policy: policy, source: source, destination: destination)
                    if template.optional { continue }
                    self.statistics.increment(.outNoStates)
                    return .dropped(.outNoStates)
                }
            }
            if let (meta, ifindex) = crypto {
                let r = self.transmit(&packet, transformed: true)
                guard case .transmit(let out) = r else { return r }
                if out == ifindex {
                    if let c = cacheable { self.cacheBundle(c.sa, device: c.device, flow: flow, key: cacheKey,
                                                            tag: tag, policy: policy, generation: generation,
                                                            now: now) }
                    return .offload(ifindex: ifindex, metadata: meta)
                }
                self.statistics.increment(.outError)
                return .dropped(.outError)
            }
            transformed = applied > 0
            let r = self.transmit(&packet, transformed: applied > 0)
            if case .transmit = r, applied == 1, let c = cacheable {
                self.cacheBundle(c.sa, device: nil, flow: flow, key: cacheKey, tag: tag, policy: policy,
                                 generation: generation, now: now)
            }
            return r
        } else if self.defaultAction(.outbound) == .block && !self.network.isLocal(flow.destination) {
            // ≈ xfrm_lookup_with_ifid: the sender gets EPERM and no counter moves; loopback traffic is exempt.
            return .dropped(nil)
        }
        guard let route else { return .dropped(nil) }
        self.outputCache.store(
            OutputCache.Entry(flow: cacheKey, tag: tag, generation: generation,
                              value: .plain(ifindex: route.ifindex, mtu: route.mtu)),
            now: now)
        return self.transmit(&packet, ifindex: route.ifindex, mtu: route.mtu, transformed: false)
    }

    /// Packet offload TX (≈ xfrm_output_one's PACKET branch + xfrm_dev_offload_ok): no ESP work, no sequence
    /// number, no SA accounting on the host — checks only, then the plaintext goes to the device. Whatever the
    /// device cannot take is dropped as XfrmOutError, never sent in software and never in clear.
    private func outputPacketOffload(_ packet: inout PacketBuffer, flow: Flow, cacheKey: Flow, tag: UInt,
                                     policy: Policy, device: Int32, mark: UInt32, cpu: UInt32, generation: UInt64,
                                     now: UInt64) -> OutputResult {
        guard let template = policy.templates.first else {
            // An offloaded allow policy without templates: plaintext through the device.
            return self.transmit(&packet)
        }
        guard let (source, destination) = self.templateAddresses(template, daddr: flow.destination,
                                                                 saddr: flow.source) else {
            self.statistics.increment(.outPolError)
            return .dropped(.outPolError)
        }
        let sa: SecurityAssociation
        var cacheable = true
        let query = StateQuery(template: template, flow: flow, source: source, destination: destination,
                               policyMark: policy.mark.value & policy.mark.mask, ifID: policy.ifID,
                               packetOffloadDevice: device, cpu: cpu,
                               cpuAcquire: policy.flags & Policy.cpuAcquireFlag != 0)
        switch self.states.resolve(query) {
        case .found(let s):
            sa = s
            cacheable = !query.cpuAcquire || s.config.pcpuNum == cpu
        case .fallback(let s):
            self.acquire(template, flow: flow, policy: policy, source: source, destination: destination,
                         offload: StateOffload(ifindex: device, direction: .outbound, type: .packet), pcpu: cpu)
            sa = s
            cacheable = false
        case .acquiring:
            self.statistics.increment(.outNoStates)
            return .dropped(.outNoStates)
        case .none:
            self.acquire(template, flow: flow, policy: policy, source: source, destination: destination,
                         offload: StateOffload(ifindex: device, direction: .outbound, type: .packet))
            self.statistics.increment(.outNoStates)
            return .dropped(.outNoStates)
        }
        guard let o = sa.offload, o.type == .packet, let dev = self.device(ifindex: o.ifindex),
            let transform = sa.transform
        else {
            self.statistics.increment(.outError)
            return .dropped(.outError)
        }
        let routeTo = sa.config.mode == .tunnel ? sa.id.destination : flow.destination
        guard let iface = self.network.egress(to: routeTo), iface.ifindex == o.ifindex else {
            self.statistics.increment(.outError)  // the route leads to another device
            return .dropped(.outError)
        }
        let limit = transform.maximumPayload(forMTU: iface.mtu)
        let tunnel = sa.config.mode == .tunnel
        if cacheable {
            self.outputCache.store(
                OutputCache.Entry(flow: cacheKey, tag: tag, generation: generation,
                                  value: .packetOffload(policyIndex: policy.index, sa: sa, device: dev, offload: o,
                                                        limit: limit, tunnel: tunnel)),
                now: now)
        }
        return self.packetOffloadChecks(&packet, sa: sa, device: dev, offload: o, limit: limit, tunnel: tunnel)
    }

    /// The per-packet part of packet offload TX (≈ xfrm_dev_offload_ok): what the device cannot take is dropped as
    /// XfrmOutError — IPv4 options, IPv6 extension headers, more than the SA's MTU (tunnel mode with DF answers with
    /// ICMP) — and the driver's offload_ok has the last word.
    @inline(__always)
    private func packetOffloadChecks(_ packet: inout PacketBuffer, sa: SecurityAssociation,
                                     device: any XfrmOffloadDevice, offload o: StateOffload, limit: Int,
                                     tunnel: Bool) -> OutputResult {
        let p = packet.data
        let v4 = p.loadByte(at: 0) >> 4 == 4
        if v4 ? p.loadByte(at: 0) & 0x0f != 5 : IPv6Header.isExtensionHeader(p.loadByte(at: 6)) {
            self.statistics.increment(.outError)  // IPv4 options or IPv6 extension headers
            return .dropped(.outError)
        }
        if packet.count > limit {
            // The stack never fragments for the device.
            let df = !v4 || p.loadBE16(at: 6) & IPv4Header.flagDF != 0
            self.statistics.increment(.outError)
            if tunnel && df {
                return self.makePacketTooBig(&packet, mtu: limit) ? .icmpError : .dropped(.outError)
            }
            return .dropped(.outError)
        }
        if device.callbacks.contains(.offloadOK) && !device.offloadOK(packet, sa: sa, offload: o) {
            self.statistics.increment(.outError)
            return .dropped(.outError)
        }
        var meta = OffloadMetadata()
        meta.handle = o.handle
        return .offload(ifindex: o.ifindex, metadata: meta)
    }

    /// Applies one SA of a bundle; nil to continue, or the final result. `limit` is the largest inner packet the
    /// tunnel's path takes (nil: look the route up; transport mode has none). `retryIfInvalid` (a cached bundle):
    /// an SA that is no longer valid gives `.stale` instead of a drop, so that the caller resolves again.
    @inline(__always)
    func apply(_ sa: SecurityAssociation, to packet: inout PacketBuffer, now: UInt64,
                       deviceLayout: inout ESPLayout, seal: Bool = false, limit cachedLimit: Int? = nil,
                       retryIfInvalid: Bool = false) -> ApplyOutcome {
        guard let transform = sa.transform else {
            self.statistics.increment(.outStateInvalid)
            return .done(.dropped(.outStateInvalid))
        }
        if sa.config.direction == .inbound {
            self.statistics.increment(.outStateDirError)
            return .done(.dropped(.outStateDirError))
        }
        // Tunnel mode: an inner packet that would not fit the path after ESP is refused with ICMP when it may not
        // be fragmented (IPv4 DF, or any IPv6), ≈ xfrm4_tunnel_check_size / xfrm6_tunnel_check_size, which run
        // before the SA's lock is taken.
        if sa.config.mode == .tunnel,
            let limit = cachedLimit ?? self.network.egress(to: sa.id.destination).map({
                transform.maximumPayload(forMTU: $0.mtu) }),
            packet.count > limit
        {
            let p = packet.data
            let v4DF = p.loadByte(at: 0) >> 4 == 4 && p.loadBE16(at: 6) & IPv4Header.flagDF != 0
            let v6 = p.loadByte(at: 0) >> 4 == 6
            if v4DF || v6 {
                // ≈ xfrm4_tunnel_check_size failing in the outer mode output: XfrmOutStateModeError.
                self.statistics.increment(.outStateModeError)
                return .done(self.makePacketTooBig(&packet, mtu: limit) ? .icmpError : .dropped(.outStateModeError))
            }
        }
        // One acquisition of the SA's lock: state, lifetime, sequence number and ESP, accounting.
        let use = sa.useForOutput(now: now) {
            // The header was verified by Flow.parse at the start of output, or written by the previous SA.
            let reason = seal ? transform.encapsulate(&packet, layout: &deviceLayout, innerHeaderChecked: true)
                : transform.encapsulateForDevice(&packet, layout: &deviceLayout, innerHeaderChecked: true)
            return (reason, deviceLayout.payloadLength)
        }
        switch use {
        case .notValid:
            if retryIfInvalid { return .stale }
            self.statistics.increment(.outStateInvalid)
            return .done(.dropped(.outStateInvalid))
        case .hardExpired:
            self.expireHard(sa)
            self.statistics.increment(.outStateExpired)
            return .done(.dropped(.outStateExpired))
        case .used(let reason, let soft):
            if soft {
                self.events.publish(.expire(sa, hard: false))
                // A dying SA gives way to a fresh one at the next resolution: cached bundles resolve again.
                self.configurationChanged()
            }
            if let reason {
                self.statistics.count(reason)
                return .done(.dropped(XfrmStatCounter(reason)))
            }
            return .next
        }
    }

    /// Routes and transmits a packet (no XFRM work): MTU check against the outgoing interface.
    @inline(__always)
    private func transmit(_ packet: inout PacketBuffer, transformed: Bool = false) -> OutputResult {
        let p = packet.data
        let version = p.loadByte(at: 0) >> 4
        let dst: IPAddress = version == 4 ? .loadV4(from: p, at: 16) : .loadV6(from: p, at: 24)
        guard let iface = self.network.egress(to: dst) else { return .dropped(nil) }
        return self.transmit(&packet, ifindex: iface.ifindex, mtu: iface.mtu, transformed: transformed)
    }

    /// The MTU check of `transmit` on a route already known.
    @inline(__always)
    func transmit(_ packet: inout PacketBuffer, ifindex: Int32, mtu: Int, transformed: Bool) -> OutputResult {
        let p = packet.data
        let version = p.loadByte(at: 0) >> 4
        let iface = (ifindex: ifindex, mtu: mtu)
        if packet.count > iface.mtu {
            let df = version == 6 || p.loadBE16(at: 6) & IPv4Header.flagDF != 0
            // Never quote a transformed packet in an ICMP error (a crypto-offload packet is still plaintext inside
            // its ESP framing); it is dropped instead. Untransformed DF/IPv6 packets get the error.
            if df && !transformed {
                if self.makePacketTooBig(&packet, mtu: iface.mtu) { return .icmpError }
                self.statistics.increment(.outError)
                return .dropped(.outError)
            }
            self.statistics.increment(.outError)  // IPv4 fragmentation of the outer packet is not implemented yet
            return .dropped(.outError)
        }
        return .transmit(ifindex: iface.ifindex)
    }

    /// Turns the packet into an ICMP "fragmentation needed" (IPv4, RFC 1191) or ICMPv6 "packet too big"
    /// (RFC 8201) addressed to its sender, carrying `mtu`.
    func makePacketTooBig(_ packet: inout PacketBuffer, mtu: Int) -> Bool {
        let p = packet.data
        let version = p.loadByte(at: 0) >> 4
        if version == 4 {
            guard let ip = IPv4Header.parse(p, available: packet.count) else { return false }
            let src = p.loadBE32(at: 12)
            let quoted = min(packet.count, ip.headerLength + 8)
            guard packet.headroom >= 28 else { return false }  // no room for the error's headers: just drop
            packet.trimBack(packet.count - quoted)
            let icmp = packet.prepend(8)
            icmp.storeByte(3, at: 0)
            icmp.storeByte(4, at: 1)
            icmp.storeBE16(0, at: 2)
            icmp.storeBE16(0, at: 4)
            icmp.storeBE16(UInt16(truncatingIfNeeded: mtu), at: 6)
            icmp.storeBE16(InternetChecksum.compute(icmp, count: 8 + quoted), at: 2)
            let hdr = packet.prepend(20)
            let from = self.replySource(toward: .v4(src), version: 4) ?? .v4(0)
            guard case .v4(let me) = from else { return false }
            IPv4Header.write(hdr, tos: 0xc0, totalLength: packet.count,
                             identification: self.ipIdentification.wrappingAdd(1, ordering: .relaxed).newValue,
                             flags: 0, ttl: 64, proto: IPProtocolNumber.icmp, source: me, destination: src)
            return true
        }
        guard packet.count >= HeaderSize.ipv6 else { return false }
        let src = IPAddress.loadV6(from: p, at: 8)
        let quoted = min(packet.count, 1280 - 48)
        guard packet.headroom >= 48 else { return false }
        packet.trimBack(packet.count - quoted)
        let icmp = packet.prepend(8)
        icmp.storeByte(2, at: 0)
        icmp.storeByte(0, at: 1)
        icmp.storeBE16(0, at: 2)
        icmp.storeBE32(UInt32(mtu), at: 4)
        let me = self.replySource(toward: src, version: 6) ?? .v6(0, 0)
        let hdr = packet.prepend(HeaderSize.ipv6)
        IPv6Header.write(hdr, trafficClass: 0, flowLabel: 0, payloadLength: 8 + quoted,
                         nextHeader: IPProtocolNumber.icmpv6, hopLimit: 64, source: me, destination: src)
        icmp.storeBE16(ICMPv6.checksum(icmp, length: 8 + quoted, source: me, destination: src), at: 2)
        return true
    }

    private func replySource(toward dst: IPAddress, version: Int) -> IPAddress? {
        if let egress = self.network.egress(to: dst),
            let a = self.network.sourceAddress(ifindex: egress.ifindex, version: version) { return a }
        for i in self.network.interfaces where i.kind != "loopback" {
            if let a = i.addresses.first(where: { $0.address.version == version }) { return a.address }
        }
        return nil
    }

    /// The (local, remote) addresses an output template is resolved with (≈ the top of xfrm_tmpl_resolve_one's
    /// loop): transport mode takes `saddr`/`daddr` (the flow's, or the previous tunnel's endpoints); tunnel mode
    /// takes the template's, a missing source from the route toward the destination (xfrm_get_saddr). nil when
    /// there is no route to take a source from.
    @inline(__always)
    private func templateAddresses(_ t: Template, daddr: IPAddress, saddr: IPAddress) -> (IPAddress, IPAddress)? {
        guard t.mode == 1 else { return (saddr, daddr) }
        let remote = t.destination ?? daddr
        if let local = t.source, !local.isUnspecified { return (local, remote) }
        guard let egress = self.network.egress(to: remote),
            let local = self.network.sourceAddress(ifindex: egress.ifindex, version: remote.version)
        else { return nil }
        return (local, remote)
    }

    /// ≈ xfrm_state_find's acquire branch: a larval SA (expires in 30 s) and an ACQUIRE to the key manager. As in
    /// xfrm_init_tempstate: the selector is the flow with full prefixes, port masks 0xffff and the output
    /// interface; the SA is `dir out` and takes the policy's mark and if_id. When no key manager listens for
    /// ACQUIRE (km_query fails), no larval SA is left behind. `pcpu`: the CPU a per-CPU acquire asks for (only with
    /// XFRM_POLICY_CPU_ACQUIRE while another SA carries the flow, as xfrm_state_find sets it); the larval SA and
    /// the ACQUIRE carry it (XFRMA_SA_PCPU).
    private func acquire(_ template: Template, flow: Flow, policy: Policy, source: IPAddress, destination: IPAddress,
                         offload: StateOffload? = nil, pcpu: UInt32? = nil) {
        let seq = self.acquireSequence.wrappingAdd(1, ordering: .relaxed).newValue
        var lifetime = LifetimeConfig()
        lifetime.hardAddExpiresSeconds = Self.acquireExpirySeconds
        let full = flow.version == 4 ? UInt8(32) : 128
        let selector = Selector(
            family: flow.version, source: IPPrefix(flow.source, length: full),
            destination: IPPrefix(flow.destination, length: full), proto: flow.proto,
            sourcePort: flow.sourcePort, sourcePortMask: 0xffff,
            destinationPort: flow.destinationPort, destinationPortMask: 0xffff, ifindex: flow.ifindex)
        var config = SAConfig(
            id: SAID(destination: destination, spi: 0, proto: template.proto), source: source, selector: selector,
            reqid: template.reqid, mode: template.mode == 1 ? .tunnel : .transport, mark: policy.mark,
            ifID: policy.ifID, direction: .outbound, lifetime: lifetime, crypto: nil, kmSequence: seq)
        config.pcpuNum = pcpu
        let larval = try! SecurityAssociation(config, addTime: self.clock.now)
        // A packet-offload policy's larval SA is offered to its device first (≈ xdo_dev_state_add with
        // XFRM_DEV_OFFLOAD_FLAG_ACQ); a device that refuses it leaves no larval SA and sends no ACQUIRE.
        if var o = offload {
            o.acquire = true
            guard let dev = self.device(ifindex: o.ifindex), dev.callbacks.contains(.stateAdd) else { return }
            do throws(DeviceError) {
                o.handle = try dev.stateAdd(larval, offload: o)
            } catch {
                return
            }
            larval.setOffload(o)
        }
        // km_query after the device add, as xfrm_state_find orders them: with no listener the larval SA goes,
        // from the device too.
        guard self.events.hasAcquireListeners else {
            self.releaseFromDevice(larval)
            return
        }
        self.states.insertLarval(larval)
        self.events.publish(.acquire(state: larval, template: template, policy: policy))
    }

    // MARK: - Input path

    /// Runs a received IP packet (from interface `ifindex`) through ESP decapsulation and the inbound policy check.
    public func input(_ packet: inout PacketBuffer, ifindex: Int32 = 0, mark: UInt32 = 0,
                      metadata: OffloadMetadata? = nil) -> InputResult {
        var decapsulated = false
        return self.input(&packet, ifindex: ifindex, mark: mark, metadata: metadata, decapsulated: &decapsulated)
    }

    /// `input`, also saying whether the delivered or forwarded packet came out of ESP (a non-empty secpath, or a
    /// packet-offload device's decryption): a daemon writes only those into its TUN.
    public func input(_ packet: inout PacketBuffer, ifindex: Int32 = 0, mark: UInt32 = 0,
                      metadata: OffloadMetadata? = nil, decapsulated: inout Bool) -> InputResult {
        var memo = InputMemo()
        return self.input(&packet, ifindex: ifindex, mark: mark, metadata: metadata, now: self.clock.now,
                          decapsulated: &decapsulated, memo: &memo)
    }

    /// `input` with what the previous packets of a batch looked up (outer destination, SA, inner verdict), reused
    /// while the configuration generation holds. `now`: the clock, read once per batch.
    func input(_ packet: inout PacketBuffer, ifindex: Int32, mark: UInt32, metadata: OffloadMetadata?, now: UInt64,
               decapsulated: inout Bool, memo: inout InputMemo) -> InputResult {
        decapsulated = false
        var secpath = SecPath()
        memo.validate(self.currentGeneration)
        var cryptoDone = metadata?.cryptoDone ?? false
        if let m = metadata, m.packetOffloaded {
            // Packet offload RX: the device decrypted, checked replay and its copy of the IN policy; the software
            // ESP and policy checks are skipped (≈ __xfrm_policy_check's PACKET branch). A failed status drops.
            guard m.cryptoDone && m.cryptoSuccess else {
                self.statistics.increment(.inError)
                return .dropped(.inError)
            }
            guard let flow = Flow.parse(packet.data, count: packet.count, mark: mark, ifindex: ifindex) else {
                self.statistics.increment(.inHdrError)
                return .dropped(.inHdrError)
            }
            decapsulated = true
            return self.network.isLocal(flow.destination) ? .deliver : self.forwardPrepare(&packet)
        }
        // A packet for another host is transit traffic whatever it carries (ESP, NAT-T, IKE, fragments): it goes
        // straight to the forward policy check, never to our SAD or NAT-T demux.
        // The outer destination's local interface, looked up once: it also serves the policy check of a packet
        // that turns out not to be ESP (its destination is the same).
        let outerLocal = Self.destination(of: packet).map { d -> Int32? in
            if let m = memo.outer, m.destination == d { return m.local }
            let local = self.network.localInterface(owning: d)
            memo.outer = (d, local)
            return local
        }
        if !cryptoDone, let outerLocal, outerLocal == nil {
            return self.policyCheck(&packet, secpath: secpath, ifindex: ifindex, mark: mark, now: now,
                                    localIfindex: .some(nil), memo: &memo)
        }
        while true {
            // After a decapsulation the header is the one the ESP transform verified or rewrote a moment ago.
            switch ESPClassification.classify(&packet, nattPort: self.nattPort.load(ordering: .relaxed),
                                              verifyChecksum: secpath.count == 0) {
            case .ike:
                return .ike
            case .drop(let reason):
                self.statistics.count(reason)
                return .dropped(reason == .nattKeepalive ? nil : XfrmStatCounter(reason))
            case .notESP:
                decapsulated = secpath.count > 0
                return self.policyCheck(&packet, secpath: secpath, ifindex: ifindex, mark: mark, now: now,
                                        localIfindex: secpath.count == 0 ? outerLocal : nil, memo: &memo)
            case .esp(let info):
                let id = SAID(destination: info.destination, spi: info.spi, proto: IPProtocolNumber.esp)
                let found: SecurityAssociation?
                if let m = memo.sa, m.id == id, m.mark == mark {
                    found = m.sa
                } else {
                    found = self.states.lookup(id, mark: mark)
                    memo.sa = found.map { (id, mark, $0) }
                }
                guard let sa = found else {
                    self.statistics.count(.noState)
                    return .dropped(.inNoStates)
                }
                // ≈ xfrm_input: the direction right after the lookup, then the state under the lock.
                if sa.config.direction == .outbound {
                    self.statistics.increment(.inStateDirError)
                    return .dropped(.inStateDirError)
                }
                guard let transform = sa.transform else {
                    // A larval SA (ALLOCSPI gave it this SPI; the key manager has not filled it in yet).
                    self.statistics.increment(.acquireError)
                    return .dropped(.acquireError)
                }
                let done = cryptoDone
                cryptoDone = false  // only the outermost ESP was handled by the device
                let tunnel = sa.config.mode == .tunnel
                // One acquisition of the SA's lock for the whole packet (≈ xfrm_input's x->lock section).
                let use = sa.useForInput(now: now, metadata: metadata, cryptoDone: done,
                                         screen: { transform.screen(info) }) {
                    let r = transform.decapsulate(&packet, info: info, cryptoDone: done)
                    // ≈ xfrm_input after x->type->input: curlft counts what ESP delivered — the inner packet in
                    // tunnel mode, the upper-layer payload in transport mode — not the outer ESP packet.
                    return (r, tunnel ? packet.count : packet.count - info.transportOffset)
                }
                switch use {
                case .packetOffloaded:
                    // A packet-offload SA is used only by its device, never in software (spec §7).
                    self.statistics.increment(.inStateInvalid)
                    return .dropped(.inStateInvalid)
                case .mismatch:
                    // The device decrypted with another SA than the one found here: trust nothing.
                    self.statistics.increment(.inStateMismatch)
                    return .dropped(.inStateMismatch)
                case .notValid(let larval):
                    self.statistics.increment(larval ? .acquireError : .inStateInvalid)
                    return .dropped(larval ? .acquireError : .inStateInvalid)
                case .hardExpired:
                    self.expireHard(sa)
                    self.statistics.increment(.inStateExpired)
                    return .dropped(.inStateExpired)
                case .deviceICVFailed(let soft):
                    // Crypto offload RX: the device found the ICV bad.
                    if soft { self.events.publish(.expire(sa, hard: false)) }
                    self.statistics.count(.icvFailed)
                    return .dropped(.inStateProtoError)
                case .used(let reason, let soft, let highMoved, let bound):
                    if soft { self.events.publish(.expire(sa, hard: false)) }
                    // ≈ xfrm_replay_advance_esn → xdo_dev_state_advance_esn: a crypto-offload device tracks the high
                    // half.
                    if done && highMoved && sa.config.esn, let o = bound, let dev = self.device(ifindex: o.ifindex),
                        dev.callbacks.contains(.advanceESN) {
                        dev.advanceESN(sa, offload: o)
                    }
                    if let reason {
                        self.statistics.count(reason)
                        return .dropped(reason == .tfcDummy ? nil : XfrmStatCounter(reason))
                    }
                }
                guard secpath.append(sa) else {
                    self.statistics.increment(.inBufferError)
                    return .dropped(.inBufferError)
                }
            }
        }
    }

    /// ≈ __xfrm_policy_check: the packet (after any decapsulation) must have come through the SAs its IN or FWD
    /// policy requires, and every one of those SAs must cover the inner flow with its selector.
    /// `localIfindex`, when known (.some), is the packet destination's local interface (nil: not local).
    private func policyCheck(_ packet: inout PacketBuffer, secpath: borrowing SecPath, ifindex: Int32, mark: UInt32,
                             now: UInt64, localIfindex known: Int32?? = nil, memo: inout InputMemo) -> InputResult {
        // After a decapsulation the inner IPv4 header was verified (tunnel mode) or rewritten with its checksum
        // (transport mode) by the ESP transform a moment ago: one checksum per header, as ip_rcv does.
        guard var flow = Flow.parse(packet.data, count: packet.count, mark: mark, ifindex: ifindex,
                                    verifyChecksum: secpath.count == 0)
        else {
            self.statistics.increment(.inHdrError)
            return .dropped(.inHdrError)
        }
        // The traffic's if_id is the innermost SA's (≈ xfrmi_decode_session finding the XFRM interface by
        // x->if_id); packets that came through no SA, or through SAs without an if_id, have if_id 0.
        if secpath.count > 0 { flow.ifID = secpath[secpath.count - 1].ifID }
        // A flow that came through one SA and was allowed before, in this configuration generation, is allowed
        // again without the lookups below (the verdict depends only on the flow, the SA and the configuration).
        let generation = memo.generation
        // The SA's identity as the tag: safe because an SA leaves the SAD only with a generation bump, so no entry
        // outlives it into a time when its address could belong to another SA.
        let cacheTag = secpath.count == 1 ? UInt(bitPattern: ObjectIdentifier(secpath[0])) : 0
        if cacheTag != 0, let m = memo.verdict, m.tag == cacheTag, m.flow.sameFlow(flow) {
            return m.decision.local ? .deliver : self.forwardPrepare(&packet)
        }
        if cacheTag != 0, let (hit, touch) = self.inputCache.lookup(flow, tag: cacheTag, generation: generation,
                                                                  now: now) {
            let d = hit.value
            if touch { self.policies.markUsed(index: d.policyIndex, direction: d.direction, at: now) }
            memo.verdict = (flow, cacheTag, d)
            return d.local ? .deliver : self.forwardPrepare(&packet)
        }
        let cacheKey = flow
        // ≈ decode_session's flowi_oif from skb_dst: a selector's `dev` is the device of the local route (the one
        // holding the address) for local traffic and the route's output device for forwarded traffic — for the
        // SA selectors below as for the policy lookup.
        let localIfindex = known ?? self.network.localInterface(owning: flow.destination)
        let local = localIfindex != nil
        flow.ifindex = localIfindex ?? self.network.egress(to: flow.destination)?.ifindex ?? 0
        // A peer may only inject traffic its SAs' selectors allow: without this, one SA's holder could send inner
        // addresses belonging to another SA whenever the policy is wider than the SA selectors.
        for i in 0..<secpath.count where !secpath[i].config.selector.covers(flow) {
            self.statistics.increment(.inStateMismatch)
            return .dropped(.inStateMismatch)
        }
        let direction: PolicyDirection = local ? .inbound : .forward
        // ≈ __xfrm_check_nopolicy: no policy in this direction and no secpath — the default decides, no lookup.
        let policy = secpath.count == 0 && self.policies.count(direction) == 0
            ? nil : self.policies.lookup(direction, flow, usedAt: now)
        guard let policy else {
            // No policy: with a blocking default the packet is XfrmInNoPols; otherwise a tunnel-mode SA in the
            // secpath still needs one (XfrmInNoPols), unless a crypto-offload device decrypted it.
            if self.defaultAction(direction) == .block {
                self.statistics.increment(.inNoPols)
                return .dropped(.inNoPols)
            }
            let cryptoOffloaded = secpath.count > 0 && secpath[secpath.count - 1].offload?.type == .crypto
            if !cryptoOffloaded && Self.nonTransport(secpath, from: 0) {
                self.statistics.increment(.inNoPols)
                return .dropped(.inNoPols)
            }
            return local ? .deliver : self.forwardPrepare(&packet)
        }
        if policy.action == .block {
            self.statistics.increment(.inPolBlock)
            return .dropped(.inPolBlock)
        }
        // Template check: templates are applied innermost first on output, so the secpath (outermost first) meets
        // them from the last template backwards (≈ the loop over xfrm_policy_ok in __xfrm_policy_check).
        var k = 0
        var t = policy.templates.count - 1
        while t >= 0 {
            guard let next = Self.templateConsumes(policy.templates[t], secpath, from: k, flow: flow) else {
                self.statistics.increment(.inTmplMismatch)
                return .dropped(.inTmplMismatch)
            }
            k = next
            t -= 1
        }
        // SAs the policy did not ask for: tunnel-mode ones are a mismatch (transport extras are tolerated).
        if Self.nonTransport(secpath, from: k) {
            self.statistics.increment(.inTmplMismatch)
            return .dropped(.inTmplMismatch)
        }
        if cacheTag != 0 {
            self.inputCache.store(
                InputCache.Entry(flow: cacheKey, tag: cacheTag, generation: generation,
                                 value: InputDecision(local: local, policyIndex: policy.index, direction: direction)),
                now: now)
        }
        return local ? .deliver : self.forwardPrepare(&packet)
    }

    /// ≈ xfrm_policy_ok: where the secpath check continues after template `t`, starting at entry `start`, or nil
    /// on a mismatch. An optional transport template consumes nothing; otherwise non-matching transport-mode
    /// entries are skipped until a matching entry (consumed) or a non-matching tunnel entry (a mismatch for a
    /// required template; an optional one then consumes nothing).
    static func templateConsumes(_ t: Template, _ sp: borrowing SecPath, from start: Int, flow: Flow) -> Int? {
        if t.optional && t.mode == 0 { return start }
        var i = start
        while i < sp.count {
            if Self.templateMatches(t, sp[i], flow: flow) { return i + 1 }
            if sp[i].config.mode != .transport { break }
            i += 1
        }
        return t.optional ? start : nil
    }

    /// ≈ secpath_has_nontransport: a tunnel-mode SA at or after `start`.
    static func nonTransport(_ sp: borrowing SecPath, from start: Int) -> Bool {
        var i = start
        while i < sp.count {
            if sp[i].config.mode != .transport { return true }
            i += 1
        }
        return false
    }

    /// The destination address of an IP packet, if its header is long enough to have one.
    @inline(__always)
    public static func destination(of packet: PacketBuffer) -> IPAddress? {
        let p = packet.data
        guard packet.count >= 20 else { return nil }
        switch p.loadByte(at: 0) >> 4 {
        case 4: return .loadV4(from: p, at: 16)
        case 6: return packet.count >= 40 ? .loadV6(from: p, at: 24) : nil
        default: return nil
        }
    }

    /// ≈ xfrm_state_ok: does this SA satisfy the template? (On input a template's reqid 0 matches any SA, and the
    /// SA's if_id must be the traffic's when the traffic has one.)
    static func templateMatches(_ t: Template, _ sa: SecurityAssociation, flow: Flow) -> Bool {
        let c = sa.config
        guard c.id.proto == t.proto, t.spi == 0 || t.spi == c.id.spi, t.reqid == 0 || t.reqid == c.reqid,
            c.mode == (t.mode == 1 ? .tunnel : .transport), flow.ifID == 0 || sa.ifID == flow.ifID
        else { return false }
        if c.mode == .tunnel {
            if let d = t.destination, d != c.id.destination { return false }
            if let s = t.source, s != c.source { return false }
        }
        return true
    }

    /// Forwarding: TTL / hop limit decrement (a packet at TTL 1 is dropped).
    private func forwardPrepare(_ packet: inout PacketBuffer) -> InputResult {
        let p = packet.data
        if p.loadByte(at: 0) >> 4 == 4 {
            let ttl = p.loadByte(at: 8)
            guard ttl > 1 else { return .dropped(nil) }
            IPv4Header.decrementTTL(p)
        } else {
            let hl = p.loadByte(at: 7)
            guard hl > 1 else { return .dropped(nil) }
            p.storeByte(hl - 1, at: 7)
        }
        return .forward
    }
}

/// What applying one SA of a bundle came to.
enum ApplyOutcome {
    /// Protected: go on with the next template.
    case next
    /// The packet's fate (a drop, an ICMP error).
    case done(OutputResult)
    /// A cached bundle's SA is no longer valid: resolve again.
    case stale
}

/// ICMPv6 checksum over the IPv6 pseudo-header (RFC 8200 §8.1).
enum ICMPv6 {
    static func checksum(_ p: UnsafeMutableRawPointer, length: Int, source: IPAddress, destination: IPAddress) -> UInt16 {
        var sum: UInt64 = 0
        if case .v6(let sh, let sl) = source, case .v6(let dh, let dl) = destination {
            sum = (sh >> 32) &+ (sh & 0xffff_ffff) &+ (sl >> 32) &+ (sl & 0xffff_ffff)
            sum &+= (dh >> 32) &+ (dh & 0xffff_ffff) &+ (dl >> 32) &+ (dl & 0xffff_ffff)
        }
        sum &+= UInt64(length) &+ UInt64(IPProtocolNumber.icmpv6)
        return InternetChecksum.finish(InternetChecksum.partial(p, count: length, initial: sum))
    }
}

/// `start + seconds`, saturating: a lifetime of 2^64 - 1 seconds never expires instead of trapping.
@inline(__always)
func deadline(_ start: UInt64, _ seconds: UInt64) -> UInt64 {
    let (sum, overflow) = start.addingReportingOverflow(seconds)
    return overflow ? .max : sum
}
