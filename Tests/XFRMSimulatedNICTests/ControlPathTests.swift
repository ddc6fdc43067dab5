import Testing
import XFRMCore
import XFRMESP
import XFRMPacket
import XFRMSimulatedNIC
import XFRMTestKit

@Suite("SimulatedNIC control path: tables, refusals, call order")
struct ControlPathTests {
    @Test("advertises HW-ESP and TX checksum, every callback, and exactly its modes")
    func advertisement() {
        for modes: Set<OffloadType> in [[.crypto], [.packet], [.crypto, .packet]] {
            let h = Harness(modes: modes)
            #expect(h.nic.features == [.hwESP, .hwESPTxChecksum])
            #expect(h.nic.callbacks.rawValue == (1 << 9) - 1)
            #expect(h.nic.supportedTypes == modes)
            #expect(h.nic.name == "sim0")
            h.finish()
        }
    }

    @Test("33 SA slots shared by RX and TX; a full table is ENOSPC naming the direction; a freed slot is reused")
    func saCapacity() throws {
        let h = Harness()
        var sas: [(SecurityAssociation, StateOffload, UInt64)] = []
        for i in 0..<33 {
            var p = SAParams()
            p.spi = 0x100 + UInt32(i)
            let inbound = i < 20
            let sa = try p.sa(outbound: !inbound)
            let o = offload(inbound ? .inbound : .outbound, i % 2 == 0 ? .crypto : .packet)
            sas.append((sa, o, try h.add(sa, o)))
        }
        #expect(h.nic.saCount == 33)
        #expect(h.nic.txSACount == 13)
        #expect(h.nic.debugDescription.hasPrefix("SA count=33 tx=13\n"))
        var p = SAParams()
        p.spi = 0x999
        let extraIn = try p.sa(outbound: false)
        let extraOut = try p.sa(outbound: true)
        expectRefusal(28, "No space for SA in Rx table!") { () throws(DeviceError) in
            _ = try h.nic.stateAdd(extraIn, offload: offload(.inbound))
        }
        expectRefusal(28, "No space for SA in Tx table!") { () throws(DeviceError) in
            _ = try h.nic.stateAdd(extraOut, offload: offload(.outbound, .crypto))
        }
        // Delete alone keeps the slot (the SA is only unusable); free releases it.
        h.nic.stateDelete(sas[3].0, offload: sas[3].1)
        #expect(h.nic.saCount == 33)
        h.nic.stateFree(sas[3].0, offload: sas[3].1)
        #expect(h.nic.saCount == 32)
        let handle = try h.add(extraIn, offload(.inbound))
        #expect(handle & 0x7fff_ffff == 3, "the lowest free slot")
        #expect(handle & (1 << 31) != 0, "BIT(31) marks a handle, as netdevsim does")
        #expect(handle != sas[3].2, "a reused slot gets a new handle")
        #expect(h.nic.saCounters(handle: sas[3].2) == nil)
        h.finish()
    }

    @Test("a custom capacity, and a bounded policy table")
    func policyCapacity() throws {
        let h = Harness(saCapacity: 2, policyCapacity: 2)
        try h.add(try SAParams().sa(outbound: true), offload(.outbound))
        try h.add(try SAParams().sa(outbound: false), offload(.inbound))
        expectRefusal(28, "No space for SA in Rx table!") { () throws(DeviceError) in
            _ = try h.nic.stateAdd(try! SAParams().sa(outbound: false), offload: offload(.inbound))
        }
        let p = SAParams()
        try h.nic.policyAdd(p.policy(.outbound))
        try h.nic.policyAdd(p.policy(.inbound))
        expectRefusal(28, "No space for policy in table!") { () throws(DeviceError) in
            try h.nic.policyAdd(p.policy(.outbound, reqid: 5))
        }
        #expect(h.nic.policyCount == 2)
        h.nic.policyDelete(p.policy(.inbound))
        h.nic.policyFree(p.policy(.inbound))
        #expect(h.nic.policyCount == 1)
        try h.nic.policyAdd(p.policy(.outbound, reqid: 5))
        h.finish()
    }

