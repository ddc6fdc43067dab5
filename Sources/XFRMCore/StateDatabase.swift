import Synchronization
import XFRMESP
import XFRMPacket


/// The Security Association Database (≈ the SAD half of net/xfrm/xfrm_state.c).
///
/// Lookups for input go by (destination, SPI, protocol) then mark; output resolution goes by template, flow and
/// reqid. Read-mostly: the data path takes the table lock only for the lookup itself; per-SA state has its own lock.
public final class StateDatabase: @unchecked Sendable {
    private struct Tables {
        /// The input lookup's table (≈ state_byspi): the SAs that have an SPI, by (SPI, protocol); the SAs of one
        /// chain differ in destination or mark. As in the kernel, a larval SA without an SPI is not in it (a `get`
        /// or `delete` of SPI 0 finds nothing), and an SPI is handed out only when no SA of the protocol holds it,
        /// whatever its destination (xfrm_alloc_spi's xfrm_state_lookup_spi_proto, Linux 6.18).
        var bySPI: [UInt64: SAChain] = [:]
        /// Every SA, oldest first (dumps walk it backwards: the kernel links new states at the list head). Sorted
        /// by generation; a removed SA leaves a nil (found by binary search, so deletes cost O(log n), not a scan and
        /// a shift of 100,000 entries), and the holes are squeezed out when they are half the array.
        var all: [(generation: UInt64, sa: SecurityAssociation?)] = []
        var holes = 0
        /// Linked SAs that may be larval acquire entries (no crypto; an SPI only if ALLOCSPI gave one): `add` looks
        /// for one to replace only when there is any, instead of scanning every SA on every add.
        var maybeLarval = 0
        var generation: UInt64 = 0
        /// Output resolution's index (≈ state_bydst).
        var output = StateOutputIndex()

        var count: Int { self.all.count - self.holes }
        var live: [SecurityAssociation] { self.all.compactMap(\.sa) }

        static func mayBeLarval(_ sa: SecurityAssociation) -> Bool { sa.config.crypto == nil }

        /// The newest linked SA `match` takes (the kernel's lists are newest first).
        func newest(_ match: (SecurityAssociation) -> Bool) -> SecurityAssociation? {
            for e in self.all.reversed() { if let x = e.sa, match(x) { return x } }
            return nil
        }

        @inline(__always)
        static func spiKey(_ spi: UInt32, _ proto: UInt8) -> UInt64 { UInt64(spi) &<< 8 | UInt64(proto) }

        /// The SAs for exactly this destination, SPI and protocol, newest first.
        @inline(__always)
        func chain(_ id: SAID) -> LazyFilterSequence<SAChain>? {
            self.bySPI[Self.spiKey(id.spi, id.proto)].map { $0.lazy.filter { $0.id.destination == id.destination } }
        }

        /// Links `sa` into every table (the input table only with an SPI).
        mutating func link(_ sa: SecurityAssociation) {
            if sa.id.spi != 0 { self.bySPI.link(sa, under: Self.spiKey(sa.id.spi, sa.id.proto)) }
            self.append(sa)
        }

        mutating func append(_ sa: SecurityAssociation) {
            self.all.append((sa.generation, sa))
            self.output.insert(sa)
            if Self.mayBeLarval(sa) { self.maybeLarval += 1 }
        }

        /// The position of this very SA in `all`, if linked (binary search on the generation).
        func position(of sa: SecurityAssociation) -> Int? {
            var lo = 0
            var hi = self.all.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if self.all[mid].generation < sa.generation { lo = mid + 1 } else { hi = mid }
            }
            return lo < self.all.count && self.all[lo].sa === sa ? lo : nil
        }

