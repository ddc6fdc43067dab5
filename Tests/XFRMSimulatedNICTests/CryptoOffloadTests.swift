import Testing
import XFRMCore
import XFRMESP
import XFRMPacket
import XFRMSimulatedNIC
import XFRMTestKit

let cryptoLayouts: [SAParams] = [
    SAParams(family: 4, mode: .transport, algorithm: .gcm),
    SAParams(family: 4, mode: .transport, algorithm: .cbc),
    SAParams(family: 6, mode: .tunnel, algorithm: .chacha),
    SAParams(family: 4, mode: .tunnel, natt: true, algorithm: .cbc),
    SAParams(family: 6, mode: .transport, natt: true, algorithm: .gcm),
    SAParams(family: 4, mode: .transport, algorithm: .gcm, esn: true, outboundSequence: 0xffff_ffff,
             inboundSequence: 0xffff_fff0),
]

/// Bytes of IV for an algorithm.
func ivLength(_ a: Algorithm) -> Int { a == .cbc ? 16 : 8 }

@Suite("SimulatedNIC crypto offload")
struct CryptoOffloadTests {
    @Test("TX: the device seals the ESP the host left unsealed; software decrypts it", arguments: cryptoLayouts)
    func seal(_ p: SAParams) throws {
        let h = Harness()
        let handle = try h.add(try p.sa(outbound: true), offload(.outbound, .crypto))
        let host = try p.software(outbound: true, backend: UnsealedBackend())
        let peer = SoftwarePeer()
        let plains = (0..<3).map { p.plaintext(30 + 5 * $0, seed: UInt8($0)) }
        for x in plains {
            let unsealed = peer.encapsulate(x, with: host)
            var m = OffloadMetadata()
            m.handle = handle
            m.espOffset = espOffset(unsealed, natt: p.natt)
            m.cryptLength = unsealed.count - m.espOffset - 8 - ivLength(p.algorithm) - 16
            m.esnHigh = p.esn ? UInt32(truncatingIfNeeded: host.outboundSequence >> 32) : nil
            h.send(unsealed, metadata: m)
        }
        h.nic.drain()
        let frames = h.wire.all
        try #require(frames.count == 3)
        let rx = try p.software(outbound: true)
        for (i, f) in frames.enumerated() {
            let (r, inner) = peer.decapsulate(f, with: rx)
            #expect(r == .delivered)
            #expect(inner == plains[i])
        }
        #expect(h.nic.counter(.cryptoTX) == 3)
        #expect(h.nic.saCounters(handle: handle)?.outboundSequence == p.outboundSequence + 3)
        h.finish()
    }

    @Test("TX: an unknown handle, or offsets that do not fit the packet, drop and count")
    func sealErrors() throws {
        let p = SAParams()
        let h = Harness()
        let handle = try h.add(try p.sa(outbound: true), offload(.outbound, .crypto))
        let unsealed = SoftwarePeer().encapsulate(p.plaintext(), with: try p.software(outbound: true,
                                                                                        backend: UnsealedBackend()))
        var m = OffloadMetadata()
        m.handle = handle ^ (1 << 40)
        m.espOffset = 20
        m.cryptLength = unsealed.count - 20 - 16 - 16
        h.send(unsealed, metadata: m)
        m.handle = handle
        m.cryptLength += 4
        h.send(unsealed, metadata: m)
        h.nic.drain()
        #expect(h.wire.count == 0)
        #expect(h.nic.counter(.txNoState) == 1)
        #expect(h.nic.counter(.txErrors) == 1)
        #expect(h.nic.txDropped == 2)
        h.finish()
    }

    @Test("RX: the device verifies and decrypts in place; the host gets ESP framing and the ICV verdict",
          arguments: cryptoLayouts)
    func open(_ p: SAParams) throws {
        let h = Harness()
        let handle = try h.add(try p.sa(outbound: false), offload(.inbound, .crypto))
        let peer = SoftwarePeer()
        let tx = try p.software(outbound: false)
        let plain = p.plaintext(77, reverse: true)
        let frame = peer.encapsulate(plain, with: tx)
        h.nic.receiveFromWire(frame)
        h.nic.receiveFromWire(frame)  // a replay: the device does not check; the host does
        var bad = frame
        bad[bad.count - 1] ^= 0x80
        h.nic.receiveFromWire(bad)
        h.nic.drain()
        let got = h.host.all
        try #require(got.count == 3)
        let esp = espOffset(frame, natt: p.natt)
        let payloadStart = esp + 8 + ivLength(p.algorithm)
        let expectedPayload = p.mode == .tunnel ? plain : Array(plain[(p.family == 4 ? 20 : 40)...])
        for (bytes, m) in got.prefix(2) {
            #expect(bytes.count == frame.count)
            #expect(Array(bytes[..<payloadStart]) == Array(frame[..<payloadStart]), "headers untouched")
            #expect(Array(bytes[payloadStart..<(payloadStart + expectedPayload.count)]) == expectedPayload)
            #expect(m.handle == handle && m.cryptoDone && m.cryptoSuccess && !m.packetOffloaded)
        }
        #expect(got[2].1.cryptoDone && !got[2].1.cryptoSuccess && got[2].1.handle == handle)
        #expect(h.nic.counter(.cryptoRX) == 3)
        #expect(h.nic.counter(.icvErrors) == 1)
        let c = try #require(h.nic.saCounters(handle: handle))
        #expect(c.integrityFailed == 0, "crypto offload: the host counts ICV failures from cryptoSuccess")
        #expect(c.packets == 2)
        h.finish()
    }

    @Test("the device's crypto-offload SA is its own copy: deleting it sends ESP to the host untouched")
    func deletedSA() throws {
        let p = SAParams()
        let h = Harness()
        let sa = try p.sa(outbound: false)
        var o = offload(.inbound, .crypto)
        o.handle = try h.add(sa, o)
        let frame = SoftwarePeer().encapsulate(p.plaintext(reverse: true), with: try p.software(outbound: false))
        h.nic.stateDelete(sa, offload: o)
        h.nic.receiveFromWire(frame)
        h.nic.drain()
        #expect(h.host.all.map(\.0) == [frame])
        #expect(h.host.all.first?.1 == OffloadMetadata())
        h.nic.stateFree(sa, offload: o)
        h.finish()
    }
}