    struct Refusal: Sendable, CustomStringConvertible {
        var name: String
        var modes: Set<OffloadType> = [.crypto, .packet]
        var offload: StateOffload
        var change: @Sendable (inout SAConfig) -> Void = { _ in }
        var errno: Int32
        var message: String
        var description: String { self.name }
    }

    static let refusals: [Refusal] = {
        var r: [Refusal] = []
        r.append(Refusal(name: "packet offload on a crypto-only device", modes: [.crypto], offload: offload(.outbound),
                         errno: 95, message: "Device sim0 does not support packet offload"))
        r.append(Refusal(name: "crypto offload on a packet-only device (EOPNOTSUPP: software fallback)",
                         modes: [.packet], offload: offload(.outbound, .crypto),
                         errno: 95, message: "Device sim0 does not support crypto offload"))
        r.append(Refusal(name: "not ESP", offload: offload(.outbound), change: { $0.id.proto = 51 },
                         errno: 22, message: "Only ESP xfrm state may be offloaded"))
        r.append(Refusal(name: "null encryption", offload: offload(.outbound, .crypto), change: {
            $0.crypto = try! .cipher(name: "ecb(cipher_null)", key: [], authName: "hmac(sha1)",
                                     authKey: PacketFactory.pattern(20), truncationBits: 96)
        }, errno: 22, message: "Cannot offload xfrm states with null encryption"))
        r.append(Refusal(name: "TFC padding", offload: offload(.outbound, .crypto), change: { $0.tfcPad = 16 },
                         errno: 22, message: "TFC padding can't be offloaded"))
        r.append(Refusal(name: "an SA in the forward direction", offload: offload(.forward, .crypto),
                         errno: 22, message: "Cannot offload xfrm state in the forward direction"))
        r.append(Refusal(name: "packet offload without reqid", offload: offload(.outbound), change: { $0.reqid = 0 },
                         errno: 22, message: "Cannot offload without reqid"))
        for w in [1, 16, 31, 100, 512, 4096] {
            r.append(Refusal(name: "inbound replay window \(w)", offload: offload(.inbound),
                             change: { $0.replayWindow = w }, errno: 22, message: "Unsupported replay window size"))
        }
        r.append(Refusal(name: "soft byte limit 0", offload: offload(.outbound),
                         change: { $0.lifetime.softByteLimit = 0 },
                         errno: 22, message: "Soft/hard byte limits can't be 0"))
        r.append(Refusal(name: "soft packet limit 0", offload: offload(.inbound),
                         change: { $0.lifetime.softPacketLimit = 0 },
                         errno: 22, message: "Soft/hard packet limits can't be 0"))
        r.append(Refusal(name: "hard byte limit 0", offload: offload(.outbound), change: {
            $0.lifetime.softByteLimit = 0
            $0.lifetime.hardByteLimit = 0
        }, errno: 22, message: "Hard byte limit must be greater than soft one"))
        r.append(Refusal(name: "soft byte = hard byte", offload: offload(.outbound), change: {
            $0.lifetime.softByteLimit = 1000
            $0.lifetime.hardByteLimit = 1000
        }, errno: 22, message: "Hard byte limit must be greater than soft one"))
        r.append(Refusal(name: "soft packets > hard packets", offload: offload(.inbound), change: {
            $0.lifetime.softPacketLimit = 10
            $0.lifetime.hardPacketLimit = 5
        }, errno: 22, message: "Hard packet limit must be greater than soft one"))
        r.append(Refusal(name: "finite hard packet limit with an infinite soft one", offload: offload(.outbound),
                         change: { $0.lifetime.hardPacketLimit = 5 },
                         errno: 22, message: "Hard packet limit must be greater than soft one"))
        return r
    }()

