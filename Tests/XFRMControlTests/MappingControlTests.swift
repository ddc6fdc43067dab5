import Testing
import XFRMCommandLine
import XFRMControl
import XFRMCore
import XFRMPacket
import XFRMTestKit
import XFRMWire

/// XFRM_MSG_MAPPING through the user API: build_mapping's xfrm_user_mapping on XFRMNLGRP_MAPPING, printed as
/// iproute2's xfrm_mapping_print prints it.
@Suite("User API: NAT-T mapping changes (XFRM_MSG_MAPPING)")
struct MappingControlTests {
    @Test("the event is a 64-byte xfrm_user_mapping (ports in network order) that the monitor prints as iproute2 does")
    func messageAndMonitor() throws {
        let stack = XFRMStack(clock: ManualClock())
        let server = XfrmControlServer(stack: stack)
        let add = "state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0xc0ffee reqid 7 mode tunnel aead "
            + "rfc4106(gcm(aes)) 0x0102030405060708090a0b0c0d0e0f1011121314 128 encap espinudp 4500 4500 0.0.0.0"
        _ = try runXfrmCommand(add.split(separator: " ").map(String.init), options: XfrmCLIOptions(),
                               transport: Recorder(server))
        let sa = try #require(stack.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0xc0ffee)))
        let moved: IPAddress = IPAddress("198.51.100.7")!
        let m = try #require(server.message(for: .mapping(sa, newSource: moved, newPort: 31337, oldPort: 4500)))
        let bytes = m.encode()
        #expect(bytes.count == 16 + 64 && bytes[4] == 38 && bytes[5] == 0, "XFRM_MSG_MAPPING, 64-byte body")
        #expect(Array(bytes[16 + 60..<16 + 64]) == [0x11, 0x94, 0x7a, 0x69], "old and new port, network order")
        let decoded = try XfrmMessage.decode(bytes)
        guard case .mapping(let um) = decoded.body else {
            Issue.record("not decoded as a mapping: \(decoded.body)")
            return
        }
        #expect(um.reqid == 7 && um.id.spi == 0xc0ffee && um.id.proto == 50 && um.id.family == AddressFamily.inet)
        #expect(formatMonitorEvent(decoded, options: XfrmCLIOptions())
            == "Mapping change 192.0.2.1:4500 -> 198.51.100.7:31337\n\tdst 192.0.2.2  reqid 0x7 protocol esp  SPI 0xc0ffee\n")
    }

    @Test("XFRMA_MTIMER_THRESH is taken on a NAT-T SA and listed back; refused without encap and on an output SA, with the kernel's texts")
    func thresholdAttribute() throws {
        let stack = XFRMStack(clock: ManualClock())
        let server = XfrmControlServer(stack: stack)
        // The NEWSA the command layer makes (recorded on a scratch server), then sent with the attribute.
        let scratch = Recorder(XfrmControlServer(stack: XFRMStack(clock: ManualClock())))
        let add = "state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0xc0ffee reqid 7 mode tunnel aead "
            + "rfc4106(gcm(aes)) 0x0102030405060708090a0b0c0d0e0f1011121314 128"
        for extra in ["", " encap espinudp 4500 4500 0.0.0.0 dir out", " encap espinudp 4500 4500 0.0.0.0"] {
            _ = try runXfrmCommand((add + extra).split(separator: " ").map(String.init), options: XfrmCLIOptions(),
                                   transport: scratch)
            _ = scratch.server.request(XfrmMessage(type: XfrmMessageType.flushSA.rawValue, flags: NetlinkFlags.request,
                                                   body: .flushSA(proto: 0)))
        }
        let adds = scratch.requests.filter { $0.type == XfrmMessageType.newSA.rawValue }
        #expect(adds.count == 3)
        func send(_ m: XfrmMessage) throws -> XfrmMessage? {
            var m = m
            m.attributes.append(.mappingMaxAge(20))
            return server.request(try XfrmMessage.decode(m.encode())).first
        }
        let refusals = ["MTIMER_THRESH attribute can only be set on ENCAP states",
                        "MTIMER_THRESH attribute should not be set on output SA"]
        for (m, text) in zip(adds, refusals) {
            let reply = try send(m)
            guard case .error(let errno, let message)? = reply?.body else {
                Issue.record("expected an error, got \(String(describing: reply))")
                continue
            }
            #expect(errno == -22 && message == text)
        }
        #expect(stack.states.count == 0, "nothing half-applied")
        guard case .error(0, _)? = try send(adds[2])?.body else {
            Issue.record("the NAT-T input SA with a threshold was refused")
            return
        }
        let sa = try #require(stack.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0xc0ffee)))
        #expect(sa.config.mappingMaxAge == 20)
        let listed = try #require(server.message(for: .stateAdded(sa, update: false)))
        #expect(try XfrmMessage.decode(listed.encode()).attributes.contains(.mappingMaxAge(20)),
                "XFRMA_MTIMER_THRESH listed, a u32 on the wire")
    }
}
