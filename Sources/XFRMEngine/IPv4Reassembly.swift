import Synchronization
import XFRMPacket

/// Reassembly of IPv4 fragments from the wire before the stack sees them (≈ ip_defrag from ip_local_deliver: RFC
/// 4303 §3.4.1, an ESP packet is reassembled before ESP processing; RFC 791 §3.2). For hosts whose own IP layer is
/// the simulation (the kernel rules); a daemon's fragments are reassembled by the host's kernel before its sockets
/// see them.
///
/// As Linux does (net/ipv4/ip_fragment.c, inet_fragment.c):
/// - fragments are queued by (source, destination, identification, protocol) until the one without More Fragments
///   has come and no hole is left; then one packet is made: the first fragment's header with the total length, no
///   fragment bits and a fresh checksum, then every payload in order;
/// - a fragment that overlaps another discards the whole queue (RFC 5722's rule, which Linux applies to IPv4 too:
///   overlaps are how fragment attacks hide headers), one inside data already queued is a duplicate, dropped alone;
/// - a fragment other than the last is cut to a multiple of 8 bytes; an empty one discards the queue;
/// - the datagram's ECN is CE when any fragment was CE; Not-ECT mixed with ECT or CE drops it (RFC 3168 §5.3,
///   ip_frag_ecn_table); it keeps DF only when its largest fragment had it;
/// - a queue not complete within `timeout` seconds (ipfrag_time, 30) is discarded;
/// - bounded: at most `maxHeld` fragments held (≈ ipfrag_high_thresh): a fragment beyond that is dropped; a
///   datagram larger than a packet buffer or than 65,535 bytes is discarded.
/// Every fragment taken ends in a reassembled packet or in one of the counters (`IPv4ReassemblyCounters`).
/// A host's dispatchers share one (its own lock; only fragments ever take it).
public final class IPv4Reassembly: @unchecked Sendable {
    struct Key: Hashable {
        let source: UInt32
        let destination: UInt32
        let identification: UInt16
        let proto: UInt8
    }

    struct Piece {
        let offset: Int
        let end: Int
        /// Where its payload starts in its buffer (after its header).
        let payloadStart: Int
        let buffer: PacketBuffer
    }

    struct Queue {
        var pieces: [Piece] = []
        /// The datagram's payload length, once its last fragment came.
        var total: Int? = nil
        let created: UInt64
        /// The ECN codepoints seen (bit 1 << codepoint), for ip_frag_ecn_table.
        var ecn: UInt8 = 0
        /// The largest fragment, and the largest with DF (the datagram keeps DF only when the largest had it, as
        /// ip_frag_reasm's max_df_size).
        var maxSize = 0
        var maxDFSize = 0
    }

    private let pool: PacketPool
    public let counters: IPv4ReassemblyCounters
    /// Seconds a datagram may take to arrive whole.
    public let timeout: UInt64
    /// Fragments held at most, over all queues.
    public let maxHeld: Int
    /// Guards `queues` and `lastSweep`; `held` is changed under it too, and read without it.
    private let lock = XFRMMutex(())
    private var queues: [Key: Queue] = [:]
    private let held = Atomic<Int>(0)
    private var lastSweep: UInt64 = 0

    public init(pool: PacketPool, counters: IPv4ReassemblyCounters, timeout: UInt64 = 30, maxHeld: Int = 256) {
        self.pool = pool
        self.counters = counters
        self.timeout = timeout
        self.maxHeld = maxHeld
    }

    /// Fragments waiting (read without the lock).
    public var heldFragments: Int { self.held.load(ordering: .relaxed) }

    /// Whether the IPv4 packet in `buffer` is a fragment (More Fragments or an offset); false for anything else.
    @inline(__always)
    public static func isFragment(_ buffer: PacketBuffer) -> Bool {
        guard buffer.count >= 20 else { return false }
        let p = buffer.data
        return p.loadByte(at: 0) >> 4 == 4 && p.loadBE16(at: 6) & (IPv4Header.flagMF | IPv4Header.fragmentOffsetMask) != 0
    }

    /// Takes a fragment (its buffer now belongs to the reassembly): returns the whole packet when this fragment
    /// completed it, else nil (held, or dropped and counted).
    public func take(_ buffer: PacketBuffer, now: UInt64) -> PacketBuffer? {
        self.lock.withLock { _ in
            self.sweepLocked(now: now)
            return self.takeLocked(buffer, now: now)
        }
    }

