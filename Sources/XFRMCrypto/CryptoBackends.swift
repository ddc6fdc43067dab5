import Glibc

/// The crypto backends by name, and the default: the fastest available (ipsec-mb where it runs, else OpenSSL),
/// unless the environment variable `XFRM_CRYPTO` names one (so that every test suite can run with each backend).
public enum CryptoBackends {
    public static let names = ["openssl", "ipsec-mb"]

    /// The backend called `name`, or nil for an unknown name. "ipsec-mb" is refused where it cannot run.
    public static func named(_ name: String) -> (any ESPCryptoBackend)? {
        switch name {
        case "openssl": OpenSSLBackend()
        case "ipsec-mb": IPsecMBBackend.isAvailable ? IPsecMBBackend() : nil
        default: nil
        }
    }

    /// `XFRM_CRYPTO` if set (a bad value ends the process with exit status 2 and a message naming it), else the
    /// fastest available.
    public static var preferred: any ESPCryptoBackend {
        if let chosen = getenv("XFRM_CRYPTO").map({ String(cString: $0) }), !chosen.isEmpty {
            guard let b = named(chosen) else {
                let message = "XFRM_CRYPTO=\(chosen): expected one of \(names.joined(separator: ", "))"
                    + (chosen == "ipsec-mb" ? " (ipsec-mb cannot run on this CPU)" : "") + "\n"
                message.withCString { _ = write(2, $0, strlen($0)) }
                exit(2)
            }
            return b
        }
        return IPsecMBBackend.isAvailable ? IPsecMBBackend() : OpenSSLBackend()
    }
}
