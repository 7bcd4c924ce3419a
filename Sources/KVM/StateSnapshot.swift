import SystemShims
#if canImport(Glibc)
import Glibc
#endif

/// One model-specific register and its value.
public struct MSRValue: Codable, Sendable, Equatable {
    public var index: UInt32
    public var value: UInt64
    public init(index: UInt32, value: UInt64) {
        self.index = index
        self.value = value
    }
}

/// Everything KVM holds for one vCPU, as plain values: each part is the kernel's own
/// structure for its ioctl (linux/kvm.h, x86-64), kept as its bytes, so that a restore
/// hands KVM exactly what it gave. The sizes are checked on restore: a state from a
/// build with other structure layouts is refused, never half-applied.
public struct VCPUState: Codable, Sendable, Equatable {
    /// struct kvm_regs (KVM_GET_REGS).
    public var regs: [UInt8]
    /// struct kvm_sregs (KVM_GET_SREGS).
    public var sregs: [UInt8]
    /// struct kvm_xsave (KVM_GET_XSAVE, or KVM_GET_XSAVE2 when the area is larger).
    public var xsave: [UInt8]
    /// struct kvm_xcrs (KVM_GET_XCRS).
    public var xcrs: [UInt8]
    /// The readable MSRs of KVM_GET_MSR_INDEX_LIST, then `VCPUState.extraMSRs` that the
    /// host has, in the order they are written back.
    public var msrs: [MSRValue]
    /// struct kvm_mp_state's value (KVM_GET_MP_STATE).
    public var mpState: UInt32
    /// struct kvm_lapic_state (KVM_GET_LAPIC).
    public var lapic: [UInt8]
    /// struct kvm_vcpu_events (KVM_GET_VCPU_EVENTS).
    public var events: [UInt8]
    /// struct kvm_debugregs (KVM_GET_DEBUGREGS).
    public var debugRegs: [UInt8]

    /// MSRs a snapshot must carry that KVM does not list: the PVM host's VIF
    /// registration (0x4b564d10; without it a restored PVM guest crashes at once). Read
    /// when the host has them, written back last (the host refuses an address outside
    /// every memory slot, so the slots must exist by then).
    public static let extraMSRs: [UInt32] = [0x4b56_4d10]

    public init(regs: [UInt8], sregs: [UInt8], xsave: [UInt8], xcrs: [UInt8], msrs: [MSRValue], mpState: UInt32,
                lapic: [UInt8], events: [UInt8], debugRegs: [UInt8]) {
        self.regs = regs
        self.sregs = sregs
        self.xsave = xsave
        self.xcrs = xcrs
        self.msrs = msrs
        self.mpState = mpState
        self.lapic = lapic
        self.events = events
        self.debugRegs = debugRegs
    }

    // Encoded with every structure as base64 and the MSRs packed (index u32, value u64,
    // little-endian): a JSON array of 4096 numbers for the XSAVE area took a restore
    // milliseconds to parse.
    private enum CodingKeys: String, CodingKey { case regs, sregs, xsave, xcrs, msrs, mpState, lapic, events, debugRegs }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        regs = try c.decodeBase64(.regs)
        sregs = try c.decodeBase64(.sregs)
        xsave = try c.decodeBase64(.xsave)
        xcrs = try c.decodeBase64(.xcrs)
        let packed = try c.decodeBase64(.msrs)
        guard packed.count % 12 == 0 else {
            throw DecodingError.dataCorruptedError(forKey: .msrs, in: c, debugDescription: "\(packed.count) bytes of MSRs is not a whole number of 12-byte entries")
        }
        msrs = stride(from: 0, to: packed.count, by: 12).map { i in
            var index: UInt32 = 0, value: UInt64 = 0
            for k in 0 ..< 4 { index |= UInt32(packed[i + k]) << (8 * UInt32(k)) }
            for k in 0 ..< 8 { value |= UInt64(packed[i + 4 + k]) << (8 * UInt64(k)) }
            return MSRValue(index: index, value: value)
        }
        mpState = try c.decode(UInt32.self, forKey: .mpState)
        lapic = try c.decodeBase64(.lapic)
        events = try c.decodeBase64(.events)
        debugRegs = try c.decodeBase64(.debugRegs)
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encodeBase64(regs, .regs)
        try c.encodeBase64(sregs, .sregs)
        try c.encodeBase64(xsave, .xsave)
        try c.encodeBase64(xcrs, .xcrs)
        var packed: [UInt8] = []
        packed.reserveCapacity(msrs.count * 12)
        for m in msrs {
            for k in 0 ..< 4 { packed.append(UInt8(truncatingIfNeeded: m.index >> (8 * UInt32(k)))) }
            for k in 0 ..< 8 { packed.append(UInt8(truncatingIfNeeded: m.value >> (8 * UInt64(k)))) }
        }
        try c.encodeBase64(packed, .msrs)
        try c.encode(mpState, forKey: .mpState)
        try c.encodeBase64(lapic, .lapic)
        try c.encodeBase64(events, .events)
        try c.encodeBase64(debugRegs, .debugRegs)
    }
}

