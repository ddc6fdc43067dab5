import Testing
import XFRMCore
import XFRMESP
import XFRMPacket
import XFRMSimulatedNIC
import XFRMTestKit

let layouts: [SAParams] = {
    var out: [SAParams] = []
    for family in [4, 6] {
        for mode in [ESPMode.transport, .tunnel] {
            for natt in [false, true] {
                out.append(SAParams(family: family, mode: mode, natt: natt, algorithm: .gcm))
            }
        }
    }
    out.append(SAParams(family: 4, mode: .tunnel, algorithm: .cbc))
    out.append(SAParams(family: 6, mode: .transport, algorithm: .chacha))
    return out
}()

@Suite("SimulatedNIC packet offload")
struct PacketOffloadTests {
    @Test("TX: the device classifies plaintext with its policy, numbers and encrypts it; software decrypts it",
          arguments: layouts)
    func transmit(_ p: SAParams) throws {
        let h = Harness()
        let handle = try h.add(try p.sa(outbound: true), offload(.outbound))
        try h.nic.policyAdd(p.policy(.outbound))
        let plains = (0..<3).map { p.plaintext(50 + $0 * 7, seed: UInt8($0)) }
        for x in plains { h.send(x) }
        h.nic.drain()
        let frames = h.wire.all
        try #require(frames.count == 3)
        let peer = SoftwarePeer()
        let rx = try p.software(outbound: true)
        for (i, f) in frames.enumerated() {
            let esp = espOffset(f, natt: p.natt)
            #expect(f[p.family == 4 ? 9 : 6] == (p.natt ? 17 : 50))
            #expect(be32(f, esp) == p.spi)
            #expect(be32(f, esp + 4) == UInt32(i + 1), "the device numbers packets from 1")
            let (r, inner) = peer.decapsulate(f, with: rx)
            #expect(r == .delivered)
            #expect(inner == plains[i])
        }
        let c = try #require(h.nic.saCounters(handle: handle))
        #expect(c.packets == 3)
        #expect(c.bytes == UInt64(plains.map(\.count).reduce(0, +)))
        #expect(c.outboundSequence == 3)
        #expect(h.nic.counter(.espTX) == 3)
        #expect(h.nic.counter(.txPackets) == 3)
        h.finish()
    }

    @Test("TX honours a user-set outbound sequence number and ESN")
    func transmitESN() throws {
        var p = SAParams()
        p.esn = true
        p.outboundSequence = 0xffff_ffff
        p.inboundSequence = 0xffff_fff0
        let h = Harness()
        try h.add(try p.sa(outbound: true), offload(.outbound))
        try h.nic.policyAdd(p.policy(.outbound))
        h.send(p.plaintext())
        h.nic.drain()
        let f = try #require(h.wire.all.first)
        #expect(be32(f, 24) == 0, "low half of 2^32")
        let (r, inner) = SoftwarePeer().decapsulate(f, with: try p.software(outbound: true))
        #expect(r == .delivered)
        #expect(inner == p.plaintext())
        h.finish()
    }

    @Test("TX: unmatched traffic goes out as is; a policy without an SA, or a blocking one, drops and counts")
    func transmitClassification() throws {
        let p = SAParams()
        let h = Harness()
        try h.add(try p.sa(outbound: true), offload(.outbound))
        try h.nic.policyAdd(p.policy(.outbound))
        // Other traffic: not IPsec.
        let other = PacketFactory.ipv4(source: "192.0.2.1", destination: "198.51.100.7",
                                       payload: PacketFactory.udp(payload: [9, 9, 9]))
        h.send(other)
        h.nic.drain()
        #expect(h.wire.all == [other])

        // A policy whose template names a reqid the device has no SA for.
        let q = SAParams(family: 6)
        try h.nic.policyAdd(q.policy(.outbound, reqid: 42))
        h.send(q.plaintext())
        // A blocking policy.
        var r = SAParams(family: 4, mode: .tunnel)
        r.spi = 0x3000
        try h.nic.policyAdd(r.policy(.outbound, action: .block))
        h.send(r.plaintext())
        h.nic.drain()
        #expect(h.wire.count == 1)
        #expect(h.nic.counter(.txNoState) == 1)
        #expect(h.nic.counter(.txPolicyBlock) == 1)
        #expect(h.nic.txDropped == 2)

        // After the SA is deleted, its policy's traffic drops at once.
        h.nic.stateDelete(try p.sa(outbound: true), offload: offload(.outbound))
        h.send(p.plaintext())
        h.nic.drain()
        #expect(h.nic.counter(.txNoState) == 2)
        #expect(h.wire.count == 1)
        h.finish()
    }

