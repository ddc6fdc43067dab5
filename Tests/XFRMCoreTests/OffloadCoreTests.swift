import Testing
import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// The core's offload rules, against a recording fake device (the simulated NIC has its own tests).
@Suite("Offload rules in the core")
struct OffloadCoreTests {
    /// Host A of TwoHosts with a fake device on eth0.
    func setUp(_ device: FakeOffloadDevice = FakeOffloadDevice()) throws -> (TwoHosts, FakeOffloadDevice) {
        let h = try TwoHosts()
        try h.a.attachDevice(device, ifindex: 2)
        return (h, device)
    }

    func outSA(_ h: TwoHosts, spi: UInt32 = 0x1001, esn: Bool = false) throws -> SecurityAssociation {
        var c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: spi, on: h.a).currentConfig
        c.esn = esn
        c.replayWindow = esn ? 32 : c.replayWindow
        return try h.a.makeSA(c)
    }

    @Test("registration refuses ESP offload without add/delete, and TX checksum without ESP offload")
    func registration() throws {
        let h = try TwoHosts()
        #expect(throws: DeviceError.self) {
            try h.a.attachDevice(FakeOffloadDevice(callbacks: [.stateAdd]), ifindex: 2)
        }
        #expect(throws: DeviceError.self) {
            try h.a.attachDevice(FakeOffloadDevice(features: [.hwESPTxChecksum]), ifindex: 2)
        }
        try h.a.attachDevice(FakeOffloadDevice(features: [.hwESP], callbacks: [.stateAdd, .stateDelete]), ifindex: 2)
    }

    @Test("state add/delete/free are called once each, in order")
    func callOrder() throws {
        let (h, dev) = try setUp()
        let sa = try outSA(h)
        try h.a.addState(sa, offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .crypto))
        #expect(sa.offload?.type == .crypto)
        try h.a.deleteState(sa.id, mark: Mark())
        #expect(dev.callLog == ["stateAdd 0x1001 crypto", "stateDelete 0x1001", "stateFree 0x1001"])
        #expect(sa.offload == nil)
    }

    @Test("crypto offload falls back to software silently; packet offload fails and leaves nothing behind")
    func fallback() throws {
        let (h, dev) = try setUp(FakeOffloadDevice(supportedTypes: [.crypto]))
        // EOPNOTSUPP from the driver.
        dev.failNextAdd = DeviceError(95, "")
        let sw = try outSA(h)
        try h.a.addState(sw, offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .crypto))
        #expect(sw.offload == nil)
        #expect(h.a.states.count == 1)
        // No device on the interface (lan0) and an unroutable one: still software.
        let sw2 = try outSA(h, spi: 0x1002)
        try h.a.addState(sw2, offload: OffloadRequest(ifindex: 3, direction: .outbound, type: .crypto))
        #expect(sw2.offload == nil)
        // Packet offload with EOPNOTSUPP: the command fails and no SA is added.
        let p = try outSA(h, spi: 0x1003)
        #expect(throws: StateDatabaseError.self) {
            try h.a.addState(p, offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .packet))
        }
        #expect(throws: StateDatabaseError.self) {
            try h.a.addState(try outSA(h, spi: 0x1004), offload: OffloadRequest(ifindex: 3, direction: .outbound, type: .packet))
        }
        #expect(h.a.states.count == 2)
    }

    @Test("a full device table (ENOSPC) fails the add in both modes")
    func tableFull() throws {
        let (h, dev) = try setUp()
        for type in [OffloadType.crypto, .packet] {
            dev.failNextAdd = DeviceError(28, "No space for SA in Tx table!")
            #expect(throws: StateDatabaseError(28, "No space for SA in Tx table!")) {
                try h.a.addState(try outSA(h), offload: OffloadRequest(ifindex: 2, direction: .outbound, type: type))
            }
        }
        #expect(h.a.states.count == 0)
    }

    @Test("crypto offload with ESN needs advance_esn; packet offload does not")
    func esn() throws {
        let (h, _) = try setUp(FakeOffloadDevice(callbacks: [.stateAdd, .stateDelete, .stateFree, .updateStats]))
        #expect(throws: StateDatabaseError(22, "Device doesn't support offload with ESN")) {
            try h.a.addState(try outSA(h, esn: true), offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .crypto))
        }
        try h.a.addState(try outSA(h, esn: true), offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .packet))
    }

    @Test("a duplicate across hardware and software is EEXIST, refused before the device is programmed")
    func duplicateUndone() throws {
        let (h, dev) = try setUp()
        try h.a.addState(try outSA(h))
        #expect(throws: StateDatabaseError(17, "File exists")) {
            try h.a.addState(try outSA(h), offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .packet))
        }
        #expect(dev.callLog.isEmpty, "a second device entry with the same key would restart the sequence numbers")
    }

    func packetSetup(_ h: TwoHosts) throws -> Policy {
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        let sel = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        let p = try h.a.addPolicy(Policy(selector: sel, direction: .outbound, templates: [t],
                                         offload: PolicyOffload(ifindex: 2)), update: false)
        return p
    }

    @Test("a packet-offload policy's larval SA is offered to the device (XFRM_DEV_OFFLOAD_FLAG_ACQ); a refusal leaves none")
    func larvalOfferedToDevice() throws {
        let (h, dev) = try setUp()
        _ = try packetSetup(h)
        #expect(h.send(h.packet()).0 == .dropped(.outNoStates))
        #expect(dev.callLog.contains("stateAdd 0x0 packet acq"))
        let larval = try #require(h.a.states.list().first)
        #expect(larval.offload?.acquire == true)
        h.clock.advance(by: 30)
        h.a.runTimers()
        #expect(h.a.states.count == 0)
        #expect(dev.callLog.suffix(2) == ["stateDelete 0x0", "stateFree 0x0"], "the device hears the larval SA go")
        // With nobody listening the device still hears the offer, then the larval SA's end (km_query fails after
        // xdo_dev_state_add in xfrm_state_find).
        h.a.events.unsubscribe(h.eventsA)
        h.a.events.unsubscribe(h.eventsB)
        let before = dev.callLog.count
        #expect(h.send(h.packet()).0 == .dropped(.outNoStates))
        #expect(h.a.states.count == 0)
        #expect(Array(dev.callLog.dropFirst(before)) == ["stateAdd 0x0 packet acq", "stateDelete 0x0", "stateFree 0x0"])
        let listener = h.a.events.subscribe()
        _ = listener
        _ = h.eventsA.drain()
        dev.failNextAdd = DeviceError(22, "no")
        #expect(h.send(h.packet()).0 == .dropped(.outNoStates))
        #expect(h.a.states.count == 0)
        #expect(!listener.drain().contains { if case .acquire = $0 { return true } else { return false } })
    }

    @Test("an offloaded policy uses only packet SAs on its device; a software policy never uses a packet SA")
    func resolution() throws {
        let (h, _) = try setUp()
        _ = try packetSetup(h)
        // Only a software SA: the offloaded policy does not use it (acquire instead).
        try h.a.addState(try outSA(h))
        #expect(h.send(h.packet()).0 == .dropped(.outNoStates))
        try h.a.flushStates(proto: 0)
        try h.a.addState(try outSA(h, spi: 0x1002), offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .packet))
        let (r, bytes) = h.send(h.packet())
        guard case .offload(let ifindex, let meta) = r else {
            Issue.record("expected the packet to go to the device, got \(r)")
            return
        }
        #expect(ifindex == 2)
        #expect(meta.cryptLength == 0)
        #expect(bytes == h.packet(), "packet offload hands the device plaintext")
        let sa = h.a.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1002))!
        #expect(sa.current.packets == 0, "no per-packet SA accounting on the host")
        // A software policy with only the packet SA: never used.
        h.a.flushPolicies()
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        let sel = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        try h.a.addPolicy(Policy(selector: sel, direction: .outbound, templates: [t]), update: false)
        #expect(h.send(h.packet()).0 == .dropped(.outNoStates))
    }

    @Test("packet offload drops (XfrmOutError) what the device cannot take: options, oversize, wrong device")
    func packetDrops() throws {
        let (h, _) = try setUp()
        _ = try packetSetup(h)
        try h.a.addState(try outSA(h), offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .packet))
        let opts = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.1", options: [1, 1, 1, 0],
                                      payload: PacketFactory.udp(payload: [1]))
        #expect(h.send(opts).0 == .dropped(.outError))
        #expect(h.send(h.packet(size: 1470, df: false)).0 == .dropped(.outError))
        let (r, icmp) = h.send(h.packet(size: 1470, df: true))
        #expect(r == .icmpError)
        #expect(icmp[20] == 3 && icmp[21] == 4)
        #expect(h.a.statistics[.outError] == 2, "the two drops; the ICMP answer counts none")
        // The route to the peer now leads to another interface.
        try h.a.network.addRoute(IPPrefix("192.0.2.2/32")!, device: "lan0", via: nil)
        #expect(h.send(h.packet()).0 == .dropped(.outError))
    }

    @Test("packet offload, transport mode: the limit is xfrm_state_mtu's with net_adj; over it, DF gets ICMP with it, no DF is dropped")
    func packetTransportLimit() throws {
        let (h, _) = try setUp()
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 0, reqid: 7)
        try h.a.addPolicy(Policy(selector: Selector(family: 4, source: IPPrefix("192.0.2.1/32")!,
                                                    destination: IPPrefix("192.0.2.2/32")!),
                                 direction: .outbound, templates: [t], offload: PolicyOffload(ifindex: 2)),
                          update: false)
        var c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x7002, mode: .transport, reqid: 7, on: h.a).currentConfig
        c.replayWindow = 0
        // AES-CBC's 16-byte blocks tell the transport formula from the tunnel one (1454), which GCM's 4 would not.
        c.crypto = try ESPCryptoSpec.cipher(name: "cbc(aes)", key: PacketFactory.pattern(16), authName: "hmac(sha256)",
                                            authKey: PacketFactory.pattern(32), truncationBits: 128)
        try h.a.addState(try h.a.makeSA(c), offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .packet))
        let limit = 1458  // ((1500 - 8 ESP - 16 IV - 16 ICV - 20 net_adj) & ~15) + 20 - 2
        for _ in 0..<2 {  // the first resolves; the second goes through the flow's cached decision
            guard case .offload = h.send(h.packet(from: "192.0.2.1", to: "192.0.2.2", size: limit - 28)).0 else {
                Issue.record("a packet at the limit goes to the device")
                return
            }
            let (r, icmp) = h.send(h.packet(from: "192.0.2.1", to: "192.0.2.2", size: limit - 28 + 1, df: true))
            #expect(r == .icmpError)
            #expect(icmp[20] == 3 && icmp[21] == 4 && Int(icmp[26]) << 8 | Int(icmp[27]) == limit)
            #expect(h.send(h.packet(from: "192.0.2.1", to: "192.0.2.2", size: limit - 28 + 1, df: false)).0
                    == .dropped(.outError))
        }
        #expect(h.a.statistics[.outError] == 2, "the drops, not the ICMP answers (ip_forward's, FragFails in Linux)")
    }

    @Test("crypto offload: the host builds ESP and leaves sealing to the device; without offload_ok it is software")
    func cryptoTX() throws {
        let (h, dev) = try setUp()
        try h.tunnel()
        try h.a.deleteState(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001), mark: Mark())
        try h.a.addState(try outSA(h), offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .crypto))
        let (r, bytes) = h.send(h.packet())
        guard case .offload(_, let meta) = r else {
            Issue.record("expected crypto offload, got \(r)")
            return
        }
        #expect(meta.espOffset == 20)
        #expect(meta.cryptLength == 128 + 2 + 2)
        #expect(bytes[20..<24] == [0, 0, 0x10, 0x01])
        #expect(bytes.suffix(16).allSatisfy { $0 == 0 }, "the ICV is left for the device")
        // Too big once ESP is added, without DF: not given to the device (≈ xfrm_dev_offload_ok's MTU check, which
        // a device that seals could not fragment after), but sealed in software and cut — through the flow's cached
        // bundle, and through the per-packet path (another flow); at the exact limit it still goes to the device.
        // xfrm_state_mtu: ((1500 - 20 outer - 8 ESP - 8 IV - 16 ICV) & ~3) - 2 for GCM (4-byte alignment).
        let limit = 1446
        #expect(h.a.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001))!.transform!
            .maximumPayload(forMTU: 1500) == limit)
        for from in ["10.0.1.1", "10.0.1.1", "10.0.1.2", "10.0.1.3"] {
            let (r, whole) = h.send(h.packet(from: from, size: limit - 28 + 1, df: false))
            #expect(r == .fragment(ifindex: 2, mtu: 1500), "from \(from)")
            // Sealed in software: B decrypts it (what a device leaves for itself to seal carries a zero ICV).
            #expect(h.receive(whole).0 == .deliver, "from \(from)")
            guard case .offload = h.send(h.packet(from: from, size: limit - 28, df: false)).0 else {
                Issue.record("a packet at the limit goes to the device, from \(from)")
                return
            }
        }
        #expect(h.a.statistics[.outError] == 0 && h.a.statistics[.outStateModeError] == 0)
        // IPv4 options: never for the device (xfrm_dev_offload_ok), small as the packet is.
        let options = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.1", options: [1, 1, 1, 0],
                                         payload: PacketFactory.udp(payload: PacketFactory.pattern(40)))
        let (ro, withOptions) = h.send(options)
        #expect(ro == .transmit(ifindex: 2))
        #expect(h.receive(withOptions).0 == .deliver, "sealed in software")
        dev.acceptOffloadOK = false
        let (r2, sealed) = h.send(h.packet())
        #expect(r2 == .transmit(ifindex: 2))
        // Software-sealed: B decrypts it.
        #expect(h.receive(sealed).0 == .deliver)
    }

    @Test("crypto offload, transport mode: the device takes up to xfrm_state_mtu's limit (the IP header outside the rounding), software seals and cuts the rest")
    func cryptoTransportLimit() throws {
        let (h, _) = try setUp()
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 0, reqid: 7)
        try h.a.addPolicy(Policy(selector: Selector(family: 4, source: IPPrefix("192.0.2.1/32")!,
                                                    destination: IPPrefix("192.0.2.2/32")!),
                                 direction: .outbound, templates: [t]), update: false)
        var c = try h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x7001, mode: .transport, reqid: 7, on: h.a).currentConfig
        c.replayWindow = 0
        try h.a.addState(try h.a.makeSA(c), offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .crypto))
        // ((1500 - 8 ESP - 8 IV - 16 ICV - 20 net_adj) & ~3) + 20 - 2.
        let limit = 1466
        for from in ["192.0.2.1", "192.0.2.1"] {  // the second through the flow's cached bundle
            guard case .offload = h.send(h.packet(from: from, to: "192.0.2.2", size: limit - 28, df: false)).0 else {
                Issue.record("a packet at the limit goes to the device")
                return
            }
            let (r, whole) = h.send(h.packet(from: from, to: "192.0.2.2", size: limit - 28 + 1, df: false))
            #expect(r == .fragment(ifindex: 2, mtu: 1500))
            #expect(whole.count == 1500 + 4, "one 4-byte GCM block past the MTU")
            #expect(!whole.suffix(16).allSatisfy { $0 == 0 }, "sealed here: the ICV is written")
        }
        #expect(h.a.statistics[.outError] == 0)
    }

    @Test("an SA a rekey deletes between the packet's lookup and its lock: the packet leaves through the new SA, nothing counted")
    func rekeyBetweenLookupAndLock() throws {
        let (h, dev) = try setUp()
        defer { dev.duringOffloadOK = nil }  // the hooks capture the stack, which holds the device
        try h.tunnel()
        try h.a.deleteState(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001), mark: Mark())
        try h.a.addState(try outSA(h), offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .crypto))
        // The key manager installs 0x1101 and deletes 0x1001 while the packet is between the two (the device still
        // accepts the packet: the SA's lock is what finds it dead, on the crypto-offload branch).
        dev.duringOffloadOK = { sa in
            guard sa.id.spi == 0x1001 else { return }
            dev.duringOffloadOK = nil
            try! h.a.addState(try! self.outSA(h, spi: 0x1101),
                              offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .crypto))
            try! h.a.deleteState(sa.id, mark: Mark())
        }
        let (r, bytes) = h.send(h.packet())
        guard case .offload = r else {
            Issue.record("expected crypto offload through the new SA, got \(r)")
            return
        }
        #expect(bytes[20..<24] == [0, 0, 0x11, 0x01])
        #expect(h.a.statistics[.outStateInvalid] == 0)
        // Twice in a row (the SA found again dies too): the packet is dropped and counted, as the kernel does.
        dev.duringOffloadOK = { sa in try! h.a.deleteState(sa.id, mark: Mark()) }
        try h.a.addState(try outSA(h, spi: 0x1201), offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .crypto))
        #expect(h.send(h.packet()).0 == .dropped(.outStateInvalid))
        #expect(h.a.states.count == 1, "0x1101 and 0x1201 both died")
        for spi: UInt32 in [0x1101, 0x1201] { _ = try? h.a.deleteState(SAID(destination: IPAddress("192.0.2.2")!, spi: spi), mark: Mark()) }
        #expect(h.a.statistics[.outStateInvalid] == 1)
        // Deleted with nothing to replace it: XfrmOutStateInvalid as the kernel counts it, not XfrmOutNoStates,
        // and no ACQUIRE.
        try h.a.addState(try outSA(h, spi: 0x1401), offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .crypto))
        _ = h.eventsA.drain()
        #expect(h.send(h.packet()).0 == .dropped(.outStateInvalid))
        #expect(h.a.statistics[.outStateInvalid] == 2)
        #expect(h.a.statistics[.outNoStates] == 0)
        #expect(!h.eventsA.drain().contains { if case .acquire = $0 { true } else { false } }, "no ACQUIRE")
    }

    @Test("packet offload: an SA a rekey deletes before the device takes the packet: the new SA takes it; no replacement is XfrmOutError")
    func packetOffloadRekeyBeforeTheDevice() throws {
        let (h, dev) = try setUp()
        defer { dev.duringOffloadOK = nil }  // the hooks capture the stack, which holds the device
        dev.refusesUnboundSAs = true  // the deleted SA is refused by the device, not by the host's lock
        _ = try packetSetup(h)
        try h.a.addState(try outSA(h), offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .packet))
        dev.duringOffloadOK = { sa in
            guard sa.id.spi == 0x1001 else { return }
            dev.duringOffloadOK = nil
            try! h.a.addState(try! self.outSA(h, spi: 0x1101),
                              offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .packet))
            try! h.a.deleteState(sa.id, mark: Mark())
        }
        guard case .offload(_, let meta) = h.send(h.packet()).0 else {
            Issue.record("expected packet offload through the new SA")
            return
        }
        #expect(meta.handle == h.a.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1101))?.offload?.handle)
        #expect(h.a.statistics[.outError] == 0)
        // The cached entry's SA dies and nothing replaces it: dropped as the first pass would have been.
        dev.duringOffloadOK = { sa in try! h.a.deleteState(sa.id, mark: Mark()) }
        _ = h.eventsA.drain()
        #expect(h.send(h.packet()).0 == .dropped(.outError))
        #expect(h.a.statistics[.outError] == 1)
        #expect(h.a.statistics[.outNoStates] == 0)
        #expect(!h.eventsA.drain().contains { if case .acquire = $0 { true } else { false } }, "no ACQUIRE")
    }

    @Test("crypto offload with ESN tells the device when the high half moves on")
    func advanceESN() throws {
        let (h, dev) = try setUp()
        try h.tunnel()
        try h.a.deleteState(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001), mark: Mark())
        var c = try outSA(h, esn: true).currentConfig
        c.outboundSequence = 0xffff_fffe
        try h.a.addState(try h.a.makeSA(c), offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .crypto))
        _ = h.send(h.packet())
        #expect(!dev.callLog.contains("advanceESN"))
        let (r, _) = h.send(h.packet())
        guard case .offload(_, let meta) = r else {
            Issue.record("expected crypto offload, got \(r)")
            return
        }
        #expect(meta.esnHigh == 1)
        #expect(dev.callLog.filter { $0 == "advanceESN" }.count == 1)
    }

    @Test("packet offload RX skips software ESP and policy checks; a failed device status drops")
    func packetRX() throws {
        let (h, _) = try setUp()
        var ok = OffloadMetadata()
        ok.cryptoDone = true
        ok.cryptoSuccess = true
        ok.packetOffloaded = true
        let clear = PacketFactory.ipv4(source: "10.0.2.1", destination: "10.0.1.1", payload: PacketFactory.udp(payload: [1]))
        try h.tunnel()  // an IN policy that would refuse clear traffic in software
        #expect(h.buffers.with(clear) { h.a.input(&$0, ifindex: 2, metadata: ok) }.0 == .deliver)
        #expect(h.buffers.with(clear) { h.a.input(&$0, ifindex: 2) }.0 == .dropped(.inTmplMismatch))
        var bad = ok
        bad.cryptoSuccess = false
        #expect(h.buffers.with(clear) { h.a.input(&$0, ifindex: 2, metadata: bad) }.0 == .dropped(.inError))
    }

    @Test("device counters drive the normal expiry: one soft EXPIRE, then hard EXPIRE and deletion; drops fold in")
    func deviceLifetimes() throws {
        let (h, dev) = try setUp()
        var l = LifetimeConfig()
        l.softPacketLimit = 10
        l.hardPacketLimit = 20
        var c = try outSA(h).currentConfig
        c.lifetime = l
        let sa = try h.a.makeSA(c)
        try h.a.addState(sa, offload: OffloadRequest(ifindex: 2, direction: .inbound, type: .packet))
        _ = h.eventsA.drain()
        var counters = DeviceSACounters()
        counters.packets = 12
        counters.bytes = 1200
        counters.replay = 2
        counters.integrityFailed = 1
        dev.counters.withLock { $0[0x1001] = counters }
        h.a.runTimers()
        #expect(sa.current.packets == 12)
        #expect(sa.stats.replay == 2 && sa.stats.failed == 1)
        #expect(h.a.statistics[.inStateSeqError] == 2)
        #expect(h.a.statistics[.inStateProtoError] == 1)
        h.a.runTimers()
        #expect(h.eventsA.expires().map { $0.1 } == [false], "exactly one soft expire")
        counters.packets = 20
        dev.counters.withLock { $0[0x1001] = counters }
        h.a.deviceLimitEvent()
        h.a.pollDeviceEvents()
        #expect(h.eventsA.expires().map { $0.1 } == [true])
        #expect(h.a.states.count == 0)
        #expect(dev.callLog.suffix(2) == ["stateDelete 0x1001", "stateFree 0x1001"])
        #expect(h.a.statistics[.inStateSeqError] == 2, "the same device counts are not folded in twice")
    }

    @Test("a device going down deletes and frees its SAs and policies and says which went")
    func deviceDown() throws {
        let (h, dev) = try setUp()
        _ = try packetSetup(h)
        try h.a.addState(try outSA(h), offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .packet))
        try h.a.addState(try outSA(h, spi: 0x1005))
        _ = h.eventsA.drain()
        h.a.deviceDown(ifindex: 2)
        #expect(h.a.states.count == 1)
        #expect(h.a.policies.totalCount == 0)
        #expect(dev.callLog.suffix(4) == ["stateDelete 0x1001", "stateFree 0x1001", "policyDelete out", "policyFree out"])
        let flushed = h.eventsA.drain().compactMap { e -> (Int, Int)? in
            if case .deviceFlushed(_, let s, let p) = e { return (s.count, p.count) } else { return nil }
        }
        #expect(flushed.count == 1 && flushed[0] == (1, 1))
    }

    @Test("policy offload needs a device with policy_add; a failed insert after the device add is undone in the device")
    func policyOffload() throws {
        let (h, dev) = try setUp(FakeOffloadDevice(callbacks: [.stateAdd, .stateDelete]))
        #expect(throws: PolicyDatabaseError(errno: 22, message: "Policy offload is not supported")) {
            _ = try packetSetup(h)
        }
        let (h2, dev2) = try setUp()
        _ = try packetSetup(h2)
        #expect(throws: PolicyDatabaseError.self) { _ = try packetSetup(h2) }  // EEXIST
        #expect(dev2.callLog == ["policyAdd out", "policyAdd out", "policyDelete out", "policyFree out"])
        // A device refusal undoes the insert.
        h2.a.flushPolicies()
        dev2.failNextAdd = DeviceError(28, "No space for policy in table!")
        #expect(throws: PolicyDatabaseError(28, "No space for policy in table!")) { _ = try packetSetup(h2) }
        #expect(h2.a.policies.totalCount == 0)
        _ = dev
    }

    @Test("offloaded policies win over better software priorities; strict mode refuses the mix instead")
    func priorities() throws {
        let (h, _) = try setUp()
        let sel = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        let narrow = Selector(family: 4, source: IPPrefix("10.0.1.1/32")!, destination: IPPrefix("10.0.2.1/32")!)
        try h.a.addPolicy(Policy(selector: sel, direction: .outbound, priority: 100, offload: PolicyOffload(ifindex: 2)), update: false)
        try h.a.addPolicy(Policy(selector: narrow, direction: .outbound, action: .block, priority: 1), update: false)
        #expect(h.a.policies.lookup(.outbound, Flow(source: IPAddress("10.0.1.1")!, destination: IPAddress("10.0.2.1")!))?.offload != nil)
        h.a.flushPolicies()
        h.a.strictOffloadPriority.store(true, ordering: .relaxed)
        try h.a.addPolicy(Policy(selector: sel, direction: .outbound, priority: 100, offload: PolicyOffload(ifindex: 2)), update: false)
        #expect(throws: PolicyDatabaseError.self) {
            try h.a.addPolicy(Policy(selector: narrow, direction: .outbound, priority: 50), update: false)
        }
        try h.a.addPolicy(Policy(selector: narrow, direction: .outbound, priority: 200), update: false)
        #expect(throws: PolicyDatabaseError.self) {
            try h.a.addPolicy(Policy(selector: narrow, direction: .inbound, priority: 10), update: false)
            try h.a.addPolicy(Policy(selector: sel, direction: .inbound, priority: 10, offload: PolicyOffload(ifindex: 2)), update: false)
        }
    }
}

