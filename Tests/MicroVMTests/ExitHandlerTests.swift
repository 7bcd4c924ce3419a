import Bus
import Testing
import KVM
import SandboxABI
import VirtIO
@testable import MicroVM

/// A bus like the machine's: serial at COM1, a recording port device at 0x100..0x103,
/// and a recording MMIO device in the first virtio window.
private struct Fixture {
    let log = ConsoleLog(capacity: 1024)
    let ports = RecordingPortDevice()
    let mmio = RecordingMMIODevice()
    let bus: DeviceBus

    init() throws {
        var bus = DeviceBus()
        try bus.addPorts(base: Layout.serialCOM1, count: 8, Serial(output: log, interrupt: nil))
        try bus.addPorts(base: 0x100, count: 4, ports)
        try bus.addMMIO(base: Layout.virtioMMIOBase, size: Layout.virtioMMIOSize, mmio)
        self.bus = bus
    }
}

/// Runs `body` with a freshly allocated buffer holding `bytes`.
private func withBuffer<R>(_ bytes: [UInt8], _ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
    let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes.count, 1), alignment: 8)
    defer { buf.deallocate() }
    let view = UnsafeMutableRawBufferPointer(rebasing: buf[0..<bytes.count])
    view.copyBytes(from: bytes)
    return try body(view)
}

private let unmappedInCases: [(port: UInt16, size: Int)] = [(port: 0x80 as UInt16, size: 1), (0x61, 2), (0xCF8, 4), (0x3F0, 1)]

private let simpleExitCases: [(exit: VCPUExitCase, action: ExitAction)] = [
    (exit: VCPUExitCase.halt, action: ExitAction.stop(.halted)),
    (.shutdown, .stop(.guestReset)),
    (.systemEvent(1), .stop(.powerOff)),
    (.systemEvent(2), .stop(.guestReset)),
    (.systemEvent(3), .stop(.guestCrash("KVM_SYSTEM_EVENT_CRASH"))),
    (.interrupted, .resume),
    ]

private let kvmErrorCases: [(VCPUExitCase, [String])] = [
    (VCPUExitCase.systemEvent(7), ["unknown system event", "7"]),
    (.failEntry(0x8000_0021), ["KVM_EXIT_FAIL_ENTRY", "0x80000021"]),
    (.internalError(1), ["KVM_EXIT_INTERNAL_ERROR", "emulation failure"]),
    (.internalError(3), ["KVM_EXIT_INTERNAL_ERROR", "suberror 3"]),
    (.unknown(99), ["unhandled KVM exit reason 99"]),
    ]

private let portLookupCases: [(port: UInt16, base: UInt16?, offset: UInt16)] = [
    (port: 0x3F8 as UInt16, base: 0x3F8 as UInt16?, offset: 0 as UInt16),
    (0x3FD, 0x3F8, 5),
    (0x3FF, 0x3F8, 7),
    (0x400, nil, 0),
    (0x3F7, nil, 0),
    (0x440, 0x440, 0),
    (0x441, nil, 0),
    (0x64, 0x64, 0),
    (0x60, nil, 0),
    ]

private let i8042Cases: [(offset: UInt16, value: UInt8, resets: Bool)] = [
    (offset: 0 as UInt16, value: 0xFE as UInt8, resets: true),
    (0, 0x00, false),
    (0, 0xFF, false),
    (0, 0xD1, false),
    (1, 0xFE, false),
    ]

private let panicCases: [(String, String)] = [
    ("[    0.512] VFS: Cannot open root device\r\n[    0.513] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\r\n[    0.514] CPU: 0 PID: 1",
     "[    0.513] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"),
    ("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100",
     "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100"),
    ("ok\n[ 3.1] kernel BUG at mm/slub.c:123!\ninvalid opcode: 0000",
     "[ 3.1] kernel BUG at mm/slub.c:123!"),
    ]

private let cleanConsoleCases: [String] = [
    "",
    "[    0.000] Linux version 6.6\n[    1.000] reboot: Restarting system\n",
    "panic=-1 in the command line\n",
    "Kernel panic",
    ]

