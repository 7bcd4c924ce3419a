import Foundation
import GuestMemory
import KVM
@testable import MicroVM
import SystemShims
import Testing

/// A VM with the in-kernel irqchip and PIT (as the real machine has) and one vCPU.
struct SnapshotVM {
    let system: KVMSystem
    let vm: VirtualMachine
    let vcpu: VCPU
    let memory: GuestMemory
    static let size: UInt64 = 0x1_0000

    init(system: KVMSystem) throws {
        self.system = system
        vm = try system.createVM()
        try vm.createIRQChip()
        try vm.createPIT()
        try vm.setTSSAddress(0xFFFB_D000)
        memory = try GuestMemory(regions: [GuestRegion(start: GuestAddress(0), size: Self.size, hostOffset: 0)], totalSize: Int(Self.size))
        try vm.mapMemory(memory)
        vcpu = try vm.createVCPU(id: 0)
        try vcpu.setCPUID(CPUIDPolicy.entries(from: system.supportedCPUID(), vcpuID: 0, vcpuCount: 1))
    }

    /// Runs until the guest writes to `port`; returns the bytes it wrote to the data
    /// port 0x510 on the way (at most `limit` exits).
    func run(until port: UInt16, limit: Int = 10_000, values: inout [UInt8]) throws -> UInt8? {
        for _ in 0..<limit {
            switch try vcpu.run() {
            case .ioOut(let p, _, let data):
                if p == 0x510 { values.append(data[0]) }
                if p == port { return data[0] }
            case .interrupted: continue
            case let other:
                let r = try vcpu.registers(), sr = try vcpu.specialRegisters()
                Issue.record("unexpected exit \(other) at rip 0x\(String(r.rip, radix: 16)) rbx \(r.rbx) cr0 0x\(String(sr.cr0, radix: 16)) cr4 0x\(String(sr.cr4, radix: 16)) efer 0x\(String(sr.efer, radix: 16))")
                return nil
            }
        }
        return nil
    }
}

@Suite("vCPU and VM state: save, restore into a fresh VM, continue")
struct StateSnapshotTests {
    /// Long mode: rbx counts 1...20, each value stored at [0x5000] and written to port
    /// 0x510; at 20 the value goes to port 0x511 too.
    static let program: [UInt8] = [
        0x66, 0xBA, 0x10, 0x05,                                     // mov dx, 0x510
        // loop:
        0x48, 0xFF, 0xC3,                                           // inc rbx
        0x48, 0x89, 0x1C, 0x25, 0x00, 0x50, 0x00, 0x00,             // mov [0x5000], rbx
        0x88, 0xD8,                                                 // mov al, bl
        0xEE,                                                       // out dx, al
        0x48, 0x83, 0xFB, 0x14,                                     // cmp rbx, 20
        0x75, 0xEC,                                                 // jne loop
        0x66, 0xBA, 0x11, 0x05,                                     // mov dx, 0x511
        0xEE,                                                       // out dx, al
        0xEB, 0xFE,                                                 // jmp $
    ]

    func start(_ vm: SnapshotVM) throws {
        try CPUSetup.writeDescriptorTables(vm.memory)
        try CPUSetup.writeIdentityPageTables(vm.memory)
        try vm.memory.writeBytes(Self.program, at: GuestAddress(0x2000))
        let (regs, sregs) = CPUSetup.longModeState(base: try vm.vcpu.specialRegisters(), entry: 0x2000)
        try vm.vcpu.setSpecialRegisters(sregs)
        try vm.vcpu.setRegisters(regs)
    }

