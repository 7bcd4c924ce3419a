// swift-tools-version:6.1
import Foundation
import PackageDescription

// Layers, lowest first; a target depends only on targets above it in this list
// (Scripts/check-layers checks the imports against it; Docs/Architecture.md draws it).
//
//   C shims        CKVM CURing CJail CInit CSystem        (the only C headers)
//   shared         SandboxABI (host/guest numbers)  AgentProtocol (wire format)
//                  SandboxCore (the public error)  TreeArchive (directory trees as tar)
//   system         SystemShims  GuestMemory
//   devices        Bus (MMIO/port bus, device protocols)  KVM
//                  VirtIO (virtqueues, mmio transport, blk, vsock)  MicroVM (the VM)
//   VMM process    VMMProtocol (library <-> VMM)  sandbox-vmm (executable)
//   library        SandboxImages (kernels, images, recipes)  Sandbox (public API)
//                  SandboxBatch (job files; Yams)  SandboxTesting
//   executables    sandbox (CLI)  sandbox-init (guest PID 1)

// The two host executables link the Swift runtime and Foundation statically: a process
// start is part of every sandbox run (the CLI's and the VMM's), and loading the shared
// Swift libraries took 11-13 ms of the VMM's, 4-5 ms without them. The modules are
// compiled as usual; only the link takes the static libraries (and the C parts of
// Foundation that its shared library would have brought).
// They stay position-independent (PIE), although the dynamic loader then applies about
// 80,000 relative relocations at every start (linked -no-pie: about 1,000, and 1.4 ms
// less per `sandbox exec`): both parse what a hostile guest sends, and a fixed address
// for all of their code (ours, the Swift runtime's, Foundation's) is not worth it.
let staticSwift: [LinkerSetting] = [.unsafeFlags([
    "-static-stdlib", "-lCoreFoundation", "-l_FoundationICU", "-l_FoundationCShims", "-l_FoundationCollections",
])]

