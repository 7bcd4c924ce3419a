import KVM

/// Adjusts the host-supported CPUID for one vCPU.
public enum CPUIDPolicy {
    /// Returns `supported` with the vCPU's APIC ID, the hypervisor bit and the
    /// topology leaves set for `vcpuCount` single-threaded cores.
    public static func entries(from supported: [CPUIDEntry], vcpuID: Int, vcpuCount: Int) -> [CPUIDEntry] {
        supported.map { e in
            var e = e
            switch e.function {
            case 0x1:
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processor count.
                e.ebx = (e.ebx & 0x0000_FFFF) | (UInt32(vcpuID) << 24) | (UInt32(max(vcpuCount, 1)) << 16)
                e.ecx |= 1 << 31 // hypervisor present
                e.edx |= 1 << 28 // HTT: the logical count field is valid
            case 0xB, 0x1F:
                // x2APIC topology: EDX is the x2APIC ID.
                e.edx = UInt32(vcpuID)
            default:
                break
            }
            return e
        }
    }
}
