import SystemShims

/// The guest console's output: the last `capacity` bytes are kept for the caller
/// (e.g. the tail shown when a guest crashes); every byte can also be streamed live.
public final class ConsoleLog: @unchecked Sendable {
    // @unchecked: all mutable state is guarded by `lock`.
    private let lock = Lock()
    private var ring: [UInt8]
    private var start = 0
    private var count = 0
    private var total: UInt64 = 0
    private let sink: (@Sendable (UnsafeRawBufferPointer) -> Void)?
    public let capacity: Int

    /// - Parameters:
    ///   - capacity: bytes kept in memory (older output is dropped).
    ///   - sink: called with each chunk of output as it arrives (on a vCPU thread).
    public init(capacity: Int = 256 * 1024, sink: (@Sendable (UnsafeRawBufferPointer) -> Void)? = nil) {
        precondition(capacity > 0)
        self.capacity = capacity
        self.ring = [UInt8](repeating: 0, count: capacity)
        self.sink = sink
    }

    public func append(_ bytes: UnsafeRawBufferPointer) {
        lock.withLock {
            for b in bytes {
                let end = (start + count) % capacity
                ring[end] = b
                if count < capacity { count += 1 } else { start = (start + 1) % capacity }
            }
            total += UInt64(bytes.count)
        }
        sink?(bytes)
    }

    public func append(_ byte: UInt8) {
        withUnsafeBytes(of: byte) { append($0) }
    }

    /// Total bytes ever written (including those dropped from the ring).
    public var totalBytes: UInt64 { lock.withLock { total } }

    /// The kept output (at most `capacity` bytes).
    public var bytes: [UInt8] {
        lock.withLock { (0..<count).map { ring[(start + $0) % capacity] } }
    }

    /// The last `maxBytes` of output as text.
    public func tail(_ maxBytes: Int = 4096) -> String {
        let b = bytes
        return String(decoding: b.suffix(maxBytes), as: UTF8.self)
    }

    /// The whole kept output as text.
    public var text: String { String(decoding: bytes, as: UTF8.self) }
}
