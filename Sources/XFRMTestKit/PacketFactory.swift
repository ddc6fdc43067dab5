import XFRMPacket

/// Builds test packets byte by byte (no dependency on the code under test beyond the checksum).
public enum PacketFactory {
    /// An IPv4 packet with a valid header checksum around `payload`.
    public static func ipv4(
        source: String = "10.0.1.1", destination: String = "10.0.2.1", proto: UInt8 = 17, tos: UInt8 = 0,
        ttl: UInt8 = 64, identification: UInt16 = 0x1234, dontFragment: Bool = true, options: [UInt8] = [],
        payload: [UInt8]
    ) -> [UInt8] {
        precondition(options.count % 4 == 0 && options.count <= 40)
        let hl = 20 + options.count
        let total = hl + payload.count
        var h: [UInt8] = [
            UInt8(0x40 | hl / 4), tos, UInt8(total >> 8), UInt8(total & 0xff),
            UInt8(identification >> 8), UInt8(identification & 0xff), dontFragment ? 0x40 : 0, 0,
            ttl, proto, 0, 0,
        ]
        h += IPAddress(source)!.bytes + IPAddress(destination)!.bytes + options
        let c = InternetChecksum.compute(h)
        h[10] = UInt8(c >> 8)
        h[11] = UInt8(c & 0xff)
        return h + payload
    }

    /// An IPv6 packet; `extensionHeaders` are raw bytes whose first header is named by `firstNextHeader`.
    public static func ipv6(
        source: String = "2001:db8:1::1", destination: String = "2001:db8:2::1", nextHeader: UInt8 = 17,
        trafficClass: UInt8 = 0, hopLimit: UInt8 = 64, extensionHeaders: [UInt8] = [], firstNextHeader: UInt8? = nil,
        payload: [UInt8]
    ) -> [UInt8] {
        let plen = extensionHeaders.count + payload.count
        var h: [UInt8] = [
            0x60 | trafficClass >> 4, (trafficClass & 0x0f) << 4, 0, 0, UInt8(plen >> 8), UInt8(plen & 0xff),
            firstNextHeader ?? nextHeader, hopLimit,
        ]
        h += IPAddress(source)!.bytes + IPAddress(destination)!.bytes
        return h + extensionHeaders + payload
    }

    /// A UDP datagram (checksum left 0, which IPv4 allows).
    public static func udp(sourcePort: UInt16 = 1234, destinationPort: UInt16 = 5678, payload: [UInt8]) -> [UInt8] {
        let len = 8 + payload.count
        return [
            UInt8(sourcePort >> 8), UInt8(sourcePort & 0xff), UInt8(destinationPort >> 8),
            UInt8(destinationPort & 0xff), UInt8(len >> 8), UInt8(len & 0xff), 0, 0,
        ] + payload
    }

    /// Bytes 0, 1, 2, ... (mod 256) of the given length.
    public static func pattern(_ count: Int, seed: UInt8 = 0) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &+ Int(seed)) }
    }

    /// Decodes lowercase or uppercase hex.
    public static func hex(_ s: String) -> [UInt8] {
        var out: [UInt8] = []
        var it = s.makeIterator()
        while let a = it.next(), let b = it.next() {
            out.append(UInt8(String([a, b]), radix: 16)!)
        }
        return out
    }
}

/// A packet pool plus helpers to move bytes in and out of buffers in tests.
public final class TestBuffers {
    public let pool: PacketPool
    public init(slotSize: Int = 4096, headroom: Int = 256) {
        self.pool = PacketPool(count: 8, slotSize: slotSize, headroom: headroom)
    }

    /// Runs `body` on a pooled buffer holding `bytes` and returns the buffer's bytes afterwards.
    public func with<R>(_ bytes: [UInt8], _ body: (inout PacketBuffer) -> R) -> (R, [UInt8]) {
        var b = self.pool.allocate()!
        defer { self.pool.release(b) }
        precondition(b.append(contentsOf: bytes))
        let r = body(&b)
        return (r, b.bytes)
    }
}
