// The `-batch` language (`xfrm --offline -batch FILE`): the input is a batch file's text, run by an offline
// session (BatchReader's words, quotes and continuations, then every command: state, policy, monitor, clock,
// stat, link, addr, route). Any text gives output or a SessionError, never a crash. A session is costly to make
// (its simulated host's packet pool), so one serves 200 inputs — what one batch configured, the next may list,
// change or delete — and is then replaced, which keeps memory bounded.
import XFRMOffline

nonisolated(unsafe) var session = OfflineSession()
nonisolated(unsafe) var inputs = 0

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzBatch(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    inputs += 1
    if inputs % 200 == 0 { session = OfflineSession() }
    let text = String(decoding: UnsafeBufferPointer(start: data, count: data == nil ? 0 : size), as: UTF8.self)
    _ = try? session.runBatch(text: text, name: "fuzz")
    return 0
}
