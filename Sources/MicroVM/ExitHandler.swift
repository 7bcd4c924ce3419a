import Bus
import KVM

/// Why a VM stopped.
public enum StopReason: Equatable, Sendable, CustomStringConvertible {
    /// The guest reset itself (triple fault with `reboot=t`, KVM_EXIT_SHUTDOWN, i8042 reset).
    /// This is how our guests end normally: Linux without ACPI cannot power off.
    case guestReset
    /// KVM_EXIT_SYSTEM_EVENT shutdown.
    case powerOff
    /// The guest halted with interrupts off and no in-kernel irqchip (test guests).
    case halted
    /// KVM reported a crash event, or the guest did something the VMM cannot continue from.
    case guestCrash(String)
    /// The wall-clock limit passed.
    case timeout
    /// The host asked the VM to stop.
    case stopRequested
    /// KVM failed (entry failure, internal error, ioctl error).
    case kvmError(String)

    public var description: String {
        switch self {
        case .guestReset: return "guest reset (shutdown)"
        case .powerOff: return "guest powered off"
        case .halted: return "guest halted"
        case .guestCrash(let why): return "guest crashed: \(why)"
        case .timeout: return "wall-clock timeout"
        case .stopRequested: return "stopped by the host"
        case .kvmError(let why): return "KVM error: \(why)"
        }
    }
}

/// What the run loop does after an exit.
public enum ExitAction: Equatable, Sendable {
    case resume
    case stop(StopReason)
}

/// Handles one vCPU exit: a pure function of the exit and the device bus, unit-tested
/// case by case. Unknown ports read as all-ones and ignore writes (like an empty ISA
/// bus); unknown MMIO reads as zero.
public enum ExitHandler {
    public static func handle(_ exit: VCPUExit, bus: DeviceBus) -> ExitAction {
        switch exit {
        case let .ioIn(port, size, data):
            // `data` holds size * count bytes (string I/O repeats the access).
            guard size > 0, size <= 4 else { return .resume }
            let target = bus.port(port)
            var offset = 0
            while offset + size <= data.count {
                let slice = UnsafeMutableRawBufferPointer(rebasing: data[offset..<offset + size])
                if let (device, off) = target {
                    device.portRead(offset: off, data: slice)
                } else {
                    for i in 0..<slice.count { slice[i] = 0xFF }
                }
                offset += size
            }
            return .resume
        case let .ioOut(port, size, data):
            guard size > 0, size <= 4 else { return .resume }
            guard let (device, off) = bus.port(port) else { return .resume }
            var offset = 0
            while offset + size <= data.count {
                device.portWrite(offset: off, data: UnsafeRawBufferPointer(rebasing: data[offset..<offset + size]))
                offset += size
            }
            return .resume
        case let .mmioRead(address, data):
            if let (device, off) = bus.mmio(address) {
                device.mmioRead(offset: off, data: data)
            } else {
                for i in 0..<data.count { data[i] = 0 }
            }
            return .resume
        case let .mmioWrite(address, data):
            if let (device, off) = bus.mmio(address) { device.mmioWrite(offset: off, data: data) }
            return .resume
        case .halt:
            return .stop(.halted)
        case .shutdown:
            return .stop(.guestReset)
        case .systemEvent(let type):
            switch type {
            case 1: return .stop(.powerOff)            // KVM_SYSTEM_EVENT_SHUTDOWN
            case 2: return .stop(.guestReset)          // KVM_SYSTEM_EVENT_RESET
            case 3: return .stop(.guestCrash("KVM_SYSTEM_EVENT_CRASH"))
            default: return .stop(.kvmError("unknown system event \(type)"))
            }
        case .failEntry(let reason):
            return .stop(.kvmError("KVM_EXIT_FAIL_ENTRY, hardware reason 0x\(String(reason, radix: 16))"))
        case .internalError(let sub):
            let what = sub == 1 ? "emulation failure (is this kernel flavor right for the host? see `sandbox doctor`)" : "suberror \(sub)"
            return .stop(.kvmError("KVM_EXIT_INTERNAL_ERROR: \(what)"))
        case .interrupted:
            return .resume
        case .unknown(let reason):
            return .stop(.kvmError("unhandled KVM exit reason \(reason)"))
        }
    }
}
