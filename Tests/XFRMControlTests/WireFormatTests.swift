import Testing
import XFRMCommandLine
import XFRMControl
import XFRMCore
import XFRMPacket
import XFRMWire

/// The netlink framing a kernel client (iproute2, libmnl, strongSwan) relies on.
@Suite("User API: netlink framing")
struct WireFormatTests {
    private func le32(_ b: [UInt8], _ at: Int) -> UInt32 {
        UInt32(b[at]) | UInt32(b[at + 1]) << 8 | UInt32(b[at + 2]) << 16 | UInt32(b[at + 3]) << 24
    }

    private func le16(_ b: [UInt8], _ at: Int) -> UInt16 { UInt16(b[at]) | UInt16(b[at + 1]) << 8 }

    @Test("GETSADINFO and GETSPDINFO requests carry their u32 body (xfrm_msg_min)")
    func infoRequestsCarryU32() throws {
        let server = XfrmControlServer(stack: XFRMStack(clock: ManualClock()))
        let rec = Recorder(server)
        _ = try runXfrmCommand(["state", "count"], options: XfrmCLIOptions(), transport: rec)
        _ = try runXfrmCommand(["policy", "count"], options: XfrmCLIOptions(), transport: rec)
        #expect(rec.requests.count == 2)
        for m in rec.requests {
            let bytes = m.encode()
            #expect(bytes.count == 20)
            #expect(self.le32(bytes, 16) == 0xffff_ffff)
            #expect(server.request(raw: bytes).first.map { if case .error = $0.body { false } else { true } } == true)
        }
    }

    @Test("a request shorter than its fixed body (a 32-bit client's xfrm_usersa_info) is EINVAL, header echoed, capped, with extack")
    func shortBodyRefused() throws {
        var info = XfrmUserSAInfo()
        info.family = AddressFamily.inet
        var m = XfrmMessage(.newSA, flags: NetlinkFlags.request | NetlinkFlags.ack, body: .saInfo(info))
        m.sequence = 77
        m.portID = 4242
        var bytes = m.encode()
        bytes = Array(bytes.prefix(16 + 220))  // the i386 layout is 4 bytes shorter
        bytes[0] = UInt8(bytes.count & 0xff)
        bytes[1] = UInt8(bytes.count >> 8)
        let server = XfrmControlServer(stack: XFRMStack(clock: ManualClock()))
        let replies = server.request(raw: bytes)
        #expect(replies.count == 1)
        let wire = try #require(replies.first).encode()
        #expect(self.le16(wire, 4) == NetlinkControlType.error)
        let flags = self.le16(wire, 6)
        #expect(flags & NetlinkFlags.capped != 0 && flags & NetlinkFlags.ackTLVs != 0)
        #expect(self.le32(wire, 8) == 77 && self.le32(wire, 12) == 4242, "sequence and requester port id")
        #expect(Int32(bitPattern: self.le32(wire, 16)) == -22)
        #expect(Array(wire[20..<36]) == Array(bytes[0..<16]), "the request's header is echoed")
        let decoded = try XfrmMessage.decode(wire)
        #expect(decoded.body == .error(errno: -22, message: "Invalid header length"))
        #expect(server.request(raw: m.encode()).count == 1)
    }

    @Test("an ACK echoes the header and is capped; a dump ends with NLMSG_DONE carrying its 4-byte status")
    func ackAndDone() throws {
        let server = XfrmControlServer(stack: XFRMStack(clock: ManualClock()))
        var flush = XfrmMessage(.flushPolicy, flags: NetlinkFlags.request | NetlinkFlags.ack, body: .flushPolicy)
        flush.portID = 99
        let ack = try #require(server.request(flush).first)
        #expect(ack.portID == 99 && ack.flags & NetlinkFlags.capped != 0)
        #expect(ack.echoedRequest.type == XfrmMessageType.flushPolicy.rawValue)
        var dump = XfrmMessage(.getSA, flags: NetlinkFlags.request | NetlinkFlags.dump, body: .empty)
        dump.portID = 99
        let replies = server.request(dump)
        let done = try #require(replies.last)
        #expect(done.portID == 99)
        let bytes = done.encode()
        #expect(self.le16(bytes, 4) == NetlinkControlType.done && bytes.count == 20 && self.le32(bytes, 16) == 0)
    }
}