private let cpuidCases: [(vcpu: Int, count: Int)] = [
    (vcpu: 0, count: 1), (3, 4), (31, 32),
    ]

@Suite("ExitHandler.handle")
struct ExitHandlerTests {
    @Test("OUT to COM1 THR reaches the serial device")
    func outToSerial() throws {
        let f = try Fixture()
        let action = withBuffer([0x41]) { ExitHandler.handle(.ioOut(port: 0x3F8, size: 1, data: UnsafeRawBufferPointer($0)), bus: f.bus) }
        #expect(action == .resume)
        #expect(f.log.text == "A")
    }

    @Test("OUTSB repeats the access: data holds size * count bytes")
    func stringOut() throws {
        let f = try Fixture()
        let text = Array("hello".utf8)
        #expect(withBuffer(text) { ExitHandler.handle(.ioOut(port: 0x3F8, size: 1, data: UnsafeRawBufferPointer($0)), bus: f.bus) } == .resume)
        #expect(f.log.text == "hello")
        // OUTSW to a recording device: three 2-byte writes at the same register.
        _ = withBuffer([1, 2, 3, 4, 5, 6]) { ExitHandler.handle(.ioOut(port: 0x101, size: 2, data: UnsafeRawBufferPointer($0)), bus: f.bus) }
        #expect(f.ports.accesses == [
            Access(write: true, offset: 1, bytes: [1, 2]),
            Access(write: true, offset: 1, bytes: [3, 4]),
            Access(write: true, offset: 1, bytes: [5, 6]),
        ])
    }

    @Test("a trailing partial element is not delivered")
    func partialElement() throws {
        let f = try Fixture()
        _ = withBuffer([1, 2, 3, 4, 5, 6]) { ExitHandler.handle(.ioOut(port: 0x100, size: 4, data: UnsafeRawBufferPointer($0)), bus: f.bus) }
        #expect(f.ports.accesses == [Access(write: true, offset: 0, bytes: [1, 2, 3, 4])])
    }

    @Test("IN from an unmapped port reads all-ones", arguments: unmappedInCases)
    func inUnmapped(port: UInt16, size: Int) throws {
        let f = try Fixture()
        withBuffer([UInt8](repeating: 0, count: size * 3)) { buf in
            #expect(ExitHandler.handle(.ioIn(port: port, size: size, data: buf), bus: f.bus) == .resume)
            #expect(Array(buf) == [UInt8](repeating: 0xFF, count: size * 3))
        }
    }

    @Test("IN from mapped ports: serial LSR, and INSW repeating a device read")
    func inMapped() throws {
        let f = try Fixture()
        withBuffer([0]) { buf in
            _ = ExitHandler.handle(.ioIn(port: 0x3FD, size: 1, data: buf), bus: f.bus)
            #expect(buf[0] == 0x60)
        }
        withBuffer([UInt8](repeating: 0, count: 4)) { buf in
            _ = ExitHandler.handle(.ioIn(port: 0x102, size: 2, data: buf), bus: f.bus)
            #expect(Array(buf) == [0xA2, 0xA3, 0xA2, 0xA3])
        }
        #expect(f.ports.accesses.count == 2)
        #expect(f.ports.accesses.allSatisfy { !$0.write && $0.offset == 2 })
    }

    @Test("access sizes 0 and above 4 are ignored", arguments: [0, 5, 8, -1])
    func badSizes(size: Int) throws {
        let f = try Fixture()
        withBuffer([UInt8](repeating: 0x11, count: 8)) { buf in
            #expect(ExitHandler.handle(.ioIn(port: 0x100, size: size, data: buf), bus: f.bus) == .resume)
            #expect(Array(buf) == [UInt8](repeating: 0x11, count: 8))
            #expect(ExitHandler.handle(.ioOut(port: 0x100, size: size, data: UnsafeRawBufferPointer(buf)), bus: f.bus) == .resume)
            #expect(ExitHandler.handle(.ioOut(port: 0x3F8, size: size, data: UnsafeRawBufferPointer(buf)), bus: f.bus) == .resume)
        }
        #expect(f.ports.accesses.isEmpty)
        #expect(f.log.totalBytes == 0)
    }

    @Test("OUT to an unmapped port is dropped")
    func outUnmapped() throws {
        let f = try Fixture()
        #expect(withBuffer([0xFE]) { ExitHandler.handle(.ioOut(port: 0x64, size: 1, data: UnsafeRawBufferPointer($0)), bus: f.bus) } == .resume)
        #expect(f.ports.accesses.isEmpty)
    }

    @Test("MMIO read outside any device reads zeros", arguments: [1, 2, 4, 8])
    func mmioReadUnmapped(len: Int) throws {
        let f = try Fixture()
        withBuffer([UInt8](repeating: 0xAA, count: len)) { buf in
            #expect(ExitHandler.handle(.mmioRead(address: 0xFED0_0000, data: buf), bus: f.bus) == .resume)
            #expect(Array(buf) == [UInt8](repeating: 0, count: len))
        }
        #expect(f.mmio.accesses.isEmpty)
    }

    @Test("MMIO reads and writes reach the device at the right offset")
    func mmioMapped() throws {
        let f = try Fixture()
        withBuffer([0, 0, 0, 0]) { buf in
            #expect(ExitHandler.handle(.mmioRead(address: Layout.virtioMMIOBase + 0x70, data: buf), bus: f.bus) == .resume)
            #expect(Array(buf) == [0x70, 0x71, 0x72, 0x73])
        }
        withBuffer([0x0F, 0, 0, 0]) { buf in
            #expect(ExitHandler.handle(.mmioWrite(address: Layout.virtioMMIOBase + 0x70, data: UnsafeRawBufferPointer(buf)), bus: f.bus) == .resume)
        }
        withBuffer([1]) { buf in
            _ = ExitHandler.handle(.mmioWrite(address: Layout.virtioMMIOBase + Layout.virtioMMIOSize - 1, data: UnsafeRawBufferPointer(buf)), bus: f.bus)
            // Just past the window: dropped.
            _ = ExitHandler.handle(.mmioWrite(address: Layout.virtioMMIOBase + Layout.virtioMMIOSize, data: UnsafeRawBufferPointer(buf)), bus: f.bus)
        }
        #expect(f.mmio.accesses == [
            Access(write: false, offset: 0x70, bytes: [0x70, 0x71, 0x72, 0x73]),
            Access(write: true, offset: 0x70, bytes: [0x0F, 0, 0, 0]),
            Access(write: true, offset: Layout.virtioMMIOSize - 1, bytes: [1]),
        ])
    }

    @Test("stop and resume exits", arguments: simpleExitCases)
    func simpleExits(exit: VCPUExitCase, action: ExitAction) throws {
        #expect(ExitHandler.handle(exit.exit, bus: DeviceBus()) == action)
    }

    @Test("KVM failures stop with a message naming the reason", arguments: kvmErrorCases)
    func kvmErrors(exit: VCPUExitCase, fragments: [String]) throws {
        guard case .stop(.kvmError(let message)) = ExitHandler.handle(exit.exit, bus: DeviceBus()) else {
            Issue.record("\(exit) did not stop with .kvmError"); return
        }
        for f in fragments { #expect(message.contains(f), "\(message)") }
    }
}

