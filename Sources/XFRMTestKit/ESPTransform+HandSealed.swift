import XFRMESP

extension ESPTransform {
    /// An IPv4 ESP packet 192.0.2.1 → 192.0.2.2 for SPI `spi` and sequence number `seq` whose encrypted part is
    /// exactly `plaintext` — payload, padding, pad length and next header as the test wants them, right or wrong —
    /// sealed under this transform's key (an AEAD's IV is 7s; no ESN).
    public func handSealed(spi: UInt32 = 0x1000, seq: UInt32, plaintext: [UInt8]) -> [UInt8] {
        func be32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8(v >> 16 & 0xff), UInt8(v >> 8 & 0xff), UInt8(v & 0xff)] }
        var esp = be32(spi) + be32(seq)
        esp += [UInt8](repeating: 7, count: self.cipher.ivLength) + plaintext
            + [UInt8](repeating: 0, count: self.cipher.icvLength)
        esp.withUnsafeMutableBytes { p in
            _ = self.cipher.seal(esp: p.baseAddress!, cryptLength: plaintext.count, esnHigh: nil)
        }
        return PacketFactory.ipv4(source: "192.0.2.1", destination: "192.0.2.2", proto: 50, payload: esp)
    }
}
