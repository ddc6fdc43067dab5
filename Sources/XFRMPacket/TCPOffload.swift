// TCP segmentation and coalescing for a TUN device with IFF_VNET_HDR (≈ what wireguard-go's tun/offload_linux.go
// does, written from the virtio spec and RFC 793/1071): the kernel hands the TUN reader 64 KB TCP "superpackets"
// with a virtio_net_hdr saying how to cut them (TSO), and accepts coalesced segments back (GRO), so neither side's
// TCP stack pays per 1,400-byte packet.

/// struct virtio_net_hdr (the 10-byte header before each packet on a TUN opened with IFF_VNET_HDR; host byte order,
/// little-endian here).
public struct VirtioNetHeader: Equatable, Sendable {
    public static let size = 10
    /// VIRTIO_NET_HDR_F_NEEDS_CSUM: the checksum at csumStart + csumOffset holds only the pseudo-header sum.
    public static let needsChecksum: UInt8 = 1
    public static let gsoNone: UInt8 = 0
    public static let gsoTCPv4: UInt8 = 1
    public static let gsoTCPv6: UInt8 = 4
    public static let gsoECN: UInt8 = 0x80

    public var flags: UInt8 = 0
    public var gsoType: UInt8 = 0
    public var headerLength: UInt16 = 0
    public var gsoSize: UInt16 = 0
    public var checksumStart: UInt16 = 0
    public var checksumOffset: UInt16 = 0

    public init() {}

    public init(from p: UnsafeRawPointer) {
        self.flags = p.load(fromByteOffset: 0, as: UInt8.self)
        self.gsoType = p.load(fromByteOffset: 1, as: UInt8.self)
        self.headerLength = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
        self.gsoSize = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt16.self))
        self.checksumStart = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 6, as: UInt16.self))
        self.checksumOffset = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt16.self))
    }

    public func store(to p: UnsafeMutableRawPointer) {
        p.storeBytes(of: self.flags, toByteOffset: 0, as: UInt8.self)
        p.storeBytes(of: self.gsoType, toByteOffset: 1, as: UInt8.self)
        p.storeBytes(of: self.headerLength.littleEndian, toByteOffset: 2, as: UInt16.self)
        p.storeBytes(of: self.gsoSize.littleEndian, toByteOffset: 4, as: UInt16.self)
        p.storeBytes(of: self.checksumStart.littleEndian, toByteOffset: 6, as: UInt16.self)
        p.storeBytes(of: self.checksumOffset.littleEndian, toByteOffset: 8, as: UInt16.self)
    }
}

public enum TCPOffload {
    /// One segment of a superpacket into `s`: the `headers` bytes of `p` (IP and transport), then `chunk` payload
    /// bytes from `offset`, with the IP length (and for IPv4 the ID and header checksum) made the segment's
    /// (≈ the IP part of inet_gso_segment / ipv6_gso_segment). Returns the segment's length; the transport header is
    /// the caller's to finish.
    @inline(__always)
    public static func writeSegment(_ s: UnsafeMutableRawPointer, from p: UnsafeRawPointer, headers: Int,
                                    ipHeader ip: Int, v4: Bool, offset: Int, chunk: Int, id: UInt16) -> Int {
        s.copyMemory(from: p, byteCount: headers)
        (s + headers).copyMemory(from: p + headers + offset, byteCount: chunk)
        let length = headers + chunk
        if v4 {
            s.storeBE16(UInt16(length), at: 2)
            s.storeBE16(id, at: 4)
            s.storeBE16(0, at: 10)
            s.storeBE16(InternetChecksum.compute(s, count: ip), at: 10)
        } else {
            s.storeBE16(UInt16(length - 40), at: 4)
        }
        return length
    }

    /// Why a packet from the TUN could not be used.
    public enum Failure: Error, Equatable { case malformed, unsupported }

