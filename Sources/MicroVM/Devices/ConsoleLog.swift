import Synchronization

/// The guest console's output: the last `capacity` bytes are kept for the caller
/// (e.g. the tail shown when a guest crashes); every byte can also be streamed live.
public final class ConsoleLog: Sendable {
    private struct State {
        var ring: [UInt8]
        var start = 0
        var count = 0
        var total: UInt64 = 0
    }
    private let state: Mutex<State>
    private let sink: (@Sendable (UnsafeRawBufferPointer) -> Void)?
    public let capacity: Int

    /// - Parameters:
    ///   - capacity: bytes kept in memory (older output is dropped).
    ///   - sink: called with each chunk of output as it arrives (on a vCPU thread).
    public init(capacity: Int = 256 * 1024, sink: (@Sendable (UnsafeRawBufferPointer) -> Void)? = nil) {
        precondition(capacity > 0)
        self.capacity = capacity
        self.state = Mutex(State(ring: [UInt8](repeating: 0, count: capacity)))
        self.sink = sink
    }

    public func append(_ bytes: UnsafeRawBufferPointer) {
        let capacity = self.capacity
        state.withLock { s in
            for b in bytes {
                let end = (s.start + s.count) % capacity
                s.ring[end] = b
                if s.count < capacity { s.count += 1 } else { s.start = (s.start + 1) % capacity }
            }
            s.total += UInt64(bytes.count)
        }
        sink?(bytes)
    }

    public func append(_ byte: UInt8) {
        withUnsafeBytes(of: byte) { append($0) }
    }

    /// Total bytes ever written (including those dropped from the ring).
    public var totalBytes: UInt64 { state.withLock { $0.total } }

    /// The kept output (at most `capacity` bytes).
    public var bytes: [UInt8] {
        let capacity = self.capacity
        return state.withLock { s in (0..<s.count).map { s.ring[(s.start + $0) % capacity] } }
    }

    /// The last `maxBytes` of output as text.
    public func tail(_ maxBytes: Int = 4096) -> String {
        let b = bytes
        return String(decoding: b.suffix(maxBytes), as: UTF8.self)
    }

    /// The whole kept output as text.
    public var text: String { String(decoding: bytes, as: UTF8.self) }
}
