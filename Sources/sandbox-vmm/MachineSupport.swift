import KVM
import SandboxABI
import MicroVM
import SandboxCore
import VMMProtocol

/// Building a `Machine` and describing how it ended, shared by both modes.
enum VMMMachine {
    static func make(_ config: MachineConfiguration, restoring: (snapshot: MachineSnapshot, memoryFD: Int32)? = nil) throws(SandboxError) -> Machine {
        do { return try Machine(config, restoring: restoring) } catch { throw Self.error(error) }
    }

    /// A set-up or run error as the library's error, with the code that says whose it is.
    static func error(_ error: any Error) -> SandboxError {
        if let e = error as? SandboxError { return e }
        guard let m = error as? MachineError else { return SandboxError(.internal, "the VM failed", underlying: ErrorText(error)) }
        switch m {
        case .kvm(let k):
            switch k {
            case .deviceMissing, .permissionDenied, .unsupportedAPIVersion, .missingCapability:
                return SandboxError(.noKVM, k.description)
            case .ioctlFailed:
                return SandboxError(.vmm, "KVM failed: \(k)")
            case .invalidState:
                return SandboxError(.snapshot, k.description)
            }
        case .kernel: return SandboxError(.kernel, m.description)
        case .initrd, .invalidConfiguration: return SandboxError(.invalidInput, m.description)
        case .setup: return SandboxError(.vmm, m.description)
        case .snapshot: return SandboxError(.snapshot, m.description)
        }
    }
}

/// An error carried as its description (for errors that are not `Sendable`).
struct ErrorText: Error, Sendable, CustomStringConvertible {
    let description: String
    init(_ e: any Error) { description = "\(e)" }
}

/// The `stopped` event for a finished run.
enum StopReport {
    static func event(_ result: MachineResult) -> VMMEvent {
        let tail = result.console.tail(16 * 1024)
        let crash = GuestCrashDetector.crashReason(consoleTail: tail)
        var e = VMMEvent(kind: .stopped)
        switch result.reason {
        case .guestReset, .powerOff, .halted: e.stop = crash == nil ? .clean : .crash
        case .timeout: e.stop = .timeout
        case .guestCrash: e.stop = .crash
        case .stopRequested: e.stop = .stopped
        case .kvmError: e.stop = .kvm
        }
        e.reason = result.reason.description
        e.crashLine = crash
        e.consoleTail = tail
        e.runMillis = Double(result.stopNanos - result.startNanos) / 1e6
        e.initMillis = result.millis(toMark: GuestABI.BootMark.initStarted.rawValue)
        return e
    }
}