extension KeyedDecodingContainer {
    /// Bytes saved by `encodeBase64`: a base64 string; anything else is a decoding error.
    func decodeBase64(_ key: Key) throws -> [UInt8] {
        let text = try decode(String.self, forKey: key)
        guard let bytes = Base64.decode(text) else {
            throw DecodingError.dataCorruptedError(forKey: key, in: self, debugDescription: "not base64")
        }
        return bytes
    }
}

extension KeyedEncodingContainer {
    mutating func encodeBase64(_ bytes: [UInt8], _ key: Key) throws {
        try encode(Base64.encode(bytes), forKey: key)
    }
}

/// What KVM holds for the VM as a whole: the in-kernel interrupt controllers, the PIT
/// and the kvm-clock.
public struct VMState: Codable, Sendable, Equatable {
    /// struct kvm_irqchip for chip 0 (PIC master), 1 (PIC slave), 2 (IOAPIC).
    public var irqchips: [[UInt8]]
    /// struct kvm_pit_state2 (KVM_GET_PIT2).
    public var pit: [UInt8]
    /// struct kvm_clock_data (KVM_GET_CLOCK).
    public var clock: [UInt8]

    public init(irqchips: [[UInt8]], pit: [UInt8], clock: [UInt8]) {
        self.irqchips = irqchips
        self.pit = pit
        self.clock = clock
    }

    private enum CodingKeys: String, CodingKey { case irqchips, pit, clock }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let chips = try c.decode([String].self, forKey: .irqchips)
        irqchips = try chips.map { text in
            guard let b = Base64.decode(text) else {
                throw DecodingError.dataCorruptedError(forKey: .irqchips, in: c, debugDescription: "not base64")
            }
            return b
        }
        pit = try c.decodeBase64(.pit)
        clock = try c.decodeBase64(.clock)
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(irqchips.map(Base64.encode), forKey: .irqchips)
        try c.encodeBase64(pit, .pit)
        try c.encodeBase64(clock, .clock)
    }
}

/// Standard base64 (RFC 4648, with padding), without Foundation.
public enum Base64 {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
    private static let values: [UInt8] = {
        var v = [UInt8](repeating: 0xff, count: 256)
        for (i, c) in alphabet.enumerated() { v[Int(c)] = UInt8(i) }
        return v
    }()

