import Synchronization
import XFRMPacket

/// Reassembly of IPv4 — and IPv6 (RFC 8200 §4.5, ≈ ipv6_frag_rcv: the rules below but DF, and 60 s) — fragments
/// from the wire before the stack sees them (≈ ip_defrag from ip_local_deliver: RFC
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
    /// IPv4: (source, destination, identification, protocol); IPv6: (source, destination, identification), as
    /// frag_v6_compare_key.
    struct Key: Hashable {
        let source: IPAddress
        let destination: IPAddress
        let identification: UInt32
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
        /// IPv6: the first fragment's unfragmentable part and the offset of the Next Header byte that named the
        /// Fragment header, and the type the Fragment header names (the datagram's header chain is the first
        /// fragment's, with the Fragment header taken out).
        var unfragmentable = 0
        var nextHeaderOffset = 0
        var nextHeader: UInt8 = 0
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

    /// Seconds an IPv6 datagram may take (ip6frag_time, 60).
    public let timeout6: UInt64

    public init(pool: PacketPool, counters: IPv4ReassemblyCounters, timeout: UInt64 = 30, timeout6: UInt64 = 60,
                maxHeld: Int = 256) {
        self.pool = pool
        self.counters = counters
        self.timeout = timeout
        self.timeout6 = timeout6
        self.maxHeld = maxHeld
    }

    /// Fragments waiting (read without the lock).
    public var heldFragments: Int { self.held.load(ordering: .relaxed) }

    /// Whether the packet in `buffer` is a fragment: IPv4 with More Fragments or an offset, or IPv6 with a Fragment
    /// header right after its header or its Hop-by-Hop, Routing or Destination Options headers; false for anything
    /// else.
    @inline(__always)
    public static func isFragment(_ buffer: PacketBuffer) -> Bool {
        guard buffer.count >= 20 else { return false }
        let p = buffer.data
        switch p.loadByte(at: 0) >> 4 {
        case 4: return p.loadBE16(at: 6) & (IPv4Header.flagMF | IPv4Header.fragmentOffsetMask) != 0
        case 6: return buffer.count >= 48 && Self.fragmentHeader6(p, count: buffer.count) != nil
        default: return false
        }
    }

    /// Where an IPv6 packet's Fragment header is, and the offset of the Next Header byte naming it: after the IPv6
    /// header and any Hop-by-Hop, Routing or Destination Options headers (ipv6_frag_rcv sees it as the next header
    /// to handle); nil when there is none or the chain runs past the packet.
    static func fragmentHeader6(_ p: UnsafeMutableRawPointer, count: Int) -> (at: Int, nextOffset: Int)? {
        var offset = 40
        var nextOffset = 6
        while true {
            switch p.loadByte(at: nextOffset) {
            case IPv6Fragmentation.fragmentHeader:
                return offset + IPv6Fragmentation.headerSize <= count ? (offset, nextOffset) : nil
            case 0, 43, 60:
                guard offset + 8 <= count else { return nil }
                nextOffset = offset
                offset += 8 + 8 * Int(p.loadByte(at: offset + 1))
            default:
                return nil
            }
        }
    }

    /// Takes a fragment (its buffer now belongs to the reassembly): returns the whole packet when this fragment
    /// completed it, else nil (held, or dropped and counted).
    public func take(_ buffer: PacketBuffer, now: UInt64) -> PacketBuffer? {
        self.lock.withLock { _ in
            self.sweepLocked(now: now)
            return self.takeLocked(buffer, now: now)
        }
    }

    /// What one fragment says: its datagram, where its data goes, where that data starts in its buffer.
    private struct Fragment {
        let key: Key
        let offset: Int
        var end: Int
        let more: Bool
        let payloadStart: Int
        let dontFragment: Bool
        let ecn: UInt8
    }

    /// An IPv4 fragment's fields (the buffer trimmed to its total length), or nil for a header that does not verify.
    private static func parse4(_ buffer: inout PacketBuffer) -> Fragment? {
        let p = buffer.data
        guard let ip = IPv4Header.parse(p, available: buffer.count), ip.totalLength >= ip.headerLength else {
            return nil  // a header that does not verify, or a total length past the bytes
        }
        // Bytes after the total length (a link layer's padding) are not the datagram's (≈ ip_rcv_core's trim).
        if buffer.count > ip.totalLength { buffer.trimBack(buffer.count - ip.totalLength) }
        let field = p.loadBE16(at: 6)
        let offset = Int(field & IPv4Header.fragmentOffsetMask) * 8
        let more = field & IPv4Header.flagMF != 0
        var end = offset + ip.totalLength - ip.headerLength
        // ≈ ip_frag_queue: a fragment other than the last is cut to a multiple of 8 bytes.
        if more { end &= ~7 }
        return Fragment(key: Key(source: .loadV4(from: p, at: 12), destination: .loadV4(from: p, at: 16),
                                 identification: UInt32(p.loadBE16(at: 4)), proto: ip.proto),
                        offset: offset, end: end, more: more, payloadStart: ip.headerLength,
                        dontFragment: field & IPv4Header.flagDF != 0, ecn: p.loadByte(at: 1) & 0x03)
    }

    /// An IPv6 fragment's fields (the buffer trimmed to its payload length) and where its Fragment header is, or nil
    /// for one ipv6_frag_rcv refuses: a payload length past the bytes, or a fragment other than the last whose data
    /// is not a multiple of 8 bytes (RFC 8200 §4.5; Linux answers it with a Parameter Problem).
    private static func parse6(_ buffer: inout PacketBuffer) -> (Fragment, at: Int, nextOffset: Int)? {
        let p = buffer.data
        let length = 40 + Int(p.loadBE16(at: 4))
        guard length <= buffer.count else { return nil }
        if buffer.count > length { buffer.trimBack(buffer.count - length) }
        guard let (at, nextOffset) = Self.fragmentHeader6(p, count: buffer.count) else { return nil }
        let field = p.loadBE16(at: at + 2)
        let offset = Int(field & 0xfff8)
        let more = field & 1 != 0
        let start = at + IPv6Fragmentation.headerSize
        let end = offset + buffer.count - start
        if more && (end - offset) & 7 != 0 { return nil }
        let key = Key(source: .loadV6(from: p, at: 8), destination: .loadV6(from: p, at: 24),
                      identification: p.loadBE32(at: at + 4), proto: 0)
        let ecn = UInt8(truncatingIfNeeded: p.loadBE16(at: 0) >> 4) & 0x03
        return (Fragment(key: key, offset: offset, end: end, more: more, payloadStart: start, dontFragment: false,
                         ecn: ecn), at, nextOffset)
    }

    private func takeLocked(_ buffer: PacketBuffer, now: UInt64) -> PacketBuffer? {
        self.counters.required.wrappingAdd(1, ordering: .relaxed)
        var buffer = buffer
        let p = buffer.data
        let v6 = p.loadByte(at: 0) >> 4 == 6
        var header6: (at: Int, nextOffset: Int)? = nil
        let parsed: Fragment?
        if v6, let (f, at, nextOffset) = Self.parse6(&buffer) {
            parsed = f
            header6 = (at, nextOffset)
        } else {
            parsed = v6 ? nil : Self.parse4(&buffer)
        }
        guard let f = parsed else { return self.fail(buffer, queue: nil) }
        let (key, offset, end, more) = (f.key, f.offset, f.end, f.more)
        // An IPv6 fragment that is the whole datagram (an atomic fragment, RFC 6946) is handled on its own, in no
        // queue: its Fragment header goes and it goes on.
        if let h = header6, offset == 0 && !more {
            self.counters.reassembled.wrappingAdd(1, ordering: .relaxed)
            self.counters.joined.wrappingAdd(1, ordering: .relaxed)
            Self.removeFragmentHeader(&buffer, at: h.at, nextOffset: h.nextOffset)
            return buffer
        }
        // One past 65,535 bytes or with nothing left discards the datagram (ip_frag_queue); for IPv6 such a
        // fragment is dropped alone, as ip6_frag_queue does (answering it with a Parameter Problem).
        if v6 && end > 65_535 { return self.fail(buffer, queue: nil) }
        guard end > offset, end <= 65_535 else { return self.fail(buffer, queue: key) }
        guard self.held.load(ordering: .relaxed) < self.maxHeld else {
            self.counters.failed.wrappingAdd(1, ordering: .relaxed)  // ≈ ipfrag_high_thresh: no room
            self.pool.release(buffer)
            return nil
        }
        var q = self.queues[key] ?? Queue(created: now)
        if let h = header6, offset == 0 {
            q.unfragmentable = h.at
            q.nextHeaderOffset = h.nextOffset
            q.nextHeader = p.loadByte(at: h.at)
        }
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
        q.ecn |= 1 << f.ecn
        let size = f.payloadStart + end - offset  // after the cut to 8 bytes (ip_frag_queue's fragsize)
        q.maxSize = max(q.maxSize, size)
        if f.dontFragment { q.maxDFSize = max(q.maxDFSize, size) }
        q.pieces.append(Piece(offset: offset, end: end, payloadStart: f.payloadStart, buffer: buffer))
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
        let v6 = first.data.loadByte(at: 0) >> 4 == 6
        // IPv6: the first fragment's header chain less its Fragment header.
        let headerLength = v6 ? q.unfragmentable : pieces[0].payloadStart
        let ce = Self.ecn(q.ecn)
        // ≈ ip_frag_reasm's out_oversize (the first fragment's header plus the data past 65,535 bytes), an ECN
        // mix it refuses, no buffer or one too small.
        // (IPv6: the payload length after the header, ip6_frag_reasm's IPV6_MAXPLEN check.)
        guard (v6 ? headerLength - 40 : headerLength) + total <= 65_535, ce != nil, var out = self.pool.allocate()
        else {
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
        if v6 {
            // ≈ ip6_frag_reasm: the payload length covers what follows the header, the Next Header byte that named
            // the Fragment header names what it named.
            h.storeBE16(UInt16(headerLength - 40 + total), at: 4)
            h.storeByte(q.nextHeader, at: q.nextHeaderOffset)
            if ce == 0x03 { h.storeByte(h.loadByte(at: 1) | 0x30, at: 1) }  // ECN: the traffic class's low bits
        } else {
            h.storeBE16(UInt16(headerLength + total), at: 2)
            h.storeBE16(q.maxDFSize == q.maxSize ? IPv4Header.flagDF : 0, at: 6)
            if ce == 0x03 { h.storeByte(h.loadByte(at: 1) | 0x03, at: 1) }
            IPv4Header.updateChecksum(h, headerLength: headerLength)
        }
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
        for (key, q) in self.queues where now >= q.created + (key.source.version == 6 ? self.timeout6 : self.timeout) {
            self.queues[key] = nil
            self.counters.timeouts.wrappingAdd(1, ordering: .relaxed)
            self.discard(q)
        }
    }

    /// Takes an atomic fragment's Fragment header out, in place: what is in front of it moves 8 bytes back.
    private static func removeFragmentHeader(_ buffer: inout PacketBuffer, at: Int, nextOffset: Int) {
        let p = buffer.data
        let next = p.loadByte(at: at)
        p.storeByte(next, at: nextOffset)
        p.storeBE16(p.loadBE16(at: 4) - UInt16(IPv6Fragmentation.headerSize), at: 4)
        (p + IPv6Fragmentation.headerSize).copyMemory(from: p, byteCount: at)  // overlapping: memmove
        buffer.trimFront(IPv6Fragmentation.headerSize)
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
