@_exported public import CKVM
import GuestMemory
import SystemShims
#if canImport(Glibc)
import Glibc
#endif

/// Errors from the KVM layer, each naming what failed.
public enum KVMError: Error, Equatable, Sendable, CustomStringConvertible {
    /// /dev/kvm does not exist (no KVM module loaded, or not a Linux host with KVM).
    case deviceMissing(path: String)
    /// /dev/kvm exists but cannot be opened by this user.
    case permissionDenied(path: String)
    /// KVM_GET_API_VERSION returned something other than 12.
    case unsupportedAPIVersion(Int32)
    /// A capability the VMM relies on is missing.
    case missingCapability(KVMCapability)
    /// An ioctl failed.
    case ioctlFailed(SystemError)
    /// A saved vCPU or VM state does not fit this build or host (nothing was written).
    case invalidState(String)

    public var description: String {
        switch self {
        case .deviceMissing(let p):
            return "\(p) does not exist: KVM is not available on this host (load kvm_intel/kvm_amd, or enable nested virtualization)"
        case .permissionDenied(let p):
            return "no permission to open \(p): add your user to the 'kvm' group or run as root"
        case .unsupportedAPIVersion(let v):
            return "unsupported KVM API version \(v) (expected 12)"
        case .missingCapability(let c):
            return "KVM capability \(c) is missing on this host"
        case .ioctlFailed(let e):
            return e.description
        case .invalidState(let why):
            return "the saved VM state cannot be restored: \(why)"
        }
    }
}

/// KVM capabilities the VMM checks for (KVM_CAP_* numbers).
public enum KVMCapability: Int32, CaseIterable, Sendable, CustomStringConvertible {
    case irqchip = 0           // KVM_CAP_IRQCHIP
    case hlt = 1               // KVM_CAP_HLT
    case userMemory = 3        // KVM_CAP_USER_MEMORY
    case setTSSAddr = 4        // KVM_CAP_SET_TSS_ADDR
    case extCPUID = 7          // KVM_CAP_EXT_CPUID
    case nrVCPUs = 9           // KVM_CAP_NR_VCPUS
    case nrMemslots = 10       // KVM_CAP_NR_MEMSLOTS
    case pit2 = 33             // KVM_CAP_PIT2
    case ioeventfd = 36        // KVM_CAP_IOEVENTFD
    case irqfd = 32            // KVM_CAP_IRQFD
    case maxVCPUs = 66         // KVM_CAP_MAX_VCPUS
    case immediateExit = 136   // KVM_CAP_IMMEDIATE_EXIT

    /// Capabilities without which this VMM cannot run.
    public static let required: [KVMCapability] = [.irqchip, .userMemory, .extCPUID, .pit2, .irqfd, .immediateExit]

    public var description: String {
        switch self {
        case .irqchip: return "KVM_CAP_IRQCHIP"
        case .hlt: return "KVM_CAP_HLT"
        case .userMemory: return "KVM_CAP_USER_MEMORY"
        case .setTSSAddr: return "KVM_CAP_SET_TSS_ADDR"
        case .extCPUID: return "KVM_CAP_EXT_CPUID"
        case .nrVCPUs: return "KVM_CAP_NR_VCPUS"
        case .nrMemslots: return "KVM_CAP_NR_MEMSLOTS"
        case .pit2: return "KVM_CAP_PIT2"
        case .ioeventfd: return "KVM_CAP_IOEVENTFD"
        case .irqfd: return "KVM_CAP_IRQFD"
        case .maxVCPUs: return "KVM_CAP_MAX_VCPUS"
        case .immediateExit: return "KVM_CAP_IMMEDIATE_EXIT"
        }
    }
}

/// An open /dev/kvm: the system-level ioctls (corresponds to rust-vmm's `Kvm`).
public final class KVMSystem: Sendable {
    public let fd: FileDescriptor
    public let path: String