    public static func encode(_ bytes: [UInt8]) -> String {
        var out = [UInt8]()
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var i = 0
        while i + 3 <= bytes.count {
            let n = UInt32(bytes[i]) << 16 | UInt32(bytes[i + 1]) << 8 | UInt32(bytes[i + 2])
            out += [alphabet[Int(n >> 18 & 63)], alphabet[Int(n >> 12 & 63)], alphabet[Int(n >> 6 & 63)], alphabet[Int(n & 63)]]
            i += 3
        }
        let rest = bytes.count - i
        if rest > 0 {
            let n = UInt32(bytes[i]) << 16 | (rest == 2 ? UInt32(bytes[i + 1]) << 8 : 0)
            out += [alphabet[Int(n >> 18 & 63)], alphabet[Int(n >> 12 & 63)]]
            out += rest == 2 ? [alphabet[Int(n >> 6 & 63)], UInt8(ascii: "=")] : [UInt8(ascii: "="), UInt8(ascii: "=")]
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// The bytes of `text`, or nil when it is not padded base64 of this alphabet.
    public static func decode(_ text: String) -> [UInt8]? {
        let chars = Array(text.utf8)
        guard chars.count % 4 == 0 else { return nil }
        var out = [UInt8]()
        out.reserveCapacity(chars.count / 4 * 3)
        var i = 0
        while i < chars.count {
            let last = i + 4 == chars.count
            let pad = last ? (chars[i + 3] == UInt8(ascii: "=") ? (chars[i + 2] == UInt8(ascii: "=") ? 2 : 1) : 0) : 0
            var n: UInt32 = 0
            for k in 0 ..< 4 {
                let c = chars[i + k]
                if k >= 4 - pad { n <<= 6; continue }
                let v = values[Int(c)]
                if v == 0xff { return nil }
                n = n << 6 | UInt32(v)
            }
            out.append(UInt8(n >> 16 & 0xff))
            if pad < 2 { out.append(UInt8(n >> 8 & 0xff)) }
            if pad < 1 { out.append(UInt8(n & 0xff)) }
            i += 4
        }
        return out
    }
}

/// The bytes of a C structure.
func structBytes<T>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value) { Array($0) }
}

/// A C structure from bytes saved by `structBytes`; the size must match exactly.
func structValue<T>(_ type: T.Type, _ bytes: [UInt8], _ what: String) throws(KVMError) -> T {
    guard bytes.count == MemoryLayout<T>.size else {
        throw .invalidState("\(what) is \(bytes.count) bytes, this build's structure is \(MemoryLayout<T>.size)")
    }
    // SAFETY: T is a plain C structure (no pointers or references) and `bytes` has
    // exactly its size; loadUnaligned copies it out.
    return bytes.withUnsafeBytes { $0.loadUnaligned(as: T.self) }
}

extension KVMSystem {
    /// KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a guest.
    public func msrIndexList() throws(KVMError) -> [UInt32] {
        var capacity = 256
        while true {
            var indices = [UInt32](repeating: 0, count: capacity)
            let r = indices.withUnsafeMutableBufferPointer { ckvm_get_msr_index_list(fd.rawValue, $0.baseAddress, Int32(capacity)) }
            if r == -E2BIG && capacity < 65536 { capacity *= 4; continue }
            if r < 0 { throw .ioctlFailed(SystemError("KVM_GET_MSR_INDEX_LIST", errno: -r)) }
            return Array(indices.prefix(Int(r)))
        }
    }

    /// The size of a vCPU's XSAVE area: KVM_CAP_XSAVE2's value, at least 4096.
    public var xsaveSize: Int {
        max(4096, Int(ckvm_ioctl_val(fd.rawValue, CKVM_CHECK_EXTENSION, UInt(CKVM_CAP_XSAVE2))))
    }
}

extension VCPU {
    private func io<T>(_ name: String, _ request: UInt, _ value: inout T) throws(KVMError) {
        let r = withUnsafeMutablePointer(to: &value) { ckvm_ioctl_ptr(fd.rawValue, request, $0) }
        if r < 0 { throw .ioctlFailed(SystemError("\(name)(vcpu \(id))", errno: -r)) }
    }

    /// Reads every MSR of `indices` that this vCPU can read (KVM_GET_MSRS stops at the
    /// first one it refuses; that one is skipped and the rest read on).
    func readableMSRs(_ indices: [UInt32]) throws(KVMError) -> [MSRValue] {
        var out: [MSRValue] = []
        var rest = indices[...]
        while !rest.isEmpty {
            let values = try msrs(Array(rest))
            for (i, v) in zip(rest, values) { out.append(MSRValue(index: i, value: v)) }
            rest = rest.dropFirst(values.count + 1)  // skip the refused one
        }
        return out
    }

