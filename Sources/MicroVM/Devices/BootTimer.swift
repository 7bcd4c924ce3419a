import Bus
import Synchronization
import SystemShims

/// The boot-timer port: the guest writes a milestone byte and the VMM records when.
/// 1 = init started, 2 = agent ready; other values are recorded as-is.
public final class BootTimer: PortIODevice, Sendable {
    public struct Mark: Equatable, Sendable {
        public var value: UInt8
        public var nanos: UInt64
    }
    public static let initStarted: UInt8 = 1
    public static let agentReady: UInt8 = 2

    private struct State {
        var marks: [Mark] = []
    }
    private let state = Mutex(State())
    private let onMark: (@Sendable (Mark) -> Void)?

    public init(onMark: (@Sendable (Mark) -> Void)? = nil) { self.onMark = onMark }

    public var recorded: [Mark] { state.withLock { $0.marks } }

    /// The first time `value` was written, in monotonic nanoseconds.
    public func time(of value: UInt8) -> UInt64? { state.withLock { s in s.marks.first { $0.value == value }?.nanos } }

    public func portRead(offset: UInt16, data: UnsafeMutableRawBufferPointer) {
        for i in 0..<data.count { data[i] = 0 }
    }

    public func portWrite(offset: UInt16, data: UnsafeRawBufferPointer) {
        guard let v = data.first else { return }
        let mark = Mark(value: v, nanos: monotonicNanos())
        state.withLock { s in if s.marks.count < 64 { s.marks.append(mark) } }
        onMark?(mark)
    }
}

/// The i8042 keyboard controller, only as far as reset goes: writing 0xFE to the
/// command port (what `reboot=k` does) requests a reset. Reads return 0xFF, which the
/// Linux driver takes as "no controller" at once (a status of 0 makes it poll for
/// half a second).
public final class I8042: PortIODevice, Sendable {
    private let onReset: @Sendable () -> Void
    public init(onReset: @escaping @Sendable () -> Void) { self.onReset = onReset }
    public func portRead(offset: UInt16, data: UnsafeMutableRawBufferPointer) {
        for i in 0..<data.count { data[i] = 0xFF }
    }
    public func portWrite(offset: UInt16, data: UnsafeRawBufferPointer) {
        if offset == 0, data.first == 0xFE { onReset() }
    }
}