@Suite("Packet-offload output cache")
struct OutputCacheTests {
    @Test("a cached decision dies with any change: SA deleted, route moved, policy flushed")
    func invalidation() throws {
        let h = try TwoHosts()
        let dev = FakeOffloadDevice()
        try h.a.attachDevice(dev, ifindex: 2)
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        let sel = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        try h.a.addPolicy(Policy(selector: sel, direction: .outbound, templates: [t], offload: PolicyOffload(ifindex: 2)),
                          update: false)
        let sa = try h.a.makeSA(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: h.a).currentConfig)
        try h.a.addState(sa, offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .packet))
        for _ in 0..<3 {
            guard case .offload = h.send(h.packet()).0 else { Issue.record("expected offload"); return }
        }
        try h.a.deleteState(sa.id, mark: Mark())
        #expect(h.send(h.packet()).0 == .dropped(.outNoStates), "the deleted SA is not used from the cache")
        h.a.flushStates(proto: 0)
        try h.a.addState(try h.a.makeSA(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1002, on: h.a).currentConfig),
                         offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .packet))
        guard case .offload = h.send(h.packet()).0 else { Issue.record("expected offload"); return }
        try h.a.network.addRoute(IPPrefix("192.0.2.2/32")!, device: "lan0", via: nil)
        #expect(h.send(h.packet()).0 == .dropped(.outError), "a route change is seen at once")
        h.a.flushPolicies()
        #expect(h.send(h.packet()) .0 != .dropped(.outError))
    }
}