    /// Finishes what the last exit left pending inside KVM: after an I/O or MMIO exit
    /// the instruction completes (and, on AMD, RIP moves past it) only on the next
    /// KVM_RUN. A KVM_RUN with immediate_exit set does exactly that and returns at once
    /// (KVM API, "immediate_exit"), so the state read afterwards is consistent.
    public func completePendingOperations() throws(KVMError) {
        requestExit()
        defer { clearExitRequest() }
        switch try run() {
        case .interrupted: return
        case let other: throw .invalidState("the vCPU did not stop for the state save (exit \(other))")
        }
    }

    /// The vCPU's whole state. Call with the vCPU stopped (not in KVM_RUN), from the
    /// thread that runs it; finishes a pending I/O or MMIO exit first
    /// (`completePendingOperations`).
    /// - Parameters:
    ///   - msrIndices: `KVMSystem.msrIndexList()`.
    ///   - xsaveSize: `KVMSystem.xsaveSize`.
    public func saveState(msrIndices: [UInt32], xsaveSize: Int) throws(KVMError) -> VCPUState {
        try completePendingOperations()
        var regs = kvm_regs(); try io("KVM_GET_REGS", CKVM_GET_REGS, &regs)
        var sregs = kvm_sregs(); try io("KVM_GET_SREGS", CKVM_GET_SREGS, &sregs)
        var xsave = [UInt8](repeating: 0, count: max(xsaveSize, MemoryLayout<kvm_xsave>.size))
        let request = xsave.count > MemoryLayout<kvm_xsave>.size ? CKVM_GET_XSAVE2 : CKVM_GET_XSAVE
        let xr = xsave.withUnsafeMutableBytes { ckvm_ioctl_ptr(fd.rawValue, request, $0.baseAddress) }
        if xr < 0 { throw .ioctlFailed(SystemError("KVM_GET_XSAVE(vcpu \(id))", errno: -xr)) }
        var xcrs = kvm_xcrs(); try io("KVM_GET_XCRS", CKVM_GET_XCRS, &xcrs)
        var listed = try readableMSRs(msrIndices)
        // The extra MSRs are read one at a time: a host without them refuses the read.
        for index in VCPUState.extraMSRs where !msrIndices.contains(index) {
            if let v = try msrs([index]).first { listed.append(MSRValue(index: index, value: v)) }
        }
        var mp = kvm_mp_state(); try io("KVM_GET_MP_STATE", CKVM_GET_MP_STATE, &mp)
        var lapic = kvm_lapic_state(); try io("KVM_GET_LAPIC", CKVM_GET_LAPIC, &lapic)
        var events = kvm_vcpu_events(); try io("KVM_GET_VCPU_EVENTS", CKVM_GET_VCPU_EVENTS, &events)
        var debug = kvm_debugregs(); try io("KVM_GET_DEBUGREGS", CKVM_GET_DEBUGREGS, &debug)
        return VCPUState(regs: structBytes(regs), sregs: structBytes(sregs), xsave: xsave, xcrs: structBytes(xcrs),
                         msrs: listed, mpState: mp.mp_state, lapic: structBytes(lapic), events: structBytes(events),
                         debugRegs: structBytes(debug))
    }

    /// Writes `state` back (QEMU's order: registers, XSAVE, XCRs, special registers,
    /// MSRs with the extra ones last, MP state, local APIC, events, debug registers).
    /// Set the CPUID first, and create the VM's memory slots before calling this.
    /// - Throws: `KVMError.invalidState` for a malformed state (nothing is written),
    ///   `.ioctlFailed` naming what KVM refused, such as an MSR.
    /// MSR_IA32_TSC_DEADLINE.
    static let tscDeadlineMSR: UInt32 = 0x6e0

