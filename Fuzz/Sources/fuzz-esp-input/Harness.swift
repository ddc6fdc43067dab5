// The ESP input path: classify → SAD → replay → open → trailer → inner packet → policy check, on a stack with
// inbound SAs of every algorithm (FuzzSupport.ESPFixture, set up once per process).
//
// Input: byte 0 chooses how the rest is used.
//   bit 7 clear: the rest is a received IP packet, as is (headers, SPI, sequence number, ICV: all the fuzzer's).
//   bit 7 set:   SA (byte 0 mod the SA count), byte 1 the outer TOS, bytes 2–9 the sequence number, and the rest
//                is the plaintext (inner packet, padding, pad length, next header) sealed with that SA's key, so
//                that what follows the ICV check — trailer, inner packet, selectors, policy — is fuzzed too.
//                The SA's window is reset first, so the verdict does not depend on earlier inputs.
// The stack must never crash (nor read or write outside the packet: the address sanitizer watches the buffer).
import FuzzSupport

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzESPInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    let fixture = ESPFixture.shared
    var r = ByteReader(UnsafeRawBufferPointer(start: data, count: data == nil ? 0 : size))
    let mode = r.byte()
    if mode & 0x80 == 0 {
        fixture.input(r.rest)
    } else {
        let sa = fixture.sas[Int(mode & 0x7f) % fixture.sas.count]
        let tos = r.byte()
        let sequence = r.u64()
        sa.transform?.setInboundSequence(0)
        let packet = fixture.seal(sa, sequence: sequence, plaintext: Array(r.rest), tos: tos)
        packet.withUnsafeBytes { fixture.input($0) }
    }
    return 0
}