    private func takeLocked(_ buffer: PacketBuffer, now: UInt64) -> PacketBuffer? {
        self.counters.required.wrappingAdd(1, ordering: .relaxed)
        var buffer = buffer
        let p = buffer.data
        guard let ip = IPv4Header.parse(p, available: buffer.count), ip.totalLength >= ip.headerLength else {
            return self.fail(buffer, queue: nil)  // a header that does not verify, or a total length past the bytes
        }
        // Bytes after the total length (a link layer's padding) are not the datagram's (≈ ip_rcv_core's trim).
        if buffer.count > ip.totalLength { buffer.trimBack(buffer.count - ip.totalLength) }
        let field = p.loadBE16(at: 6)
        let offset = Int(field & IPv4Header.fragmentOffsetMask) * 8
        let more = field & IPv4Header.flagMF != 0
        var end = offset + ip.totalLength - ip.headerLength
        let key = Key(source: p.loadBE32(at: 12), destination: p.loadBE32(at: 16),
                      identification: p.loadBE16(at: 4), proto: ip.proto)
        // ≈ ip_frag_queue: a fragment other than the last is cut to a multiple of 8 bytes; one past 65,535 bytes
        // or with nothing left discards the datagram.
        if more { end &= ~7 }
        guard end > offset, end <= 65_535 else { return self.fail(buffer, queue: key) }
        guard self.held.load(ordering: .relaxed) < self.maxHeld else {
            self.counters.failed.wrappingAdd(1, ordering: .relaxed)  // ≈ ipfrag_high_thresh: no room
            self.pool.release(buffer)
            return nil
        }
        var q = self.queues[key] ?? Queue(created: now)
        if !more {
            // The last fragment: a second last one that disagrees, or one before data already queued, is corrupt.
            if let t = q.total, t != end { return self.fail(buffer, queue: key) }
            if q.pieces.contains(where: { $0.end > end }) { return self.fail(buffer, queue: key) }
        } else if let t = q.total, end > t {
            return self.fail(buffer, queue: key)
        }
        // Inside what is queued already (a run of fragments): a duplicate, dropped alone; partly inside: an overlap,
        // which discards the datagram (inet_frag_queue_insert's IPFRAG_DUP and IPFRAG_OVERLAP).
        var covered = 0
        for piece in q.pieces where piece.offset < end && offset < piece.end {
            covered += min(end, piece.end) - max(offset, piece.offset)
        }
        if covered == end - offset {
            // A last fragment still says where the datagram ends (ip_frag_queue sets it before the insert finds
            // the duplicate): data said to lie past it later discards the datagram.
            if !more {
                q.total = end
                self.queues[key] = q
            }
            self.counters.duplicates.wrappingAdd(1, ordering: .relaxed)
            self.pool.release(buffer)
            return nil
        }
        if covered > 0 {
            self.counters.overlaps.wrappingAdd(1, ordering: .relaxed)
            return self.fail(buffer, queue: key)
        }
        if !more { q.total = end }
        q.ecn |= 1 << (p.loadByte(at: 1) & 0x03)
        let size = ip.headerLength + end - offset  // after the cut to 8 bytes (ip_frag_queue's fragsize)
        q.maxSize = max(q.maxSize, size)
        if field & IPv4Header.flagDF != 0 { q.maxDFSize = max(q.maxDFSize, size) }
        q.pieces.append(Piece(offset: offset, end: end, payloadStart: ip.headerLength, buffer: buffer))
        self.held.wrappingAdd(1, ordering: .relaxed)
        guard let total = q.total, Self.covered(q.pieces, total: total) else {
            self.queues[key] = q
            return nil
        }
        self.queues[key] = nil
        return self.build(q, total: total)
    }

    /// Whether the pieces cover 0..<total without a hole (they do not overlap).
    private static func covered(_ pieces: [Piece], total: Int) -> Bool {
        pieces.reduce(0) { $0 + ($1.end - $1.offset) } == total
    }

    /// The ECN codepoint the datagram gets from those its fragments carried, or nil when they mix Not-ECT with ECT
    /// or CE (ip_frag_ecn_table's 0xff: dropped); CE anywhere makes it CE (RFC 3168 §5.3).
    static func ecn(_ seen: UInt8) -> UInt8? {
        let notECT: UInt8 = 1 << 0, ect: UInt8 = 1 << 1 | 1 << 2, ce: UInt8 = 1 << 3
        if seen & notECT != 0 && seen & (ect | ce) != 0 { return nil }
        return seen & ce != 0 ? 0x03 : 0
    }

