import Foundation
import SandboxCore
import SandboxImages
import VMMProtocol

/// A bare boot without the agent (what `sandbox boot` does): a kernel, optionally an
/// initramfs and a root image, the console streamed, and how the guest ended.
public enum GuestBoot {
    public struct Configuration: Sendable {
        /// Kernel path; nil = the cached kernel for this host's flavor.
        public var kernel: String?
        public var initrd: String?
        /// Image name in the store, or the path of an ext4 image; nil = no disk.
        public var image: String?
        public var extraCommandLine = ""
        public var memoryMiB: UInt64 = 256
        public var cpus = 1
        /// Wall-clock limit; nil = none.
        public var timeoutSeconds: Double? = 60
        public var keepDiskPath: String?
        /// Where the console goes as it arrives (a host descriptor); nil = nowhere.
        public var consoleFD: Int32?
        public var vmmExecutable: String?
        /// Jail the VMM (see `SandboxConfiguration.jail`).
        public var jail = true
        public init() {}
    }

    /// How the guest ended.
    public enum Ending: Sendable, Equatable {
        /// It shut down or reset itself, and the console shows no crash.
        case clean
        /// The kernel crashed (panic, BUG) or the VM reported a crash.
        case crash
        /// The wall-clock limit passed.
        case timeout
        /// KVM failed while it ran.
        case kvmError
        /// It was stopped from outside.
        case stopped
    }

    public struct Result: Sendable {
        public var ending: Ending
        public var reason: String
        public var runMillis: Double
        /// When init started (boot-timer mark), if the guest wrote it.
        public var initMillis: Double?
        /// The kernel's crash line, when the console shows one.
        public var crashLine: String?
    }

    /// Boots and waits for the guest to end. Throws `SandboxError` for bad input (the
    /// kernel, initramfs, image or numbers), a host without KVM, or a VMM that failed.
    public static func run(_ c: Configuration, progress: (String) -> Void) throws(SandboxError) -> Result {
        let kernel: String, image: String?
        do {
            kernel = try c.kernel ?? KernelStore.defaultKernelPath(progress: progress)
            image = try c.image.map { try RootImage.resolve($0, progress: progress) }
        } catch {
            throw .from(error, code: .invalidInput)
        }
        var config = VMMConfig(mode: .boot, kernelPath: kernel, initrdPath: c.initrd, imagePath: image,
                               overlayDirectory: SandboxPaths.overlayDirectory, memoryMiB: c.memoryMiB, cpus: c.cpus,
                               vmTimeoutSeconds: c.timeoutSeconds, bootTimeoutSeconds: c.timeoutSeconds ?? 0,
                               extraCommandLine: c.extraCommandLine, keepDiskPath: c.keepDiskPath, streamConsole: c.consoleFD != nil)
        config.jail = c.jail
        let staging = try c.keepDiskPath.map { (keep) throws(SandboxError) in try KeepDiskStaging(for: keep) }
        config.keepDiskPath = staging?.stagedPath
        defer { staging?.remove() }
        let vmm = try VMMProcess.spawn(config, executable: c.vmmExecutable, stdout: c.consoleFD, stderr: 2)
        defer { vmm.reap(patienceMillis: 1000) }
        // The VMM ends the VM itself (timeout included); wait for its report.
        while true {
            guard let e = vmm.nextEvent(timeoutMillis: Int32.max) else {
                let how = vmm.reap(patienceMillis: 1000).map(SandboxRunner.describeExit) ?? "ended"
                throw SandboxError(.vmm, "the VMM process \(how) without reporting how the guest ended")
            }
            switch e.kind {
            case .failed: throw e.error ?? .vmm("the VMM failed to set the VM up")
            case .ready, .snapshotted: continue
            case .stopped:
                if let keepError = e.error { throw keepError }
                vmm.reap(patienceMillis: 10_000)
                try staging?.finish()
                let ending: Ending
                switch e.stop {
                case .clean?: ending = .clean
                case .crash?: ending = .crash
                case .timeout?, .bootTimeout?: ending = .timeout
                case .kvm?: ending = .kvmError
                case .stopped?, nil: ending = .stopped
                }
                return Result(ending: ending, reason: e.reason ?? "unknown", runMillis: e.runMillis ?? 0,
                              initMillis: e.initMillis, crashLine: e.crashLine)
            }
        }
    }
}
