// UDP segmentation and coalescing for a TUN device with IFF_VNET_HDR and TUN_F_USO4/USO6 (kernel 6.2+): the kernel
// hands the TUN reader UDP "superpackets" (a UDP_SEGMENT send routed into the TUN) with a virtio_net_hdr of type
// VIRTIO_NET_HDR_GSO_UDP_L4, and takes coalesced datagrams back the same way. Written from RFC 768, RFC 8200 §8.1
// and the kernel's __udp_gso_segment / udp_gro_receive_segment (what wireguard-go's tun/offload_linux.go also does).

extension VirtioNetHeader {
    /// VIRTIO_NET_HDR_GSO_UDP_L4: cut the payload after the UDP header into gsoSize datagrams (the last may be shorter).
    public static let gsoUDPL4: UInt8 = 5
}

public enum UDPOffload {
    /// The IP header length of a UDP packet (IPv4 without fragments; IPv6 without extension headers, or with
    /// `extensions` behind hop-by-hop and destination options), or nil.
    @inline(__always)
    static func ipHeaderLength(_ p: UnsafeRawPointer, count: Int, extensions: Bool = false) -> Int? {
        guard count >= 28 else { return nil }
        let version = p.load(fromByteOffset: 0, as: UInt8.self) >> 4
        if version == 4 {
            let ip = Int(p.load(fromByteOffset: 0, as: UInt8.self) & 0x0f) * 4
            guard ip >= 20, count >= ip + 8, p.load(fromByteOffset: 9, as: UInt8.self) == 17,
                UInt16(bigEndian: p.loadUnaligned(fromByteOffset: 6, as: UInt16.self)) & 0x3fff == 0
            else { return nil }
            return ip
        }
        guard version == 6, let ip = TCPOffload.ipv6HeaderLength(p, count: count, proto: 17, extensions: extensions),
            count >= ip + 8
        else { return nil }
        return ip
    }

    /// The UDP payload length of a packet `ipHeaderLength` accepts, or nil when it is not UDP.
    public static func payloadLength(_ p: UnsafeRawPointer, count: Int, extensions: Bool = false) -> Int? {
        guard let ip = Self.ipHeaderLength(p, count: count, extensions: extensions) else { return nil }
        return count - ip - 8
    }

