import Bus
import Foundation
import Testing
@testable import MicroVM

/// Register offsets of a 16550A.
private enum Reg {
    static let rbr: UInt8 = 0, thr: UInt8 = 0, dll: UInt8 = 0
    static let ier: UInt8 = 1, dlm: UInt8 = 1
    static let iir: UInt8 = 2, fcr: UInt8 = 2
    static let lcr: UInt8 = 3, mcr: UInt8 = 4, lsr: UInt8 = 5, msr: UInt8 = 6, scr: UInt8 = 7
}

private func makeSerial() -> (Serial, ConsoleLog, CountingTrigger) {
    let log = ConsoleLog(capacity: 1024)
    let irq = CountingTrigger()
    return (Serial(output: log, interrupt: irq), log, irq)
}

private let loopbackCases: [(mcr: UInt8, msr: UInt8)] = [
    (mcr: 0x1A as UInt8, msr: 0x90 as UInt8),  // LOOP|OUT2|RTS -> DCD|CTS
    (0x10, 0x00),
    (0x11, 0x20),   // DTR -> DSR
    (0x12, 0x10),   // RTS -> CTS
    (0x14, 0x40),   // OUT1 -> RI
    (0x18, 0x80),   // OUT2 -> DCD
    (0x1F, 0xF0),
    ]

@Suite("16550A serial port")
struct SerialTests {
    @Test("the state saved from one UART, encoded and restored into another, behaves the same")
    func snapshotRestore() throws {
        let (a, _, _) = makeSerial()
        a.write(offset: Reg.lcr, value: 0x80)   // DLAB: set the divisor
        a.write(offset: Reg.dll, value: 0x01)
        a.write(offset: Reg.lcr, value: 0x03)
        a.write(offset: Reg.ier, value: 0x01)   // rx interrupt
        a.write(offset: Reg.scr, value: 0x5A)
        a.enqueueInput(Array("ab".utf8))
        let saved = try JSONDecoder().decode(Serial.State.self, from: JSONEncoder().encode(a.snapshot))
        let (b, _, _) = makeSerial()
        b.restore(saved)
        #expect(b.snapshot == a.snapshot)
        #expect(b.read(offset: Reg.scr) == 0x5A)
        #expect(b.read(offset: Reg.lsr) & 0x01 != 0)   // data ready
        #expect(b.read(offset: Reg.rbr) == UInt8(ascii: "a"))
        #expect(b.read(offset: Reg.rbr) == UInt8(ascii: "b"))
        // A hostile state cannot grow the input past the limit.
        var big = saved
        big.input = [UInt8](repeating: 1, count: 1 << 20)
        b.restore(big)
        #expect(b.snapshot.input.count == 4096)
    }

    @Test("a THR write is emitted to the console")
    func transmit() {
        let (s, log, irq) = makeSerial()
        for b in "hi\n".utf8 { s.write(offset: Reg.thr, value: b) }
        #expect(log.text == "hi\n")
        #expect(irq.count == 0)    // no interrupts enabled
    }

    @Test("reset values: LSR THRE|TEMT, IIR no interrupt with FIFOs, LCR 8N1, MSR DCD|DSR|CTS")
    func resetValues() {
        let (s, _, _) = makeSerial()
        #expect(s.read(offset: Reg.lsr) == 0x60)
        #expect(s.read(offset: Reg.iir) == 0xC1)
        #expect(s.read(offset: Reg.lcr) == 0x03)
        #expect(s.read(offset: Reg.msr) == 0xB0)
        #expect(s.read(offset: Reg.ier) == 0)
        #expect(s.read(offset: Reg.rbr) == 0)    // nothing received
        #expect(s.read(offset: 8) == 0xFF)       // beyond the register file
    }

