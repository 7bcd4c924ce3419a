import Foundation
import SandboxCore

/// What the library hands the VMM process (`sandbox-vmm`), as JSON in its environment
/// (`SANDBOX_VMM_CONFIG`). In `agent` mode the process gets two sockets: fd 3 carries the
/// raw agent byte stream (relayed to the guest agent's vsock port), fd 4 carries control
/// events (JSON lines, ``VMMEvent``). In `boot` mode only fd 4 is used, and the guest
/// console goes to fd 1.
public struct VMMConfig: Codable, Sendable {
    public enum Mode: String, Codable, Sendable {
        /// A sandbox: root disk, vsock, relay to the guest agent (`sandbox exec`, the API).
        case agent
        /// A bare boot: stream the console, report how the guest ended (`sandbox boot`).
        case boot
        /// Applies the jail, reports it in a `ready` event and exits (`sandbox doctor`).
        case jailCheck
    }

    public var mode: Mode
    public var kernelPath: String
    public var initrdPath: String?
    /// The root image (ext4); nil boots without a disk (boot mode only).
    public var imagePath: String?
    /// Where the VMM creates (and at once unlinks) the root disk's private overlay.
    public var overlayDirectory: String
    public var memoryMiB: UInt64
    public var cpus: Int
    /// Hard wall-clock limit for the whole VM (the backstop behind the command timeout);
    /// nil = none.
    public var vmTimeoutSeconds: Double?
    /// Agent mode: how long the guest may take to start its agent; past it the VM is
    /// stopped and reported with ``VMMStopKind/bootTimeout`` (slow, not crashed).
    public var bootTimeoutSeconds: Double
    /// Appended to the kernel command line.
    public var extraCommandLine: String
    /// Write the guest's final root disk (base + writes) here.
    public var keepDiskPath: String?
    /// Copy the guest console to fd 2 (agent mode) or fd 1 (boot mode) as it arrives.
    public var streamConsole: Bool
    /// Grow the root disk to this many bytes (the guest agent grows the file system to
    /// match at boot); nil keeps the image's size.
    public var diskSizeBytes: UInt64?
    /// Agent mode: where a "snapshot" control line makes the VMM write a snapshot of the
    /// VM (then it stops). See Docs/SnapshotFormat.md.
    public var snapshotDirectory: String?
    /// Agent mode: restore the VM from the snapshot in this directory instead of booting
    /// (`kernelPath` and `imagePath` are then not used: the snapshot has its own disk).
    public var restoreDirectory: String?
    /// Jail the VMM (Docs/Jail.md); false only for debugging (`--no-jail`).
    public var jail = true
    /// The new namespaces the library started the VMM in (names as in /proc/PID/ns), so
    /// that the VMM's jail report says which it got.
    public var namespaces: [String] = []
    /// Why the host refused them, when it did (the VMM's jail report quotes it).
    public var namespacesRefused: String?
    /// The cgroup v2 directory the library made for this VMM (limits already set); the
    /// VMM moves itself into it before it builds the VM. Nil: no delegated cgroup.
    public var cgroup: String?
    /// Agent mode, restoring: copy the pages of the snapshot's working set (``WorkingSet``)
    /// in ahead of the guest. False only to measure what that saves.
    public var prefault = true
    /// Agent mode, restoring: report in the stop event which pages the guest wrote
    /// (``VMMEvent/writtenPages``), to record the snapshot's working set.
    public var recordWorkingSet = false

    public init(mode: Mode, kernelPath: String, initrdPath: String? = nil, imagePath: String?, overlayDirectory: String,
                memoryMiB: UInt64, cpus: Int, vmTimeoutSeconds: Double?, bootTimeoutSeconds: Double,
                extraCommandLine: String = "", keepDiskPath: String? = nil, streamConsole: Bool = false,
                diskSizeBytes: UInt64? = nil) {
        self.mode = mode
        self.kernelPath = kernelPath
        self.initrdPath = initrdPath
        self.imagePath = imagePath
        self.overlayDirectory = overlayDirectory
        self.memoryMiB = memoryMiB
        self.cpus = cpus
        self.vmTimeoutSeconds = vmTimeoutSeconds
        self.bootTimeoutSeconds = bootTimeoutSeconds
        self.extraCommandLine = extraCommandLine
        self.keepDiskPath = keepDiskPath
        self.streamConsole = streamConsole
        self.diskSizeBytes = diskSizeBytes
    }

