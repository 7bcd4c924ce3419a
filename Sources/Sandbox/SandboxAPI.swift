import AgentProtocol
import Foundation
import SandboxABI
import SandboxCore

/// A file to copy between host and guest.
public struct FileCopy: Sendable, Equatable {
    public var hostPath: String
    public var guestPath: String
    public init(hostPath: String, guestPath: String) { self.hostPath = hostPath; self.guestPath = guestPath }

    /// Parses `HOST:GUEST` (copy-in) or `GUEST:HOST` (copy-out, with `reversed`).
    public static func parse(_ spec: String, guestFirst: Bool) throws -> FileCopy {
        guard let colon = spec.firstIndex(of: ":"), colon != spec.startIndex, spec.index(after: colon) != spec.endIndex else {
            throw SandboxError.invalidInput("'\(spec)' is not of the form \(guestFirst ? "GUEST:HOST" : "HOST:GUEST")")
        }
        let a = String(spec[..<colon]), b = String(spec[spec.index(after: colon)...])
        let guest = guestFirst ? a : b
        guard guest.hasPrefix("/") else { throw SandboxError.invalidInput("guest path '\(guest)' must be absolute") }
        return guestFirst ? FileCopy(hostPath: b, guestPath: a) : FileCopy(hostPath: a, guestPath: b)
    }
}

/// How to build a sandbox.
public struct SandboxConfiguration: Sendable {
    /// Kernel path; nil = the cached kernel for this host's flavor (`$SANDBOX_KERNEL` first).
    public var kernel: String?
    /// Image name in the store, or the path of an ext4 image.
    public var image: String = "busybox"
    public var memoryMiB: UInt64 = 256
    public var cpus: Int = 1
    /// Wall-clock limit for the command; nil = none.
    public var timeout: Duration? = .seconds(300)
    /// How long the guest may take from the VMM's start until its agent answers; nil =
    /// `$SANDBOX_BOOT_TIMEOUT` seconds, else 60 s. A guest still booting at the limit is
    /// stopped and reported as an infrastructure error that says it was slow (never as a
    /// crash); emulated or heavily loaded hosts may need more.
    public var bootTimeout: Duration?
    /// Extra environment for the command (PATH, HOME and TERM have defaults).
    public var environment: [String: String] = [:]
    public var workingDirectory: String = "/"
    public var copyIn: [FileCopy] = []
    public var copyOut: [FileCopy] = []
    /// Most bytes one copy-out may bring back from the guest (default 1 GiB).
    public var copyOutLimit: UInt64 = 1 << 30
    /// How long one file transfer (a copy-out of a run; a running sandbox's readFile,
    /// writeFile, copyIn or copyOut) may take before the host stops the sandbox and the
    /// transfer fails saying so. nil: max(300 s, `timeout`).
    public var transferTimeout: Duration?
    /// Most bytes the guest sends per output stream (the rest is dropped and flagged);
    /// 0 = no limit.
    public var outputLimit: UInt64 = 256 << 20
    /// Whether the result keeps the output (up to `outputLimit`). Callers that consume the
    /// stream themselves (the CLI) turn this off so that memory does not grow with output.
    public var keepOutput: Bool = true
    /// Run the command on a pseudo-terminal in the guest (its controlling terminal):
    /// stdin, stdout and stderr are the terminal, so its output arrives as stdout, and
    /// input (`stdinFD`) is typed into it (Ctrl-C interrupts). Its size comes from the
    /// `TerminalSize` given to `SandboxRunner.run` (24×80 without one). One-shot runs.
    public var terminal: Bool = false
    /// Write the guest's final root disk here (base + writes).
    public var keepDiskPath: String?
    /// Grow the guest's root disk (and its file system) to this many MiB; nil keeps the
    /// image's size (images have about 1 GiB free). The growth is sparse: host space is
    /// used only as the guest writes. At least the image's size, at most 16 TiB.
    public var diskSizeMiB: UInt64?
    /// Start from this snapshot directory (made by ``SnapshotMaker``) instead of booting:
    /// its memory, CPU state and disk. `memoryMiB` and `cpus` must be the snapshot's;
    /// `image`, `kernel` and `diskSizeMiB` are the snapshot's and are not used.
    /// When nil, a run restores the cached start snapshot of its image, kernel and shape
    /// (made on first use) unless `cold` is set; `ExecResult.timings` says which.
    public var snapshot: String?
    /// Start from this template (made by ``Templates/create(name:configuration:setup:replace:onOutput:progress:)``
    /// or `sandbox template create`): the VM as its setup command left it. The template's
    /// image, memory, vCPUs and disk size are used; `snapshot` and `cold` must not be set.
    public var template: String?
    /// Boot the kernel instead of restoring the cached start snapshot (also for every
    /// run when `$SANDBOX_COLD` is set). Runs that stream the console boot too.
    public var cold: Bool = false
    /// Jail the VMM process (Docs/Jail.md): its own namespaces and empty root, no
    /// privileges, a seccomp allow-list. `false` is for debugging the VMM only (`--no-jail`).
    public var jail: Bool = true
    /// Copy the guest console to this host descriptor (debugging).
    public var consoleFD: Int32?
    /// The VMM executable; nil finds it by the rule of ``VMMExecutable`` (`$SANDBOX_VMM`,
    /// else `sandbox-vmm` next to the running executable).
    public var vmmExecutable: String?

