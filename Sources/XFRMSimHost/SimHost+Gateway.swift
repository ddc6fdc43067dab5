import XFRMCore
import XFRMPacket

extension SimHost {
    /// Makes this host a tunnel gateway (the simulated hosts' usual setup): `nic` up with the `outer` address, a
    /// dummy `lan0` up with the `inner` one, and `remote` routed over `nic` via `gateway`.
    public func configureGateway(nic: String = "sim0", outer: String, inner: String, remote: String,
                                 gateway: String) throws
    {
        let net = self.stack.network
        try net.modify(name: nic) { (i: inout Interface) throws(NetworkError) in i.isUp = true }
        try net.addAddress(IPPrefix(outer)!, device: nic)
        _ = try net.addInterface(name: "lan0", kind: "dummy")
        try net.modify(name: "lan0") { (i: inout Interface) throws(NetworkError) in i.isUp = true }
        try net.addAddress(IPPrefix(inner)!, device: "lan0")
        try net.addRoute(IPPrefix(remote)!, device: nic, via: IPAddress(gateway)!)
    }
}
