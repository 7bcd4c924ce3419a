import Bus
import GuestMemory
import KVM
@testable import MicroVM
import SystemShims
import Testing
import VirtIO

/// An MMIO device for tests: records writes, answers reads with a fixed byte.
final class RecordingMMIO: MMIODevice, @unchecked Sendable {
    let lock = Lock()
    var writes: [(UInt64, [UInt8])] = []
    var reads: [UInt64] = []
    let answer: UInt8
    init(answer: UInt8) { self.answer = answer }
    func mmioRead(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        lock.withLock { reads.append(offset) }
        for i in 0..<data.count { data[i] = answer }
    }
    func mmioWrite(offset: UInt64, data: UnsafeRawBufferPointer) {
        lock.withLock { writes.append((offset, Array(data))) }
    }
}

/// A bare VM without irqchip (so HLT exits to us) running one vCPU over `memory`.
struct TinyVM {
    let system: KVMSystem
    let vm: VirtualMachine
    let vcpu: VCPU
    let memory: GuestMemory
    let console = ConsoleLog(capacity: 4096)
    let mmio = RecordingMMIO(answer: 0x77)
    var bus = DeviceBus()

    init(memorySize: UInt64 = 0x1_0000) throws {
        system = try KVMSystem()
        vm = try system.createVM()
        memory = try GuestMemory(regions: [GuestRegion(start: GuestAddress(0), size: memorySize, hostOffset: 0)], totalSize: Int(memorySize))
        try vm.setTSSAddress(0xFFFB_D000)
        try vm.mapMemory(memory)
        vcpu = try vm.createVCPU(id: 0)
        try vcpu.setCPUID(CPUIDPolicy.entries(from: system.supportedCPUID(), vcpuID: 0, vcpuCount: 1))
        try bus.addPorts(base: Layout.serialCOM1, count: 8, Serial(output: console, interrupt: nil))
        try bus.addMMIO(base: 0xD000_0000, size: 0x1000, mmio)
        try bus.addMMIO(base: 0x20000, size: 0x1000, mmio)
    }

    /// Runs until the handler says stop (at most `maxExits` exits).
    func run(maxExits: Int = 10_000) throws -> StopReason? {
        for _ in 0..<maxExits {
            if case .stop(let r) = ExitHandler.handle(try vcpu.run(), bus: bus) { return r }
        }
        return nil
    }
}

@Suite("Hand-assembled guests on /dev/kvm")
struct HandAssembledGuestTests {
    @Test("real mode: serial output, MMIO write and read, HLT")
    func realMode() throws {
        let vm = try TinyVM()
        let code: [UInt8] = [
            0xBA, 0xF8, 0x03,             // mov dx, 0x3f8
            0xB0, 0x48, 0xEE,             // mov al, 'H'; out dx, al
            0xB0, 0x69, 0xEE,             // mov al, 'i'; out dx, al
            0xB8, 0x00, 0x20,             // mov ax, 0x2000
            0x8E, 0xD8,                   // mov ds, ax
            0xC6, 0x06, 0x10, 0x00, 0x42, // mov byte [0x10], 0x42   -> MMIO write 0x20010
            0xA0, 0x01, 0x00,             // mov al, [0x1]           -> MMIO read 0x20001
            0xEE,                         // out dx, al (0x77)
            0xF4,                         // hlt
        ]
        try vm.memory.writeBytes(code, at: GuestAddress(0x1000))
        let (regs, sregs) = CPUSetup.realModeState(base: try vm.vcpu.specialRegisters(), entry: 0x1000)
        try vm.vcpu.setSpecialRegisters(sregs)
        try vm.vcpu.setRegisters(regs)
        _ = vm.bus
        let reason = try vm.run()
        #expect(reason == .halted)
        #expect(vm.console.bytes == [0x48, 0x69, 0x77])
        #expect(vm.mmio.writes.count == 1)
        #expect(vm.mmio.writes.first?.0 == 0x10)
        #expect(vm.mmio.writes.first?.1 == [0x42])
        #expect(vm.mmio.reads == [0x1])
    }