    public init() {}
}

/// How a sandboxed command ended. Test runners switch on this.
public enum Outcome: Equatable, Sendable, CustomStringConvertible {
    case exited(Int32)
    case signalled(Int32)
    case timedOut
    case outOfMemory
    case guestCrashed(consoleTail: String)
    /// The sandbox itself failed (not the command): the error says what and why.
    case infrastructureError(SandboxError)

    public var description: String {
        switch self {
        case .exited(let c): return "exited with status \(c)"
        case .signalled(let s): return "killed by signal \(s)"
        case .timedOut: return "timed out"
        case .outOfMemory: return "ran out of memory"
        case .guestCrashed(let tail): return "guest crashed: \(GuestCrashSummary.line(tail))"
        case .infrastructureError(let r): return "sandbox failed: \(r)"
        }
    }

    /// The process exit status `sandbox exec` uses for this outcome (see README).
    public var exitStatus: Int32 {
        switch self {
        case .exited(let c): return c
        case .signalled(let s): return 128 + s
        case .timedOut: return 124
        case .infrastructureError: return 125
        case .guestCrashed: return 250
        case .outOfMemory: return 251
        }
    }
}

enum GuestCrashSummary {
    static func line(_ tail: String) -> String {
        if let panic = GuestCrashDetector.crashReason(consoleTail: tail) { return panic }
        for l in tail.split(whereSeparator: \.isNewline) where l.hasPrefix("[sandbox:") { return String(l) }
        return tail.split(whereSeparator: \.isNewline).last.map(String.init) ?? "(no console output)"
    }
}

/// Milliseconds spent in each phase of a run.
public struct PhaseTimings: Sendable, Equatable {
    /// Library call to the first guest instruction: resolving inputs, spawning the VMM
    /// process, building the VM (memory, kernel load, devices, vCPUs). On a restore:
    /// the call to the VMM process running (its own start before the restore).
    public var vmmStart: Double = 0
    /// Whether the run started from a snapshot (then `kernelBoot` is 0).
    public var restored = false
    /// The snapshot directory it was restored from (a cached start snapshot or the
    /// configuration's), when restored.
    public var snapshot: String?
    /// When it booted: why it did not restore (asked for, or no snapshot could be used).
    public var coldReason: String?
    /// Whether the VM was restored ahead of the run and waited in the warm pool
    /// (`SandboxRunner.keepWarm`); then `restore` was spent before the call.
    public var warm = false
    /// On a restore: the VMM building the VM from the snapshot (mapping its memory,
    /// loading every vCPU's and device's state), before the vCPUs run.
    public var restore: Double = 0
    /// On a restore: the pages of the snapshot's working set (what a restored guest
    /// writes first) the VMM copied in ahead of the guest, and, when it copied none or
    /// only some, why (the snapshot has none, the file was unusable, the host refused).
    public var prefaultPages: UInt64 = 0
    public var prefaultNote: String?
    /// Kernel entry to the guest's init (PID 1) starting, by the guest's own boot clock.
    public var kernelBoot: Double = 0
    /// Init started to the agent connected over vsock and answering.
    public var agentReady: Double = 0
    /// Of `agentReady`: init started to the agent listening, by the guest's clock.
    public var agentStartup: Double = 0
    /// Exec request to exit status (includes copy-in/out).
    public var exec: Double = 0
    /// Exit status to VMM process reaped.
    public var teardown: Double = 0
    /// The whole call.
    public var total: Double = 0

    public init() {}
}

/// The result of running one command in a sandbox.
public struct ExecResult: Sendable {
    public var command: [String]
    public var outcome: Outcome
    public var stdout: [UInt8]
    public var stderr: [UInt8]
    public var timings: PhaseTimings
    /// The last lines of the guest console (always kept; useful in failure messages).
    public var consoleTail: String

    public var stdoutText: String { String(decoding: stdout, as: UTF8.self) }
    public var stderrText: String { String(decoding: stderr, as: UTF8.self) }
}

/// A chunk of output from a streaming run.
public enum OutputEvent: Sendable {
    case stdout([UInt8])
    case stderr([UInt8])
}

extension SandboxConfiguration {
    /// The boot limit used when neither the configuration nor `$SANDBOX_BOOT_TIMEOUT` sets one.
    public static let defaultBootTimeoutSeconds: Double = 60

    /// The boot limit in seconds: `configured`, else `$SANDBOX_BOOT_TIMEOUT`, else 60.
    static func resolvedBootTimeout(_ configured: Duration?) throws -> Double {
        if let configured {
            let s = try InputCheck.seconds(of: configured, name: "bootTimeout", max: 86_400)
            guard s > 0 else { throw SandboxError.invalidInput("bootTimeout must be more than 0 seconds (got \(configured))") }
            return s
        }
        guard let raw = ProcessInfo.processInfo.environment["SANDBOX_BOOT_TIMEOUT"], !raw.isEmpty else {
            return defaultBootTimeoutSeconds
        }
        guard let s = Double(raw), s.isFinite, s > 0, s <= 86_400 else {
            throw SandboxError.invalidInput("SANDBOX_BOOT_TIMEOUT=\(raw) is not a number of seconds between 0 and 86400")
        }
        return s
    }
}
