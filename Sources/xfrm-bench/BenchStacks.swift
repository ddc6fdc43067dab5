// The two stacks the `engine` and `stack` benchmarks share: A protects 10.0.1.0/24 → 10.0.2.0/24 with one
// AES-128-GCM tunnel SA (SPI 0x1001) towards 192.0.2.2; B receives it (IN and FWD policies: the inner subnet is behind
// it). Both use the default crypto backend.

import XFRMCore
import XFRMCrypto
import XFRMPacket
import XFRMTestKit

func makeBenchStacks() -> (a: XFRMStack, b: XFRMStack, key: [UInt8]) {
    let a = XFRMStack()
    let b = XFRMStack()
    let key = PacketFactory.pattern(20, seed: 0x41)
    for (s, outer) in [(a, "192.0.2.1/24"), (b, "192.0.2.2/24")] {
        try! s.network.addInterface(name: "eth0", kind: "dummy")
        try! s.network.modify(name: "eth0") { (i: inout Interface) throws(NetworkError) in i.isUp = true }
        try! s.network.addAddress(IPPrefix(outer)!, device: "eth0")
        try! s.network.addRoute(IPPrefix("0.0.0.0/0")!, device: "eth0", via: nil)
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        let sel = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        // A sends; B forwards what it decapsulates into its TUN (the inner subnet is behind it): IN and FWD policies.
        for d in s === a ? [PolicyDirection.outbound] : [.inbound, .forward] {
            try! s.addPolicy(Policy(selector: sel, direction: d, templates: [t]), update: false)
        }
        let crypto = try! ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: key, icvBits: 128)
        try! s.addState(s.makeSA(SAConfig(
            id: SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001), source: IPAddress("192.0.2.1")!,
            selector: .any(family: 0), reqid: 1, mode: .tunnel, replayWindow: 4096, crypto: crypto)))
    }
    return (a, b, key)
}
