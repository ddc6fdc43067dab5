// Batch input against one packet at a time: `XFRMStack.process` opens consecutive packets of one SA in one
// acquisition of its lock (XFRMStack+BatchRuns.swift). Two identical receiving hosts (FuzzSupport.ESPFixture)
// get the same packets, one as a batch and one per packet through `input`; the verdicts, the bytes, the xfrm_stat
// counters and every SA's curlft and stats must agree. A difference stops the fuzzer (fatalError): a run that
// opened a packet with the wrong SA, skipped a check or counted differently.
//
// Input: records, up to 64 packets. Byte 0 of a record:
//   0x00–0x3f: a raw packet follows: 1 length byte, then that many bytes (the fuzzer's headers, SPI, ICV).
//   0x40–0x7f: SA (low 6 bits mod the SA count), 1 sequence byte, 1 length byte, then that many plaintext bytes
//              (payload and trailer as the fuzzer wrote them), sealed with the SA's key.
//   0x80–0xff: SA (low 6 bits), 1 sequence byte, source and destination host bytes, 1 payload length byte: a
//              well-formed inner IPv4 UDP packet 10.0.1.S → 10.0.2.D (S ≥ 128: from 10.0.7.S, outside the
//              policies) with its trailer, sealed — so runs of valid packets, replays and policy refusals occur.
//              Bit 6 set: nested — one more byte gives the inner layer's sequence number (bit 7: its ICV damaged);
//              the inner packet is sealed with the same SA first, and that ESP packet sealed again.
// The SAs' windows are reset first, so the verdicts do not depend on earlier inputs.
import FuzzSupport
import XFRMCore
import XFRMPacket

nonisolated(unsafe) let batched = ESPFixture()
nonisolated(unsafe) let single = ESPFixture()

func records(_ data: UnsafeRawBufferPointer) -> [[UInt8]] {
    var r = ByteReader(data)
    var packets: [[UInt8]] = []
    while !r.isEmpty && packets.count < PacketBatch.defaultCapacity {
        let kind = r.byte()
        switch kind {
        case 0x00..<0x40:
            packets.append(r.take(Int(r.byte())))
        case 0x40..<0x80:
            let sa = batched.sas[Int(kind & 0x3f) % batched.sas.count]
            let sequence = UInt64(r.byte()) + 1
            let plaintext = r.take(Int(r.byte()))
            packets.append(batched.seal(sa, sequence: sequence, plaintext: plaintext, tos: 0))
        default:
            let sa = batched.sas[Int(kind & 0x3f) % batched.sas.count]
            let sequence = UInt64(r.byte()) + 1
            let (s, d, n) = (r.byte(), r.byte(), Int(r.byte()))
            let udp = PacketFactory.udp(payload: PacketFactory.pattern(n))
            var inner = PacketFactory.ipv4(source: s >= 128 ? "10.0.7.\(s & 0x7f)" : "10.0.1.\(s)",
                                           destination: "10.0.2.\(d)", proto: 17, payload: udp)
            if kind & 0x40 != 0 {
                let innerSequence = r.byte()
                inner = batched.seal(sa, sequence: UInt64(innerSequence & 0x7f) + 1, plaintext: trailed(inner), tos: 0)
                if innerSequence & 0x80 != 0 { inner[inner.count - 1] ^= 1 }
            }
            packets.append(batched.seal(sa, sequence: sequence, plaintext: trailed(inner), tos: 0))
        }
    }
    return packets
}

/// `packet` with an RFC 4303 trailer: padding to 4 bytes, pad length, next header (IPv4 or IPv6 by its version).
func trailed(_ packet: [UInt8]) -> [UInt8] {
    let pad = (4 - (packet.count + 2) % 4) % 4
    return packet + (0..<pad).map { UInt8($0 + 1) } + [UInt8(pad), packet.first.map { $0 >> 4 == 6 } == true ? 41 : 4]
}

/// What a host shows: its counters and each SA's curlft (use time only as used or not: the two hosts' clocks
/// are read at different moments) and stats.
func state(_ f: ESPFixture) -> String {
    var s = f.stack.statistics.procText()
    for sa in f.sas {
        let c = sa.current
        s += "\(sa.id.spi): \(c.bytes) \(c.packets) \(c.useTime != 0) \(sa.stats)\n"
    }
    return s
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzInputRuns(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    let packets = records(UnsafeRawBufferPointer(start: data, count: data == nil ? 0 : size))
    for f in [batched, single] { for sa in f.sas { sa.transform?.setInboundSequence(0) } }
    // The batch: each packet in a buffer of its own allocation (the address sanitizer sees overruns).
    var batch = PacketBatch()
    var storages: [UnsafeMutableRawPointer] = []
    for p in packets {
        let capacity = 256 + p.count + 256
        let storage = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 64)
        storages.append(storage)
        var b = PacketBuffer(storage: storage, capacity: capacity, headroom: 256)
        p.withUnsafeBytes { _ = b.append(bytes: $0) }
        _ = batch.append(PacketBatch.Packet(b, stage: .input, ifindex: batched.ifindex))
    }
    batched.stack.process(&batch)
    for (i, p) in packets.enumerated() {
        var decapsulated = false
        let (r, bytes) = p.withUnsafeBytes { raw in
            ESPFixture.withExactBuffer(raw) { b in
                (single.stack.input(&b, ifindex: single.ifindex, decapsulated: &decapsulated), b.bytes)
            }
        }
        let verdict = PacketBatch.Verdict.input(r, decapsulated: decapsulated)
        guard batch[i].verdict == verdict else {
            fatalError("packet \(i): batch \(batch[i].verdict), alone \(verdict)")
        }
        guard batch[i].buffer.bytes == bytes else { fatalError("packet \(i): batch and alone bytes differ") }
    }
    for s in storages { s.deallocate() }
    let (a, b) = (state(batched), state(single))
    guard a == b else { fatalError("batch and per-packet state differ:\n\(a)\n---\n\(b)") }
    return 0
}