    @Test("TX: the newest SA for a template wins, and tunnel endpoints must match the template")
    func transmitSAChoice() throws {
        var p = SAParams(mode: .tunnel)
        let h = Harness()
        try h.add(try p.sa(outbound: true), offload(.outbound))
        p.spi = 0x2002
        try h.add(try p.sa(outbound: true), offload(.outbound))
        var elsewhere = p
        elsewhere.spi = 0x2003
        var c = elsewhere.config(outbound: true)
        c.id.destination = IPAddress("192.0.2.99")!
        try h.add(try SecurityAssociation(c, addTime: 0), offload(.outbound))
        try h.nic.policyAdd(p.policy(.outbound))
        h.send(p.plaintext())
        h.nic.drain()
        let f = try #require(h.wire.all.first)
        #expect(be32(f, 20) == 0x2002)
        h.finish()
    }

    @Test("RX: software ESP is decrypted, checked against the IN policy and delivered as plaintext",
          arguments: layouts)
    func receive(_ p: SAParams) throws {
        let h = Harness()
        let handle = try h.add(try p.sa(outbound: false), offload(.inbound))
        try h.nic.policyAdd(p.policy(.inbound))
        let peer = SoftwarePeer()
        let tx = try p.software(outbound: false)
        let plains = (0..<3).map { p.plaintext(40 + $0, seed: UInt8($0), reverse: true) }
        let frames = plains.map { peer.encapsulate($0, with: tx) }
        for f in frames { h.nic.receiveFromWire(f) }
        h.nic.drain()
        let got = h.host.all
        try #require(got.count == 3)
        for (i, (bytes, m)) in got.enumerated() {
            #expect(bytes == plains[i])
            #expect(m.handle == handle)
            #expect(m.cryptoDone && m.cryptoSuccess && m.packetOffloaded)
        }
        let c = try #require(h.nic.saCounters(handle: handle))
        #expect(c.packets == 3)
        #expect(c.bytes == UInt64(frames.map(\.count).reduce(0, +)))
        #expect(c.inboundSequence == 3)
        #expect(h.nic.counter(.espRX) == 3)
        h.finish()
    }

