// esp-tool: runs pcap files through one ESP SA, for interoperability tests against independent peers.
//
//   esp-tool encap --sa SA.json IN.pcap OUT.pcap    protect every IP packet of IN.pcap
//   esp-tool decap --sa SA.json IN.pcap OUT.pcap    verify and strip ESP from every packet of IN.pcap
//
// Prints one line per packet (`ok`, `drop REASON`, `ike` or `not-esp`), then `counters {...}`.

import Foundation
import XFRMCrypto
import XFRMESP
import XFRMPacket

struct ToolError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { self.description = d }
}

func hexBytes(_ s: String, field: String) throws -> [UInt8] {
    var t = Substring(s)
    if t.hasPrefix("0x") { t = t.dropFirst(2) }
    guard t.count % 2 == 0 else { throw ToolError("\(field): odd number of hex digits") }
    var out: [UInt8] = []
    var i = t.startIndex
    while i < t.endIndex {
        let j = t.index(i, offsetBy: 2)
        guard let b = UInt8(t[i..<j], radix: 16) else { throw ToolError("\(field): not hex: \(t[i..<j])") }
        out.append(b)
        i = j
    }
    return out
}

func loadSA(path: String) throws -> (ESPConfig, [UInt8]?) {
    guard let data = FileManager.default.contents(atPath: path),
        let obj = try JSONSerialization.jsonObject(with: data) as? [String: Any]
    else { throw ToolError("\(path): not a JSON object") }
    guard let spi = obj["spi"] as? Int, spi >= 0, spi <= Int(UInt32.max) else { throw ToolError("spi: missing") }
    guard let modeName = obj["mode"] as? String, let mode = ESPMode(rawValue: modeName) else {
        throw ToolError("mode: expected \"tunnel\" or \"transport\"")
    }
    let crypto: ESPCryptoSpec
    if let aead = obj["aead"] as? [String: Any] {
        guard let name = aead["name"] as? String, let key = aead["key"] as? String else {
            throw ToolError("aead: needs name and key")
        }
        crypto = try ESPCryptoSpec.aead(
            name: name, key: hexBytes(key, field: "aead.key"), icvBits: aead["icv_bits"] as? Int ?? 128)
    } else if let enc = obj["enc"] as? [String: Any] {
        guard let name = enc["name"] as? String else { throw ToolError("enc: needs name") }
        let key = try hexBytes(enc["key"] as? String ?? "", field: "enc.key")
        let auth = obj["auth"] as? [String: Any]
        crypto = try ESPCryptoSpec.cipher(
            name: name, key: key, authName: auth?["name"] as? String,
            authKey: try hexBytes(auth?["key"] as? String ?? "", field: "auth.key"),
            truncationBits: auth?["trunc_bits"] as? Int)
    } else {
        throw ToolError("the SA needs \"aead\" or \"enc\"")
    }
    var src: IPAddress? = nil
    var dst: IPAddress? = nil
    if let t = obj["tunnel"] as? [String: Any] {
        guard let s = t["src"] as? String, let a = IPAddress(s), let d = t["dst"] as? String, let b = IPAddress(d)
        else { throw ToolError("tunnel: needs src and dst addresses") }
        src = a
        dst = b
    }
    var encap: NATTEncapsulation? = nil
    if let e = obj["encap"] as? [String: Any] {
        encap = NATTEncapsulation(
            sourcePort: UInt16(e["sport"] as? Int ?? 4500), destinationPort: UInt16(e["dport"] as? Int ?? 4500))
    }
    let seq = (obj["seq"] as? NSNumber)?.uint64Value ?? 1
    var flags: ESPFlags = []
    if obj["oseq_may_wrap"] as? Bool == true { flags.insert(.outboundSequenceMayWrap) }
    let config = ESPConfig(
        spi: UInt32(spi), mode: mode, crypto: crypto, tunnelSource: src, tunnelDestination: dst,
        encapsulation: encap, esn: obj["esn"] as? Bool ?? false, replayWindow: obj["replay_window"] as? Int ?? 32,
        flags: flags, outboundSequence: seq == 0 ? 0 : seq - 1,
        inboundSequence: (obj["replay_seq"] as? NSNumber)?.uint64Value ?? 0)
    let iv = try (obj["iv"] as? String).map { try hexBytes($0, field: "iv") }
    return (config, iv)
}

