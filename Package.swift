// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "sandbox",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "Sandbox", targets: ["Sandbox"]),
        .library(name: "SandboxTesting", targets: ["SandboxTesting"]),
        .executable(name: "sandbox", targets: ["sandbox"]),
        .executable(name: "sandbox-init", targets: ["sandbox-init"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "5.0.1"),
    ],
    targets: [
        // C shims: the only place C headers are imported. Each exposes small wrappers
        // that return -errno, and ioctl numbers as constants (macros do not import).
        .target(name: "CKVM"),
        .target(name: "CURing", linkerSettings: [.linkedLibrary("uring")]),
        .target(name: "CJail", linkerSettings: [.linkedLibrary("seccomp"), .linkedLibrary("cap")]),
        .target(name: "CInit"),
        .target(name: "CSystem"),

        // Lowest Swift layer: file descriptors, errno, mmap, eventfd.
        .target(name: "SystemShims", dependencies: ["CSystem"]),
        // Bounds-checked guest physical memory.
        .target(name: "GuestMemory", dependencies: ["SystemShims"]),
        // Thin, typed wrappers over the KVM ioctls.
        .target(name: "KVM", dependencies: ["CKVM", "SystemShims", "GuestMemory"]),
        // virtio-mmio transport, split virtqueues and devices (block, vsock).
        .target(name: "VirtIO", dependencies: ["SystemShims", "GuestMemory", "CURing"]),
        // The VMM: boot loaders, legacy devices, vCPU run loop, VM assembly.
        .target(name: "MicroVM", dependencies: ["KVM", "GuestMemory", "VirtIO", "SystemShims"]),
        // Host <-> guest agent wire format; Foundation-free, shared with sandbox-init.
        .target(name: "AgentProtocol"),
        // Public async API, kernel and image stores.
        .target(name: "Sandbox", dependencies: ["MicroVM", "KVM", "VirtIO", "AgentProtocol", "SystemShims", "CJail", "CURing", "CSystem",
                                                .product(name: "Yams", package: "Yams")]),
        // Helpers for XCTest and Swift Testing suites that spawn sandboxes.
        .target(name: "SandboxTesting", dependencies: ["Sandbox"]),
        .executableTarget(name: "sandbox", dependencies: [
            "Sandbox", "MicroVM", "VirtIO",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // The guest's PID 1. Built as a static executable by the image store.
        .executableTarget(name: "sandbox-init", dependencies: ["AgentProtocol", "CInit"]),

        .testTarget(name: "MicroVMTests", dependencies: ["MicroVM", "GuestMemory", "KVM", "VirtIO", "SystemShims"]),
        .testTarget(name: "KVMTests", dependencies: ["KVM", "MicroVM", "GuestMemory", "VirtIO", "SystemShims"]),
        .testTarget(name: "VirtIOTests", dependencies: ["VirtIO", "GuestMemory"]),
        .testTarget(name: "IntegrationTests", dependencies: ["Sandbox", "MicroVM"]),
        .testTarget(name: "SandboxTestingTests", dependencies: ["SandboxTesting", "Sandbox"]),
        .testTarget(name: "AgentProtocolTests", dependencies: ["AgentProtocol"], exclude: ["Corpus"]),
    ]
)