@Suite("Fail-closed paths found in review")
struct FailClosedTests {
    @Test("a crypto-offload packet too big after ESP is sealed in software and leaves in fragments, never quoted in an ICMP error (IPv6 outer)")
    func noPlaintextInICMP() throws {
        let clock = ManualClock()
        let s = XFRMStack(clock: clock)
        try s.network.addInterface(name: "eth0", kind: "dummy", mtu: 1400)
        try s.network.modify(name: "eth0") { (i: inout Interface) throws(NetworkError) in i.isUp = true }
        try s.network.addAddress(IPPrefix("2001:db8::1/64")!, device: "eth0")
        try s.network.addRoute(IPPrefix("10.0.2.0/24")!, device: "eth0", via: nil)
        let dev = FakeOffloadDevice()
        try s.attachDevice(dev, ifindex: 2)
        let crypto = try ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: PacketFactory.pattern(20), icvBits: 128)
        let sa = try s.makeSA(SAConfig(
            id: SAID(destination: IPAddress("2001:db8::2")!, spi: 0x44), source: IPAddress("2001:db8::1")!,
            selector: .any(family: 4), reqid: 1, mode: .tunnel, crypto: crypto))
        try s.addState(sa, offload: OffloadRequest(ifindex: 2, direction: .outbound, type: .crypto))
        let t = Template(source: IPAddress("2001:db8::1"), destination: IPAddress("2001:db8::2"), mode: 1, reqid: 1)
        try s.addPolicy(Policy(selector: Selector(family: 4, source: IPPrefix("10.0.1.0/24")!,
                                                  destination: IPPrefix("10.0.2.0/24")!),
                               direction: .outbound, templates: [t]), update: false)
        let secret = [UInt8]("plaintext-secret".utf8)
        let big = PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.1", dontFragment: false,
                                     payload: PacketFactory.udp(payload: secret + PacketFactory.pattern(1340)))
        let buffers = TestBuffers()
        let (r, out) = buffers.with(big) { s.output(&$0) }
        // xfrm_dev_offload_ok refuses the device what ESP makes too big: software seals it, the IPv6 layer cuts it.
        #expect(r == .fragment(ifindex: 2, mtu: 1400))
        #expect(out[6] == 50 && out.count > 1400 && !String(decoding: out, as: UTF8.self).contains("plaintext-secret"))
        #expect(s.statistics[.outError] == 0)
    }

    @Test("IPv6 inner, an outer path too small for 1,280 after ESP: Packet Too Big says 1,280, never less (xfrm6_tunnel_check_size)")
    func ipv6TooBigNeverBelowMinimum() throws {
        let s = XFRMStack(clock: ManualClock())
        try s.network.addInterface(name: "eth0", kind: "dummy", mtu: 1300)
        try s.network.modify(name: "eth0") { (i: inout Interface) throws(NetworkError) in i.isUp = true }
        try s.network.addAddress(IPPrefix("2001:db8::1/64")!, device: "eth0")
        try s.network.addRoute(IPPrefix("2001:db8:2::/64")!, device: "eth0", via: nil)
        let crypto = try ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: PacketFactory.pattern(20), icvBits: 128)
        try s.addState(try s.makeSA(SAConfig(
            id: SAID(destination: IPAddress("2001:db8::2")!, spi: 0x46), source: IPAddress("2001:db8::1")!,
            selector: .any(family: 6), reqid: 1, mode: .tunnel, crypto: crypto)))
        let t = Template(source: IPAddress("2001:db8::1"), destination: IPAddress("2001:db8::2"), mode: 1, reqid: 1)
        try s.addPolicy(Policy(selector: Selector(family: 6, source: IPPrefix("2001:db8:1::/64")!,
                                                  destination: IPPrefix("2001:db8:2::/64")!),
                               direction: .outbound, templates: [t]), update: false)
        let buffers = TestBuffers()
        // 1300 - 40 - 8 - 8 - 16 = 1228, less 2: ESP leaves room for 1,226 bytes, under IPv6's minimum.
        let (r, icmp) = buffers.with(PacketFactory.ipv6(payload: PacketFactory.udp(payload: PacketFactory.pattern(1300)))) {
            s.output(&$0)
        }
        #expect(r == .icmpError)
        #expect(icmp[40] == 2 && Int(icmp[44]) << 24 | Int(icmp[45]) << 16 | Int(icmp[46]) << 8 | Int(icmp[47]) == 1280,
                "ICMPv6 Packet Too Big with MTU 1280")
        #expect(s.statistics[.outStateModeError] == 1)
        // A 1,280-byte packet is not refused: sealed, it leaves in outer IPv6 fragments (RFC 8200 §5: a link that
        // cannot carry 1,280 bytes in one piece fragments below IPv6; README "Deliberate differences from Linux").
        let (r2, esp) = buffers.with(PacketFactory.ipv6(payload: PacketFactory.udp(payload: PacketFactory.pattern(1232)))) {
            s.output(&$0)
        }
        #expect(r2 == .fragment(ifindex: 2, mtu: 1300) && esp[6] == 50)
        #expect(s.statistics[.outStateModeError] == 1 && s.statistics[.outError] == 0)
    }

    @Test("transit NAT-T, IKE and ESP for another host are forwarded, not consumed")
    func transit() throws {
        let h = try TwoHosts()
        for payload in [[UInt8(0xff)], [0, 0, 0, 0] + PacketFactory.pattern(30), [0, 0, 0x10, 1] + PacketFactory.pattern(40)] {
            let pkt = PacketFactory.ipv4(source: "192.0.2.1", destination: "10.0.2.77", proto: 17,
                                         payload: PacketFactory.udp(sourcePort: 4500, destinationPort: 4500, payload: payload))
            #expect(h.receive(pkt).0 == .forward)
        }
        let esp = PacketFactory.ipv4(source: "192.0.2.1", destination: "10.0.2.77", proto: 50,
                                     payload: [0, 0, 0x10, 1, 0, 0, 0, 1] + PacketFactory.pattern(40))
        #expect(h.receive(esp).0 == .forward)
    }
}