    @Test("stateAdd refuses, with errno and message", arguments: ControlPathTests.refusals)
    func stateRefusals(_ r: Refusal) throws {
        let h = Harness(modes: r.modes)
        var c = SAParams().config(outbound: r.offload.direction != .inbound)
        if r.offload.direction == .inbound { c.replayWindow = 64 }
        r.change(&c)
        let sa = try SecurityAssociation(c, addTime: 0)
        expectRefusal(r.errno, r.message) { () throws(DeviceError) in
            _ = try h.nic.stateAdd(sa, offload: r.offload)
        }
        #expect(h.nic.saCount == 0, "a refused SA takes no slot")
        #expect(h.nic.callCounts.stateAdd == 1)
        h.finish()
    }

    @Test("what the packet-offload rules do not refuse")
    func accepted() throws {
        let h = Harness()
        var n: UInt32 = 0x10
        func add(_ o: StateOffload, _ change: (inout SAConfig) -> Void) throws {
            var c = SAParams().config(outbound: o.direction == .outbound)
            c.id.spi = n
            n += 1
            change(&c)
            try h.add(try SecurityAssociation(c, addTime: 0), o)
        }
        for w in [32, 64, 128, 256, 0] { try add(offload(.inbound)) { $0.replayWindow = w } }
        try add(offload(.inbound, .crypto)) { $0.replayWindow = 16 }  // the window rule is packet offload's
        try add(offload(.outbound)) { $0.replayWindow = 0 }
        try add(offload(.outbound, .crypto)) { $0.reqid = 0 }
        try add(offload(.outbound, .crypto)) { $0.lifetime.softByteLimit = 0 }
        try add(offload(.outbound)) {
            $0.lifetime.softByteLimit = 100
            $0.lifetime.hardByteLimit = 101
            $0.lifetime.softPacketLimit = 1
            $0.lifetime.hardPacketLimit = 2
        }
        for alg in Algorithm.allCases { try add(offload(.outbound)) { $0.crypto = alg.spec } }
        try add(offload(.outbound)) {
            $0.crypto = try! .aead(name: "rfc4543(gcm(aes))", key: PacketFactory.pattern(20), icvBits: 128)
        }
        try add(offload(.outbound)) { $0.encapsulation = NATTEncapsulation() }
        try add(offload(.outbound)) { $0.esn = true }
        #expect(h.nic.saCount == Int(n - 0x10))
        h.finish()
    }

    @Test("policyAdd refuses crypto-only devices, more than one template and (by default) forward policies")
    func policyRefusals() throws {
        let p = SAParams()
        let cryptoOnly = Harness(modes: [.crypto])
        expectRefusal(95, "Device sim0 does not support packet offload") { () throws(DeviceError) in
            try cryptoOnly.nic.policyAdd(p.policy(.outbound))
        }
        cryptoOnly.finish()

        let h = Harness()
        var two = p.policy(.outbound)
        two.templates.append(Template(mode: 0, reqid: 2))
        expectRefusal(22, "Cannot offload policy with more than one template") { () throws(DeviceError) in
            try h.nic.policyAdd(two)
        }
        expectRefusal(22, "Cannot offload forward policy") { () throws(DeviceError) in
            try h.nic.policyAdd(p.policy(.forward))
        }
        #expect(h.nic.policyCount == 0)
        var bypass = p.policy(.outbound)
        bypass.templates = []
        try h.nic.policyAdd(bypass)
        h.finish()

        let fwd = Harness(forward: true)
        try fwd.nic.policyAdd(p.policy(.forward))
        #expect(fwd.nic.policyCount == 1)
        #expect(fwd.nic.debugDescription.contains("policy[0] dir fwd src"))
        fwd.finish()
    }