    /// The IP and TCP header lengths of a TCP packet (IPv4 without fragments; IPv6 without extension headers, or
    /// with `extensions` also behind hop-by-hop and destination options headers), or nil.
    @inline(__always)
    static func tcpHeaders(_ p: UnsafeRawPointer, count: Int, extensions: Bool = false) -> (ip: Int, tcp: Int)? {
        guard count >= 20 else { return nil }
        let version = p.load(fromByteOffset: 0, as: UInt8.self) >> 4
        let ip: Int
        if version == 4 {
            ip = Int(p.load(fromByteOffset: 0, as: UInt8.self) & 0x0f) * 4
            guard ip >= 20, p.load(fromByteOffset: 9, as: UInt8.self) == 6,
                UInt16(bigEndian: p.loadUnaligned(fromByteOffset: 6, as: UInt16.self)) & 0x3fff == 0
            else { return nil }
        } else if version == 6 {
            guard let l = Self.ipv6HeaderLength(p, count: count, proto: 6, extensions: extensions) else { return nil }
            ip = l
        } else {
            return nil
        }
        guard count >= ip + 20 else { return nil }
        let tcp = Int(p.load(fromByteOffset: ip + 12, as: UInt8.self) >> 4) * 4
        guard tcp >= 20, count >= ip + tcp else { return nil }
        return (ip, tcp)
    }

    /// The length of an IPv6 header chain ending in `proto`: the fixed header alone, or with `extensions` also
    /// hop-by-hop and destination options headers before it (what a socket's IPV6_HOPOPTS / IPV6_DSTOPTS adds to
    /// each segment, ≈ ipv6_gso_segment walking them). A routing header is not taken: the transport checksum would
    /// cover its final destination, not the header's (RFC 8200 §8.1); nor is a fragment header.
    @inline(__always)
    static func ipv6HeaderLength(_ p: UnsafeRawPointer, count: Int, proto: UInt8, extensions: Bool) -> Int? {
        guard count >= 40 else { return nil }
        var next = p.load(fromByteOffset: 6, as: UInt8.self)
        var off = 40
        if extensions {
            var hops = 0
            while next == IPProtocolNumber.hopByHop || next == IPProtocolNumber.destinationOptions {
                hops += 1
                guard hops <= 8, off + 8 <= count else { return nil }
                if next == IPProtocolNumber.hopByHop && off != 40 { return nil }
                next = p.load(fromByteOffset: off, as: UInt8.self)
                off += (Int(p.load(fromByteOffset: off + 1, as: UInt8.self)) + 1) * 8
            }
        }
        return next == proto ? off : nil
    }

    /// The pseudo-header sum (RFC 793 / RFC 8200 §8.1) for `length` bytes of protocol `proto`, unfolded.
    @inline(__always)
    public static func pseudoHeader(_ p: UnsafeRawPointer, proto: UInt8, length: Int) -> UInt64 {
        let version = p.load(fromByteOffset: 0, as: UInt8.self) >> 4
        let addresses = version == 4 ? InternetChecksum.partial(p + 12, count: 8)
            : InternetChecksum.partial(p + 8, count: 32)
        return addresses &+ UInt64(proto) &+ UInt64(length)
    }

    /// Completes a checksum the kernel left partial (VIRTIO_NET_HDR_F_NEEDS_CSUM): the field holds the pseudo-header
    /// sum; the sum from `start` to the end, complemented, goes in its place.
    public static func completeChecksum(_ p: UnsafeMutableRawPointer, count: Int, start: Int, offset: Int)
        throws(Failure)
    {
        guard start >= 0, start + offset + 2 <= count else { throw .malformed }
        let sum = InternetChecksum.finish(InternetChecksum.partial(p + start, count: count - start))
        // UDP (the checksum 6 bytes in) cannot carry 0: it means "none" (RFC 768, RFC 8200 §8.1); send 0xffff.
        p.storeBE16(sum == 0 && offset == 6 ? 0xffff : sum, at: start + offset)
    }