    @Test("DLAB switches offsets 0 and 1 to the divisor latch")
    func divisorLatch() {
        let (s, log, _) = makeSerial()
        s.write(offset: Reg.lcr, value: 0x83)
        s.write(offset: Reg.dll, value: 0x01)
        s.write(offset: Reg.dlm, value: 0x02)
        #expect(s.read(offset: Reg.dll) == 0x01)
        #expect(s.read(offset: Reg.dlm) == 0x02)
        #expect(log.totalBytes == 0)             // divisor writes are not output
        s.write(offset: Reg.lcr, value: 0x03)
        #expect(s.read(offset: Reg.ier) == 0)    // IER untouched by the DLM write
        #expect(s.snapshot.dll == 0x01 && s.snapshot.dlm == 0x02)
        s.write(offset: Reg.thr, value: 0x41)
        #expect(log.text == "A")
    }

    @Test("the scratch register keeps its value", arguments: [0x00 as UInt8, 0x5A, 0xFF])
    func scratch(value: UInt8) {
        let (s, _, _) = makeSerial()
        s.write(offset: Reg.scr, value: value)
        #expect(s.read(offset: Reg.scr) == value)
    }

    @Test("loopback MSR mirrors MCR (the Linux 8250 autoconfig probe)", arguments: loopbackCases)
    func loopbackMSR(mcr: UInt8, msr: UInt8) {
        let (s, _, _) = makeSerial()
        s.write(offset: Reg.mcr, value: mcr)
        #expect(s.read(offset: Reg.mcr) == mcr)
        #expect(s.read(offset: Reg.msr) == msr)
        #expect(s.read(offset: Reg.msr) & 0x0F == 0)   // no delta bits
        s.write(offset: Reg.mcr, value: 0x0B)
        #expect(s.read(offset: Reg.msr) == 0xB0)       // out of loopback: the fixed lines
    }

    @Test("MCR keeps only its five defined bits")
    func mcrMask() {
        let (s, _, _) = makeSerial()
        s.write(offset: Reg.mcr, value: 0xFF)
        #expect(s.read(offset: Reg.mcr) == 0x1F)
    }

    @Test("loopback THR writes arrive in RBR and set LSR.DR")
    func loopbackData() {
        let (s, log, _) = makeSerial()
        s.write(offset: Reg.mcr, value: 0x10)
        s.write(offset: Reg.thr, value: 0x42)
        s.write(offset: Reg.thr, value: 0x43)
        #expect(log.totalBytes == 0)
        #expect(s.read(offset: Reg.lsr) == 0x61)
        #expect(s.read(offset: Reg.rbr) == 0x42)
        #expect(s.read(offset: Reg.rbr) == 0x43)
        #expect(s.read(offset: Reg.lsr) == 0x60)
    }

    @Test("enabling the THR-empty interrupt raises it; reading IIR acknowledges")
    func thrEmptyInterrupt() {
        let (s, _, irq) = makeSerial()
        s.write(offset: Reg.ier, value: 0x02)
        #expect(irq.count == 1)
        #expect(s.read(offset: Reg.iir) == 0xC2)
        #expect(s.read(offset: Reg.iir) == 0xC1)
        // Each transmitted byte makes THR empty again.
        s.write(offset: Reg.thr, value: 0x41)
        #expect(irq.count == 2)
        #expect(s.read(offset: Reg.iir) == 0xC2)
        // Re-writing IER with THRE already enabled does not raise another edge.
        s.write(offset: Reg.ier, value: 0x02)
        #expect(irq.count == 2)
        // Disabling clears the pending interrupt.
        s.write(offset: Reg.thr, value: 0x42)
        s.write(offset: Reg.ier, value: 0x00)
        #expect(s.read(offset: Reg.iir) == 0xC1)
    }

    @Test("received data raises the RX interrupt until RBR is drained")
    func rxInterrupt() {
        let (s, _, irq) = makeSerial()
        s.write(offset: Reg.ier, value: 0x01)
        #expect(irq.count == 0)
        s.enqueueInput([0x61, 0x62])
        #expect(irq.count == 1)
        #expect(s.read(offset: Reg.iir) == 0xC4)
        #expect(s.read(offset: Reg.iir) == 0xC4)    // not acknowledged by reading IIR
        #expect(s.read(offset: Reg.lsr) & 0x01 == 0x01)
        #expect(s.read(offset: Reg.rbr) == 0x61)
        #expect(s.read(offset: Reg.iir) == 0xC4)
        #expect(s.read(offset: Reg.rbr) == 0x62)
        #expect(s.read(offset: Reg.iir) == 0xC1)
        #expect(s.read(offset: Reg.lsr) == 0x60)
    }