    /// The datagram from its pieces (their buffers released), or nil when it cannot be made.
    private func build(_ q: Queue, total: Int) -> PacketBuffer? {
        let pieces = q.pieces.sorted { $0.offset < $1.offset }
        defer {
            for piece in pieces { self.pool.release(piece.buffer) }
            self.held.wrappingSubtract(pieces.count, ordering: .relaxed)
        }
        let first = pieces[0].buffer
        let headerLength = pieces[0].payloadStart
        let ce = Self.ecn(q.ecn)
        // ≈ ip_frag_reasm's out_oversize (the first fragment's header plus the data past 65,535 bytes), an ECN
        // mix it refuses, no buffer or one too small.
        guard headerLength + total <= 65_535, ce != nil, var out = self.pool.allocate() else {
            self.counters.failed.wrappingAdd(UInt64(pieces.count), ordering: .relaxed)
            return nil
        }
        guard headerLength + total <= out.tailroom else {
            self.counters.failed.wrappingAdd(UInt64(pieces.count), ordering: .relaxed)
            self.pool.release(out)
            return nil
        }
        let h = out.append(headerLength + total)
        h.copyMemory(from: first.data, byteCount: headerLength)
        for piece in pieces {
            (h + headerLength + piece.offset).copyMemory(from: piece.buffer.data + piece.payloadStart,
                                                         byteCount: piece.end - piece.offset)
        }
        h.storeBE16(UInt16(headerLength + total), at: 2)
        h.storeBE16(q.maxDFSize == q.maxSize ? IPv4Header.flagDF : 0, at: 6)
        if ce == 0x03 { h.storeByte(h.loadByte(at: 1) | 0x03, at: 1) }
        IPv4Header.updateChecksum(h, headerLength: headerLength)
        self.counters.reassembled.wrappingAdd(1, ordering: .relaxed)
        self.counters.joined.wrappingAdd(UInt64(pieces.count), ordering: .relaxed)
        return out
    }

    /// Drops `buffer` and the queue `key` names (if any): every fragment in it counts as failed.
    private func fail(_ buffer: PacketBuffer, queue key: Key?) -> PacketBuffer? {
        self.counters.failed.wrappingAdd(1, ordering: .relaxed)
        self.pool.release(buffer)
        if let key, let q = self.queues.removeValue(forKey: key) { self.discard(q) }
        return nil
    }

    private func discard(_ q: Queue) {
        for piece in q.pieces { self.pool.release(piece.buffer) }
        self.held.wrappingSubtract(q.pieces.count, ordering: .relaxed)
        self.counters.failed.wrappingAdd(UInt64(q.pieces.count), ordering: .relaxed)
    }

    /// Discards the queues older than `timeout` (≈ ip_expire), at most once a second.
    public func sweep(now: UInt64) { self.lock.withLock { _ in self.sweepLocked(now: now) } }

    private func sweepLocked(now: UInt64) {
        guard now != self.lastSweep, !self.queues.isEmpty else { return }
        self.lastSweep = now
        for (key, q) in self.queues where now >= q.created + self.timeout {
            self.queues[key] = nil
            self.counters.timeouts.wrappingAdd(1, ordering: .relaxed)
            self.discard(q)
        }
    }

    /// Returns every held buffer to the pool (the dispatcher going away).
    public func releaseAll() {
        self.lock.withLock { _ in
            for q in self.queues.values { self.discard(q) }
            self.queues = [:]
        }
    }

    deinit { self.releaseAll() }
}

/// What reassembly did (≈ the Ip ReasmReqds, ReasmOKs, ReasmFails, ReasmTimeout and ReasmOverlaps of
/// /proc/net/snmp and netstat): fragments taken, datagrams made and the fragments joined into them, fragments dropped
/// (each counted once: a discarded queue counts all it held), queues timed out, overlaps, duplicates dropped. Every
/// fragment taken is joined, failed, a duplicate, or still held: required = joined + failed + duplicates + held.
public final class IPv4ReassemblyCounters: Sendable {
    public let required = Atomic<UInt64>(0)
    public let reassembled = Atomic<UInt64>(0)
    public let joined = Atomic<UInt64>(0)
    public let failed = Atomic<UInt64>(0)
    public let timeouts = Atomic<UInt64>(0)
    public let overlaps = Atomic<UInt64>(0)
    public let duplicates = Atomic<UInt64>(0)
    public init() {}
}
