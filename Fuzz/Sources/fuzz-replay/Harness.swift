// Differential fuzzer: ReplayWindow (XFRMESP) against the RFC 4303 reference model (XFRMTestKit.ReplayReference).
// The input chooses the window size (0–4096), ESN, the starting top and the received numbers
// (ReplayDifferential); any disagreement traps, so libFuzzer keeps the input as a crash.
import XFRMTestKit

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzReplay(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    let bytes = UnsafeRawBufferPointer(start: data, count: data == nil ? 0 : size)
    if let disagreement = ReplayDifferential.run(bytes) {
        fatalError("replay window disagrees with the reference model: \(disagreement)")
    }
    return 0
}
