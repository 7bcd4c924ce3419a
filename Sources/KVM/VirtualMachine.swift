import GuestMemory
import SystemShims
#if canImport(Glibc)
import Glibc
#endif

/// A KVM virtual machine (corresponds to rust-vmm's `VmFd`).
public final class VirtualMachine: Sendable {
    public let fd: FileDescriptor
    public let system: KVMSystem

    init(fd: FileDescriptor, system: KVMSystem) {
        self.fd = fd
        self.system = system
    }

    private func ioctl(_ name: String, _ request: UInt, _ arg: UnsafeMutableRawPointer) throws(KVMError) {
        let r = ckvm_ioctl_ptr(fd.rawValue, request, arg)
        if r < 0 { throw .ioctlFailed(SystemError(name, errno: -r)) }
    }

    /// KVM_SET_USER_MEMORY_REGION for every region of `memory`, slots numbered from 0.
    public func mapMemory(_ memory: GuestMemory) throws(KVMError) {
        for (slot, region) in memory.regions.enumerated() {
            var r = kvm_userspace_memory_region(
                slot: UInt32(slot), flags: 0,
                guest_phys_addr: region.start.rawValue,
                memory_size: region.size,
                userspace_addr: memory.hostAddress(of: region))
            try ioctl("KVM_SET_USER_MEMORY_REGION(slot \(slot))", CKVM_SET_USER_MEMORY_REGION, &r)
        }
    }

    /// KVM_SET_TSS_ADDR (needed by Intel VMX before the first vCPU runs).
    public func setTSSAddress(_ address: UInt64) throws(KVMError) {
        let r = ckvm_ioctl_val(fd.rawValue, CKVM_SET_TSS_ADDR, UInt(address))
        if r < 0 { throw .ioctlFailed(SystemError("KVM_SET_TSS_ADDR", errno: -r)) }
    }

    /// KVM_SET_IDENTITY_MAP_ADDR (Intel VMX real-mode support page).
    public func setIdentityMapAddress(_ address: UInt64) throws(KVMError) {
        var a = address
        try ioctl("KVM_SET_IDENTITY_MAP_ADDR", CKVM_SET_IDENTITY_MAP_ADDR, &a)
    }

    /// KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and local APICs.
    public func createIRQChip() throws(KVMError) {
        let r = ckvm_ioctl_val(fd.rawValue, CKVM_CREATE_IRQCHIP, 0)
        if r < 0 { throw .ioctlFailed(SystemError("KVM_CREATE_IRQCHIP", errno: -r)) }
    }

    /// KVM_CREATE_PIT2: in-kernel i8254 timer.
    public func createPIT() throws(KVMError) {
        var config = kvm_pit_config()
        config.flags = 0
        try ioctl("KVM_CREATE_PIT2", CKVM_CREATE_PIT2, &config)
    }

    /// KVM_IRQ_LINE: sets a GSI's level.
    public func setIRQLine(_ gsi: UInt32, level: Bool) throws(KVMError) {
        var l = kvm_irq_level()
        l.irq = gsi
        l.level = level ? 1 : 0
        try ioctl("KVM_IRQ_LINE(\(gsi))", CKVM_IRQ_LINE, &l)
    }

    /// KVM_IRQFD: signalling `event` injects an edge on `gsi`.
    public func registerIRQFD(_ event: EventFD, gsi: UInt32) throws(KVMError) {
        var irqfd = kvm_irqfd()
        irqfd.fd = UInt32(event.fd.rawValue)
        irqfd.gsi = gsi
        try ioctl("KVM_IRQFD(gsi \(gsi))", CKVM_IRQFD, &irqfd)
    }

    /// KVM_IOEVENTFD: a guest write to the MMIO `address` (of `length` bytes, matching
    /// `datamatch` if given) signals `event` in the kernel without a userspace exit.
    public func registerIOEventFD(_ event: EventFD, mmioAddress address: UInt64, length: UInt32 = 4,
                                  datamatch: UInt64? = nil) throws(KVMError) {
        var io = kvm_ioeventfd()
        io.addr = address
        io.len = length
        io.fd = event.fd.rawValue
        if let d = datamatch {
            io.datamatch = d
            io.flags = UInt32(1 << 0) // KVM_IOEVENTFD_FLAG_DATAMATCH
        }
        try ioctl("KVM_IOEVENTFD(0x\(String(address, radix: 16)))", CKVM_IOEVENTFD, &io)
    }

    /// KVM_CREATE_VCPU, mapping its shared run page.
    public func createVCPU(id: Int) throws(KVMError) -> VCPU {
        let r = ckvm_ioctl_val(fd.rawValue, CKVM_CREATE_VCPU, UInt(id))
        if r < 0 { throw .ioctlFailed(SystemError("KVM_CREATE_VCPU(\(id))", errno: -r)) }
        let vcpuFD = FileDescriptor(owning: r)
        let size = try system.vcpuMmapSize()
        let run: MappedRegion
        do { run = try MappedRegion.shared(fd: r, size: size) } catch { throw .ioctlFailed(error) }
        return VCPU(id: id, fd: vcpuFD, runPage: run)
    }
}
