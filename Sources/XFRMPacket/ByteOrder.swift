// Big-endian (network order) loads and stores on raw packet memory. Unaligned access is allowed everywhere.

extension UnsafeMutableRawPointer {
    @inline(__always) public func loadBE16(at offset: Int) -> UInt16 {
        UInt16(bigEndian: self.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
    }
    @inline(__always) public func loadBE32(at offset: Int) -> UInt32 {
        UInt32(bigEndian: self.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }
    @inline(__always) public func loadBE64(at offset: Int) -> UInt64 {
        UInt64(bigEndian: self.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }
    @inline(__always) public func loadByte(at offset: Int) -> UInt8 {
        self.load(fromByteOffset: offset, as: UInt8.self)
    }
    @inline(__always) public func storeBE16(_ value: UInt16, at offset: Int) {
        self.storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt16.self)
    }
    @inline(__always) public func storeBE32(_ value: UInt32, at offset: Int) {
        self.storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt32.self)
    }
    @inline(__always) public func storeBE64(_ value: UInt64, at offset: Int) {
        self.storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt64.self)
    }
    @inline(__always) public func storeByte(_ value: UInt8, at offset: Int) {
        self.storeBytes(of: value, toByteOffset: offset, as: UInt8.self)
    }
}
