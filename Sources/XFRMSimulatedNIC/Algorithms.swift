// Which algorithms a simulated NIC offloads (`link add ... type simnic algos LIST`). Real devices take far fewer
// than the stack: ConnectX (mlx5) offloads AES-GCM with a 128-bit ICV and 128- or 256-bit keys only, and answers
// anything else with EINVAL ("Cannot offload xfrm states without aead", "... with AEAD ICV length other than
// 128bit", "... with AEAD key length other than 128/256 bit"). The default stays permissive.

import XFRMCrypto

public struct NICAlgorithms: Sendable, Equatable, CustomStringConvertible {
    /// ICV lengths accepted per AEAD; nil accepts every algorithm the stack has.
    public var aeads: [AEADAlgorithm: Set<Int>]?
    /// AES-CBC with an HMAC (only when `aeads` is restricted; always with the permissive default).
    public var cbc: Bool

    public static let all = NICAlgorithms(aeads: nil, cbc: true)

    public init(aeads: [AEADAlgorithm: Set<Int>]?, cbc: Bool) {
        self.aeads = aeads
        self.cbc = cbc
    }

    /// Parses a comma-separated list of `rfc4106-ICV`, `rfc7539esp-128`, `rfc4543-128` and `cbc`
    /// (e.g. `rfc4106-128`, what a ConnectX takes). nil when a word is not one of those.
    public init?(parsing text: String) {
        var aeads: [AEADAlgorithm: Set<Int>] = [:]
        var cbc = false
        for word in text.split(separator: ",") {
            if word == "cbc" {
                cbc = true
                continue
            }
            let parts = word.split(separator: "-")
            guard parts.count == 2, let icv = Int(parts[1]) else { return nil }
            let alg: AEADAlgorithm
            switch parts[0] {
            case "rfc4106": alg = .aesGCM
            case "rfc7539esp": alg = .chacha20Poly1305
            case "rfc4543": alg = .aesGMAC
            default: return nil
            }
            guard alg.icvBits.contains(icv) else { return nil }
            aeads[alg, default: []].insert(icv)
        }
        guard !aeads.isEmpty || cbc else { return nil }
        self.init(aeads: aeads, cbc: cbc)
    }

    public var description: String {
        guard let aeads else { return "all" }
        var words: [String] = []
        for (alg, icvs) in aeads.sorted(by: { $0.key.rawValue < $1.key.rawValue }) {
            let prefix = alg == .aesGCM ? "rfc4106" : alg == .chacha20Poly1305 ? "rfc7539esp" : "rfc4543"
            for icv in icvs.sorted() { words.append("\(prefix)-\(icv)") }
        }
        if self.cbc { words.append("cbc") }
        return words.joined(separator: ",")
    }

    /// The driver's refusal of `crypto` (EINVAL and its message), or nil when the device takes it.
    func refusal(_ crypto: ESPCryptoSpec) -> String? {
        guard let aeads else { return nil }
        switch crypto {
        case .cipher:
            return self.cbc ? nil : "Cannot offload xfrm states without aead"
        case .aead(let alg, let key, let icvBits):
            guard let icvs = aeads[alg] else { return "Cannot offload xfrm states with AEAD algorithm \(alg.name)" }
            guard icvs.contains(icvBits) else {
                let allowed = icvs.sorted().map(String.init).joined(separator: "/")
                return "Cannot offload xfrm states with AEAD ICV length other than \(allowed)bit"
            }
            // As mlx5: AES keys of 128 or 256 bits (plus the 32-bit salt).
            if alg != .chacha20Poly1305 && key.bits != 128 + 32 && key.bits != 256 + 32 {
                return "Cannot offload xfrm states with AEAD key length other than 128/256 bit"
            }
            return nil
        }
    }
}
