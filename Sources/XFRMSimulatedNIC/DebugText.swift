// The device's debug text (≈ netdevsim's debugfs "ipsec" file), shown by `link show -s sim0`:
//
//   SA count=2 tx=1
//   sa[0] tx ipaddr=192.0.2.2 spi=0x00001001 proto=0x32 mode=packet reqid=1
//   sa[1] rx ipaddr=192.0.2.1 spi=0x00002001 proto=0x32 mode=packet reqid=1
//   policy[0] dir out src 10.0.1.0/24 dst 10.0.2.0/24 reqid 1
//   tx_packets 0
//   ...

import XFRMCore

extension NICCore {
    var debugText: String {
        let (sas, policies) = self.tables.withLock { t in
            (t.sas.compactMap { $0 }, t.policies.compactMap { $0 })
        }
        let tx = sas.filter { $0.direction != .inbound }.count
        var out = "SA count=\(sas.count) tx=\(tx)\n"
        for e in sas.sorted(by: { $0.slot < $1.slot }) {
            let dir = e.direction == .inbound ? "rx" : "tx"
            out += "sa[\(e.slot)] \(dir) ipaddr=\(e.id.destination) spi=0x\(hex8(e.id.spi)) "
                + "proto=0x\(String(e.id.proto, radix: 16)) mode=\(e.type.name) reqid=\(e.reqid)\n"
        }
        for p in policies.sorted(by: { $0.slot < $1.slot }) {
            out += "policy[\(p.slot)] dir \(p.direction.name) src \(p.selector.source) dst \(p.selector.destination) "
                + "reqid \(p.template?.reqid ?? 0)\n"
        }
        for c in NICCounter.allCases {
            out += "\(c.name) \(self.counters[c])\n"
        }
        return out
    }
}

private func hex8(_ v: UInt32) -> String {
    let s = String(v, radix: 16)
    return String(repeating: "0", count: max(0, 8 - s.count)) + s
}