let package = Package(
    name: "sandbox",
    // Linux only: KVM, io_uring, vsock, seccomp. (SwiftPM has no way to say "Linux only";
    // no Apple platform is listed because none is supported.)
    products: [
        .library(name: "Sandbox", targets: ["Sandbox"]),
        .library(name: "SandboxTesting", targets: ["SandboxTesting"]),
        .library(name: "SandboxBatch", targets: ["SandboxBatch"]),
        .executable(name: "sandbox", targets: ["sandbox"]),
        .executable(name: "sandbox-vmm", targets: ["sandbox-vmm"]),
        .executable(name: "sandbox-init", targets: ["sandbox-init"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "5.0.1"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
    ],
    targets: [
        // C shims: the only place C headers are imported. Each exposes small wrappers
        // that return -errno, and ioctl numbers as constants (macros do not import).
        .target(name: "CKVM"),
        .target(name: "CURing", linkerSettings: [.linkedLibrary("uring")]),
        .target(name: "CJail", linkerSettings: [.linkedLibrary("seccomp"), .linkedLibrary("cap")]),
        .target(name: "CInit"),
        .target(name: "CSystem"),

        // What host and guest must agree on: ports, CIDs, boot marks, crash lines.
        .target(name: "SandboxABI"),
        // Host <-> guest agent wire format; Foundation-free, shared with sandbox-init.
        .target(name: "AgentProtocol"),
        // The library's one public error type (also reported by the VMM process).
        .target(name: "SandboxCore"),
        // Directory trees as tar streams (copy-in and copy-out of directories); shared
        // with sandbox-init, so Foundation-free.
        .target(name: "TreeArchive"),

        // Lowest Swift layer: file descriptors, errno, mmap, eventfd, threads, spawn.
        .target(name: "SystemShims", dependencies: ["CSystem"]),
        // Bounds-checked guest physical memory.
        .target(name: "GuestMemory", dependencies: ["SystemShims"]),
        // The device bus: MMIO and port-I/O device protocols, interrupt triggers, routing.
        .target(name: "Bus"),
        // Thin, typed wrappers over the KVM ioctls.
        .target(name: "KVM", dependencies: ["CKVM", "SystemShims", "GuestMemory"]),
        // virtio-mmio transport, split virtqueues and devices (block, vsock).
        .target(name: "VirtIO", dependencies: ["Bus", "SystemShims", "GuestMemory", "CURing"]),
        // The VM: boot loaders, legacy devices, vCPU run loop, VM assembly.
        .target(name: "MicroVM", dependencies: ["KVM", "GuestMemory", "Bus", "VirtIO", "SystemShims", "SandboxABI"]),

        // What the library and the VMM process say to each other.
        .target(name: "VMMProtocol", dependencies: ["SandboxCore"]),
        // The VMM process: one per sandbox, started by the library.
        .executableTarget(name: "sandbox-vmm", dependencies: [
            "MicroVM", "KVM", "VirtIO", "SystemShims", "CSystem", "CJail", "SandboxABI", "SandboxCore", "VMMProtocol",
            .product(name: "Crypto", package: "swift-crypto"),
        ], linkerSettings: staticSwift),

        // Kernels, images, recipes, content hashes.
        .target(name: "SandboxImages", dependencies: [
            "SandboxCore", "SystemShims", .product(name: "Crypto", package: "swift-crypto"),
        ]),
        // Public API: sandboxes, one-shot runs, the pool, outcomes.
        .target(name: "Sandbox", dependencies: ["SandboxCore", "SandboxImages", "VMMProtocol", "AgentProtocol", "SandboxABI", "SystemShims", "TreeArchive"]),
        // Batch job files (YAML/JSON), the batch runner and its reports.
        .target(name: "SandboxBatch", dependencies: ["Sandbox", "SystemShims", .product(name: "Yams", package: "Yams")]),
        // Helpers for XCTest and Swift Testing suites that spawn sandboxes.
        .target(name: "SandboxTesting", dependencies: ["Sandbox"]),
        .executableTarget(name: "sandbox", dependencies: [
            "Sandbox", "SandboxBatch", "SystemShims",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], linkerSettings: staticSwift),
        // The guest's PID 1. Built as a static executable by the image store.
        .executableTarget(name: "sandbox-init", dependencies: ["AgentProtocol", "SandboxABI", "SystemShims", "CInit", "TreeArchive"]),

        .testTarget(name: "MicroVMTests", dependencies: ["MicroVM", "Bus", "GuestMemory", "KVM", "VirtIO", "SystemShims", "SandboxABI"]),
        .testTarget(name: "KVMTests", dependencies: ["KVM", "MicroVM", "Bus", "GuestMemory", "VirtIO", "SystemShims"]),
        .testTarget(name: "VirtIOTests", dependencies: ["VirtIO", "Bus", "GuestMemory", "SystemShims"]),
        // The tests that run the executables do not depend on them: a test target that
        // depends on an executable target links its objects, and with them its static
        // linker settings (there is no static XCTest). `swift test` builds every product.
        .testTarget(name: "IntegrationTests", dependencies: ["Sandbox", "SandboxImages", "SandboxBatch", "VMMProtocol", "SystemShims"]),
        .testTarget(name: "SandboxTestingTests", dependencies: ["SandboxTesting", "Sandbox"]),
        .testTarget(name: "AgentProtocolTests", dependencies: ["AgentProtocol"], exclude: ["Corpus"]),
        .testTarget(name: "TreeArchiveTests", dependencies: ["TreeArchive"]),
    ]
)

// Fuzz targets (Docs/Testing.md, Scripts/fuzz): libFuzzer executables, declared only when
// SANDBOX_FUZZ is set, because they build only with -sanitize=fuzzer. SwiftPM links an
// executable with main = <module>_main; each target's Main.swift defines it and hands
// over to libFuzzer's driver (lld: gold cannot link the sanitizer runtimes here).
if ProcessInfo.processInfo.environment["SANDBOX_FUZZ"] != nil {
    let fuzzTargets: [(String, [Target.Dependency])] = [
        ("fuzz-virtqueue", ["VirtIO", "GuestMemory"]),
        ("fuzz-devices", ["VirtIO", "GuestMemory", "Bus"]),
        ("fuzz-agent-frames", ["AgentProtocol"]),
        ("fuzz-job-file", ["SandboxBatch"]),
        ("fuzz-tree", ["TreeArchive"]),
    ]
    package.targets.append(.target(name: "FuzzSupport", path: "Fuzz/FuzzSupport"))
    for (name, dependencies) in fuzzTargets {
        package.targets.append(.executableTarget(
            name: name, dependencies: dependencies + ["FuzzSupport"], path: "Fuzz/\(name)",
            swiftSettings: [.unsafeFlags(["-parse-as-library"])],
            linkerSettings: [.unsafeFlags(["-use-ld=lld"])]))
    }
}
