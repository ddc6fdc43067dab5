#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import XFRMCommandLine

/// The host's interface names (if_nametoindex / if_indextoname), for `dev` selectors against the kernel.
public struct KernelInterfaceNames: InterfaceNameResolver {
    public init() {}

    public func ifindex(named name: String) -> Int32? {
        let i = if_nametoindex(name)
        return i == 0 ? nil : Int32(bitPattern: i)
    }

    public func name(ofIndex index: Int32) -> String? {
        var buf = [CChar](repeating: 0, count: Int(IF_NAMESIZE) + 1)
        guard index > 0, if_indextoname(UInt32(index), &buf) != nil else { return nil }
        return String(cString: buf)
    }
}
