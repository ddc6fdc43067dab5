// swift-tools-version: 6.2
import PackageDescription

// Modules by responsibility, dependencies pointing down (an arrow means "imports"):
//   executables   xfrm (the command: wire types, the offline session, the kernel and daemon transports; no benchmark,
//                 no test kit), xfrmd (the daemon), esp-tool, xfrm-bench (benchmarks; the only one linking them),
//                 xfrm-bridge (C) with libxfrmbridge.so (CXFRMBridge, C): NETLINK_XFRM of any program to xfrmd
//   XFRMDaemon    xfrmd's control socket, data path (TUN, ESP sockets), metrics  → Engine, Control, SimulatedNIC
//   XFRMOffline   the in-process session behind `xfrm --offline`, pcap, demo    → SimHost, Control, CommandLine
//   XFRMKernel    NETLINK_XFRM to the Linux kernel                               → Wire, CommandLine
//   XFRMCommandLine  the `ip xfrm` grammar and printers, over wire types only    → Wire
//   XFRMSimHost   simulated hosts on the engine                                  → Engine, SimulatedNIC
//   XFRMEngine    batch sources/sinks, rings, dispatcher, workers                → Core
//   XFRMControl   the XFRM user API server (≈ xfrm_user.c)                       → Core, Wire
//   XFRMSimulatedNIC  an offload device with engines and a wire (an engine sink)  → Engine, Core
//   XFRMCore      SPD, SAD, lifetimes, events, the output and input paths        → ESP
//   XFRMESP       ESP transform (RFC 4303), anti-replay, NAT-T                   → Crypto, Packet
//   XFRMCrypto    per-SA pre-keyed ciphers: OpenSSL (CXFRMCrypto), ipsec-mb (CXFRMIPsecMB) → Packet
//   XFRMWire      uapi structs and the netlink codec; stands alone               → Packet
//   XFRMPacket    buffers, pool, IPv4/IPv6, checksums, TCP offload helpers, pcap
let package = Package(
    name: "swift-xfrm",
    products: [
        .library(name: "XFRMPacket", targets: ["XFRMPacket"]),
        .library(name: "XFRMCrypto", targets: ["XFRMCrypto"]),
        .library(name: "XFRMESP", targets: ["XFRMESP"]),
        // For the libFuzzer harnesses in Fuzz/ (a package of their own that depends on this one by path).
        .library(name: "XFRMWire", targets: ["XFRMWire"]),
        .library(name: "XFRMCore", targets: ["XFRMCore"]),
        .library(name: "XFRMControl", targets: ["XFRMControl"]),
        .library(name: "XFRMOffline", targets: ["XFRMOffline"]),
        .library(name: "XFRMDaemon", targets: ["XFRMDaemon"]),
        .library(name: "XFRMEngine", targets: ["XFRMEngine"]),
        .library(name: "XFRMTestKit", targets: ["XFRMTestKit"]),
        .executable(name: "xfrm", targets: ["xfrm"]),
        .executable(name: "esp-tool", targets: ["esp-tool"]),
        .executable(name: "xfrm-bench", targets: ["xfrm-bench"]),
        .executable(name: "xfrmd", targets: ["xfrmd"]),
        // An unmodified XFRM-netlink program (iproute2's `ip xfrm`, strongSwan's charon) driving xfrmd:
        // `xfrm-bridge [-S PATH] COMMAND…` preloads libxfrmbridge.so (C, no Swift runtime) into COMMAND.
        .library(name: "xfrmbridge", type: .dynamic, targets: ["CXFRMBridge"]),
        .executable(name: "xfrm-bridge", targets: ["xfrm-bridge"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        .target(
            name: "CXFRMCrypto",
            cSettings: [.define("OPENSSL_SUPPRESS_DEPRECATED"), .unsafeFlags(["-O2"])],
            linkerSettings: [.linkedLibrary("crypto")]
        ),
        .target(
            name: "CXFRMIPsecMB",
            cSettings: [.unsafeFlags(["-O2"])],
            linkerSettings: [.linkedLibrary("IPSec_MB")]
        ),
        .target(
            name: "CXFRMBridge", dependencies: ["CXFRMSys"], cSettings: [.unsafeFlags(["-O2", "-fvisibility=hidden"])],
            // Preloaded into C programs: no Swift runtime among its dependencies.
            linkerSettings: [.unsafeFlags(["-Xlinker", "--as-needed"])]),
        .executableTarget(name: "xfrm-bridge"),
        .target(name: "CXFRMChecksum"),
        .target(name: "XFRMPacket", dependencies: ["CXFRMChecksum"]),
        .target(name: "XFRMCrypto", dependencies: ["CXFRMCrypto", "CXFRMIPsecMB", "XFRMPacket"]),
        .target(name: "XFRMESP", dependencies: ["XFRMCrypto", "XFRMPacket"]),
        .target(name: "XFRMWire", dependencies: ["XFRMPacket"]),
        .target(name: "XFRMKernel", dependencies: ["XFRMWire", "XFRMCommandLine"]),
        .target(name: "CXFRMSys"),
        .target(
            name: "XFRMDaemon",
            dependencies: [
                "CXFRMSys", "XFRMControl", "XFRMCore", "XFRMEngine", "XFRMESP", "XFRMPacket", "XFRMSimulatedNIC", "XFRMWire",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]),
        .executableTarget(
            name: "xfrmd",
            dependencies: [
                "XFRMDaemon", "XFRMControl", "XFRMCore", "XFRMCrypto",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        .target(name: "XFRMCommandLine", dependencies: ["XFRMWire", "XFRMPacket"]),
        .target(name: "XFRMCore", dependencies: ["XFRMESP", "XFRMCrypto", "XFRMPacket"]),
        .target(name: "XFRMControl", dependencies: ["XFRMCore", "XFRMWire", "XFRMESP", "XFRMCrypto", "XFRMPacket"]),
        .target(
            name: "XFRMSimulatedNIC", dependencies: ["XFRMCore", "XFRMEngine", "XFRMESP", "XFRMCrypto", "XFRMPacket"]),
        .target(
            name: "XFRMBenchmarks",
            dependencies: ["XFRMCore", "XFRMCrypto", "XFRMESP", "XFRMPacket", "XFRMSimHost", "XFRMSimulatedNIC"]),
        .target(name: "XFRMEngine", dependencies: ["XFRMCore", "XFRMPacket"]),
        .target(
            name: "XFRMSimHost", dependencies: ["XFRMCore", "XFRMEngine", "XFRMESP", "XFRMPacket", "XFRMSimulatedNIC"]),
        .target(
            name: "XFRMOffline",
            dependencies: [
                "XFRMCommandLine", "XFRMControl", "XFRMCore", "XFRMESP", "XFRMPacket", "XFRMWire", "XFRMSimHost",
                "XFRMSimulatedNIC",
            ]),
        .executableTarget(
            name: "xfrm",
            dependencies: ["XFRMOffline", "XFRMCommandLine", "XFRMKernel", "XFRMWire", "XFRMDaemon"]),
        .executableTarget(name: "esp-tool", dependencies: ["XFRMESP", "XFRMCrypto", "XFRMPacket"]),
        .target(name: "CMallocCounter"),
        .executableTarget(
            name: "xfrm-bench",
            dependencies: [
                "XFRMESP", "XFRMCore", "XFRMCrypto", "XFRMPacket", "XFRMTestKit", "CXFRMCrypto", "CXFRMIPsecMB",
                "CMallocCounter",
                "XFRMSimHost", "XFRMSimulatedNIC", "XFRMBenchmarks", "XFRMEngine",
            ]
        ),
        .target(name: "XFRMTestKit", dependencies: ["XFRMPacket", "XFRMESP", "XFRMCore"]),
        .testTarget(
            name: "XFRMControlTests",
            dependencies: ["XFRMControl", "XFRMCore", "XFRMWire", "XFRMCommandLine", "XFRMPacket", "XFRMTestKit"]),
        .testTarget(
            name: "XFRMEngineTests", dependencies: ["XFRMEngine", "XFRMCore", "XFRMCrypto", "XFRMESP", "XFRMPacket", "XFRMTestKit"]),
        .testTarget(name: "XFRMPacketTests", dependencies: ["XFRMPacket", "XFRMTestKit"]),
        .testTarget(name: "XFRMCommandLineTests", dependencies: ["XFRMCommandLine", "XFRMWire"]),
        .testTarget(
            name: "XFRMCoreTests", dependencies: ["XFRMCore", "XFRMCrypto", "XFRMESP", "XFRMPacket", "XFRMTestKit"]),
        .testTarget(
            name: "XFRMSimulatedNICTests",
            dependencies: ["XFRMSimulatedNIC", "XFRMCore", "XFRMCrypto", "XFRMESP", "XFRMPacket", "XFRMTestKit"]),
        .testTarget(
            name: "XFRMFaultTests",
            dependencies: ["XFRMSimHost", "XFRMSimulatedNIC", "XFRMEngine", "XFRMCore", "XFRMCrypto", "XFRMESP",
                           "XFRMPacket", "XFRMTestKit"]),
        .testTarget(
            name: "XFRMCryptoTests", dependencies: ["XFRMCrypto", "XFRMTestKit"], resources: [.copy("Resources")]),
        .testTarget(
            name: "XFRMESPTests",
            dependencies: ["XFRMESP", "XFRMCrypto", "XFRMPacket", "XFRMTestKit"],
            resources: [.copy("Vectors")]
        ),
    ]
)