func run() throws -> Int32 {
    var args = Array(CommandLine.arguments.dropFirst())
    let usage = "usage: esp-tool encap|decap --sa SA.json IN.pcap OUT.pcap"
    guard args.count == 5, args[0] == "encap" || args[0] == "decap", args[1] == "--sa" else {
        throw ToolError(usage)
    }
    let op = args.removeFirst()
    args.removeFirst()
    let (config, iv) = try loadSA(path: args[0])
    let transform = try ESPTransform(config)
    if let iv, iv.count != transform.cipher.ivLength {
        throw ToolError("iv: expected \(transform.cipher.ivLength) bytes, got \(iv.count)")
    }
    let input = try readPcapIPPackets(path: args[1])
    if op == "encap", iv != nil, input.count > 1 {
        // One IV under one key protects one packet: a repeated GCM/ChaCha20 nonce leaks the keystream and the
        // authentication key; a repeated CBC IV leaks equal prefixes.
        throw ToolError("iv: a fixed IV protects one packet only, and \(args[1]) holds \(input.count)")
    }
    let pool = PacketPool(count: 4, slotSize: 65536 + 512, headroom: 256)
    let counters = DropCounters()
    var output: [[UInt8]] = []
    var lines = ""
    for pkt in input {
        guard var buf = pool.allocate() else { throw ToolError("packet pool exhausted") }
        defer { pool.release(buf) }
        guard buf.append(contentsOf: pkt) else {
            lines += "drop noBufferSpace\n"
            counters.count(.noBufferSpace)
            continue
        }
        if op == "encap" {
            let reason: DropReason?
            if let iv {
                reason = iv.withUnsafeBytes { transform.encapsulate(&buf, fixedIV: $0.baseAddress!) }
            } else {
                reason = transform.encapsulate(&buf)
            }
            if let reason {
                counters.count(reason)
                lines += "drop \(reason.name)\n"
            } else {
                output.append(buf.bytes)
                lines += "ok\n"
            }
        } else {
            let port = config.encapsulation?.destinationPort ?? 4500
            switch transform.decapsulate(&buf, nattPort: port) {
            case .delivered:
                output.append(buf.bytes)
                lines += "ok\n"
            case .dropped(let r):
                counters.count(r)
                lines += "drop \(r.name)\n"
            case .ike: lines += "ike\n"
            case .notESP: lines += "not-esp\n"
            }
        }
    }
    try writePcapIPPackets(output, path: args[2])
    var stats: [String: UInt64] = [:]
    for (r, n) in counters.nonZero { stats[r.name] = n }
    let s = transform.statistics
    stats["sa.packets"] = s.packets
    stats["sa.bytes"] = s.bytes
    stats["sa.replay"] = s.replay
    stats["sa.replayWindow"] = s.replayWindow
    stats["sa.integrityFailed"] = s.integrityFailed
    let json = try JSONSerialization.data(withJSONObject: stats, options: [.sortedKeys])
    lines += "counters " + String(decoding: json, as: UTF8.self) + "\n"
    FileHandle.standardOutput.write(lines.data(using: .utf8)!)
    // On success only (an error stays one line): the interop suites run once per backend (XFRM_CRYPTO) and check
    // from this line which one did the work.
    FileHandle.standardError.write("esp-tool: crypto \(transform.cipher.backendName)\n".data(using: .utf8)!)
    return 0
}

do {
    exit(try run())
} catch {
    FileHandle.standardError.write("esp-tool: \(error)\n".data(using: .utf8)!)
    exit(2)
}
