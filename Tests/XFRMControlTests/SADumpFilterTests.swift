import Testing
import XFRMCommandLine
import XFRMControl
import XFRMCore
import XFRMPacket
import XFRMWire

/// GETSA dumps limited as xfrm_dump_sa limits them: XFRMA_PROTO and XFRMA_ADDRESS_FILTER (what `ip xfrm state list`
/// sends on every dump).
@Suite("User API: SA dumps with a protocol and an address filter")
struct SADumpFilterTests {
    private func server() throws -> XfrmControlServer {
        let server = XfrmControlServer(stack: XFRMStack(clock: ManualClock()))
        let aead = "aead rfc4106(gcm(aes)) 0x0102030405060708090a0b0c0d0e0f1011121314 128"
        for line in [
            "state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 mode tunnel \(aead)",
            "state add src 198.51.100.1 dst 198.51.100.2 proto esp spi 0x200 mode tunnel \(aead)",
            "state add src 2001:db8::1 dst 2001:db8::2 proto esp spi 0x300 mode tunnel \(aead)",
        ] {
            _ = try runXfrmCommand(line.split(separator: " ").map(String.init), options: XfrmCLIOptions(),
                                   transport: Recorder(server))
        }
        return server
    }

    /// struct xfrm_address_filter in host order: saddr, daddr, family, splen, dplen.
    private func filter(_ source: String, _ sourceLength: UInt8, _ destination: String, _ destinationLength: UInt8,
                        family: UInt16) -> XfrmAttribute {
        var p = XfrmAddress(IPAddress(source)!).bytes + XfrmAddress(IPAddress(destination)!).bytes
        p += [UInt8(family & 0xff), UInt8(family >> 8), sourceLength, destinationLength]
        return .unknown(type: XfrmAttributeType.addressFilter.rawValue, payload: p)
    }

    /// The SPIs a dump lists, or the errno it fails with.
    private func dump(_ server: XfrmControlServer, _ attributes: [XfrmAttribute]) -> Result<[UInt32], ControlErrno> {
        let replies = server.request(XfrmMessage(.getSA, flags: NetlinkFlags.request | NetlinkFlags.dump, body: .empty,
                                                 attributes: attributes))
        #expect(!replies.contains { $0.type == NetlinkControlType.error }, "a dump answers in its NLMSG_DONE")
        if case .done(let e, _) = replies.last?.body, e != 0 { return .failure(ControlErrno(value: e)) }
        return .success(replies.compactMap { m -> UInt32? in
            if case .saInfo(let info) = m.body { return info.id.spi }
            return nil
        }.sorted())
    }

    struct ControlErrno: Error, Equatable { let value: Int32 }

    @Test("a filter keeps the SAs of its family whose source and destination are in its prefixes; prefix 0 and family 0 keep all")
    func addressFilter() throws {
        let s = try self.server()
        #expect(self.dump(s, []) == .success([0x100, 0x200, 0x300]))
        #expect(self.dump(s, [self.filter("0.0.0.0", 0, "0.0.0.0", 0, family: 0)]) == .success([0x100, 0x200, 0x300]))
        #expect(self.dump(s, [self.filter("0.0.0.0", 0, "0.0.0.0", 0, family: AddressFamily.inet)])
            == .success([0x100, 0x200]))
        #expect(self.dump(s, [self.filter("0.0.0.0", 0, "192.0.2.0", 24, family: AddressFamily.inet)]) == .success([0x100]))
        #expect(self.dump(s, [self.filter("198.51.100.1", 32, "198.51.100.0", 25, family: AddressFamily.inet)])
            == .success([0x200]))
        #expect(self.dump(s, [self.filter("198.51.100.1", 32, "198.51.100.128", 25, family: AddressFamily.inet)])
            == .success([]))
        #expect(self.dump(s, [self.filter("2001:db8::", 32, "::", 0, family: AddressFamily.inet6)]) == .success([0x300]))
    }

    @Test("XFRMA_PROTO: 0 lists every protocol, 255 (IPSEC_PROTO_ANY) AH, ESP and IPComp, another number only its own")
    func protocolFilter() throws {
        let s = try self.server()
        #expect(self.dump(s, [.proto(0)]) == .success([0x100, 0x200, 0x300]))
        #expect(self.dump(s, [.proto(XfrmProto.any)]) == .success([0x100, 0x200, 0x300]))
        #expect(self.dump(s, [.proto(XfrmProto.esp)]) == .success([0x100, 0x200, 0x300]))
        #expect(self.dump(s, [.proto(XfrmProto.ah)]) == .success([]))
    }

    @Test("a prefix past 128 bits is EINVAL, a filter shorter than its struct ERANGE, in the dump's NLMSG_DONE (netlink_dump_done) with the extack; nothing is listed")
    func badFilters() throws {
        let s = try self.server()
        let short = XfrmAttribute.unknown(type: XfrmAttributeType.addressFilter.rawValue, payload: [UInt8](repeating: 0, count: 35))
        let replies = s.request(XfrmMessage(.getSA, flags: NetlinkFlags.request | NetlinkFlags.dump, body: .empty,
                                            attributes: [short]))
        #expect(replies.count == 1 && replies[0].flags & NetlinkFlags.multi != 0)
        #expect(replies.first?.body == .done(status: -34, message: "Attribute failed policy validation"))
        // On the wire: the status int, then NLMSGERR_ATTR_MSG under NLM_F_ACK_TLVS, and back.
        let wire = try #require(replies.first).encode()
        #expect(wire[7] & 0x02 != 0, "NLM_F_ACK_TLVS (0x200): the flags' high byte (little-endian, bytes 6-7)")
        #expect(try XfrmMessage.decode(wire).body == .done(status: -34, message: "Attribute failed policy validation"))
        #expect(self.dump(s, [self.filter("0.0.0.0", 129, "0.0.0.0", 0, family: 0)]) == .failure(ControlErrno(value: -22)))
        #expect(self.dump(s, [self.filter("0.0.0.0", 0, "0.0.0.0", 129, family: 0)]) == .failure(ControlErrno(value: -22)))
        #expect(self.dump(s, [.unknown(type: XfrmAttributeType.addressFilter.rawValue, payload: [UInt8](repeating: 0, count: 35))])
            == .failure(ControlErrno(value: -34)))
    }
}
