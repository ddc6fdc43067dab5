import Testing
import XFRMCommandLine
import XFRMControl
import XFRMCore
import XFRMTestKit

/// `xfrmd --offload-promote`: a key manager that can ask for crypto offload only (strongSwan 5.9, libreswan 4) gets
/// packet offload on the promoted device, with its policies offloaded there too.
@Suite("User API: crypto-offload requests promoted to packet offload")
struct OffloadPromotionTests {
    private static let key = "0x" + String(repeating: "11", count: 20)

    private func run(_ line: String, _ server: XfrmControlServer) throws(CommandError) -> String {
        try runXfrmCommand(line.split(separator: " ").map(String.init), options: XfrmCLIOptions(),
                           transport: Recorder(server), interfaces: OneInterface())
    }

    /// The device's interface: nic0, index 2; eth9, index 9, an interface the stack does not know.
    private struct OneInterface: InterfaceNameResolver {
        func ifindex(named: String) -> Int32? { ["nic0": 2, "eth9": 9][named] }
        func name(ofIndex: Int32) -> String? { [2: "nic0", 9: "eth9"][ofIndex] }
    }

    /// A stack with a recording device on interface 2 (`nic0`), the default route through it.
    private func server(promoting: Bool) throws -> (XfrmControlServer, FakeOffloadDevice) {
        let stack = XFRMStack(clock: ManualClock())
        let device = FakeOffloadDevice()
        _ = try stack.network.addInterface(name: "nic0", kind: "simnic", index: 2)
        try stack.network.modify(name: "nic0") { (i: inout Interface) throws(NetworkError) in i.isUp = true }
        try stack.network.addRoute(IPPrefix("0.0.0.0/0")!, device: "nic0", via: nil)
        try stack.attachDevice(device, ifindex: 2)
        return (XfrmControlServer(stack: stack, packetOffloadPromotion: promoting ? 2 : nil), device)
    }

    private func addSA(_ spi: String, offload: String, _ server: XfrmControlServer) throws {
        _ = try self.run("state add src 192.0.2.1 dst 192.0.2.2 proto esp spi \(spi) mode tunnel reqid 1 aead "
                         + "rfc4106(gcm(aes)) \(Self.key) 128 \(offload)", server)
    }

    @Test("a crypto-offload SA on the promoted device is packet-offloaded, and so is every IPsec policy")
    func promoted() throws {
        let (server, device) = try self.server(promoting: true)
        try self.addSA("0x100", offload: "offload dev nic0 dir out", server)
        try self.addSA("0x101", offload: "", server)  // asked for no offload: stays in software
        let states = try self.run("state list", server)
        #expect(states.contains("crypto offload parameters: dev nic0 dir out mode packet"), "\(states)")
        #expect(states.components(separatedBy: "offload parameters").count == 2, "\(states)")
        #expect(device.callLog.contains("stateAdd 0x100 packet"), "\(device.callLog)")

        _ = try self.run("policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir out tmpl src 192.0.2.1 dst 192.0.2.2 "
                         + "proto esp mode tunnel reqid 1", server)
        _ = try self.run("policy add src 10.0.3.0/24 dst 10.0.4.0/24 dir out action block", server)
        _ = try self.run("policy add src 10.0.5.0/24 dst 10.0.6.0/24 dir out", server)  // allow without templates
        let policies = try self.run("policy list", server)
        #expect(policies.components(separatedBy: "crypto offload parameters: dev nic0 mode packet").count == 2,
                "\(policies)")
        #expect(device.callLog.filter { $0.hasPrefix("policyAdd") } == ["policyAdd out"], "\(device.callLog)")
    }

    @Test("only what the device can take is promoted: one ESP template, not AH, not IPComp before ESP; a request on an interface the stack does not know is promoted (the route leads to the NIC)")
    func promotedOnlyWhatFits() throws {
        let (server, device) = try self.server(promoting: true)
        _ = try self.run("policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir out tmpl src 192.0.2.1 dst 192.0.2.2 "
                         + "proto comp mode tunnel reqid 1 tmpl proto esp mode transport reqid 1", server)
        _ = try self.run("policy add src 10.0.3.0/24 dst 10.0.4.0/24 dir out tmpl src 192.0.2.1 dst 192.0.2.2 "
                         + "proto ah mode tunnel reqid 2", server)
        #expect(!(try self.run("policy list", server)).contains("offload"))
        #expect(device.callLog.isEmpty, "\(device.callLog)")
        try self.addSA("0x100", offload: "offload dev eth9 dir out", server)
        #expect(try self.run("state list", server).contains("mode packet"))
        #expect(device.callLog == ["stateAdd 0x100 packet"], "\(device.callLog)")
    }

    @Test("without promotion a crypto-offload request stays crypto offload and policies stay in software")
    func notPromoted() throws {
        let (server, device) = try self.server(promoting: false)
        try self.addSA("0x100", offload: "offload dev nic0 dir out", server)
        _ = try self.run("policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir out tmpl src 192.0.2.1 dst 192.0.2.2 "
                         + "proto esp mode tunnel reqid 1", server)
        #expect(try self.run("state list", server).contains("crypto offload parameters: dev nic0 dir out mode crypto"))
        #expect(!(try self.run("policy list", server)).contains("offload"))
        #expect(device.callLog == ["stateAdd 0x100 crypto"], "\(device.callLog)")
    }
}