    public func restoreState(_ s: VCPUState, xsaveSize: Int) throws(KVMError) {
        // Decode everything before touching the vCPU.
        var regs = try structValue(kvm_regs.self, s.regs, "regs")
        var sregs = try structValue(kvm_sregs.self, s.sregs, "sregs")
        // A pending interrupt comes back through the vCPU events; the bitmap in the
        // special registers would queue it a second time (QEMU clears it too).
        sregs.interrupt_bitmap = (0, 0, 0, 0)
        Self.pvmSupervisorSegments(&sregs, rip: regs.rip, msrs: s.msrs)
        var xcrs = try structValue(kvm_xcrs.self, s.xcrs, "xcrs")
        var lapic = try structValue(kvm_lapic_state.self, s.lapic, "lapic")
        var events = try structValue(kvm_vcpu_events.self, s.events, "vcpu events")
        var debug = try structValue(kvm_debugregs.self, s.debugRegs, "debug registers")
        guard s.xsave.count == max(xsaveSize, MemoryLayout<kvm_xsave>.size) else {
            throw .invalidState("the XSAVE area is \(s.xsave.count) bytes, this host's is \(max(xsaveSize, MemoryLayout<kvm_xsave>.size))")
        }
        try io("KVM_SET_REGS", CKVM_SET_REGS, &regs)
        var xsave = s.xsave
        let xr = xsave.withUnsafeMutableBytes { ckvm_ioctl_ptr(fd.rawValue, CKVM_SET_XSAVE, $0.baseAddress) }
        if xr < 0 { throw .ioctlFailed(SystemError("KVM_SET_XSAVE(vcpu \(id))", errno: -xr)) }
        try io("KVM_SET_XCRS", CKVM_SET_XCRS, &xcrs)
        try io("KVM_SET_SREGS", CKVM_SET_SREGS, &sregs)
        let extra = Set(VCPUState.extraMSRs)
        let ordered = s.msrs.filter { !extra.contains($0.index) } + s.msrs.filter { extra.contains($0.index) }
        let accepted = try setMSRs(ordered.map { ($0.index, $0.value) })
        if accepted < ordered.count {
            let refused = ordered[accepted]
            throw .ioctlFailed(SystemError("KVM_SET_MSRS(vcpu \(id)): MSR 0x\(String(refused.index, radix: 16)) = 0x\(String(refused.value, radix: 16)) refused", errno: EINVAL))
        }
        var mp = kvm_mp_state(mp_state: s.mpState)
        try io("KVM_SET_MP_STATE", CKVM_SET_MP_STATE, &mp)
        try io("KVM_SET_LAPIC", CKVM_SET_LAPIC, &lapic)
        // Setting the LAPIC state disarms the timer, TSC-deadline mode included: write the
        // deadline again after it (as QEMU does), or a guest whose next timer event was
        // armed at the snapshot never gets it, and its sleeps never end.
        if let deadline = s.msrs.first(where: { $0.index == Self.tscDeadlineMSR }) {
            guard try setMSRs([(deadline.index, deadline.value)]) == 1 else {
                throw .ioctlFailed(SystemError("KVM_SET_MSRS(vcpu \(id)): the TSC deadline 0x\(String(deadline.value, radix: 16)) was refused", errno: EINVAL))
            }
        }
        try io("KVM_SET_VCPU_EVENTS", CKVM_SET_VCPU_EVENTS, &events)
        try io("KVM_SET_DEBUGREGS", CKVM_SET_DEBUGREGS, &debug)
    }
}

extension VCPU {
    /// Tells the guest that it was stopped (KVM_KVMCLOCK_CTRL: PVCLOCK_GUEST_STOPPED in its
    /// kvm-clock page), so that its RCU stall and soft-lockup detectors take the time a
    /// restore skips for a pause, not a hang. Without it, a guest whose clock reads the
    /// host's TSC (as on PVM hosts, where the snapshot's age shows up as elapsed time)
    /// prints an RCU stall report with stack dumps on its serial console after every
    /// restore of a snapshot older than the stall timeout (21 s): 60-80 ms of console
    /// output, byte by byte, before the agent answers. Returns false when the guest has
    /// not registered a kvm-clock (EINVAL: there is nowhere to tell it).
    @discardableResult
    public func tellGuestItWasPaused() throws(KVMError) -> Bool {
        let r = ckvm_ioctl_ptr(fd.rawValue, CKVM_KVMCLOCK_CTRL, nil)
        if r == -EINVAL { return false }
        if r < 0 { throw .ioctlFailed(SystemError("KVM_KVMCLOCK_CTRL(vcpu \(id))", errno: -r)) }
        return true
    }