/// The data-less VCPUExit cases (VCPUExit holds pointers and is not Sendable, so
/// parameterised tests use this and build the exit inside the test).
enum VCPUExitCase: Sendable, CustomTestStringConvertible {
    case halt, shutdown, interrupted
    case systemEvent(UInt32)
    case failEntry(UInt64)
    case internalError(UInt32)
    case unknown(UInt32)

    var exit: VCPUExit {
        switch self {
        case .halt: return .halt
        case .shutdown: return .shutdown
        case .interrupted: return .interrupted
        case .systemEvent(let t): return .systemEvent(type: t)
        case .failEntry(let r): return .failEntry(reason: r)
        case .internalError(let s): return .internalError(suberror: s)
        case .unknown(let r): return .unknown(reason: r)
        }
    }
    var testDescription: String { "\(self)" }
}

@Suite("DeviceBus")
struct DeviceBusTests {
    @Test("overlapping port ranges are rejected; adjacent ones are fine")
    func portOverlap() throws {
        var bus = DeviceBus()
        let d = RecordingPortDevice()
        try bus.addPorts(base: 0x3F8, count: 8, d)
        for (base, count) in [(0x3F8, 1), (0x3FF, 1), (0x3F0, 9), (0x3F0, 0x100), (0x3FC, 2)] as [(UInt16, UInt16)] {
            #expect(throws: DeviceBus.Error.self) { try bus.addPorts(base: base, count: count, d) }
        }
        try bus.addPorts(base: 0x3F0, count: 8, d)
        try bus.addPorts(base: 0x400, count: 1, d)
        try bus.addPorts(base: 0xFFFF, count: 1, d)
        #expect(bus.ports.count == 4)
    }