    @Test("long mode: identity paging, serial output, MMIO above 3 GiB, HLT")
    func longMode() throws {
        let vm = try TinyVM()
        try CPUSetup.writeDescriptorTables(vm.memory)
        try CPUSetup.writeIdentityPageTables(vm.memory)
        let code: [UInt8] = [
            0x66, 0xBA, 0xF8, 0x03,                               // mov dx, 0x3f8
            0xB0, 0x4C, 0xEE,                                     // mov al, 'L'; out dx, al
            0x48, 0xB8, 0x00, 0x00, 0x00, 0xD0, 0, 0, 0, 0,       // mov rax, 0xd0000000
            0xC6, 0x40, 0x08, 0x5A,                               // mov byte [rax+8], 0x5a
            0x8A, 0x58, 0x04,                                     // mov bl, [rax+4]
            0x88, 0xD8,                                           // mov al, bl
            0xEE,                                                 // out dx, al
            0x48, 0xC7, 0xC1, 0x34, 0x12, 0x00, 0x00,             // mov rcx, 0x1234
            0xF4,                                                 // hlt
        ]
        try vm.memory.writeBytes(code, at: GuestAddress(0x2000))
        let (regs, sregs) = CPUSetup.longModeState(base: try vm.vcpu.specialRegisters(), entry: 0x2000)
        try vm.vcpu.setSpecialRegisters(sregs)
        try vm.vcpu.setRegisters(regs)
        let reason = try vm.run()
        #expect(reason == .halted)
        #expect(vm.console.bytes == [0x4C, 0x77])
        #expect(vm.mmio.writes.map(\.0) == [0x8])
        #expect(vm.mmio.writes.first?.1 == [0x5A])
        #expect(vm.mmio.reads == [0x4])
        let after = try vm.vcpu.registers()
        #expect(after.rcx == 0x1234)
        let s = try vm.vcpu.specialRegisters()
        #expect(s.efer & 0x400 != 0, "long mode active")
    }

    @Test("32-bit protected mode (the PVH entry state): string I/O to the serial port")
    func protectedMode() throws {
        let vm = try TinyVM()
        try CPUSetup.writeDescriptorTables(vm.memory)
        let message = Array("PVH ok\n".utf8)
        try vm.memory.writeBytes(message, at: GuestAddress(0x3000))
        let code: [UInt8] = [
            0x66, 0xBA, 0xF8, 0x03,                   // mov dx, 0x3f8
            0xBE, 0x00, 0x30, 0x00, 0x00,             // mov esi, 0x3000
            0xB9, UInt8(message.count), 0, 0, 0,      // mov ecx, len
            0xFC,                                     // cld
            0xF3, 0x6E,                               // rep outsb
            0x89, 0xD8,                               // mov eax, ebx (start_info pointer)
            0xF4,                                     // hlt
        ]
        try vm.memory.writeBytes(code, at: GuestAddress(0x2000))
        let (regs, sregs) = CPUSetup.pvhState(base: try vm.vcpu.specialRegisters(), entry: 0x2000, startInfo: GuestAddress(0x6000))
        try vm.vcpu.setSpecialRegisters(sregs)
        try vm.vcpu.setRegisters(regs)
        #expect(try vm.run() == .halted)
        #expect(vm.console.bytes == message)
        #expect(try vm.vcpu.registers().rax == 0x6000)
    }