    /// Cuts a TCP superpacket (`count` bytes at `p`, described by `header`) into segments of at most `gsoSize` payload
    /// bytes, each a whole IP packet with its own length, identification, sequence number, flags and complete
    /// checksums (≈ tcp_gso_segment + inet_gso_segment). Starts at payload offset `from` (a multiple of gsoSize: where
    /// an earlier call stopped) and emits at most `limit` segments; `emit(bytes, count)` gets each one in order, in
    /// `scratch` (valid only for the call). Returns the payload offset where it stopped (the payload length when done).
    public static func segment(_ p: UnsafeRawPointer, count: Int, header: VirtioNetHeader, from start: Int = 0,
                               limit: Int = .max, scratch: UnsafeMutableRawPointer, scratchSize: Int,
                               _ emit: (_ bytes: UnsafeRawPointer, _ count: Int) -> Void) throws(Failure) -> Int
    {
        guard let (ip, tcp) = Self.tcpHeaders(p, count: count, extensions: true) else { throw .unsupported }
        let headers = ip + tcp
        let mss = Int(header.gsoSize)
        guard mss > 0, headers + mss <= scratchSize else { throw .malformed }
        let payload = count - headers
        guard payload > 0 else { throw .malformed }
        let v4 = p.load(fromByteOffset: 0, as: UInt8.self) >> 4 == 4
        let firstID = v4 ? UInt16(bigEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt16.self)) : 0
        let firstSeq = UInt32(bigEndian: p.loadUnaligned(fromByteOffset: ip + 4, as: UInt32.self))
        let flags = p.load(fromByteOffset: ip + 13, as: UInt8.self)
        var offset = start
        var emitted = 0
        while offset < payload && emitted < limit {
            let n = offset / mss
            let chunk = min(mss, payload - offset)
            let last = offset + chunk == payload
            let s = scratch
            let length = TCPOffload.writeSegment(s, from: p, headers: headers, ipHeader: ip, v4: v4, offset: offset,
                                                 chunk: chunk, id: firstID &+ UInt16(truncatingIfNeeded: n))
            s.storeBE32(firstSeq &+ UInt32(truncatingIfNeeded: offset), at: ip + 4)
            var f = flags
            if !last { f &= ~0x09 }  // FIN and PSH only on the last segment
            if n > 0 { f &= ~0x80 }  // CWR only on the first
            s.storeBytes(of: f, toByteOffset: ip + 13, as: UInt8.self)
            s.storeBE16(0, at: ip + 16)
            let sum = Self.pseudoHeader(s, proto: 6, length: tcp + chunk)
            s.storeBE16(InternetChecksum.finish(InternetChecksum.partial(s + ip, count: tcp + chunk, initial: sum)),
                        at: ip + 16)
            emit(s, length)
            offset += chunk
            emitted += 1
        }
        return offset
    }

    /// Whether a TCP packet's checksums verify (the IPv4 header's and the TCP one with its pseudo-header): what a
    /// receiver checks before it merges segments (≈ skb_gro_checksum_validate), since the merged packet is handed
    /// on with its checksum marked partial and never checked again.
    public static func checksumsValid(_ p: UnsafeRawPointer, count: Int) -> Bool {
        guard let (ip, _) = Self.tcpHeaders(p, count: count) else { return false }
        if p.load(fromByteOffset: 0, as: UInt8.self) >> 4 == 4, InternetChecksum.compute(p, count: ip) != 0 {
            return false
        }
        let sum = Self.pseudoHeader(p, proto: 6, length: count - ip)
        return InternetChecksum.finish(InternetChecksum.partial(p + ip, count: count - ip, initial: sum)) == 0
    }

    /// The TCP flags byte of a packet `segment` accepts, or nil when it is not TCP.
    public static func flags(_ p: UnsafeRawPointer, count: Int) -> UInt8? {
        guard let (ip, _) = Self.tcpHeaders(p, count: count) else { return nil }
        return p.load(fromByteOffset: ip + 13, as: UInt8.self)
    }

    /// The TCP payload length of a packet `segment` accepts, or nil when it is not TCP.
    public static func payloadLength(_ p: UnsafeRawPointer, count: Int, extensions: Bool = false) -> Int? {
        guard let (ip, tcp) = Self.tcpHeaders(p, count: count, extensions: extensions) else { return nil }
        return count - ip - tcp
    }

    /// Whether `next` continues the run that starts with `first` (≈ the conditions of tcp_gro_receive): the same flow
    /// and headers apart from length, identification, checksums and sequence number; the next sequence number;
    /// ACK (PSH allowed on the last) only; every segment but the last exactly `segmentSize` bytes.
    public static func continues(first: UnsafeRawPointer, firstCount: Int, next: UnsafeRawPointer, nextCount: Int,
                                 runPayload: Int, segmentSize: Int, lastPayload: Int) -> Bool
    {
        guard let (ip, tcp) = Self.tcpHeaders(first, count: firstCount),
            let (ip2, tcp2) = Self.tcpHeaders(next, count: nextCount), ip == ip2, tcp == tcp2
        else { return false }
        let payload = nextCount - ip - tcp
        guard payload > 0, payload <= segmentSize, lastPayload == segmentSize,
            ip + tcp + runPayload + payload <= 65_535
        else { return false }
        if first.load(fromByteOffset: 0, as: UInt8.self) >> 4 == 4 {
            // Version/IHL and TOS; flags and fragment offset, TTL and protocol; the addresses (not the length,
            // identification or checksum). IPv4 options are never coalesced.
            guard ip == 20, memcmpEqual(first, next, 2), memcmpEqual(first + 6, next + 6, 4),
                memcmpEqual(first + 12, next + 12, 8)
            else { return false }
        } else {
            // Version, traffic class and flow label; next header and hop limit; the addresses.
            guard memcmpEqual(first, next, 4), memcmpEqual(first + 6, next + 6, 34) else { return false }
        }
        // Ports, acknowledgment, data offset, window, urgent pointer and options equal; flags ACK (| PSH on `next`).
        let firstFlags = first.load(fromByteOffset: ip + 13, as: UInt8.self)
        let nextFlags = next.load(fromByteOffset: ip + 13, as: UInt8.self)
        guard firstFlags == 0x10, nextFlags == 0x10 || nextFlags == 0x18,
            memcmpEqual(first + ip, next + ip, 4), memcmpEqual(first + ip + 8, next + ip + 8, 5),
            memcmpEqual(first + ip + 14, next + ip + 14, 2), memcmpEqual(first + ip + 18, next + ip + 18, tcp - 18)
        else { return false }
        let seq = UInt32(bigEndian: first.loadUnaligned(fromByteOffset: ip + 4, as: UInt32.self))
        let nextSeq = UInt32(bigEndian: next.loadUnaligned(fromByteOffset: ip + 4, as: UInt32.self))
        return nextSeq == seq &+ UInt32(runPayload)
    }

    /// Makes `first` (its headers) the head of a coalesced run of `totalPayload` bytes: fixes the IP length (and the
    /// IPv4 header checksum), puts the pseudo-header sum in the TCP checksum field, takes PSH from the last segment,
    /// and returns the virtio header for the TUN write (GSO TCPv4/v6 with NEEDS_CSUM).
    public static func finishRun(first: UnsafeMutableRawPointer, firstCount: Int, totalPayload: Int,
                                 segmentSize: Int, lastFlags: UInt8) -> VirtioNetHeader
    {
        let (ip, tcp) = Self.tcpHeaders(first, count: firstCount)!
        let total = ip + tcp + totalPayload
        let v4 = first.load(fromByteOffset: 0, as: UInt8.self) >> 4 == 4
        if v4 {
            first.storeBE16(UInt16(total), at: 2)
            first.storeBE16(0, at: 10)
            first.storeBE16(InternetChecksum.compute(first, count: ip), at: 10)
        } else {
            first.storeBE16(UInt16(total - 40), at: 4)
        }
        first.storeBytes(of: lastFlags, toByteOffset: ip + 13, as: UInt8.self)
        var s = Self.pseudoHeader(first, proto: 6, length: tcp + totalPayload)
        s = (s & 0xffff_ffff) &+ (s >> 32)
        s = (s & 0xffff) &+ (s >> 16)
        s = (s & 0xffff) &+ (s >> 16)
        first.storeBE16(UInt16(truncatingIfNeeded: s), at: ip + 16)
        var h = VirtioNetHeader()
        h.flags = VirtioNetHeader.needsChecksum
        h.gsoType = v4 ? VirtioNetHeader.gsoTCPv4 : VirtioNetHeader.gsoTCPv6
        h.headerLength = UInt16(ip + tcp)
        h.gsoSize = UInt16(segmentSize)
        h.checksumStart = UInt16(ip)
        h.checksumOffset = 16
        return h
    }

    @inline(__always)
    static func memcmpEqual(_ a: UnsafeRawPointer, _ b: UnsafeRawPointer, _ n: Int) -> Bool {
        var i = 0
        while i < n {
            if a.load(fromByteOffset: i, as: UInt8.self) != b.load(fromByteOffset: i, as: UInt8.self) { return false }
            i += 1
        }
        return true
    }
}