    @Test("input queued before RX is enabled raises the interrupt on enable")
    func rxEnableWithPendingInput() {
        let (s, _, irq) = makeSerial()
        s.enqueueInput([0x0D])
        #expect(irq.count == 0)
        s.write(offset: Reg.ier, value: 0x01)
        #expect(irq.count == 1)
        #expect(s.read(offset: Reg.iir) == 0xC4)
    }

    @Test("input is capped at 4096 bytes")
    func inputLimit() {
        let (s, _, _) = makeSerial()
        s.enqueueInput([UInt8](repeating: 0x78, count: 5000))
        #expect(s.snapshot.input.count == 4096)
        s.enqueueInput([0x79])
        #expect(s.snapshot.input.count == 4096)
        // Loopback writes respect the same cap.
        s.write(offset: Reg.mcr, value: 0x10)
        s.write(offset: Reg.thr, value: 0x7A)
        #expect(s.snapshot.input.count == 4096)
        _ = s.read(offset: Reg.rbr)
        s.enqueueInput([0x79, 0x79])
        #expect(s.snapshot.input.count == 4096)
        #expect(s.snapshot.input.last == 0x79)
    }

    @Test("as a port device, multi-byte accesses address consecutive registers")
    func portDevice() {
        let (s, log, _) = makeSerial()
        let dev: any PortIODevice = s
        [UInt8(0x41)].withUnsafeBytes { dev.portWrite(offset: 0, data: $0) }
        [UInt8(0x77)].withUnsafeBytes { dev.portWrite(offset: 7, data: $0) }
        #expect(log.text == "A")
        let out = UnsafeMutableRawBufferPointer.allocate(byteCount: 2, alignment: 1)
        defer { out.deallocate() }
        dev.portRead(offset: 5, data: out)
        #expect(Array(out) == [0x60, 0xB0])   // LSR, MSR
        dev.portRead(offset: 7, data: UnsafeMutableRawBufferPointer(rebasing: out[0..<1]))
        #expect(out[0] == 0x77)
    }
}

@Suite("ConsoleLog")
struct ConsoleLogTests {
    @Test("the ring keeps the last `capacity` bytes and counts all of them")
    func ring() {
        let log = ConsoleLog(capacity: 8)
        let text = "hello, world"
        Array(text.utf8).withUnsafeBytes { log.append($0) }
        #expect(log.text == "o, world")
        #expect(log.bytes.count == 8)
        #expect(log.totalBytes == 12)
        log.append(UInt8(ascii: "!"))
        #expect(log.text == ", world!")
        #expect(log.totalBytes == 13)
        #expect(log.tail(3) == "ld!")
        #expect(log.tail() == ", world!")
    }

    @Test("under capacity, everything is kept", arguments: [0, 1, 7, 8])
    func underCapacity(n: Int) {
        let log = ConsoleLog(capacity: 8)
        for i in 0..<n { log.append(UInt8(0x30 + i)) }
        #expect(log.bytes == (0..<n).map { UInt8(0x30 + $0) })
        #expect(log.totalBytes == UInt64(n))
    }

    @Test("many wraps keep the newest bytes in order")
    func manyWraps() {
        let log = ConsoleLog(capacity: 5)
        for i in 0..<1003 { log.append(UInt8(truncatingIfNeeded: i)) }
        #expect(log.bytes == (998..<1003).map { UInt8(truncatingIfNeeded: $0) })
    }

    @Test("the sink receives every chunk, including dropped bytes")
    func sink() {
        let collector = ByteCollector()
        let log = ConsoleLog(capacity: 4, sink: { collector.add($0) })
        Array("abcdef".utf8).withUnsafeBytes { log.append($0) }
        log.append(UInt8(ascii: "g"))
        #expect(collector.bytes == Array("abcdefg".utf8))
        #expect(collector.chunkCount == 2)
        #expect(log.text == "defg")
    }
}