    /// Cuts a UDP superpacket (`count` bytes at `p`, described by `header`) into datagrams of at most `gsoSize`
    /// payload bytes, each a whole IP packet with its own IP length (IPv4: identification counting up from the
    /// superpacket's and a header checksum, as inet_gso_segment does), UDP length and complete UDP checksum
    /// (≈ __udp_gso_segment). Starts at payload offset `from` (a multiple of gsoSize) and emits at most `limit`
    /// datagrams to `emit(bytes, count)`, in `scratch` (valid only for the call). Returns the payload offset where
    /// it stopped (the payload length when done).
    public static func segment(_ p: UnsafeRawPointer, count: Int, header: VirtioNetHeader, from start: Int = 0,
                               limit: Int = .max, scratch: UnsafeMutableRawPointer, scratchSize: Int,
                               _ emit: (_ bytes: UnsafeRawPointer, _ count: Int) -> Void) throws(TCPOffload.Failure)
        -> Int
    {
        guard let ip = Self.ipHeaderLength(p, count: count, extensions: true) else { throw .unsupported }
        let headers = ip + 8
        let size = Int(header.gsoSize)
        guard size > 0, headers + size <= scratchSize, start % size == 0 else { throw .malformed }
        let payload = count - headers
        guard payload > 0 else { throw .malformed }
        let v4 = p.load(fromByteOffset: 0, as: UInt8.self) >> 4 == 4
        let firstID = v4 ? UInt16(bigEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt16.self)) : 0
        var offset = start
        var emitted = 0
        while offset < payload && emitted < limit {
            let n = offset / size
            let chunk = min(size, payload - offset)
            let s = scratch
            let length = TCPOffload.writeSegment(s, from: p, headers: headers, ipHeader: ip, v4: v4, offset: offset,
                                                 chunk: chunk, id: firstID &+ UInt16(truncatingIfNeeded: n))
            s.storeBE16(UInt16(8 + chunk), at: ip + 4)
            s.storeBE16(0, at: ip + 6)
            let sum = TCPOffload.pseudoHeader(s, proto: 17, length: 8 + chunk)
            let c = InternetChecksum.finish(InternetChecksum.partial(s + ip, count: 8 + chunk, initial: sum))
            s.storeBE16(c == 0 ? 0xffff : c, at: ip + 6)  // 0 means "no checksum" (RFC 768)
            emit(s, length)
            offset += chunk
            emitted += 1
        }
        return offset
    }

    /// Whether a UDP packet's checksums verify (IPv4 header; UDP with its pseudo-header, and present: a zero UDP
    /// checksum is never taken as valid, so such datagrams are written alone). What a receiver checks before merging
    /// (≈ skb_gro_checksum_validate_zero_check in udp4_gro_receive).
    public static func checksumsValid(_ p: UnsafeRawPointer, count: Int) -> Bool {
        guard let ip = Self.ipHeaderLength(p, count: count),
            UInt16(bigEndian: p.loadUnaligned(fromByteOffset: ip + 6, as: UInt16.self)) != 0,
            Int(UInt16(bigEndian: p.loadUnaligned(fromByteOffset: ip + 4, as: UInt16.self))) == count - ip
        else { return false }
        if p.load(fromByteOffset: 0, as: UInt8.self) >> 4 == 4, InternetChecksum.compute(p, count: ip) != 0 {
            return false
        }
        let sum = TCPOffload.pseudoHeader(p, proto: 17, length: count - ip)
        return InternetChecksum.finish(InternetChecksum.partial(p + ip, count: count - ip, initial: sum)) == 0
    }

    /// Whether `next` may follow the run that starts with `first` (≈ udp_gro_receive_segment): the same flow (ports)
    /// and IP headers apart from length, identification and checksum; every datagram but the last exactly
    /// `segmentSize` payload bytes (so `lastPayload` must be that, and `next` no longer); at most `maxSegments`
    /// (`runCount` so far) and 65,535 bytes in all.
    public static func continues(first: UnsafeRawPointer, firstCount: Int, next: UnsafeRawPointer, nextCount: Int,
                                 runPayload: Int, runCount: Int, segmentSize: Int, lastPayload: Int,
                                 maxSegments: Int = 64) -> Bool
    {
        guard let ip = Self.ipHeaderLength(first, count: firstCount),
            let ip2 = Self.ipHeaderLength(next, count: nextCount), ip == ip2
        else { return false }
        let payload = nextCount - ip - 8
        guard payload > 0, payload <= segmentSize, lastPayload == segmentSize, runCount < maxSegments,
            ip + 8 + runPayload + payload <= 65_535
        else { return false }
        if first.load(fromByteOffset: 0, as: UInt8.self) >> 4 == 4 {
            guard ip == 20, TCPOffload.memcmpEqual(first, next, 2), TCPOffload.memcmpEqual(first + 6, next + 6, 4),
                TCPOffload.memcmpEqual(first + 12, next + 12, 8)
            else { return false }
        } else {
            guard TCPOffload.memcmpEqual(first, next, 4), TCPOffload.memcmpEqual(first + 6, next + 6, 34) else {
                return false
            }
        }
        return TCPOffload.memcmpEqual(first + ip, next + ip, 4)
    }

    /// Makes `first` (its headers) the head of a coalesced run of `totalPayload` bytes: fixes the IP length (and the
    /// IPv4 header checksum) and the UDP length, puts the pseudo-header sum in the UDP checksum field, and returns
    /// the virtio header for the TUN write (GSO UDP_L4 with NEEDS_CSUM; the kernel cuts it again for a socket
    /// without UDP_GRO, udp_unexpected_gso).
    public static func finishRun(first: UnsafeMutableRawPointer, firstCount: Int, totalPayload: Int,
                                 segmentSize: Int) -> VirtioNetHeader
    {
        let ip = Self.ipHeaderLength(first, count: firstCount)!
        let total = ip + 8 + totalPayload
        if first.load(fromByteOffset: 0, as: UInt8.self) >> 4 == 4 {
            first.storeBE16(UInt16(total), at: 2)
            first.storeBE16(0, at: 10)
            first.storeBE16(InternetChecksum.compute(first, count: ip), at: 10)
        } else {
            first.storeBE16(UInt16(total - 40), at: 4)
        }
        first.storeBE16(UInt16(8 + totalPayload), at: ip + 4)
        var s = TCPOffload.pseudoHeader(first, proto: 17, length: 8 + totalPayload)
        s = (s & 0xffff_ffff) &+ (s >> 32)
        s = (s & 0xffff) &+ (s >> 16)
        s = (s & 0xffff) &+ (s >> 16)
        first.storeBE16(UInt16(truncatingIfNeeded: s), at: ip + 6)
        var h = VirtioNetHeader()
        h.flags = VirtioNetHeader.needsChecksum
        h.gsoType = VirtioNetHeader.gsoUDPL4
        h.headerLength = UInt16(ip + 8)
        h.gsoSize = UInt16(segmentSize)
        h.checksumStart = UInt16(ip)
        h.checksumOffset = 6
        return h
    }
}