    @Test("call counts and order: add, stats, ESN, delete, free for SAs; add, delete, free for policies")
    func callOrder() throws {
        let h = Harness()
        let p = SAParams()
        let sa = try p.sa(outbound: true)
        var o = offload(.outbound)
        o.handle = try h.add(sa, o)
        try h.nic.policyAdd(p.policy(.outbound))
        _ = h.nic.updateStats(sa, offload: o)
        h.nic.advanceESN(sa, offload: o)
        var b = h.pool.allocate()!
        b.append(contentsOf: p.plaintext())
        #expect(h.nic.offloadOK(b, sa: sa, offload: o))
        h.pool.release(b)
        h.nic.stateDelete(sa, offload: o)
        h.nic.policyDelete(p.policy(.outbound))
        h.nic.stateFree(sa, offload: o)
        h.nic.policyFree(p.policy(.outbound))
        let c = h.nic.callCounts
        #expect(c.stateAdd == 1 && c.stateDelete == 1 && c.stateFree == 1)
        #expect(c.policyAdd == 1 && c.policyDelete == 1 && c.policyFree == 1)
        #expect(c.updateStats == 1 && c.advanceESN == 1 && c.offloadOK == 1)
        #expect(h.nic.callLog == [
            .stateAdd(spi: 0x1001), .policyAdd(.outbound), .updateStats(spi: 0x1001), .advanceESN(spi: 0x1001),
            .stateDelete(spi: 0x1001), .policyDelete(.outbound), .stateFree(spi: 0x1001), .policyFree(.outbound),
        ])
        #expect(h.nic.callLog.map(\.description).first == "stateAdd 0x1001")
        #expect(h.nic.saCount == 0 && h.nic.policyCount == 0)
        h.finish()
    }

    @Test("offloadOK: no IPv4 options, no IPv6 extension headers, and only for an SA the device still holds")
    func offloadOK() throws {
        let h = Harness()
        let p = SAParams()
        let sa = try p.sa(outbound: true)
        var o = offload(.outbound)
        o.handle = try h.add(sa, o)
        func ok(_ bytes: [UInt8]) -> Bool {
            var b = h.pool.allocate()!
            defer { h.pool.release(b) }
            b.append(contentsOf: bytes)
            return h.nic.offloadOK(b, sa: sa, offload: o)
        }
        let udp = PacketFactory.udp(payload: [1, 2, 3])
        #expect(ok(PacketFactory.ipv4(payload: udp)))
        #expect(!ok(PacketFactory.ipv4(options: [1, 1, 1, 0], payload: udp)))
        #expect(ok(PacketFactory.ipv6(payload: udp)))
        #expect(!ok(PacketFactory.ipv6(extensionHeaders: [17, 0, 1, 4, 0, 0, 0, 0], firstNextHeader: 60,
                                       payload: udp)))
        h.nic.stateDelete(sa, offload: o)
        #expect(!ok(PacketFactory.ipv4(payload: udp)), "a deleted SA is unusable at once")
        h.nic.stateFree(sa, offload: o)
        h.finish()
    }

    @Test("the debug text: SA count, one line per slot, policies, counters")
    func debugText() throws {
        let h = Harness()
        var p = SAParams()
        try h.add(try p.sa(outbound: true), offload(.outbound))
        p.spi = 0xabc
        try h.add(try p.sa(outbound: false), offload(.inbound, .crypto))
        try h.nic.policyAdd(p.policy(.outbound))
        let lines = h.nic.debugDescription.split(separator: "\n").map(String.init)
        #expect(lines[0] == "SA count=2 tx=1")
        #expect(lines[1] == "sa[0] tx ipaddr=192.0.2.2 spi=0x00001001 proto=0x32 mode=packet reqid=1")
        #expect(lines[2] == "sa[1] rx ipaddr=192.0.2.1 spi=0x00000abc proto=0x32 mode=crypto reqid=1")
        #expect(lines[3] == "policy[0] dir out src 192.0.2.1/32 dst 192.0.2.2/32 reqid 1")
        for name in ["tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "tx_dropped", "rx_dropped", "esp_tx",
                     "esp_rx", "crypto_tx", "crypto_rx", "icv_errors", "replay_errors"] {
            #expect(lines.contains("\(name) 0"), "\(name)")
        }
        h.finish()
    }
}
