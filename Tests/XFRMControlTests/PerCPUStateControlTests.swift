import Testing
import XFRMCommandLine
import XFRMControl
import XFRMCore
import XFRMPacket
import XFRMTestKit
import XFRMWire

/// XFRMA_SA_PCPU through the user API (Linux 6.13, xfrm_user.c): accepted, listed and sent with ACQUIRE as the
/// kernel does, refused as the kernel refuses.
@Suite("User API: per-CPU SAs (XFRMA_SA_PCPU)")
struct PerCPUStateControlTests {
    private func run(_ line: String, _ server: XfrmControlServer) throws(CommandError) -> String {
        try runXfrmCommand(line.split(separator: " ").map(String.init), options: XfrmCLIOptions(),
                           transport: Recorder(server))
    }

    private func server(cpus: UInt32 = 4) -> XfrmControlServer {
        let stack = XFRMStack(clock: ManualClock())
        stack.possibleCPUs.store(cpus, ordering: .relaxed)
        return XfrmControlServer(stack: stack)
    }

    private static let add = "state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x101 reqid 1 mode tunnel "
        + "aead rfc4106(gcm(aes)) 0x0102030405060708090a0b0c0d0e0f1011121314 128"

    @Test("XFRMA_SA_PCPU round-trips through the codec as a u32 of type 35")
    func codecRoundTrip() throws {
        var info = XfrmUserSAInfo()
        info.family = AddressFamily.inet
        let m = XfrmMessage(.newSA, flags: NetlinkFlags.request, body: .saInfo(info), attributes: [.saPCPU(7)])
        let bytes = m.encode()
        let decoded = try XfrmMessage.decode(bytes)
        #expect(decoded.attributes == [.saPCPU(7)])
        // nlattr: length 8, type 35, then the u32 in host order.
        #expect(Array(bytes.suffix(8)) == [8, 0, 35, 0, 7, 0, 0, 0])
    }

    @Test("pcpu-num is kept and listed after dir, before sel, as iproute2 prints it")
    func listed() throws {
        let s = self.server()
        _ = try self.run(Self.add + " dir out pcpu-num 3", s)
        let out = try self.run("state list", s)
        #expect(out.contains("\tdir out\n\tpcpu-num 3\n\tsel src 0.0.0.0/0 dst 0.0.0.0/0 \n"))
        let sa = try #require(s.stack.states.list().first)
        #expect(sa.config.pcpuNum == 3)
    }

    @Test("pcpu-num without dir is EINVAL: SA_PCPU only supported with SA_DIR")
    func needsDirection() throws {
        let s = self.server()
        do {
            _ = try self.run(Self.add + " pcpu-num 1", s)
            Issue.record("accepted")
        } catch {
            #expect(error.description.contains("SA_PCPU only supported with SA_DIR"))
        }
        #expect(s.stack.states.count == 0)
    }

    @Test("a CPU that does not exist is refused: ERANGE on NEWSA, EINVAL on ALLOCSPI, both pCPU number too big")
    func cpuOutOfRange() throws {
        let s = self.server(cpus: 4)
        var info = XfrmUserSAInfo()
        info.family = AddressFamily.inet
        info.id.daddr = XfrmAddress(IPAddress("192.0.2.2")!)
        info.saddr = XfrmAddress(IPAddress("192.0.2.1")!)
        info.id.proto = XfrmProto.esp
        info.id.spi = 0x101
        info.mode = 1
        let aead = XfrmAlgorithm(name: "rfc4106(gcm(aes))", key: Array(repeating: 1, count: 20), lengthBits: 128)
        let bad = XfrmMessage(.newSA, flags: NetlinkFlags.request | NetlinkFlags.ack, body: .saInfo(info),
                              attributes: [.algAEAD(aead), .saDir(XfrmSADir.outbound), .saPCPU(4)])
        #expect(s.request(bad).first?.body == .error(errno: -34, message: "pCPU number too big"))
        var spi = XfrmUserSPIInfo()
        spi.info = info
        spi.min = 0x100
        spi.max = 0x1000
        let alloc = XfrmMessage(.allocSPI, flags: NetlinkFlags.request, body: .spiInfo(spi), attributes: [.saPCPU(9)])
        #expect(s.request(alloc).first?.body == .error(errno: -22, message: "pCPU number too big"))
        var good = bad
        good.attributes = [.algAEAD(aead), .saDir(XfrmSADir.outbound), .saPCPU(3)]
        #expect(s.request(good).first.map { if case .error(0, _) = $0.body { true } else { false } } == true)
        #expect(s.stack.states.count == 1)
    }

    @Test("an ACQUIRE for a CPU carries XFRMA_SA_PCPU and the monitor prints it in the policy block")
    func acquireCarriesCPU() throws {
        let s = self.server()
        let events = s.stack.events.subscribe()
        _ = try self.run(Self.add + " dir out", s)
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        try s.stack.addPolicy(Policy(selector: Selector(family: 4, source: IPPrefix("10.0.1.0/24")!,
                                                        destination: IPPrefix("10.0.2.0/24")!),
                                     direction: .outbound, flags: Policy.cpuAcquireFlag, templates: [t]), update: false)
        try s.stack.network.addInterface(name: "eth0", kind: "dummy")
        try s.stack.network.modify(name: "eth0") { (i: inout Interface) throws(NetworkError) in i.isUp = true }
        try s.stack.network.addAddress(IPPrefix("192.0.2.1/24")!, device: "eth0")
        try s.stack.network.addRoute(IPPrefix("10.0.2.0/24")!, device: "eth0", via: IPAddress("192.0.2.2"))
        let pool = PacketPool(count: 4)
        var b = pool.allocate()!
        defer { pool.release(b) }
        _ = b.append(contentsOf: PacketFactory.ipv4(payload: PacketFactory.udp(payload: [1, 2, 3])))
        let r = s.stack.output(&b, cpu: 2)
        #expect(r == .transmit(ifindex: 2), "the fallback SA carries the packet")
        let acquire = try #require(events.drain().compactMap { e -> XfrmMessage? in
            guard case .acquire = e else { return nil }
            return s.message(for: e)
        }.first)
        #expect(acquire.attributes.contains(.saPCPU(2)))
        let text = formatMonitorEvent(acquire, options: XfrmCLIOptions())
        #expect(text.contains("\tpcpu-num 2\n"))
    }
}
