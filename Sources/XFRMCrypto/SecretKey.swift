import CXFRMCrypto

/// Key material that is wiped when the last reference goes (≈ the kernel's kfree_sensitive of x->aead/ealg/aalg).
public final class SecretKey: @unchecked Sendable {
    private let storage: UnsafeMutableRawBufferPointer

    /// Copies `bytes` into private storage. The caller should wipe its own copy.
    public init(_ bytes: some Collection<UInt8>) {
        self.storage = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes.count, 1), alignment: 16)
        self.storage.initializeMemory(as: UInt8.self, repeating: 0)
        _ = UnsafeMutableRawBufferPointer(rebasing: self.storage[0..<bytes.count]).initializeMemory(
            as: UInt8.self, from: bytes)
        self.count = bytes.count
    }

    /// Key length in bytes.
    public let count: Int

    /// Key length in bits.
    public var bits: Int { self.count * 8 }

    /// Scoped access to the key bytes.
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeRawBufferPointer(start: self.storage.baseAddress, count: self.count))
    }

    /// A copy of the bytes (for listings with keys shown, and tests).
    public var bytes: [UInt8] { self.withUnsafeBytes { Array($0) } }

    deinit {
        xfrm_cleanse(self.storage.baseAddress, self.storage.count)
        self.storage.deallocate()
    }
}