    @Test("port lookups return the device and the offset from its base", arguments: portLookupCases)
    func portLookup(port: UInt16, base: UInt16?, offset: UInt16) throws {
        var bus = DeviceBus()
        let serial = RecordingPortDevice(), timer = RecordingPortDevice(), kbd = RecordingPortDevice()
        try bus.addPorts(base: 0x3F8, count: 8, serial)
        try bus.addPorts(base: 0x440, count: 1, timer)
        try bus.addPorts(base: 0x64, count: 1, kbd)
        let byBase: [UInt16: RecordingPortDevice] = [0x3F8: serial, 0x440: timer, 0x64: kbd]
        let found = bus.port(port)
        if let base {
            #expect(found?.0 === byBase[base])
            #expect(found?.1 == offset)
        } else {
            #expect(found == nil)
        }
    }

    @Test("MMIO ranges: overlap rejected, lookups give offsets")
    func mmio() throws {
        var bus = DeviceBus()
        let a = RecordingMMIODevice(), b = RecordingMMIODevice()
        try bus.addMMIO(base: 0xD000_0000, size: 0x1000, a)
        try bus.addMMIO(base: 0xD000_1000, size: 0x1000, b)
        #expect(throws: DeviceBus.Error.self) { try bus.addMMIO(base: 0xD000_0800, size: 0x1000, b) }
        #expect(throws: DeviceBus.Error.self) { try bus.addMMIO(base: 0xCFFF_F000, size: 0x2000, b) }
        #expect(throws: DeviceBus.Error.self) { try bus.addMMIO(base: 0xD000_1FFF, size: 1, b) }
        #expect(bus.mmio(0xD000_0000)?.0 === a)
        #expect(bus.mmio(0xD000_0FFF)?.1 == 0xFFF)
        #expect(bus.mmio(0xD000_1000)?.0 === b)
        #expect(bus.mmio(0xD000_1050)?.1 == 0x50)
        #expect(bus.mmio(0xD000_2000) == nil)
        #expect(bus.mmio(0xCFFF_FFFF) == nil)
    }
}

@Suite("Boot timer and i8042")
struct SmallDeviceTests {
    @Test("boot timer records marks in order with non-decreasing times")
    func bootTimer() {
        let calls = CallCounter()
        let timer = BootTimer(onMark: { _ in calls.bump() })
        for v: UInt8 in [BootTimer.initStarted, BootTimer.agentReady, 7] {
            [v].withUnsafeBytes { timer.portWrite(offset: 0, data: $0) }
        }
        // An empty write is ignored.
        timer.portWrite(offset: 0, data: UnsafeRawBufferPointer(start: nil, count: 0))
        let marks = timer.recorded
        #expect(marks.map(\.value) == [1, 2, 7])
        #expect(zip(marks, marks.dropFirst()).allSatisfy { $0.nanos <= $1.nanos })
        #expect(timer.time(of: 2) == marks[1].nanos)
        #expect(timer.time(of: 9) == nil)
        #expect(calls.count == 3)
        let out = UnsafeMutableRawBufferPointer.allocate(byteCount: 4, alignment: 1)
        defer { out.deallocate() }
        out.initializeMemory(as: UInt8.self, repeating: 0xEE)
        timer.portRead(offset: 0, data: out)
        #expect(Array(out) == [0, 0, 0, 0])
    }