    @Test("KVM capabilities and host kind")
    func capabilities() throws {
        let kvm = try KVMSystem()
        for cap in KVMCapability.required { #expect(kvm.check(cap) > 0, "\(cap)") }
        #expect(try kvm.vcpuMmapSize() >= 4096)
        #expect(!(try kvm.supportedCPUID()).isEmpty)
        #expect(HostKind.detect() != .none)
    }

    @Test("a missing /dev/kvm gives a specific error")
    func missingDevice() {
        #expect(throws: KVMError.deviceMissing(path: "/nonexistent/kvm")) { try KVMSystem(path: "/nonexistent/kvm") }
        #expect(HostKind.detect(devicePath: "/nonexistent/kvm") == .none)
    }

    @Test("a Machine with a wall-clock limit stops a guest that spins forever")
    func timeoutStopsSpinningGuest() throws {
        // A tiny "kernel": an ELF whose PVH entry is `jmp $`.
        let elf = TinyELF.make(code: [0xEB, 0xFE], loadAddress: 0x100000)
        let path = "/tmp/sandbox-kvmtest-\(getpid()).elf"
        try writeFile(path, elf)
        defer { unlink(path) }
        var config = MachineConfiguration(kernelPath: path)
        config.memoryMiB = 64
        config.cpus = 2
        config.timeoutSeconds = 0.5
        let start = monotonicNanos()
        let result = try Machine(config).run()
        #expect(result.reason == .timeout)
        #expect(monotonicNanos() - start < 5_000_000_000)
    }

    @Test("a guest write to the boot-timer port is timestamped by the Machine")
    func bootTimerPort() throws {
        let code: [UInt8] = [
            0x66, 0xBA, 0x40, 0x04,   // mov dx, 0x440
            0xB0, 0x01, 0xEE,         // mov al, 1; out dx, al   (init started)
            0xB0, 0x02, 0xEE,         // mov al, 2; out dx, al   (agent ready)
            0x0F, 0x0B,               // ud2 -> triple fault ends the run
        ]
        let elf = TinyELF.make(code: code, loadAddress: 0x100000)
        let path = "/tmp/sandbox-kvmtest-bt-\(getpid()).elf"
        try writeFile(path, elf)
        defer { unlink(path) }
        var config = MachineConfiguration(kernelPath: path)
        config.memoryMiB = 64
        config.timeoutSeconds = 10
        let machine = try Machine(config)
        let result = try machine.run()
        #expect(result.reason == .guestReset)
        #expect(result.bootMarks.map(\.value) == [1, 2])
        let first = try #require(result.millis(toMark: 1))
        let second = try #require(result.millis(toMark: 2))
        #expect(first > 0 && second >= first)
        #expect(result.bootMarks.allSatisfy { $0.nanos >= machine.runStartNanos && $0.nanos <= result.stopNanos })
    }

    @Test("a guest that triple-faults ends the run with guestReset")
    func tripleFault() throws {
        // #UD with an IDT that has no usable gate: #GP -> #DF -> triple fault.
        let code: [UInt8] = [0x0F, 0x0B] // ud2 with an empty IDT
        let elf = TinyELF.make(code: code, loadAddress: 0x100000)
        let path = "/tmp/sandbox-kvmtest-tf-\(getpid()).elf"
        try writeFile(path, elf)
        defer { unlink(path) }
        var config = MachineConfiguration(kernelPath: path)
        config.memoryMiB = 64
        config.timeoutSeconds = 10
        let result = try Machine(config).run()
        #expect(result.reason == .guestReset)
    }
}

#if canImport(Glibc)
import Glibc
#endif

func writeFile(_ path: String, _ bytes: [UInt8]) throws {
    let fd = try FileDescriptor.open(path, O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
    try bytes.withUnsafeBytes { try fd.writeAll($0) }
}

/// Builds a minimal x86-64 ELF executable with one PT_LOAD and a PVH entry note.
enum TinyELF {
    static func make(code: [UInt8], loadAddress: UInt64) -> [UInt8] {
        func le16(_ v: UInt16) -> [UInt8] { [UInt8(v & 0xFF), UInt8(v >> 8)] }
        func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8((v >> ($0 * 8)) & 0xFF) } }
        func le64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8((v >> ($0 * 8)) & 0xFF) } }
        let phoff: UInt64 = 64
        let note: [UInt8] = le32(4) + le32(4) + le32(18) + Array("Xen\0".utf8) + le32(UInt32(loadAddress))
        let noteOffset = phoff + 2 * 56
        let codeOffset = noteOffset + UInt64(note.count)
        var h: [UInt8] = [0x7F, 0x45, 0x4C, 0x46, 2, 1, 1, 0] + [UInt8](repeating: 0, count: 8)
        h += le16(2) + le16(62) + le32(1) + le64(loadAddress) + le64(phoff) + le64(0)
        h += le32(0) + le16(64) + le16(56) + le16(2) + le16(64) + le16(0) + le16(0)
        var load: [UInt8] = le32(1) + le32(5) + le64(codeOffset) + le64(loadAddress) + le64(loadAddress)
        load += le64(UInt64(code.count)) + le64(UInt64(code.count) + 16) + le64(0x1000)
        var noteHeader: [UInt8] = le32(4) + le32(4) + le64(noteOffset) + le64(0) + le64(0)
        noteHeader += le64(UInt64(note.count)) + le64(UInt64(note.count)) + le64(4)
        return h + load + noteHeader + note + code
    }
}
