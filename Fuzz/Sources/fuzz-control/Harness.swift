// The XFRM-netlink control server (XFRMControl behind xfrmd's control socket): the input is one datagram from a
// client, holding one or more netlink messages, answered as the daemon answers it (ControlProtocol.answer: every
// message checked against xfrm_msg_min, decoded, applied). The stack persists across inputs, so an SA or policy
// one input adds is there for the next to update, get, dump, delete or flush; it is replaced every 1,000 inputs
// so memory stays bounded. After each datagram the clock moves a second, the lifetime timers run, and every
// event is turned into its multicast message as the daemon does for listeners. Every reply and event must encode.
import XFRMControl
import XFRMCore
import XFRMDaemon
import XFRMWire

final class ControlState {
    let clock = ManualClock()
    let stack: XFRMStack
    let server: XfrmControlServer
    let events: EventBus.Subscription
    var groups: UInt32 = 0

    init() {
        self.stack = XFRMStack(clock: self.clock)
        self.server = XfrmControlServer(stack: self.stack)
        self.events = self.stack.events.subscribe(capacity: 1 << 12, acquire: false)
    }
}

nonisolated(unsafe) var state = ControlState()
nonisolated(unsafe) var inputs = 0

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzControl(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    inputs += 1
    if inputs % 1_000 == 0 { state = ControlState() }
    let s = state
    let datagram = Array(UnsafeBufferPointer(start: data, count: data == nil ? 0 : size))
    let replies = ControlProtocol.answer(datagram: datagram, server: s.server) { s.groups = $0 }
    for m in replies { _ = m.encode() }
    s.clock.advance(by: 1)
    s.stack.runTimers()
    for e in s.events.drain() {
        if let m = s.server.message(for: e) { _ = m.encode() }
    }
    return 0
}
