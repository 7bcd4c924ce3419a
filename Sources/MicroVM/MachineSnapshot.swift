import KVM
import SystemShims
import VirtIO

/// Everything a snapshot holds besides guest RAM (which is the memory file): the VM's
/// shape, the host it was taken on, and every vCPU's and device's state as plain values.
/// See Docs/SnapshotFormat.md.
public struct MachineSnapshot: Codable, Sendable, Equatable {
    /// Bumped whenever this structure or what a field means changes.
    /// 2: state.json names the sandbox-vmm build; restored guests are reseeded.
    /// 3: the KVM structures are base64 strings, the MSRs packed.
    public static let currentFormat = 3

    public var format: Int = MachineSnapshot.currentFormat
    /// The host the snapshot was taken on; a restore elsewhere is refused.
    public var host: HostIdentity
    public var memoryBytes: UInt64
    public var cpus: Int
    public var vcpus: [VCPUState]
    public var vm: VMState
    public var serial: Serial.State
    /// One per virtio device, in the configuration's order.
    public var transports: [MMIOTransportState]
    /// The virtio device type of each transport (2 = block, 19 = vsock).
    public var deviceTypes: [UInt32]

    public init(host: HostIdentity, memoryBytes: UInt64, cpus: Int, vcpus: [VCPUState], vm: VMState,
                serial: Serial.State, transports: [MMIOTransportState], deviceTypes: [UInt32]) {
        self.host = host
        self.memoryBytes = memoryBytes
        self.cpus = cpus
        self.vcpus = vcpus
        self.vm = vm
        self.serial = serial
        self.transports = transports
        self.deviceTypes = deviceTypes
    }

    /// Whether this snapshot can be restored into a VM built from `config`; throws
    /// `MachineError.snapshot` saying what differs.
    public func check(against config: MachineConfiguration) throws {
        func refuse(_ why: String) throws -> Never { throw MachineError.snapshot(why) }
        guard format == Self.currentFormat else {
            try refuse("format \(format), this build reads format \(Self.currentFormat)")
        }
        guard memoryBytes == config.memoryMiB << 20 else {
            try refuse("taken with \(memoryBytes >> 20) MiB of guest memory, this VM has \(config.memoryMiB) MiB")
        }
        guard cpus == config.cpus, vcpus.count == cpus else {
            try refuse("taken with \(cpus) vCPUs (\(vcpus.count) saved), this VM has \(config.cpus)")
        }
        let types = config.virtioDevices.map(\.deviceType)
        guard deviceTypes == types, transports.count == types.count else {
            try refuse("taken with virtio devices \(deviceTypes), this VM has \(types)")
        }
    }
}

/// What must match between the host a snapshot was taken on and the one restoring it:
/// the KVM flavor and the CPU (vendor, family, model, stepping). The guest's TSC, CPUID
/// and saved FPU area all depend on them.
public struct HostIdentity: Codable, Sendable, Equatable, CustomStringConvertible {
    public var kind: String
    public var cpuVendor: String
    /// CPUID leaf 1 EAX (family, model, stepping).
    public var cpuSignature: UInt32
    /// The XSAVE area size KVM uses for a vCPU.
    public var xsaveSize: Int

    public var description: String {
        "\(kind), \(cpuVendor) CPU 0x\(String(cpuSignature, radix: 16)), XSAVE \(xsaveSize) bytes"
    }

    /// This host, as seen through `system` and the CPUID leaves it supports (`cpuid`,
    /// when the caller has them already).
    public static func current(_ system: KVMSystem, cpuid known: [kvm_cpuid_entry2]? = nil) throws -> HostIdentity {
        let cpuid = try known ?? system.supportedCPUID()
        var vendor = ""
        if let leaf0 = cpuid.first(where: { $0.function == 0 }) {
            for reg in [leaf0.ebx, leaf0.edx, leaf0.ecx] {
                for shift in stride(from: 0, to: 32, by: 8) { vendor.append(Character(Unicode.Scalar(UInt8((reg >> UInt32(shift)) & 0xff)))) }
            }
        }
        let signature = cpuid.first(where: { $0.function == 1 })?.eax ?? 0
        return HostIdentity(kind: HostKind.detect().rawValue, cpuVendor: vendor, cpuSignature: signature, xsaveSize: system.xsaveSize)
    }
}