    @Test("RX: replays and bad ICVs are dropped in the device and counted per SA for updateStats")
    func receiveDrops() throws {
        let p = SAParams()
        let h = Harness()
        let sa = try p.sa(outbound: false)
        var o = offload(.inbound)
        o.handle = try h.add(sa, o)
        try h.nic.policyAdd(p.policy(.inbound))
        let peer = SoftwarePeer()
        let tx = try p.software(outbound: false)
        let frames = (0..<3).map { peer.encapsulate(p.plaintext(seed: UInt8($0), reverse: true), with: tx) }
        for f in frames { h.nic.receiveFromWire(f) }
        h.nic.receiveFromWire(frames[1])  // duplicate
        tx.setOutboundSequence(99)
        h.nic.receiveFromWire(peer.encapsulate(p.plaintext(reverse: true), with: tx))  // seq 100
        var stale = p  // a counter never moves back: an old number comes from a second transform
        stale.outboundSequence = 9
        let old = try stale.software(outbound: false)
        h.nic.receiveFromWire(peer.encapsulate(p.plaintext(reverse: true), with: old))  // seq 10: left of the window
        var bad = peer.encapsulate(p.plaintext(reverse: true), with: tx)  // seq 101, ICV broken below
        bad[40] ^= 0x01
        h.nic.receiveFromWire(bad)
        var truncated = Array(peer.encapsulate(p.plaintext(reverse: true), with: tx).prefix(20 + 8 + 8 + 10))
        truncated[2] = 0
        truncated[3] = UInt8(truncated.count)
        truncated[10] = 0
        truncated[11] = 0
        let sum = InternetChecksum.compute(Array(truncated[0..<20]))
        truncated[10] = UInt8(sum >> 8)
        truncated[11] = UInt8(sum & 0xff)
        h.nic.receiveFromWire(truncated)
        h.nic.drain()
        #expect(h.host.count == 4)
        let c = h.nic.updateStats(sa, offload: o)
        #expect(c.packets == 4)
        #expect(c.replay == 1)
        #expect(c.replayWindow == 1)
        #expect(c.integrityFailed == 1)
        #expect(c.headerErrors == 1)
        #expect(c.inboundSequence == 100)
        #expect(h.nic.counter(.replayErrors) == 2)
        #expect(h.nic.counter(.icvErrors) == 1)
        #expect(h.nic.counter(.headerErrors) == 1)
        #expect(h.nic.rxDropped == 4)
        #expect(h.nic.callCounts.updateStats == 1)
        h.finish()
    }

    @Test("RX: decrypted traffic that no IN policy of the device accepts is dropped and counted")
    func receivePolicy() throws {
        let p = SAParams(mode: .tunnel)
        let h = Harness()
        try h.add(try p.sa(outbound: false), offload(.inbound))
        let peer = SoftwarePeer()
        let tx = try p.software(outbound: false)
        h.nic.receiveFromWire(peer.encapsulate(p.plaintext(reverse: true), with: tx))  // no IN policy at all
        try h.nic.policyAdd(p.policy(.inbound, reqid: 77))  // a policy wanting another SA
        h.nic.receiveFromWire(peer.encapsulate(p.plaintext(reverse: true), with: tx))
        let inner = PacketFactory.ipv4(source: "10.9.9.9", destination: p.innerLocal,
                                       payload: PacketFactory.udp(payload: [1]))
        var block = Policy(selector: Selector(family: 4, source: IPPrefix("10.9.9.9")!,
                                              destination: IPPrefix(p.innerLocal)!),
                           direction: .inbound, action: .block)
        block.offload = PolicyOffload(ifindex: 7)
        try h.nic.policyAdd(block)
        h.nic.receiveFromWire(peer.encapsulate(inner, with: tx))
        h.nic.drain()
        #expect(h.host.count == 0)
        #expect(h.nic.counter(.rxPolicyDrops) == 3)
        h.nic.policyDelete(p.policy(.inbound, reqid: 77))
        try h.nic.policyAdd(p.policy(.inbound))
        h.nic.receiveFromWire(peer.encapsulate(p.plaintext(reverse: true), with: tx))
        h.nic.drain()
        #expect(h.host.count == 1)
        h.finish()
    }