    /// The environment variable that carries the configuration.
    public static let environmentKey = "SANDBOX_VMM_CONFIG"
}

/// How a VM ended, as the VMM judged it.
public enum VMMStopKind: String, Codable, Sendable {
    /// The guest shut down or reset itself, and its console shows no crash.
    case clean
    /// The guest kernel crashed (panic, oops, triple fault during boot).
    case crash
    /// The VM's wall-clock limit passed.
    case timeout
    /// Agent mode: the guest agent did not answer within the boot limit, and the console
    /// shows no crash (a slow guest or an overloaded host).
    case bootTimeout
    /// The library asked the VM to stop.
    case stopped
    /// KVM failed (entry failure, internal error, a failing ioctl).
    case kvm
}

/// Control events from the VMM process to the library.
public struct VMMEvent: Codable, Sendable {
    public enum Kind: String, Codable, Sendable {
        case ready, stopped, failed
        /// The snapshot asked for was written (then the VM stops as usual).
        case snapshotted
    }
    public var kind: Kind
    /// ready: milliseconds from VMM start to init started / agent ready / connected.
    public var initMillis: Double?
    public var agentMillis: Double?
    public var connectedMillis: Double?
    /// ready: milliseconds from VMM start to the first KVM_RUN.
    public var vcpuStartMillis: Double?
    /// ready, on a restore: milliseconds from VMM start to the restored VM built (memory
    /// mapped, every state loaded), just before its vCPUs run.
    public var restoreMillis: Double?
    /// ready, on a restore: pages of the working set copied in ahead of the guest (0 when
    /// the snapshot has none), and why it was not used or only partly, when so.
    public var prefaultPages: UInt64?
    public var prefaultNote: String?
    /// ready (and stopped, in boot mode): what the jail applied and what it could not.
    public var jail: JailReport?
    /// snapshotted: milliseconds the snapshot took (pause to files written).
    public var snapshotMillis: Double?
    /// stopped: how it ended, in words and as a kind.
    public var reason: String?
    public var stop: VMMStopKind?
    public var consoleTail: String?
    public var runMillis: Double?
    /// stopped, when ``VMMConfig/recordWorkingSet`` was set: the pages the guest wrote
    /// since the restore, as (first page, count) pairs flattened.
    public var writtenPages: [UInt32]?
    /// stopped: the kernel's crash line, when the console shows one.
    public var crashLine: String?
    /// stopped: the kept disk could not be written. failed: the set-up error.
    public var error: SandboxError?

    public init(kind: Kind) { self.kind = kind }

    /// One JSON line. (Encoding these plain values cannot fail; if it ever did, the
    /// line says so rather than going missing.)
    public static func line(_ e: VMMEvent) -> [UInt8] {
        let data = (try? JSONEncoder().encode(e)) ?? Data(#"{"kind":"failed","error":{"code":"internal","message":"the VMM could not encode an event"}}"#.utf8)
        return Array(data) + [0x0A]
    }

    /// Decodes one line; nil when it is not an event.
    public static func decode(_ line: some Collection<UInt8>) -> VMMEvent? {
        try? JSONDecoder().decode(VMMEvent.self, from: Data(line))
    }
}

/// File descriptor numbers in the VMM process.
public enum VMMFileDescriptors {
    public static let agent: Int32 = 3
    public static let control: Int32 = 4
}

/// What `sandbox-vmm probe` reports about the host (one JSON object on its stdout).
public struct HostProbe: Codable, Sendable {
    /// `HostKind` raw value: hardware, pvm or none.
    public var hostKind: String
    public var kvmUsable = false
    /// KVM's API and capabilities, or why /dev/kvm cannot be used.
    public var kvmDetail = ""
    /// The block I/O engine the VMM would use (io_uring or sync) and why.
    public var blockEngine = ""
    public var blockEngineReason = ""
    /// libseccomp's version, nil when unavailable.
    public var libseccomp: String?

    public init(hostKind: String) { self.hostKind = hostKind }
}

/// What the VMM's jail applied, and what it could not (with the reason), in words.
public struct JailReport: Codable, Sendable, Equatable {
    public var applied: [String] = []
    public var missing: [String] = []
    public init() {}
}
