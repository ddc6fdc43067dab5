// `link fault NAME ...` (issue 10): fault injection into a simulated NIC from a batch, the offline counterpart of
// SimulatedNIC.injectFault / setStalled / vanish (see XFRMSimulatedNIC/Faults.swift for what each fault does):
//
//   link fault NAME state-add|state-free|policy-add|policy-free|stats ENOSPC|EIO|ETIMEDOUT [count N|always]
//   link fault NAME stall on|off
//   link fault NAME vanish        (the device disappears; the host then removes it, taking its SAs and policies)
//   link fault NAME clear

import XFRMCore
import XFRMSimHost
import XFRMSimulatedNIC

extension NetworkCommands {
    static func fault(_ a: [String], _ host: SimHost) throws(NetworkError) -> String {
        let usage = "Usage: link fault NAME { \(NICFaultPoint.allCases.map(\.rawValue).joined(separator: " | ")) } "
            + "{ ENOSPC | EIO | ETIMEDOUT } [ count N | always ] | stall { on | off } | vanish | clear"
        guard a.count >= 3 else { throw NetworkError(22, usage) }
        guard let nic = host.nic(named: a[1]) else {
            throw NetworkError(19, host.stack.network.interface(named: a[1]) == nil
                               ? "Cannot find device \"\(a[1])\"" : "Device \"\(a[1])\" is not a simulated NIC")
        }
        switch (a[2], a.count) {
        case ("stall", 4) where a[3] == "on" || a[3] == "off":
            nic.setStalled(a[3] == "on")
        case ("vanish", 3):
            nic.vanish()
            do throws(HostError) { try host.removeNIC(name: nic.name) } catch { throw NetworkError(19, error.description) }
        case ("clear", 3):
            nic.clearFaults()
        default:
            guard let point = NICFaultPoint(rawValue: a[2]), a.count >= 4, let errno = NICFaultErrno(name: a[3]) else {
                throw NetworkError(22, usage)
            }
            var count: Int? = 1
            switch Array(a.dropFirst(4)) {
            case []: break
            case ["always"]: count = nil
            case let r where r.count == 2 && r[0] == "count":
                guard let n = Int(r[1]), n > 0 else { throw NetworkError(22, "Error: \"count\" must be a positive number.") }
                count = n
            default: throw NetworkError(22, usage)
            }
            nic.injectFault(point, errno: errno, count: count)
        }
        return ""
    }
}
