import SystemShims
#if canImport(Glibc)
import Glibc
#endif

public typealias Registers = kvm_regs
public typealias SpecialRegisters = kvm_sregs
public typealias Segment = kvm_segment
public typealias CPUIDEntry = kvm_cpuid_entry2

/// Why KVM_RUN returned, decoded from the shared run page.
///
/// The data buffers of I/O and MMIO exits point into the run page and are only valid
/// until the next `run()`; the handler fills them (reads) or consumes them (writes).
public enum VCPUExit {
    case ioIn(port: UInt16, size: Int, data: UnsafeMutableRawBufferPointer)
    case ioOut(port: UInt16, size: Int, data: UnsafeRawBufferPointer)
    case mmioRead(address: UInt64, data: UnsafeMutableRawBufferPointer)
    case mmioWrite(address: UInt64, data: UnsafeRawBufferPointer)
    /// HLT with the in-kernel irqchip off (with it on, KVM handles HLT itself).
    case halt
    /// Triple fault or similar: the guest reset or powered off (KVM_EXIT_SHUTDOWN).
    case shutdown
    /// KVM_EXIT_SYSTEM_EVENT (shutdown = 1, reset = 2, crash = 3).
    case systemEvent(type: UInt32)
    /// KVM_EXIT_FAIL_ENTRY with the hardware reason.
    case failEntry(reason: UInt64)
    /// KVM_EXIT_INTERNAL_ERROR with its sub-error (1 = emulation failure).
    case internalError(suberror: UInt32)
    /// KVM_RUN was interrupted by a signal (or immediate_exit was set).
    case interrupted
    /// Any other exit reason.
    case unknown(reason: UInt32)
}

/// A virtual CPU (corresponds to rust-vmm's `VcpuFd`). Not thread-safe: one thread runs it.
public final class VCPU: @unchecked Sendable {
    // @unchecked: a VCPU is created on one thread and then owned by its run thread;
    // only `requestExit()` is called from other threads, and it touches a single
    // byte of the run page with an atomic store.
    public let id: Int
    public let fd: FileDescriptor
    private let runPage: MappedRegion

    init(id: Int, fd: FileDescriptor, runPage: MappedRegion) {
        self.id = id
        self.fd = fd
        self.runPage = runPage
    }

    private var runStruct: UnsafeMutablePointer<kvm_run> {
        // SAFETY: the run page is a live MAP_SHARED mapping of at least
        // sizeof(kvm_run) bytes (KVM_GET_VCPU_MMAP_SIZE), owned by self.
        runPage.pointer.assumingMemoryBound(to: kvm_run.self)
    }

    private func get<T>(_ name: String, _ request: UInt, _ value: inout T) throws(KVMError) {
        let r = withUnsafeMutablePointer(to: &value) { ckvm_ioctl_ptr(fd.rawValue, request, $0) }
        if r < 0 { throw .ioctlFailed(SystemError(name, errno: -r)) }
    }

    public func registers() throws(KVMError) -> Registers {
        var r = Registers(); try get("KVM_GET_REGS", CKVM_GET_REGS, &r); return r
    }
    public func setRegisters(_ regs: Registers) throws(KVMError) {
        var r = regs; try get("KVM_SET_REGS", CKVM_SET_REGS, &r)
    }
    public func specialRegisters() throws(KVMError) -> SpecialRegisters {
        var r = SpecialRegisters(); try get("KVM_GET_SREGS", CKVM_GET_SREGS, &r); return r
    }
    public func setSpecialRegisters(_ sregs: SpecialRegisters) throws(KVMError) {
        var r = sregs; try get("KVM_SET_SREGS", CKVM_SET_SREGS, &r)
    }
    /// KVM_SET_FPU with the reset defaults (FCW 0x37f, MXCSR 0x1f80).
    public func resetFPU() throws(KVMError) {
        var f = kvm_fpu()
        f.fcw = 0x37f
        f.mxcsr = 0x1f80
        try get("KVM_SET_FPU", CKVM_SET_FPU, &f)
    }

    /// KVM_SET_CPUID2.
    public func setCPUID(_ entries: [CPUIDEntry]) throws(KVMError) {
        let r = entries.withUnsafeBufferPointer { ckvm_set_cpuid2(fd.rawValue, $0.baseAddress, Int32($0.count)) }
        if r < 0 { throw .ioctlFailed(SystemError("KVM_SET_CPUID2", errno: -r)) }
    }