        mutating func removeFromAll(_ sa: SecurityAssociation) {
            guard let i = self.position(of: sa) else { return }
            self.all[i].sa = nil
            self.output.remove(sa)
            self.holes += 1
            if Self.mayBeLarval(sa) { self.maybeLarval -= 1 }
            if self.holes > 64 && self.holes * 2 > self.all.count {
                self.all.removeAll { $0.sa == nil }
                self.holes = 0
            }
        }
    }
    private let tables: XFRMMutex<Tables>
    private let changes = Atomic<UInt64>(0)
    /// How many linked SAs are bound to a CPU, readable without the lock (the output cache keys its entries by CPU
    /// only when there are any).
    private let perCPUCount: StateOutputIndex.PublishedCount

    public init() {
        let t = Tables()
        self.perCPUCount = t.output.published  // shared by reference with the index inside the lock
        self.tables = XFRMMutex(t)
    }

    /// Bumped on every change (cached output decisions are only valid within one generation).
    public var generation: UInt64 { self.changes.load(ordering: .acquiring) }

    @inline(__always) private func changed() { self.changes.wrappingAdd(1, ordering: .releasing) }

    /// Whether any SA is bound to a CPU (XFRMA_SA_PCPU): output decisions then depend on the CPU.
    public var hasPerCPUStates: Bool { self.perCPUCount.value.load(ordering: .relaxed) > 0 }

    /// Whether a per-CPU SA serves the tunnel to `destination` with this protocol and reqid (the engine then
    /// spreads the tunnel's flows over its workers).
    public func hasPerCPUStates(destination: IPAddress, proto: UInt8, reqid: UInt32) -> Bool {
        guard self.hasPerCPUStates else { return false }
        return self.tables.withLock {
            $0.output.hasPerCPU(StateOutputIndex.Target(destination: destination, reqid: reqid, proto: proto))
        }
    }

    public var count: Int { self.tables.withLock { $0.count } }


    /// Every SA in the kernel's dump order (newest first).
    public func list() -> [SecurityAssociation] { self.tables.withLock { Array($0.live.reversed()) } }

    /// ≈ xfrm_state_lookup: the SA for (destination, SPI, protocol) whose mark matches `mark`.
    @inline(__always)
    public func lookup(_ id: SAID, mark: UInt32 = 0) -> SecurityAssociation? {
        self.tables.withLock { t in
            guard let list = t.bySPI[Tables.spiKey(id.spi, id.proto)] else { return nil }
            for sa in list where sa.id.destination == id.destination && sa.config.mark.matches(mark) { return sa }
            return nil
        }
    }

    /// True when a stored SA with this id would take the new SA's traffic: its mark matches the new mark's
    /// value & mask (≈ __xfrm_state_locate in xfrm_state_add, the duplicate test of `add`).
    public func exists(_ id: SAID, mark: Mark) -> Bool {
        self.tables.withLock { $0.chain(id)?.contains { $0.config.mark.matches(mark.value & mark.mask) } ?? false }
    }

    /// The SA stored under exactly this id and mark value/mask.
    public func getExact(_ id: SAID, mark: Mark) -> SecurityAssociation? {
        self.tables.withLock { $0.chain(id)?.first { $0.config.mark == mark } }
    }

    /// The SA stored under exactly this id and mark value/mask (for delete/get/update, ≈ xfrm_user_state_lookup).
    public func get(_ id: SAID, mark: Mark) -> SecurityAssociation? {
        self.tables.withLock { t in
            t.chain(id)?.first { $0.config.mark == mark || $0.config.mark.matches(mark.value) }
        }
    }

    /// Adds an SA (≈ xfrm_state_add): EEXIST when (destination, SPI, protocol, mark) is taken. A larval entry
    /// created by an acquire for the same flow (same reqid, mode, protocol and addresses, SPI 0) or with the same
    /// key-manager sequence number is removed and returned.
    @discardableResult
    public func add(_ sa: SecurityAssociation) throws(StateDatabaseError) -> SecurityAssociation? {
        self.changed()
        defer { self.changed() }  // before and after: no lookup can straddle a change unnoticed
        return try self.tables.withLock { t throws(StateDatabaseError) -> SecurityAssociation? in
            let m = sa.config.mark
            if let list = t.chain(sa.id), list.contains(where: { $0.config.mark.matches(m.value & m.mask) }) {
                throw StateDatabaseError(17, "File exists")
            }
            let larval = Self.findLarval(&t, for: sa)
            if let larval { Self.unlink(&t, larval) }
            t.generation += 1
            sa.generation = t.generation
            t.link(sa)
            return larval
        }
    }

    /// The larval SA `add` replaces (≈ xfrm_state_add, Linux 6.13+): with a key-manager sequence number, the newest
    /// ACQUIRE-state SA of that number, mark and CPU (__xfrm_find_acq_byseq: whether or not ALLOCSPI gave it an SPI
    /// already), kept only when it is for the same protocol and destination; else the newest one without an SPI for
    /// the same mode, reqid, protocol, mark, CPU and addresses (__find_acq_core).
    private static func findLarval(_ t: inout Tables, for sa: SecurityAssociation) -> SecurityAssociation? {
        if t.maybeLarval == 0 { return nil }
        let c = sa.config
        let markValue = c.mark.value & c.mark.mask
        if c.kmSequence != 0,
            let x = t.newest({ x in
                x.state == .acquiring && x.config.kmSequence == c.kmSequence && x.config.mark.matches(markValue)
                    && x.config.pcpuNum == c.pcpuNum
            }), x.id.proto == c.id.proto && x.id.destination == c.id.destination
        {
            return x
        }
        return t.newest { x in
            x.state == .acquiring && x.id.spi == 0 && x.config.reqid == c.reqid && x.config.mode == c.mode
                && x.id.proto == c.id.proto && x.config.mark.matches(markValue) && x.config.pcpuNum == c.pcpuNum
                && x.id.destination == c.id.destination && x.config.source == c.source
        }
    }

    private static func unlink(_ t: inout Tables, _ sa: SecurityAssociation) {
        if sa.id.spi != 0 { t.bySPI.unlink(sa, under: Tables.spiKey(sa.id.spi, sa.id.proto)) }
        t.removeFromAll(sa)
        sa.markDead()
    }

    /// Replaces a larval (acquiring/allocspi) SA with a full one, or finds the valid one to update and checks that
    /// the update may apply (≈ xfrm_state_update; EINVAL when the encapsulation's presence or type changes). ESRCH
    /// when there is nothing to update. Returns the SA now in the database; the caller applies a valid SA's new
    /// limits and ports (`XFRMStack.updateState`).
    @discardableResult
    public func update(_ sa: SecurityAssociation) throws(StateDatabaseError) -> SecurityAssociation {
        self.changed()
        defer { self.changed() }  // before and after: no lookup can straddle a change unnoticed
        return try self.tables.withLock { t throws(StateDatabaseError) -> SecurityAssociation in
            guard let old = t.chain(sa.id)?.first(where: { $0.config.mark == sa.config.mark }) else {
                throw StateDatabaseError(3, "No such process")
            }
            if old.config.direction != sa.config.direction && old.state != .acquiring {
                throw StateDatabaseError(3, "No such process")
            }
            if old.state == .expired || old.state == .dead {
                throw StateDatabaseError(22, "Invalid argument")  // ≈ xfrm_state_update on a dying entry: EINVAL
            }
            if old.state == .acquiring {
                Self.unlink(&t, old)
                t.generation += 1
                sa.generation = t.generation
                t.link(sa)
                return sa
            }
            // ≈ xfrm_state_update: the encapsulation may change its ports, never its presence or type.
            switch (old.encapsulation, sa.encapsulation) {
            case (nil, nil): break
            case (.some, .some) where old.config.encapsulationType == sa.config.encapsulationType: break
            default: throw StateDatabaseError(22, "Invalid argument")
            }
            return old
        }
    }

    /// Deletes the SA (≈ __xfrm_state_delete). ESRCH when absent.
    @discardableResult
    public func delete(_ id: SAID, mark: Mark) throws(StateDatabaseError) -> SecurityAssociation {
        self.changed()
        defer { self.changed() }  // before and after: no lookup can straddle a change unnoticed
        return try self.tables.withLock { t throws(StateDatabaseError) -> SecurityAssociation in
            guard let sa = t.chain(id)?.first(where: { $0.config.mark == mark || $0.config.mark.matches(mark.value) })
            else { throw StateDatabaseError(3, "No such process") }
            Self.unlink(&t, sa)
            return sa
        }
    }

    /// Removes a specific SA object if it is still present; returns whether it was.
    @discardableResult
    public func remove(_ sa: SecurityAssociation) -> Bool {
        self.changed()
        defer { self.changed() }  // before and after: no lookup can straddle a change unnoticed
        return self.tables.withLock { t in
            guard t.position(of: sa) != nil else { return false }
            Self.unlink(&t, sa)
            return true
        }
    }

    /// Removes every SA `matching` selects (protocol flush, device flush); returns them.
    @discardableResult
    public func flush(where matching: (SecurityAssociation) -> Bool) -> [SecurityAssociation] {
        self.changed()
        defer { self.changed() }  // before and after: no lookup can straddle a change unnoticed
        return self.tables.withLock { t in
            let gone = t.live.filter(matching)
            for sa in gone { Self.unlink(&t, sa) }
            return gone
        }
    }

    /// Inserts a larval SA (acquire or allocspi) without the duplicate rules of `add`.
    func insertLarval(_ sa: SecurityAssociation) {
        self.changed()
        defer { self.changed() }  // before and after: no lookup can straddle a change unnoticed
        return self.tables.withLock { t in
            t.generation += 1
            sa.generation = t.generation
            t.link(sa)
        }
    }

    /// ≈ xfrm_alloc_userspi (Linux 6.18) once the request is checked. The SA that gets the SPI is the larval SA an
    /// ACQUIRE made with sequence number `seq`, if that is not 0 and it goes to the same destination
    /// (xfrm_find_acq_byseq, its mark matching the request's); else a larval SA without an SPI for the same mode,
    /// reqid, protocol, addresses, mark, if_id and CPU (xfrm_find_acq, which may be an ACQUIRE's: it keeps its flow
    /// selector and sequence number); else `fresh`, linked now — and left in place, as the kernel leaves it, when no
    /// SPI is found. An SA that has its SPI already keeps it. The SPI is `min` when `min == max`, else random in the
    /// range (a draw of 0 fails the request), and must be held by no SA of the protocol (ENOENT "No SPI available in the requested range").
    /// The chosen SA takes `direction` when one is given (XFRMA_SA_DIR). An SA's configuration is immutable, so the
    /// larval SA is replaced by an equal one with the SPI (same add time and place in the dump order); `replaced` is
    /// the old object when that happened (the caller moves a device binding across).
    func allocateSPI(_ fresh: SecurityAssociation, seq: UInt32, direction: SADirection?, min: UInt32, max: UInt32)
        throws(StateDatabaseError) -> (sa: SecurityAssociation, replaced: SecurityAssociation?)
    {
        self.changed()
        defer { self.changed() }  // before and after: no lookup can straddle a change unnoticed
        return try self.tables.withLock { t throws(StateDatabaseError) -> (SecurityAssociation, SecurityAssociation?) in
            let c = fresh.config
            let markValue = c.mark.value & c.mark.mask
            var target: SecurityAssociation? = nil
            if seq != 0 {
                target = t.newest { x in
                    x.config.kmSequence == seq && x.config.mark.matches(markValue) && x.state == .acquiring
                        && x.config.pcpuNum == c.pcpuNum  // Linux 6.13+: the CPU too
                }
                if let x = target, x.id.destination != c.id.destination { target = nil }
            }
            if target == nil {
                target = t.newest { x in
                    x.state == .acquiring && x.id.spi == 0 && x.config.reqid == c.reqid && x.config.mode == c.mode
                        && x.id.proto == c.id.proto && x.config.mark.matches(markValue)
                        && x.config.pcpuNum == c.pcpuNum && x.config.ifID == c.ifID
                        && x.id.destination == c.id.destination && x.config.source == c.source
                }
            }
            let larval: SecurityAssociation
            if let target {
                larval = target
            } else {
                t.generation += 1
                fresh.generation = t.generation
                t.link(fresh)
                larval = fresh
            }
            let proto = larval.id.proto
            var spi = larval.id.spi
            if spi == 0 {
                let span = UInt64(max) - UInt64(min) + 1
                var tries: UInt64 = 0
                while tries < Swift.min(span, 65536) {
                    // Random, as xfrm_alloc_spi's get_random_u32_inclusive: two hosts (or daemons) asking in the
                    // same second must not get the same SPI, and nobody may predict the next one.
                    let candidate = span == 1 ? min : UInt32(truncatingIfNeeded: UInt64(min) + UInt64.random(in: 0..<span))
                    // SPI 0 is no SPI: drawing it ends the search unanswered, as in the kernel (whose loop takes
                    // the first free draw, and 0 is always free).
                    if candidate == 0 { break }
                    if t.bySPI[Tables.spiKey(candidate, proto)] == nil {
                        spi = candidate
                        break
                    }
                    tries += 1
                    if span == 1 { break }
                }
                guard spi != 0 else {
                    throw StateDatabaseError(2, "No SPI available in the requested range")  // ENOENT
                }
            }
            let newDirection = direction ?? larval.config.direction
            if spi == larval.id.spi && newDirection == larval.config.direction { return (larval, nil) }
            var config = larval.currentConfig
            config.id.spi = spi
            config.direction = newDirection
            let sa = try! SecurityAssociation(config, addTime: larval.current.addTime)
            sa.generation = larval.generation
            if let i = t.position(of: larval) {
                t.all[i].sa = sa
                t.output.remove(larval)
                t.output.insert(sa)
                if Tables.mayBeLarval(larval) { t.maybeLarval -= 1 }
                if Tables.mayBeLarval(sa) { t.maybeLarval += 1 }
            }
            if larval.id.spi != 0 { t.bySPI.unlink(larval, under: Tables.spiKey(larval.id.spi, proto)) }
            t.bySPI.link(sa, under: Tables.spiKey(spi, proto))
            larval.markDead()
            return (sa, larval)
        }
    }

    /// The outcome of output SA resolution for one template.
    public enum Resolution: Sendable {
        case found(SecurityAssociation)
        /// The policy asks for an SA per CPU (XFRM_POLICY_CPU_ACQUIRE) and none serves this CPU yet: this SA carries
        /// the packet, and the caller asks the key manager for the CPU's own (≈ xfrm_state_find's "fallback").
        case fallback(SecurityAssociation)
        /// An acquire is already pending for this template and flow.
        case acquiring
        case none
    }

    /// ≈ xfrm_state_find: a valid SA for `template` and `flow`, preferring a non-dying one, then the newest.
    /// Outbound-direction or undirected SAs only. As the kernel compares them: the template's reqid exactly (0
    /// matches only 0), the SA's mark against `policyMark` (the policy's value & mask, not the packet's mark), the
    /// SA's if_id equal to the policy's; an SA whose source is the wildcard address is taken only when no SA has
    /// the exact source (the kernel's second, wildcard pass). Runs on CPU 0 (see `resolve(_:)`).
    @inline(__always)
    public func resolve(_ template: Template, flow: Flow, source: IPAddress, destination: IPAddress,
                        policyMark: UInt32, ifID: UInt32 = 0, packetOffloadDevice: Int32? = nil) -> Resolution {
        self.resolve(StateQuery(template: template, flow: flow, source: source, destination: destination,
                                policyMark: policyMark, ifID: ifID, packetOffloadDevice: packetOffloadDevice))
    }

    /// ≈ xfrm_state_find over the `state_bydst` chains: the SAs for exactly (destination, source, reqid,
    /// protocol), then those with the wildcard source; per-CPU SAs as in Linux 6.13 (`ResolutionScan`).
    public func resolve(_ q: StateQuery) -> Resolution {
        let exactKey = StateOutputIndex.key(destination: q.destination, source: q.source, reqid: q.template.reqid,
                                            proto: q.template.proto)
        let wildcardSource: IPAddress = q.source.version == 4 ? .v4(0) : .v6(0, 0)
        let wildcardKey = StateOutputIndex.key(destination: q.destination, source: wildcardSource,
                                               reqid: q.template.reqid, proto: q.template.proto)
        return self.tables.withLock { t in
            var scan = ResolutionScan(q, perCPUPossible: t.output.perCPU > 0)
            if t.output.visit(exactKey, { scan.look(at: $0, exactSource: true) }) { return scan.result }
            if !q.source.isUnspecified {
                _ = t.output.visit(wildcardKey) { sa in
                    _ = scan.look(at: sa, exactSource: false)
                    return false
                }
            }
            return scan.result
        }
    }
}