    @Test("a guest stopped mid-loop continues in a fresh VM from the saved state: registers, FPU/XSAVE, MSRs, memory, irqchip, PIT")
    func restoreContinues() throws {
        let system = try KVMSystem()
        let msrList = try system.msrIndexList()
        #expect(!msrList.isEmpty)
        let a = try SnapshotVM(system: system)
        try start(a)
        var before: [UInt8] = []
        // Stop after the guest wrote 10 (the 10th exit on the data port).
        for _ in 0..<10 { _ = try a.run(until: 0x510, values: &before) }
        #expect(before == Array(1...10))
        let vcpuState = try a.vcpu.saveState(msrIndices: msrList, xsaveSize: system.xsaveSize)
        let vmState = try a.vm.saveState()
        let ram = try a.memory.readBytes(at: GuestAddress(0), count: Int(SnapshotVM.size))
        #expect(vcpuState.msrs.count >= msrList.count / 2, "only \(vcpuState.msrs.count) of \(msrList.count) MSRs readable")
        // The PVM host's VIF registration MSR is carried exactly when the host has it.
        let hasVIF = vcpuState.msrs.contains { $0.index == 0x4b56_4d10 }
        #expect(hasVIF == (HostKind.detect() == .pvm), "MSR 0x4b564d10 carried: \(hasVIF) on \(HostKind.detect())")

        // The state round-trips as plain values (what a snapshot file stores).
        let decoded = try JSONDecoder().decode(VCPUState.self, from: JSONEncoder().encode(vcpuState))
        #expect(decoded == vcpuState)

        let b = try SnapshotVM(system: system)
        try b.memory.writeBytes(ram, at: GuestAddress(0))
        try b.vcpu.restoreState(decoded, xsaveSize: system.xsaveSize)
        try b.vm.restoreState(vmState)
        #expect(try b.vcpu.registers().rbx == 10)
        // What KVM now holds reads back as what was saved.
        let reread = try b.vcpu.saveState(msrIndices: msrList, xsaveSize: system.xsaveSize)
        #expect(reread.regs == vcpuState.regs && reread.sregs == vcpuState.sregs)
        #expect(reread.xsave == vcpuState.xsave && reread.xcrs == vcpuState.xcrs && reread.debugRegs == vcpuState.debugRegs)
        #expect(reread.mpState == vcpuState.mpState)
        #expect(reread.msrs.map(\.index) == vcpuState.msrs.map(\.index))
        let chips = try b.vm.saveState().irqchips
        #expect(chips == vmState.irqchips)

        var after: [UInt8] = []
        let final = try b.run(until: 0x511, values: &after)
        #expect(after == Array(11...20), "the restored guest went on with \(after)")
        #expect(final == 20)
        #expect(try b.memory.readBytes(at: GuestAddress(0x5000), count: 1) == [20])
        // The original is untouched by the copy and finishes the same way.
        var rest: [UInt8] = []
        #expect(try a.run(until: 0x511, values: &rest) == 20)
        #expect(rest == Array(11...20))
    }

    @Test("a malformed state is refused before anything is written")
    func malformedStateIsRefused() throws {
        let system = try KVMSystem()
        let a = try SnapshotVM(system: system)
        try start(a)
        var good = try a.vcpu.saveState(msrIndices: try system.msrIndexList(), xsaveSize: system.xsaveSize)
        let regsBefore = try a.vcpu.registers()
        good.regs.removeLast()
        var refused = false
        do { try a.vcpu.restoreState(good, xsaveSize: system.xsaveSize) } catch {
            refused = "\(error)".contains("regs is \(MemoryLayout<Registers>.size - 1) bytes")
            #expect(refused, "\(error)")
        }
        #expect(refused)
        #expect(try a.vcpu.registers().rip == regsBefore.rip)
        var vmState = try a.vm.saveState()
        vmState.irqchips.removeLast()
        #expect(throws: KVMError.invalidState("the VM state has 2 interrupt controllers, not 3")) { try a.vm.restoreState(vmState) }
    }
}

@Suite("saved state encoding")
struct StateEncodingTests {
    @Test("base64 round-trips every length and refuses what is not base64")
    func base64() {
        var g = SystemRandomNumberGenerator()
        for n in 0 ..< 70 {
            let bytes = (0 ..< n).map { _ in UInt8.random(in: 0 ... 255, using: &g) }
            let text = Base64.encode(bytes)
            #expect(text == Data(bytes).base64EncodedString(), "length \(n)")
            #expect(Base64.decode(text) == bytes, "length \(n)")
        }
        for bad in ["A", "AB=C", "AAA*", "A===", "AA==AA==", "é"] { #expect(Base64.decode(bad) == nil, "\(bad)") }
    }

    @Test("a vCPU state encodes its structures as base64 and decodes to the same value")
    func vcpuStateRoundTrip() throws {
        let s = VCPUState(regs: Array(0 ..< 144), sregs: [UInt8](repeating: 7, count: 312), xsave: (0 ..< 4096).map { UInt8(truncatingIfNeeded: $0) },
                          xcrs: [1, 2, 3], msrs: [MSRValue(index: 0x10, value: 0x1122_3344_5566_7788), MSRValue(index: 0x4b56_4d10, value: 1)],
                          mpState: 0, lapic: [UInt8](repeating: 9, count: 1024), events: [4], debugRegs: [5])
        let data = try JSONEncoder().encode(s)
        let text = String(decoding: data, as: UTF8.self)
        #expect(text.contains("\"xsave\":\"AAECAwQF"), "\(text.prefix(200))")
        #expect(try JSONDecoder().decode(VCPUState.self, from: data) == s)
        let vm = VMState(irqchips: [[1], [2, 3], [4, 5, 6]], pit: [7], clock: [8, 9])
        #expect(try JSONDecoder().decode(VMState.self, from: JSONEncoder().encode(vm)) == vm)
        // A damaged field is a decoding error, not a wrong value.
        let broken = text.replacingOccurrences(of: "\"xcrs\":\"AQID\"", with: "\"xcrs\":\"A*ID\"")
        #expect(broken != text)
        #expect(throws: DecodingError.self) { try JSONDecoder().decode(VCPUState.self, from: Data(broken.utf8)) }
    }
}
