// swift-tools-version: 6.2
import PackageDescription

// libFuzzer harnesses for swift-xfrm, one executable each (README "Reliability (issue 10)" → "Fuzzing").
//
// A package of its own, depending on the root package by path, so that `swift build --build-tests` of the root
// package never sees these executables: each defines `LLVMFuzzerTestOneInput` and no `main` (libFuzzer brings
// it), which links only with `--sanitize fuzzer`. Build them into their own directory:
//
//     swift build --package-path Fuzz --scratch-path .build/fuzz -c release --sanitize fuzzer --sanitize address
//
// or let `scripts/fuzz.sh TARGET SECONDS` do it (once, cached) and run one with its corpus.
let harness: [SwiftSetting] = [.unsafeFlags(["-parse-as-library"])]

let package = Package(
    name: "swift-xfrm-fuzz",
    dependencies: [.package(name: "swift-xfrm", path: "..")],
    targets: [
        // What several harnesses share: a stack with SAs of every algorithm, a byte reader.
        .target(
            name: "FuzzSupport",
            dependencies: [
                .product(name: "XFRMCore", package: "swift-xfrm"),
                .product(name: "XFRMESP", package: "swift-xfrm"),
                .product(name: "XFRMCrypto", package: "swift-xfrm"),
                .product(name: "XFRMPacket", package: "swift-xfrm"),
                .product(name: "XFRMOffline", package: "swift-xfrm"),
                .product(name: "XFRMTestKit", package: "swift-xfrm"),
            ]),
        .executableTarget(
            name: "fuzz-esp-input",
            dependencies: ["FuzzSupport"], swiftSettings: harness),
        .executableTarget(
            name: "fuzz-input-runs",
            dependencies: [
                "FuzzSupport",
                .product(name: "XFRMCore", package: "swift-xfrm"),
                .product(name: "XFRMPacket", package: "swift-xfrm"),
            ], swiftSettings: harness),
        .executableTarget(
            name: "fuzz-control",
            dependencies: [
                "FuzzSupport",
                .product(name: "XFRMControl", package: "swift-xfrm"),
                .product(name: "XFRMDaemon", package: "swift-xfrm"),
                .product(name: "XFRMWire", package: "swift-xfrm"),
            ], swiftSettings: harness),
        .executableTarget(
            name: "fuzz-batch",
            dependencies: [.product(name: "XFRMOffline", package: "swift-xfrm")], swiftSettings: harness),
        .executableTarget(
            name: "fuzz-pcap",
            dependencies: [.product(name: "XFRMPacket", package: "swift-xfrm")], swiftSettings: harness),
        .executableTarget(
            name: "fuzz-daemon-intake",
            dependencies: [
                "FuzzSupport",
                .product(name: "XFRMDaemon", package: "swift-xfrm"),
                .product(name: "XFRMEngine", package: "swift-xfrm"),
            ], swiftSettings: harness),
        .executableTarget(
            name: "fuzz-reassembly",
            dependencies: [
                .product(name: "XFRMEngine", package: "swift-xfrm"),
                .product(name: "XFRMPacket", package: "swift-xfrm"),
            ], swiftSettings: harness),
        .executableTarget(
            name: "fuzz-replay",
            dependencies: [.product(name: "XFRMTestKit", package: "swift-xfrm")], swiftSettings: harness),
    ],
    swiftLanguageModes: [.v5]
)
