#if canImport(Glibc)
import Glibc
#endif

/// What provides /dev/kvm on this host.
public enum HostKind: String, Sendable, CustomStringConvertible {
    /// VT-x / AMD-V (kvm_intel or kvm_amd): standard guest kernels boot.
    case hardware
    /// The kvm_pvm module: only kernels with the PVM guest patch run natively.
    case pvm
    /// No usable /dev/kvm.
    case none

    public var description: String {
        switch self {
        case .hardware: return "hardware KVM"
        case .pvm: return "PVM (kvm_pvm)"
        case .none: return "no KVM"
        }
    }

    /// Detects the host kind from /dev/kvm and /sys/module.
    /// - Parameter sysModule: the sysfs module directory (tests pass a fake tree).
    public static func detect(devicePath: String = "/dev/kvm", sysModule: String = "/sys/module") -> HostKind {
        if access(devicePath, F_OK) != 0 { return .none }
        if access(sysModule + "/kvm_pvm", F_OK) == 0 { return .pvm }
        return .hardware
    }
}
