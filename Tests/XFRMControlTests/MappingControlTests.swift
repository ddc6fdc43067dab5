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
}
