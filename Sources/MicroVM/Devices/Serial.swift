import Bus
import Synchronization

/// A 16550A-compatible UART (enough of it for the Linux 8250 driver and early console).
///
/// Registers (offset from the base port): 0 RBR/THR or DLL, 1 IER or DLM, 2 IIR/FCR,
/// 3 LCR, 4 MCR, 5 LSR, 6 MSR, 7 SCR. Transmission is instantaneous, so THR is always
/// empty; the driver still needs the THR-empty interrupt to keep sending.
public final class Serial: Sendable {
    public struct State: Equatable, Sendable, Codable {
        public var ier: UInt8 = 0
        public var iir: UInt8 = 0x01 // no interrupt pending
        public var lcr: UInt8 = 0x03
        public var mcr: UInt8 = 0x08
        public var lsr: UInt8 = 0x60 // THR empty, transmitter empty
        public var msr: UInt8 = 0xB0 // DCD, DSR, CTS
        public var scr: UInt8 = 0
        public var dll: UInt8 = 0x0C
        public var dlm: UInt8 = 0
        public var input: [UInt8] = []
        public init() {}
    }

    static let ierRxData: UInt8 = 0x01, ierTHREmpty: UInt8 = 0x02
    static let iirNone: UInt8 = 0x01, iirTHREmpty: UInt8 = 0x02, iirRxData: UInt8 = 0x04, iirFIFO: UInt8 = 0xC0
    static let lcrDLAB: UInt8 = 0x80
    static let lsrDataReady: UInt8 = 0x01
    static let mcrLoop: UInt8 = 0x10
    static let inputLimit = 4096

    private let state = Mutex(State())
    private let output: ConsoleLog
    private let interrupt: (any InterruptTrigger)?

    public init(output: ConsoleLog, interrupt: (any InterruptTrigger)?) {
        self.output = output
        self.interrupt = interrupt
    }

    /// A copy of the register state (for snapshots and tests).
    public var snapshot: State { state.withLock { $0 } }

    /// Puts back a state from `snapshot` (a restored VM's UART). Input beyond the
    /// buffer limit is dropped, as `enqueueInput` would.
    public func restore(_ saved: State) {
        var s = saved
        if s.input.count > Self.inputLimit { s.input = Array(s.input.prefix(Self.inputLimit)) }
        state.withLock { $0 = s }
    }

    /// Queues bytes for the guest to read (console input). Excess input is dropped.
    public func enqueueInput(_ bytes: [UInt8]) {
        let raise: Bool = state.withLock { state in
            let room = Self.inputLimit - state.input.count
            state.input.append(contentsOf: bytes.prefix(max(0, room)))
            return Self.updateInterrupt(&state)
        }
        if raise { interrupt?.trigger() }
    }

    /// Guest read of register `offset` (0...7).
    public func read(offset: UInt8) -> UInt8 {
        state.withLock { state in
            let dlab = state.lcr & Self.lcrDLAB != 0
            switch offset {
            case 0:
                if dlab { return state.dll }
                guard !state.input.isEmpty else { return 0 }
                let b = state.input.removeFirst()
                _ = Self.updateInterrupt(&state)
                return b
            case 1: return dlab ? state.dlm : state.ier
            case 2:
                let v = state.iir | Self.iirFIFO
                // Reading IIR acknowledges a THR-empty interrupt.
                if state.iir == Self.iirTHREmpty { state.iir = Self.iirNone; _ = Self.updateInterrupt(&state, thrEmpty: false) }
                return v
            case 3: return state.lcr
            case 4: return state.mcr
            case 5:
                return state.lsr | (state.input.isEmpty ? 0 : Self.lsrDataReady)
            case 6:
                if state.mcr & Self.mcrLoop != 0 {
                    // Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
                    let m = state.mcr
                    return ((m & 0x01) << 5) | ((m & 0x02) << 3) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
                }
                return state.msr
            case 7: return state.scr
            default: return 0xFF
            }
        }
    }

    /// Guest write of `value` to register `offset` (0...7).
    public func write(offset: UInt8, value: UInt8) {
        var raise = false
        var emit: UInt8?
        state.withLock { state in
            let dlab = state.lcr & Self.lcrDLAB != 0
            switch offset {
            case 0:
                if dlab { state.dll = value; return }
                if state.mcr & Self.mcrLoop != 0 {
                    if state.input.count < Self.inputLimit { state.input.append(value) }
                } else {
                    emit = value
                }
                raise = Self.updateInterrupt(&state, thrEmpty: true)
            case 1:
                if dlab { state.dlm = value; return }
                let enablingTHR = value & Self.ierTHREmpty != 0 && state.ier & Self.ierTHREmpty == 0
                state.ier = value & 0x0F
                raise = Self.updateInterrupt(&state, thrEmpty: enablingTHR)
            case 2: break // FCR: FIFOs are always on
            case 3: state.lcr = value
            case 4: state.mcr = value & 0x1F
            case 7: state.scr = value
            default: break
            }
        }
        if let emit { output.append(emit) }
        if raise { interrupt?.trigger() }
    }

    /// Recomputes IIR; returns whether an interrupt edge should be raised.
    /// Called inside `state.withLock`.
    private static func updateInterrupt(_ state: inout State, thrEmpty: Bool? = nil) -> Bool {
        let before = state.iir
        if state.ier & Self.ierRxData != 0 && !state.input.isEmpty {
            state.iir = Self.iirRxData
        } else if state.ier & Self.ierTHREmpty != 0 && (thrEmpty ?? (state.iir == Self.iirTHREmpty)) {
            state.iir = Self.iirTHREmpty
        } else {
            state.iir = Self.iirNone
        }
        return state.iir != Self.iirNone && (state.iir != before || thrEmpty == true)
    }
}

extension Serial: PortIODevice {
    public func portRead(offset: UInt16, data: UnsafeMutableRawBufferPointer) {
        for i in 0..<data.count { data[i] = read(offset: UInt8(truncatingIfNeeded: offset) &+ UInt8(truncatingIfNeeded: i)) }
    }
    public func portWrite(offset: UInt16, data: UnsafeRawBufferPointer) {
        for (i, b) in data.enumerated() { write(offset: UInt8(truncatingIfNeeded: offset) &+ UInt8(truncatingIfNeeded: i), value: b) }
    }
}