    @Test("RX: outer-fragmented ESP for a device SA is dropped and counted; other traffic reaches the host as is")
    func receiveFragments() throws {
        let p = SAParams()
        let h = Harness()
        try h.add(try p.sa(outbound: false), offload(.inbound))
        try h.nic.policyAdd(p.policy(.inbound))
        let peer = SoftwarePeer()
        let frame = peer.encapsulate(p.plaintext(reverse: true), with: try p.software(outbound: false))
        func fragment(_ f: [UInt8], offset: UInt16, more: Bool) -> [UInt8] {
            var g = f
            let v = offset | (more ? 0x2000 : 0)
            g[6] = UInt8(v >> 8)
            g[7] = UInt8(v & 0xff)
            g[10] = 0
            g[11] = 0
            let s = InternetChecksum.compute(Array(g[0..<20]))
            g[10] = UInt8(s >> 8)
            g[11] = UInt8(s & 0xff)
            return g
        }
        h.nic.receiveFromWire(fragment(frame, offset: 0, more: true))
        h.nic.receiveFromWire(fragment(frame, offset: 100, more: false))
        // IPv6: a fragment header in front of ESP.
        let q = SAParams(family: 6)
        try h.add(try q.sa(outbound: false), offload(.inbound))
        let f6 = peer.encapsulate(q.plaintext(reverse: true), with: try q.software(outbound: false))
        let fragHeader: [UInt8] = [50, 0, 0, 1, 0, 0, 0, 7]
        let payload = Array(f6[40...])
        let v6frag = PacketFactory.ipv6(source: q.remote.description, destination: q.local.description,
                                        extensionHeaders: fragHeader, firstNextHeader: 44, payload: payload)
        h.nic.receiveFromWire(v6frag)
        // Fragmented ESP for someone else, plain traffic, ESP with an unknown SPI: all to the host unchanged.
        var elsewhere = fragment(frame, offset: 0, more: true)
        elsewhere[16] = 203
        elsewhere[10] = 0
        elsewhere[11] = 0
        let s = InternetChecksum.compute(Array(elsewhere[0..<20]))
        elsewhere[10] = UInt8(s >> 8)
        elsewhere[11] = UInt8(s & 0xff)
        h.nic.receiveFromWire(elsewhere)
        let plain = p.plaintext(reverse: true)
        h.nic.receiveFromWire(plain)
        var unknown = frame
        unknown[20] = 0xee
        h.nic.receiveFromWire(unknown)
        h.nic.drain()
        #expect(h.nic.counter(.rxFragmentDrops) == 3)
        let got = h.host.all
        #expect(got.map(\.0) == [elsewhere, plain, unknown])
        #expect(got.allSatisfy { $0.1 == OffloadMetadata() })
        h.finish()
    }

    @Test("hard packet limit: soft and hard limit events, then the device drops (TX)")
    func hardPacketLimitTX() throws {
        var p = SAParams()
        p.lifetime.softPacketLimit = 2
        p.lifetime.hardPacketLimit = 4
        let h = Harness()
        let handle = try h.add(try p.sa(outbound: true), offload(.outbound))
        try h.nic.policyAdd(p.policy(.outbound))
        for i in 0..<6 { h.send(p.plaintext(seed: UInt8(i))) }
        h.nic.drain()
        #expect(h.wire.count == 4)
        #expect(h.events.all == [handle, handle], "one event at the soft limit, one at the hard limit")
        #expect(h.nic.counter(.txExpired) == 2)
        #expect(h.nic.saCounters(handle: handle)?.packets == 4)
        h.finish()
    }

    @Test("hard byte limit: events and drops (RX)")
    func hardByteLimitRX() throws {
        var p = SAParams()
        let peer = SoftwarePeer()
        let tx = try p.software(outbound: false)
        let frames = (0..<5).map { peer.encapsulate(p.plaintext(60, seed: UInt8($0), reverse: true), with: tx) }
        let n = UInt64(frames[0].count)
        p.lifetime.softByteLimit = n + 1  // crossed by the 2nd packet
        p.lifetime.hardByteLimit = 3 * n  // reached by the 3rd
        let h = Harness()
        let handle = try h.add(try p.sa(outbound: false), offload(.inbound))
        try h.nic.policyAdd(p.policy(.inbound))
        var seen: [Int] = []
        for f in frames {
            h.nic.receiveFromWire(f)
            h.nic.drain()
            seen.append(h.events.count)
        }
        #expect(seen == [0, 1, 2, 2, 2])
        #expect(h.host.count == 3)
        #expect(h.nic.counter(.rxExpired) == 2)
        #expect(h.nic.saCounters(handle: handle)?.bytes == 3 * n)
        h.finish()
    }
}