    /// Opens /dev/kvm and checks the API version and every required capability.
    /// - Throws: `KVMError` naming the missing device, permission, version or capability.
    public init(path: String = "/dev/kvm") throws(KVMError) {
        self.path = path
        let raw = Glibc.open(path, O_RDWR | O_CLOEXEC)
        if raw < 0 {
            let e = Glibc.errno
            switch e {
            case ENOENT, ENODEV, ENXIO: throw .deviceMissing(path: path)
            case EACCES, EPERM: throw .permissionDenied(path: path)
            default: throw .ioctlFailed(SystemError("open(\(path))", errno: e))
            }
        }
        fd = FileDescriptor(owning: raw)
        let version = ckvm_ioctl_val(raw, CKVM_GET_API_VERSION, 0)
        guard version == 12 else { throw .unsupportedAPIVersion(version) }
        for cap in KVMCapability.required where check(cap) <= 0 {
            throw .missingCapability(cap)
        }
    }

    /// KVM_CHECK_EXTENSION: 0 if absent, otherwise a capability-specific value.
    public func check(_ cap: KVMCapability) -> Int32 {
        max(0, ckvm_ioctl_val(fd.rawValue, CKVM_CHECK_EXTENSION, UInt(cap.rawValue)))
    }

    /// KVM_GET_VCPU_MMAP_SIZE.
    public func vcpuMmapSize() throws(KVMError) -> Int {
        let r = ckvm_ioctl_val(fd.rawValue, CKVM_GET_VCPU_MMAP_SIZE, 0)
        if r < 0 { throw .ioctlFailed(SystemError("KVM_GET_VCPU_MMAP_SIZE", errno: -r)) }
        return Int(r)
    }

    /// KVM_GET_SUPPORTED_CPUID.
    public func supportedCPUID() throws(KVMError) -> [kvm_cpuid_entry2] {
        var capacity: Int32 = 128
        while true {
            var entries = [kvm_cpuid_entry2](repeating: kvm_cpuid_entry2(), count: Int(capacity))
            let n = entries.withUnsafeMutableBufferPointer { ckvm_get_supported_cpuid(fd.rawValue, $0.baseAddress, capacity) }
            if n == -E2BIG && capacity < 4096 { capacity *= 2; continue }
            if n < 0 { throw .ioctlFailed(SystemError("KVM_GET_SUPPORTED_CPUID", errno: -n)) }
            return Array(entries.prefix(Int(n)))
        }
    }

    /// KVM_CREATE_VM.
    public func createVM() throws(KVMError) -> VirtualMachine {
        let r = ckvm_ioctl_val(fd.rawValue, CKVM_CREATE_VM, 0) // retries EINTR itself
        if r < 0 { throw .ioctlFailed(SystemError("KVM_CREATE_VM", errno: -r)) }
        return VirtualMachine(fd: FileDescriptor(owning: r), system: self)
    }
}

/// The ioctl requests a VMM makes once its VM is built (the vCPUs run, interrupts are
/// raised, a snapshot reads the state back): what the jail's seccomp filter lets through.
/// Creating VMs, vCPUs or memory slots, and setting any state, are not among them.
public enum KVMRuntimeIoctls {
    public static let requests: [UInt] = [
        CKVM_RUN, CKVM_IRQ_LINE, CKVM_CHECK_EXTENSION, CKVM_GET_MSR_INDEX_LIST,
        CKVM_GET_REGS, CKVM_GET_SREGS, CKVM_GET_XSAVE, CKVM_GET_XSAVE2, CKVM_GET_XCRS, CKVM_GET_MSRS,
        CKVM_GET_MP_STATE, CKVM_GET_LAPIC, CKVM_GET_VCPU_EVENTS, CKVM_GET_DEBUGREGS,
        CKVM_GET_IRQCHIP, CKVM_GET_PIT2, CKVM_GET_CLOCK,
    ]
}
