// IPv4 and IPv6 reassembly (XFRMEngine.IPv4Reassembly, what the simulated hosts and `xfrm pcap --input-path` run
// before the stack): any sequence of fragments gives whole datagrams or counted drops, never a crash, a lost buffer
// or two datagrams' bytes in one.
//
// Input: byte 0 the bound on held fragments (1–64), bit 6 IPv6 fragments (fuzzIPv6 below); then 8 bytes per
// fragment, for IPv4:
//   0   bits 0–1 the datagram (its identification, 1–4), bit 2 More Fragments, bit 3 DF, bit 4 a broken header
//       checksum, bit 5 two bytes of link-layer padding after it;
//   1–2 the offset in 8-byte units (13 bits); 3–4 the payload length (mod 1,600); 5 the options (0–3 words);
//   6   the ECN codepoint (2 bits); 7 seconds to let pass before it (mod 40: the 30-second limit comes into play).
// Each datagram's payload byte at position k is (identification × 37 + k) mod 256, whichever fragment carries it, so
// a datagram that comes out holding another's bytes (or shifted ones) is found. After the last fragment: every
// fragment taken is joined, failed, a duplicate or held; every datagram out is well formed; all buffers come back.
import Synchronization
import XFRMEngine
import XFRMPacket

let pool = PacketPool(count: 128, slotSize: 4096, headroom: 64)

@inline(__always) func byteAt(_ id: Int, _ k: Int) -> UInt8 { UInt8(truncatingIfNeeded: id &* 37 &+ k) }