    /// The one PVM-specific step of a restore. A PVM host keeps whether its guest is in
    /// supervisor or user mode to itself, and KVM_GET_SREGS reports the hardware CS/SS,
    /// which are CPL-3 selectors (0x33/0x2b) in both modes. A fresh vCPU starts in
    /// supervisor mode and takes a CS with DPL 3 in its first KVM_SET_SREGS as a switch to
    /// user mode, so a guest saved in its kernel would come back in user mode and die on
    /// its first event (measured: a recursive page fault in the kernel entry code). So,
    /// for a PVM guest (its state carries the VIF registration, MSR 0x4b564d10) stopped at
    /// a kernel address, CS and SS become the kernel's selectors from MSR_STAR, DPL 0.
    static func pvmSupervisorSegments(_ sregs: inout kvm_sregs, rip: UInt64, msrs: [MSRValue]) {
        guard msrs.contains(where: { $0.index == VCPUState.extraMSRs[0] && $0.value != 0 }),
              rip >= 0xffff_8000_0000_0000,
              let star = msrs.first(where: { $0.index == 0xc000_0081 })?.value else { return }
        let kernelCS = UInt16(truncatingIfNeeded: star >> 32) & ~3
        sregs.cs.selector = kernelCS
        sregs.cs.dpl = 0
        sregs.ss.selector = kernelCS + 8
        sregs.ss.dpl = 0
    }
}

extension VirtualMachine {
    private func io<T>(_ name: String, _ request: UInt, _ value: inout T) throws(KVMError) {
        let r = withUnsafeMutablePointer(to: &value) { ckvm_ioctl_ptr(fd.rawValue, request, $0) }
        if r < 0 { throw .ioctlFailed(SystemError(name, errno: -r)) }
    }

    /// The VM-wide state (irqchip, PIT, clock). Call with every vCPU stopped.
    public func saveState() throws(KVMError) -> VMState {
        var chips: [[UInt8]] = []
        for chip in UInt32(0)...2 {
            var c = kvm_irqchip()
            c.chip_id = chip
            try io("KVM_GET_IRQCHIP(\(chip))", CKVM_GET_IRQCHIP, &c)
            chips.append(structBytes(c))
        }
        var pit = kvm_pit_state2(); try io("KVM_GET_PIT2", CKVM_GET_PIT2, &pit)
        var clock = kvm_clock_data(); try io("KVM_GET_CLOCK", CKVM_GET_CLOCK, &clock)
        return VMState(irqchips: chips, pit: structBytes(pit), clock: structBytes(clock))
    }

    /// Writes `state` back into a VM made with the same irqchip and PIT. The clock is set
    /// to the saved value (flags 0): the guest's kvm-clock continues from the snapshot.
    public func restoreState(_ s: VMState) throws(KVMError) {
        guard s.irqchips.count == 3 else { throw .invalidState("the VM state has \(s.irqchips.count) interrupt controllers, not 3") }
        var chips: [kvm_irqchip] = []
        for (i, bytes) in s.irqchips.enumerated() {
            let c = try structValue(kvm_irqchip.self, bytes, "irqchip \(i)")
            guard c.chip_id == UInt32(i) else { throw .invalidState("irqchip \(i) says it is chip \(c.chip_id)") }
            chips.append(c)
        }
        var pit = try structValue(kvm_pit_state2.self, s.pit, "PIT state")
        let saved = try structValue(kvm_clock_data.self, s.clock, "clock")
        for i in chips.indices { try io("KVM_SET_IRQCHIP(\(i))", CKVM_SET_IRQCHIP, &chips[i]) }
        try io("KVM_SET_PIT2", CKVM_SET_PIT2, &pit)
        var clock = kvm_clock_data()
        clock.clock = saved.clock
        try io("KVM_SET_CLOCK", CKVM_SET_CLOCK, &clock)
    }
}