    /// KVM_SET_MSRS; returns how many of `msrs` KVM accepted (it stops at the first refusal).
    @discardableResult
    public func setMSRs(_ msrs: [(index: UInt32, value: UInt64)]) throws(KVMError) -> Int {
        let entries = msrs.map { kvm_msr_entry(index: $0.index, reserved: 0, data: $0.value) }
        let r = entries.withUnsafeBufferPointer { ckvm_set_msrs(fd.rawValue, $0.baseAddress, Int32($0.count)) }
        if r < 0 { throw .ioctlFailed(SystemError("KVM_SET_MSRS", errno: -r)) }
        return Int(r)
    }

    /// KVM_GET_MSRS for `indices`; returns the values KVM read (prefix of `indices`).
    public func msrs(_ indices: [UInt32]) throws(KVMError) -> [UInt64] {
        var entries = indices.map { kvm_msr_entry(index: $0, reserved: 0, data: 0) }
        let r = entries.withUnsafeMutableBufferPointer { ckvm_get_msrs(fd.rawValue, $0.baseAddress, Int32($0.count)) }
        if r < 0 { throw .ioctlFailed(SystemError("KVM_GET_MSRS", errno: -r)) }
        return entries.prefix(Int(r)).map(\.data)
    }

    /// Asks a running (or about to run) KVM_RUN to return with `.interrupted`.
    /// Pair with a signal to the run thread to kick it out of the guest.
    public func requestExit() { ckvm_run_set_immediate_exit(runStruct, 1) }

    /// Clears a pending exit request.
    public func clearExitRequest() { ckvm_run_set_immediate_exit(runStruct, 0) }

    /// KVM_RUN until the next exit, decoded.
    public func run() throws(KVMError) -> VCPUExit {
        let r = ckvm_ioctl_ptr(fd.rawValue, CKVM_RUN, nil)
        if r < 0 {
            if -r == EINTR || -r == EAGAIN { return .interrupted }
            throw .ioctlFailed(SystemError("KVM_RUN(vcpu \(id))", errno: -r))
        }
        return decodeExit()
    }

    private func decodeExit() -> VCPUExit {
        let run = self.runStruct
        let base = runPage.pointer
        let reason = ckvm_run_exit_reason(run)
        switch Int32(reason) {
        case KVM_EXIT_IO:
            let size = Int(ckvm_run_io_size(run))
            let count = Int(ckvm_run_io_count(run))
            let offset = Int(ckvm_run_io_data_offset(run))
            let length = size * count
            // SAFETY: KVM places the data inside the run mapping; we still check it
            // before handing out a buffer over it.
            guard offset >= 0, length >= 0, offset + length <= runPage.size else { return .unknown(reason: reason) }
            let port = ckvm_run_io_port(run)
            let data = UnsafeMutableRawBufferPointer(start: base + offset, count: length)
            return ckvm_run_io_direction(run) == UInt8(KVM_EXIT_IO_OUT)
                ? .ioOut(port: port, size: size, data: UnsafeRawBufferPointer(data))
                : .ioIn(port: port, size: size, data: data)
        case KVM_EXIT_MMIO:
            let len = min(Int(ckvm_run_mmio_len(run)), 8)
            // SAFETY: mmio.data is an 8-byte array inside the run page; len is capped at 8.
            let data = UnsafeMutableRawBufferPointer(start: ckvm_run_mmio_data(run), count: len)
            let address = ckvm_run_mmio_phys_addr(run)
            return ckvm_run_mmio_is_write(run) != 0
                ? .mmioWrite(address: address, data: UnsafeRawBufferPointer(data))
                : .mmioRead(address: address, data: data)
        case KVM_EXIT_HLT: return .halt
        case KVM_EXIT_SHUTDOWN: return .shutdown
        case KVM_EXIT_SYSTEM_EVENT: return .systemEvent(type: ckvm_run_system_event_type(run))
        case KVM_EXIT_FAIL_ENTRY: return .failEntry(reason: ckvm_run_fail_entry_reason(run))
        case KVM_EXIT_INTERNAL_ERROR: return .internalError(suberror: ckvm_run_internal_suberror(run))
        case KVM_EXIT_INTR: return .interrupted
        default: return .unknown(reason: reason)
        }
    }
}
