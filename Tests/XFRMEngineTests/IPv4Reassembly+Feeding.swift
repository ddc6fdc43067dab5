import XFRMEngine
import XFRMPacket

/// What the reassembly suites (IPv4 and IPv6) share: a fragment handed in from bytes, the datagram read back out.
extension IPv4Reassembly {
    /// Hands `bytes` to the reassembly in a buffer from `pool`; the datagram, byte for byte, when this piece
    /// completed one (its buffer goes back to `pool`), else nil.
    func feed(_ bytes: [UInt8], from pool: PacketPool, now: UInt64 = 100) -> [UInt8]? {
        var buf = pool.allocate()!
        _ = buf.append(contentsOf: bytes)
        guard let out = self.take(buf, now: now) else { return nil }
        defer { pool.release(out) }
        return out.bytes
    }
}
