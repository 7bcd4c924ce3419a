import Foundation

/// What the library hands the VMM child process (`sandbox _vmm`), as JSON in its
/// environment (`SANDBOX_VMM_CONFIG`). The child gets two sockets: fd 3 carries the raw
/// agent byte stream (relayed to the guest's vsock port 1024), fd 4 carries control
/// messages (JSON lines).
public struct VMMConfig: Codable, Sendable {
    public var kernelPath: String
    public var imagePath: String
    public var memoryMiB: UInt64
    public var cpus: Int
    /// Hard wall-clock limit for the whole VM (the backstop behind the command timeout).
    public var vmTimeoutSeconds: Double
    /// How long the guest may take to start its agent; past it the VM is stopped and
    /// reported with `reasonKind` "bootTimeout" (slow, not crashed).
    public var bootTimeoutSeconds: Double
    public var extraCommandLine: String
    public var keepDiskPath: String?
    public var streamConsoleTo: Int32?
}

/// Control events from the VMM child to the library.
public struct VMMEvent: Codable, Sendable {
    public enum Kind: String, Codable, Sendable { case ready, stopped, failed }
    public var kind: Kind
    /// ready: milliseconds from VMM start to init started / agent ready / connected.
    public var initMillis: Double?
    public var agentMillis: Double?
    public var connectedMillis: Double?
    /// ready: milliseconds from VMM start to the first KVM_RUN.
    public var vcpuStartMillis: Double?
    /// stopped: why, and how it ended: "clean", "crash", "timeout", "bootTimeout" (the
    /// agent did not answer within the boot limit and the console shows no crash),
    /// "stopped", "kvm".
    public var reason: String?
    public var reasonKind: String?
    public var consoleTail: String?
    public var runMillis: Double?
    /// failed: the set-up error.
    public var error: String?

    static func line(_ e: VMMEvent) -> [UInt8] {
        let data = (try? JSONEncoder().encode(e)) ?? Data("{\"kind\":\"failed\",\"error\":\"encode\"}".utf8)
        return Array(data) + [0x0A]
    }
}

/// File descriptor numbers in the VMM child.
public enum VMMFileDescriptors {
    public static let agent: Int32 = 3
    public static let control: Int32 = 4
}