func check(_ ok: Bool, _ what: @autoclosure () -> String) {
    if !ok { fatalError("reassembly: \(what())") }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzReassembly(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    let input = UnsafeBufferPointer(start: data, count: data == nil ? 0 : size)
    guard let first = input.first else { return 0 }
    let counters = IPv4ReassemblyCounters()
    let r = IPv4Reassembly(pool: pool, counters: counters, timeout: 30, maxHeld: 1 + Int(first % 64))
    if first & 0x40 != 0 {
        fuzzIPv6(input, r)
    } else {
        fuzzIPv4(input, r)
    }
    let held = UInt64(r.heldFragments)
    let r0 = counters.required.load(ordering: .relaxed)
    let accounted = counters.joined.load(ordering: .relaxed) + counters.failed.load(ordering: .relaxed)
        + counters.duplicates.load(ordering: .relaxed) + held
    check(r0 == accounted, "\(r0) fragments taken, \(accounted) accounted for")
    r.releaseAll()
    check(pool.available == pool.slotCount, "\(pool.slotCount - pool.available) buffers not returned")
    return 0
}

/// The loop both families share: each 8-byte op makes one fragment (`header` writes its headers for the datagram,
/// offset and data length the op names), lets time pass, hands it in, and `verify` checks any datagram it completed.
func feed(_ input: UnsafeBufferPointer<UInt8>, _ r: IPv4Reassembly,
          header: (_ op: [UInt8], _ id: Int, _ offset: Int, _ length: Int) -> [UInt8],
          verify: (PacketBuffer) -> Void) {
    var now: UInt64 = 1_000
    var i = 1
    while i + 8 <= input.count {
        let op = Array(input[i..<(i + 8)])
        i += 8
        now += UInt64(op[7] % 40)
        let id = Int(op[0] & 3) + 1
        let offset = (Int(op[1]) << 8 | Int(op[2])) & 0x1fff
        let length = (Int(op[3]) << 8 | Int(op[4])) % 1600
        let h = header(op, id, offset, length)
        guard var b = pool.allocate() else { break }
        guard b.tailroom >= h.count + length + 2 else {
            pool.release(b)
            continue
        }
        let p = b.append(h.count + length + (op[0] & 0x20 != 0 ? 2 : 0))
        p.copyMemory(from: h, byteCount: h.count)
        for k in 0..<length { p.storeBytes(of: byteAt(id, offset * 8 + k), toByteOffset: h.count + k, as: UInt8.self) }
        if op[0] & 0x20 != 0 { p.storeBytes(of: UInt16(0xeeee), toByteOffset: h.count + length, as: UInt16.self) }
        r.sweep(now: now)
        guard IPv4Reassembly.isFragment(b) else {
            pool.release(b)
            continue
        }
        if let whole = r.take(b, now: now) {
            verify(whole)
            pool.release(whole)
        }
    }
}

func fuzzIPv4(_ input: UnsafeBufferPointer<UInt8>, _ r: IPv4Reassembly) {
    feed(input, r, header: { op, id, offset, length in
        let header = 20 + Int(op[5] % 4) * 4
        var h = [UInt8](repeating: 0, count: header)
        h[0] = UInt8(0x40 | header / 4)
        h[1] = op[6] & 0x03
        h[2] = UInt8((header + length) >> 8)
        h[3] = UInt8((header + length) & 0xff)
        h[5] = UInt8(id)
        var field = offset
        if op[0] & 0x04 != 0 { field |= 0x2000 }
        if op[0] & 0x08 != 0 { field |= 0x4000 }
        h[6] = UInt8(field >> 8)
        h[7] = UInt8(field & 0xff)
        h[8] = 64
        h[9] = 50
        h.replaceSubrange(12..<20, with: [192, 0, 2, 1, 192, 0, 2, 2])
        for k in 20..<header { h[k] = 1 }  // No Operation options
        h.withUnsafeMutableBytes { IPv4Header.updateChecksum($0.baseAddress!, headerLength: header) }
        if op[0] & 0x10 != 0 { h[10] ^= 0x5a }
        return h
    }, verify: { whole in
        let o = whole.data
        let hl = Int(o.loadByte(at: 0) & 0x0f) * 4
        let total = Int(o.loadBE16(at: 2))
        check(total == whole.count && hl >= 20 && total >= hl, "a datagram of \(whole.count) bytes says \(total)")
        check(o.loadBE16(at: 6) & 0xbfff == 0, "a datagram out with fragment bits")
        check(IPv4Header.checksumIsValid(o, headerLength: hl), "a datagram out with a bad header checksum")
        let wid = Int(o.loadBE16(at: 4))
        for k in 0..<(total - hl) {
            check(o.loadByte(at: hl + k) == byteAt(wid, k), "datagram \(wid): byte \(k) is not its own")
        }
    })
}

/// IPv6 fragments, 8 bytes each: 0 bits 0–1 the datagram (the last byte of its source address, 1–4), bit 2 More
/// Fragments, bit 3 a Hop-by-Hop header before the Fragment header, bit 4 a payload length 8 bytes past the packet,
/// bit 5 two bytes of padding after it; 1–2 the offset in 8-byte units (13 bits); 3–4 the data length (mod 1,600);
/// 5 unused; 6 the ECN codepoint; 7 seconds to let pass before it (mod 40; the limit is 60). Offset 0 without More
/// Fragments is an atomic fragment. Datagrams out must be IPv6 without a Fragment header, their lengths agreeing,
/// their data their own.
func fuzzIPv6(_ input: UnsafeBufferPointer<UInt8>, _ r: IPv4Reassembly) {
    feed(input, r, header: { op, id, offset, length in
        let hbh = op[0] & 0x08 != 0
        let header = 40 + (hbh ? 8 : 0) + 8
        var h = [UInt8](repeating: 0, count: header)
        h[0] = 0x60
        h[1] = (op[6] & 0x03) << 4
        let payloadLength = header - 40 + length + (op[0] & 0x10 != 0 ? 8 : 0)
        h[4] = UInt8(payloadLength >> 8)
        h[5] = UInt8(payloadLength & 0xff)
        h[6] = hbh ? 0 : 44
        h[7] = 64
        h.replaceSubrange(8..<12, with: [0x20, 0x01, 0x0d, 0xb8])
        h[23] = UInt8(id)
        h.replaceSubrange(24..<28, with: [0x20, 0x01, 0x0d, 0xb8])
        h[39] = 2
        var f = 40
        if hbh {
            h[40] = 44
            h[42] = 1  // PadN over the rest
            h[43] = 4
            f = 48
        }
        h[f] = 50
        let field = offset << 3 | (op[0] & 0x04 != 0 ? 1 : 0)
        h[f + 2] = UInt8(field >> 8)
        h[f + 3] = UInt8(field & 0xff)
        h[f + 7] = UInt8(id)
        return h
    }, verify: { whole in
        let o = whole.data
        check(o.loadByte(at: 0) >> 4 == 6 && 40 + Int(o.loadBE16(at: 4)) == whole.count,
              "a datagram of \(whole.count) bytes says \(40 + Int(o.loadBE16(at: 4)))")
        var start = 40
        var next = o.loadByte(at: 6)
        if next == 0 {
            next = o.loadByte(at: 40)
            start = 48
        }
        check(next == 50, "a datagram out whose header chain names \(next), not ESP")
        let wid = Int(o.loadByte(at: 23))
        for k in 0..<(whole.count - start) {
            check(o.loadByte(at: start + k) == byteAt(wid, k), "datagram \(wid): byte \(k) is not its own")
        }
    })
}
