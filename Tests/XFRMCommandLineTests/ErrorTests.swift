import Testing
import XFRMWire
@testable import XFRMCommandLine

private let esp = "state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 1 enc cbc(aes) 0x00"

/// Each command line and the one line iproute2 prints for it (ipxfrm.c, xfrm_state.c, xfrm_policy.c, utils.c).
private let cases: [(String, String)] = [
    // offload and dir
    (esp + " offload dev eth9 dir in", "Error: argument \"eth9\" is wrong: Invalid device name"),
    (esp + " offload packet eth0 dir in", "Error: argument \"eth0\" is wrong: Missing dev keyword"),
    (esp + " offload crypto dev eth0 in", "Error: argument \"in\" is wrong: Missing DIR keyword"),
    (esp + " offload dev eth0 dir both", "Error: argument \"both\" is wrong: DIR value is not \"in\" or \"out\""),
    (esp + " dir sideways", "Error: argument \"sideways\" is wrong: DIR value is not \"in\" or \"out\""),
    (esp + " offload dev eth0", "Command line is not complete. Try option \"help\""),
    // replay
    (esp + " flag esn", "Error: esn flag set without replay-window."),
    (esp + " replay-window 5000", "Error: replay-window (5000) > XFRMA_REPLAY_ESN_MAX (4096)."),
    (esp + " replay-window x", "Error: argument \"x\" is wrong: value after \"replay-window\" is invalid"),
    (esp + " replay-oseq -1", "Error: argument \"-1\" is wrong: value after \"replay-oseq\" is invalid"),
    // ID
    (esp + " bogus", "Error: argument \"bogus\" is wrong: unknown"),
    ("state add enc cbc(aes) 0x00", "Not enough information: ID is required"),
    ("state add src 10.0.0.1 dst 10.0.0.2 spi 1", "Error: argument \"XFRM-PROTO\" is required"),
    ("state add src 10.0.0.1 dst ::1 proto esp",
     "Error: argument \"esp\" is wrong: the same address family is required between values after \"src\" and \"dst\""),
    ("state add src 10.0.0.300 dst 10.0.0.2 proto esp", "Error: any valid prefix is expected rather than \"10.0.0.300\"."),
    ("state add src any dst 10.0.0.2 proto esp",
     "Error: argument \"any\" is wrong: value after \"src\" has an unrecognized address family"),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto foo", "Error: argument \"foo\" is wrong: XFRM-PROTO value is invalid"),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto esp spi zz", "Error: argument \"zz\" is wrong: SPI value is invalid"),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto comp spi 0x10000 comp deflate",
     "SPI value is too large with XFRM-PROTO value \"comp\""),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto route2 spi 1", "\"spi\" is invalid with XFRM-PROTO value \"route2\""),
    ("state add src", "Command line is not complete. Try option \"help\""),
    // algorithms
    ("state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 1 enc", "Error: argument \"ALGO-NAME\" is required"),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 1 enc cbc(aes)", "Error: argument \"ALGO-KEYMAT\" is required"),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 1 aead gcm 0x00", "Error: argument \"ALGO-ICV-LEN\" is required"),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 1 aead gcm 0x00 x",
     "Error: argument \"x\" is wrong: ALGO-ICV-LEN value is invalid"),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto ah spi 1 auth-trunc sha 0x00",
     "Error: argument \"ALGO-TRUNC-LEN\" is required"),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 1 enc cbc(aes) 0xzz",
     "Error: argument \"0xzz\" is wrong: ALGO-KEYMAT value is invalid"),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 1 enc x 0x" + String(repeating: "00", count: 513),
     "Error: argument \"0x" + String(repeating: "00", count: 513) + "\" is wrong: ALGO-KEYMAT value makes buffer overflow"),
    (esp + " enc cbc(aes) 0x00", "Error: duplicate \"ALGO-TYPE\": \"enc\" is the second value."),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 1 aead gcm 0x00 64 auth x 0x00",
     "Error: duplicate \"ALGO-TYPE\": \"auth\" is the second value."),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 1 auth hmac(sha1) 0x00",
     "ALGO-TYPE value \"enc\" or \"aead\" is required with XFRM-PROTO value \"esp\""),
    (esp + " comp deflate", "ALGO-TYPE value \"comp\" is invalid with XFRM-PROTO value \"esp\""),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto ah spi 1 auth x 0x00 enc y 0x00",
     "ALGO-TYPE values \"enc\", \"aead\", and \"comp\" are invalid with XFRM-PROTO value \"ah\""),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto ah spi 1",
     "ALGO-TYPE value \"auth\" or \"auth-trunc\" is required with XFRM-PROTO value \"ah\""),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto comp spi 1 comp deflate enc x 0x00",
     "ALGO-TYPE values \"enc\", \"auth\", \"auth-trunc\", and \"aead\" are invalid with XFRM-PROTO value \"comp\""),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto comp spi 1", "ALGO-TYPE value \"comp\" is required with XFRM-PROTO value \"comp\""),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto route2 enc x 0x00", "ALGO is invalid with XFRM-PROTO value \"route2\""),
    // modes and coa
    (esp + " mode ro", "MODE value is invalid with XFRM-PROTO value \"esp\""),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto ah spi 1 auth x 0x00 mode beet",
     "MODE value is invalid with XFRM-PROTO value \"ah\""),
    (esp + " mode sideways", "Error: argument \"sideways\" is wrong: MODE value is invalid"),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto route2", "\"mode\" is required with XFRM-PROTO value \"route2\""),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto hao mode tunnel", "MODE value is invalid with XFRM-PROTO value \"hao\""),
    ("state add src 10.0.0.1 dst 10.0.0.2 proto route2 mode ro", "\"coa\" is required with XFRM-PROTO value \"route2\""),
    (esp + " coa 10.0.0.9", "\"coa\" is invalid with XFRM-PROTO value \"esp\""),
    (esp + " coa 10.0.0.9 coa 10.0.0.8", "Error: duplicate \"coa\": \"coa\" is the second value."),
    // other values
    (esp + " mark x", "Error: argument \"x\" is wrong: MARK value is invalid"),
    (esp + " mark 1 mask y", "Error: argument \"y\" is wrong: MASK value is invalid"),
    (esp + " reqid -2", "Error: argument \"-2\" is wrong: REQID value is invalid"),
    (esp + " seq 0x1ffffffff", "Error: argument \"0x1ffffffff\" is wrong: SEQ value is invalid"),
    (esp + " limit foo 1", "Error: argument \"foo\" is wrong: LIMIT value is invalid"),
    (esp + " limit time-soft 1s", "Error: argument \"1s\" is wrong: value after \"time-soft\" is invalid"),
    (esp + " encap foo 1 2 0.0.0.0", "Error: argument \"foo\" is wrong: ENCAP-TYPE value is invalid"),
    (esp + " encap espinudp x 4500 0.0.0.0", "Error: argument \"x\" is wrong: SPORT value after \"encap\" is invalid"),
    (esp + " encap espinudp 4500 70000 0.0.0.0",
     "Error: argument \"70000\" is wrong: DPORT value after \"encap\" is invalid"),
    (esp + " encap espinudp 4500 4500 bogus", "Error: any valid address is expected rather than \"bogus\"."),
    (esp + " extra-flag 0xzz", "Error: argument \"0xzz\" is wrong: \"EXTRA-FLAG\" is invalid"),
    (esp + " flag 0x100", "Error: argument \"0x100\" is wrong: FLAG value is invalid"),
    (esp + " if_id x", "Error: argument \"x\" is wrong: value after \"if_id\" is invalid"),
    (esp + " tfcpad x", "Error: argument \"x\" is wrong: value after \"tfcpad\" is invalid"),
    (esp + " sel src 10.0.0.0/33", "Error: any valid prefix is expected rather than \"10.0.0.0/33\"."),
    ("state frob", "Command \"frob\" is unknown, try \"ip xfrm state help\"."),
    // allocspi, get, list, flush
    ("state allocspi src 10.0.0.1 dst 10.0.0.2 proto esp spi 5", "\"spi\" is invalid"),
    ("state allocspi reqid 1", "Not enough information: ID is required"),
    ("state allocspi src 10.0.0.1 dst 10.0.0.2 proto esp min 5", "\"max\" is missing"),
    ("state allocspi src 10.0.0.1 dst 10.0.0.2 proto esp max 5", "\"min\" is missing"),
    ("state allocspi src 10.0.0.1 dst 10.0.0.2 proto esp min 9 max 5",
     "value after \"min\" is larger than value after \"max\""),
    ("state allocspi src 10.0.0.1 dst 10.0.0.2 proto esp min 1 min 2",
     "Error: duplicate \"min\": \"min\" is the second value."),
    ("state get dst 10.0.0.2 proto esp spi 1 extra", "Error: argument \"extra\" is wrong: unknown"),
    ("state list foo", "Error: argument \"foo\" is wrong: unknown"),
    ("state list mode x", "Error: argument \"x\" is wrong: MODE value is invalid"),
    ("state flush proto esp proto ah", "Error: duplicate \"proto\": \"proto\" is the second value."),
    ("state flush proto xyz", "Error: argument \"xyz\" is wrong: XFRM-PROTO value is invalid"),
    ("state flush all", "Error: argument \"all\" is wrong: unknown"),
    // selectors
    ("policy add proto tcp type 8 dir in", "\"type\" and \"code\" are invalid with PROTO value \"tcp\""),
    ("policy add proto icmp sport 5 dir in", "\"sport\" and \"dport\" are invalid with PROTO value \"icmp\""),
    ("policy add proto udp key 5 dir in", "\"key\" is invalid with PROTO value \"udp\""),
    ("policy add proto gre key x dir in", "value after \"key\" is invalid"),
    ("policy add proto gre key 1.2.3.x dir in", "Error: an IP address is expected rather than \"1.2.3.x\""),
    ("policy add proto nosuch dir in", "Error: argument \"nosuch\" is wrong: PROTO value is invalid"),
    ("policy add proto icmp type 300 dir in", "Error: argument \"300\" is wrong: value after \"type\" is invalid"),
    ("policy add proto tcp sport 65536 dir in", "Error: argument \"65536\" is wrong: value after \"sport\" is invalid"),
    ("policy add dev eth9 dir in", "Error: argument \"eth9\" is wrong: DEV value is invalid"),
    ("policy add src 10.0.0.0/8 dst ::/0 dir in",
     "Error: argument \"::/0\" is wrong: the same address family is required between values after \"src\" and \"dst\""),
    // policy
    ("policy add src 10.0.0.0/8", "Not enough information: DIR is required."),
    ("policy add src 10.0.0.0/8 dir sideways", "Error: argument \"sideways\" is wrong: DIR value is invalid"),
    ("policy add dir in dir out", "Error: duplicate \"dir\": \"dir\" is the second value."),
    ("policy add src 10.0.0.0/8 dir in src 10.0.0.1", "Error: duplicate \"unknown\": \"src\" is the second value."),
    ("policy add dir in offload crypto dev eth0", "Error: argument \"crypto\" is wrong: Invalid offload mode"),
    ("policy add dir in offload packet eth0", "Error: argument \"eth0\" is wrong: Missing dev keyword"),
    ("policy add dir in offload packet dev nosuch", "Error: argument \"nosuch\" is wrong: Invalid device name"),
    ("policy add dir in action drop", "Error: argument \"drop\" is wrong: ACTION value is invalid"),
    ("policy add dir in priority high", "Error: argument \"high\" is wrong: PRIORITY value is invalid"),
    ("policy add dir in index x", "Error: argument \"x\" is wrong: INDEX value is invalid"),
    ("policy add dir in ptype other", "Error: argument \"other\" is wrong: PTYPE value is invalid"),
    ("policy add dir in ptype main ptype sub", "Error: duplicate \"ptype\": \"ptype\" is the second value."),
    ("policy add dir in if_id x", "Error: argument \"x\" is wrong: IF_ID value is invalid"),
    ("policy add dir in flag 0xfff", "Error: argument \"0xfff\" is wrong: FLAG value is invalid"),
    ("policy add dir in tmpl src 1.1.1.1 dst 2.2.2.2", "Error: argument \"XFRM-PROTO\" is required"),
    ("policy add dir in tmpl proto esp level maybe", "Error: argument \"maybe\" is wrong: LEVEL value is invalid"),
    ("policy add dir in" + String(repeating: " tmpl proto esp", count: 17), "Too many tmpls: buffer overflow"),
    ("policy get src 10.0.0.0/8", "Not enough information: DIR is required."),
    ("policy get dir in", "Not enough information: either SELECTOR or INDEX is required."),
    ("policy delete src 10.0.0.0/8 index 5 dir in", "Error: either \"SELECTOR\" is duplicate, or \"INDEX\" is garbage."),
    ("policy delete index 5 index 6 dir in", "Error: duplicate \"index\": \"index\" is the second value."),
    ("policy list dir up", "Error: argument \"up\" is wrong: DIR value is invalid"),
    ("policy flush ptype main ptype sub", "Error: duplicate \"ptype\": \"ptype\" is the second value."),
    ("policy flush now", "Error: argument \"now\" is wrong: unknown"),
    ("policy setdefault in drop", "Error: argument \"drop\" is wrong: in policy value is invalid"),
    ("policy setdefault in block in accept", "Error: duplicate \"in\": \"in\" is the second value."),
    ("policy setdefault sideways block", "Error: argument \"sideways\" is wrong: unknown direction"),
    ("policy setdefault out", "Command line is not complete. Try option \"help\""),
    ("policy frob", "Command \"frob\" is unknown, try \"ip xfrm policy help\"."),
    ("frob", "Usage: ip xfrm XFRM-OBJECT { COMMAND | help }\nwhere  XFRM-OBJECT := state | policy | monitor"),
]