    @Test("boot timer keeps at most 64 marks; time(of:) is the first write")
    func bootTimerLimit() {
        let timer = BootTimer()
        for i in 0..<100 { [UInt8(i % 3)].withUnsafeBytes { timer.portWrite(offset: 0, data: $0) } }
        #expect(timer.recorded.count == 64)
        #expect(timer.time(of: 1) == timer.recorded[1].nanos)
    }

    @Test("i8042: writing 0xFE to the command port resets; other writes do not", arguments: i8042Cases)
    func i8042(offset: UInt16, value: UInt8, resets: Bool) {
        let calls = CallCounter()
        let kbd = I8042(onReset: { calls.bump() })
        [value].withUnsafeBytes { kbd.portWrite(offset: offset, data: $0) }
        #expect(calls.count == (resets ? 1 : 0))
        var status: UInt8 = 0
        withUnsafeMutableBytes(of: &status) { kbd.portRead(offset: 0, data: $0) }
        #expect(status == 0xFF)
    }

    @Test("i8042 reset through the exit handler")
    func i8042ViaBus() throws {
        let calls = CallCounter()
        var bus = DeviceBus()
        try bus.addPorts(base: Layout.i8042Command, count: 1, I8042(onReset: { calls.bump() }))
        let action = [UInt8(0xFE)].withUnsafeBytes { ExitHandler.handle(.ioOut(port: 0x64, size: 1, data: $0), bus: bus) }
        #expect(action == .resume)   // the callback, not the exit, stops the VM
        #expect(calls.count == 1)
    }
}

@Suite("GuestCrashDetector")
struct GuestCrashDetectorTests {
    @Test("finds the panic line", arguments: panicCases)
    func panics(console: String, line: String) {
        #expect(GuestCrashDetector.crashReason(consoleTail: console) == line)
    }

    @Test("clean output is not a crash", arguments: cleanConsoleCases)
    func clean(console: String) {
        #expect(GuestCrashDetector.crashReason(consoleTail: console) == nil)
    }
}

@Suite("CPUIDPolicy")
struct CPUIDPolicyTests {
    private func entry(_ function: UInt32, index: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0) -> CPUIDEntry {
        var e = CPUIDEntry()
        e.function = function; e.index = index; e.ebx = ebx; e.ecx = ecx; e.edx = edx
        return e
    }

    @Test("leaf 1 carries the APIC ID, CPU count, hypervisor and HTT bits; leaves 0xB/0x1F the x2APIC ID", arguments: cpuidCases)
    func policy(vcpu: Int, count: Int) {
        let supported = [
            entry(0x0, ebx: 0x756E_6547),
            entry(0x1, ebx: 0xFFFF_0800, ecx: 0x0000_0001, edx: 0x0000_0001),
            entry(0xB, index: 0, edx: 0xFFFF),
            entry(0xB, index: 1, edx: 0xFFFF),
            entry(0x1F, index: 0, edx: 0xFFFF),
            entry(0x7, ebx: 0x1234, edx: 0x5678),
        ]
        let out = CPUIDPolicy.entries(from: supported, vcpuID: vcpu, vcpuCount: count)
        #expect(out.count == supported.count)
        let leaf1 = out[1]
        #expect(leaf1.ebx >> 24 == UInt32(vcpu))
        #expect((leaf1.ebx >> 16) & 0xFF == UInt32(count))
        #expect(leaf1.ebx & 0xFFFF == 0x0800)       // CLFLUSH size / brand index kept
        #expect(leaf1.ecx == 0x8000_0001)           // hypervisor bit added, others kept
        #expect(leaf1.edx == 0x1000_0001)           // HTT added
        for i in 2...4 { #expect(out[i].edx == UInt32(vcpu)) }
        #expect(out[0].ebx == 0x756E_6547)
        #expect(out[5].ebx == 0x1234 && out[5].edx == 0x5678)
    }
}
