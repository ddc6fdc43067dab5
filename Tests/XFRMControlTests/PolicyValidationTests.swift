import Testing
import XFRMCommandLine
import XFRMControl
import XFRMCore
import XFRMPacket
import XFRMWire

/// Policy requests the kernel refuses, and template families as the kernel lists them (verify_newpolicy_info,
/// validate_tmpl).
@Suite("User API: policy validation and template families")
struct PolicyValidationTests {
    private func run(_ line: String, _ server: XfrmControlServer) throws(CommandError) -> String {
        try runXfrmCommand(line.split(separator: " ").map(String.init), options: XfrmCLIOptions(),
                           transport: Recorder(server))
    }

    @Test("an optional tunnel template in an OUT policy is refused with the kernel's message")
    func optionalTunnelOut() throws {
        let server = XfrmControlServer(stack: XFRMStack(clock: ManualClock()))
        do {
            _ = try self.run("policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir out tmpl src 192.0.2.1 dst 192.0.2.2 "
                             + "proto esp mode tunnel level use", server)
            Issue.record("accepted")
        } catch {
            #expect(error.description.contains("Mode in optional template not allowed in outbound policy"))
        }
        // The same template is fine inbound.
        _ = try self.run("policy add src 10.0.2.0/24 dst 10.0.1.0/24 dir in tmpl src 192.0.2.2 dst 192.0.2.1 "
                         + "proto esp mode tunnel level use", server)
    }

    @Test("a policy selector of family AF_UNSPEC is refused: Invalid selector family")
    func unspecSelector() throws {
        let server = XfrmControlServer(stack: XFRMStack(clock: ManualClock()))
        var info = XfrmUserPolicyInfo()
        info.sel.family = AddressFamily.unspec
        info.dir = 1
        let reply = server.request(XfrmMessage(.newPolicy, flags: NetlinkFlags.request | NetlinkFlags.ack,
                                               body: .policyInfo(info)))
        guard case .error(let errno, let text) = reply.first?.body else {
            Issue.record("no error reply: \(reply)")
            return
        }
        #expect(errno == -22 || errno == 22)
        #expect(text == "Invalid selector family")
    }

    @Test("a transport template without addresses after a tunnel template of the other family lists with that family")
    func templateFamilyListed() throws {
        let server = XfrmControlServer(stack: XFRMStack(clock: ManualClock()))
        _ = try self.run("policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir out tmpl src 2001:db8::1 dst 2001:db8::2 "
                         + "proto esp mode tunnel reqid 1 tmpl proto esp mode transport reqid 2", server)
        let out = try self.run("policy list", server)
        #expect(out.contains("tmpl src :: dst ::"), "\(out)")
    }
}

/// State requests and listings where the kernel was seen to differ (../shared/interop/kernel-vm).
@Suite("User API: states as the kernel keeps and lists them")
struct StateFidelityTests {
    private let aead = "aead rfc4106(gcm(aes)) 0x0102030405060708090a0b0c0d0e0f1011121314 128"

    private func run(_ line: String, _ server: XfrmControlServer) throws(CommandError) -> String {
        try runXfrmCommand(line.split(separator: " ").map(String.init), options: XfrmCLIOptions(),
                           transport: Recorder(server))
    }

    private func refusal(_ line: String) -> String {
        let server = XfrmControlServer(stack: XFRMStack(clock: ManualClock()))
        do {
            _ = try self.run(line, server)
            return "accepted"
        } catch {
            return error.description
        }
    }

    @Test("tfcpad in transport mode and encap espinudp-nonike are refused with the kernel's messages")
    func refusals() {
        let sa = "state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 mode transport \(aead)"
        #expect(self.refusal(sa + " tfcpad 16").contains("TFC padding can only be used in tunnel mode"))
        #expect(self.refusal(sa + " encap espinudp-nonike 4500 4500 0.0.0.0")
            .contains("Unsupported encapsulation type for ESP"))
        #expect(self.refusal("state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 mode transport "
                             + "enc cbc(aes) 0x0102030405060708090a0b0c0d0e0f10").contains("Encryption without integrity"))
    }

    @Test("a window in XFRMA_REPLAY_ESN_VAL lists replay-window 0; the mark is kept masked; output-mark is listed")
    func listings() throws {
        let server = XfrmControlServer(stack: XFRMStack(clock: ManualClock()))
        _ = try self.run("state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 mode tunnel \(aead) "
                         + "replay-window 64 mark 0x17 mask 0xf0 output-mark 0x5 mask 0xff", server)
        let out = try self.run("state list", server)
        #expect(out.contains("\treplay-window 0 \n"), "\(out)")
        #expect(out.contains("mark 0x10/0xf0 "), "\(out)")
        #expect(out.contains("output-mark 0x5/0xff"), "\(out)")
        #expect(out.contains("replay_window 64, bitmap-length 2"), "\(out)")
    }
}