@Suite("ip xfrm errors")
struct ErrorTests {
    @Test("each parse error in iproute2's words, on one line, and nothing sent", arguments: cases.indices)
    func parseError(_ i: Int) {
        let (line, message) = cases[i]
        let t = RecordingTransport()
        let args = line.split(separator: " ").map(String.init)
        #expect(throws: CommandError(message)) {
            try runXfrmCommand(args, options: XfrmCLIOptions(), transport: t, interfaces: Interfaces())
        }
        #expect(t.requests.isEmpty)
        if !line.hasPrefix("frob") { #expect(!message.contains("\n")) }
    }

    @Test("without a resolver a device name is invalid, but iproute2's ifN form still resolves")
    func noResolver() throws {
        let t = RecordingTransport()
        #expect(throws: CommandError("Error: argument \"eth0\" is wrong: Invalid device name")) {
            try runXfrmCommand((esp + " offload dev eth0 dir out").split(separator: " ").map(String.init),
                               options: XfrmCLIOptions(), transport: t)
        }
        _ = try runXfrmCommand((esp + " offload dev if7 dir out").split(separator: " ").map(String.init),
                               options: XfrmCLIOptions(), transport: t)
        #expect(t.requests.last?.attributes.contains(.offloadDevice(XfrmUserOffload(ifindex: 7, flags: 0))) == true)
    }

    @Test("esn without a window is allowed for an output SA, and the ESN struct is sent")
    func esnOut() throws {
        let t = RecordingTransport()
        _ = try runXfrmCommand((esp + " flag esn dir out").split(separator: " ").map(String.init),
                               options: XfrmCLIOptions(), transport: t)
        #expect(t.requests.last?.attributes.dropFirst() == [.replayESN(XfrmReplayStateESN()), .saDir(XfrmSADir.outbound)])
    }

    @Test("monitor cannot run as a single command; empty arguments print the usage")
    func monitorAndUsage() {
        let t = RecordingTransport()
        #expect(throws: CommandError.self) { try runXfrmCommand(["monitor"], options: XfrmCLIOptions(), transport: t) }
        #expect(throws: CommandError(xfrmUsage)) { try runXfrmCommand([], options: XfrmCLIOptions(), transport: t) }
    }
}
