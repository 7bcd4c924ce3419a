import GuestMemory
import SystemShims

/// A FIFO of bytes with cheap removal from the front.
struct ByteQueue {
    private var storage: [UInt8] = []
    private var head = 0

    var count: Int { storage.count - head }
    var isEmpty: Bool { count == 0 }

    /// Appends `count` readable bytes of `chain` starting at `offset`.
    mutating func append(from chain: DescriptorChain, memory: GuestMemory, offset: Int, count: Int) throws {
        let start = storage.count
        storage.append(contentsOf: [UInt8](repeating: 0, count: count)) // memset, not an element-wise loop
        do {
            try storage.withUnsafeMutableBytes { b in
                try chain.read(from: memory, offset: offset, into: UnsafeMutableRawBufferPointer(rebasing: b[start ..< start + count]))
            }
        } catch {
            storage.removeLast(count)
            throw error
        }
    }

    /// Moves up to `destination.count` bytes out; returns how many.
    mutating func read(into destination: UnsafeMutableRawBufferPointer) -> Int {
        let n = min(destination.count, count)
        guard n > 0 else { return 0 }
        storage.withUnsafeBytes { src in
            // SAFETY: head + n <= storage.count and n <= destination.count.
            destination.baseAddress!.copyMemory(from: src.baseAddress! + head, byteCount: n)
        }
        head += n
        if head == storage.count {
            storage.removeAll(keepingCapacity: true)
            head = 0
        } else if head >= 64 << 10, head * 2 >= storage.count {
            storage.removeFirst(head)
            head = 0
        }
        return n
    }
}

/// Something queued for the guest on one connection, in order.
enum VsockOutItem {
    /// A packet without payload (REQUEST, RESPONSE, SHUTDOWN, RST, CREDIT_*).
    case control(op: UInt16, flags: UInt32)
    /// Stream data; split into packets as rx buffers allow.
    case data([UInt8])
}

/// One stream between a host port and a guest port.
///
/// Reads and writes block the calling thread (never call them on a vCPU thread or
/// the cooperative async pool without care); `readinessFD` lets async code wait
/// with poll(2) instead. Closing is explicit: call `close()` when done.
public final class VsockConnection: @unchecked Sendable {
    // @unchecked: every mutable field below is guarded by `device.lock`; the
    // eventfds and the read/write locks are thread-safe objects.

    /// The host side port.
    public let localPort: UInt32
    /// The guest side port.
    public let peerPort: UInt32
    /// Whether the host opened the connection (`connect`) or the guest did (listener).
    public let hostInitiated: Bool
    /// Readable (poll POLLIN) while received data, end of stream or an error is
    /// pending, i.e. exactly when `read` would not block. Do not read it; only poll.
    public let readinessFD: EventFD

    let device: VsockDevice
    /// Woken on credit, backlog and state changes (writers and `connect`).
    let wakeFD: EventFD
    /// Serialise readers and writers of this connection (one waiter per eventfd).
    private let readLock = Lock()
    private let writeLock = Lock()

    // Guarded by device.lock.
    var phase: VsockConnectionPhase
    let bufAlloc: UInt32
    var rxCount: UInt32 = 0
    var fwdCount: UInt32 = 0
    var advertisedFwdCount: UInt32 = 0
    var txCount: UInt32 = 0
    var peerBufAlloc: UInt32 = 0
    var peerFwdCount: UInt32 = 0
    var received = ByteQueue()
    var outbox: [VsockOutItem] = []
    /// Bytes of the first outbox item (if data) already delivered.
    var outboxOffset = 0
    var backlogBytes = 0
    var creditUpdateQueued = false
    var creditRequestOutstanding = false
    var creditRequestQueued = false
    var peerShutdown: UInt32 = 0
    var localShutdownSend = false
    var peerReset = false
    var closedLocally = false
    var failure: VsockError?
    var readySignalled = false
    var inReadyList = false

    init(device: VsockDevice, localPort: UInt32, peerPort: UInt32, hostInitiated: Bool, bufAlloc: UInt32,
         phase: VsockConnectionPhase) throws(VsockError) {
        self.device = device
        self.localPort = localPort
        self.peerPort = peerPort
        self.hostInitiated = hostInitiated
        self.bufAlloc = bufAlloc
        self.phase = phase
        do {
            readinessFD = try EventFD(nonBlocking: true)
            wakeFD = try EventFD(nonBlocking: true)
        } catch {
            throw .system(error)
        }
    }

    var key: VsockConnectionKey { VsockConnectionKey(localPort: localPort, peerPort: peerPort) }

    /// Bytes the guest can still take: peer buf_alloc - (tx_cnt - peer fwd_cnt), or 0
    /// if the guest's counters make no sense (fwd_cnt ahead of what we sent).
    var peerCredit: Int {
        let inFlight = txCount &- peerFwdCount
        return inFlight > peerBufAlloc ? 0 : Int(peerBufAlloc - inFlight)
    }

    /// Whether `read` would return without blocking.
    var isReadableLocked: Bool {
        failure != nil || closedLocally || !received.isEmpty || peerShutdown & VsockShutdown.send != 0 || peerReset
    }

    /// Keeps `readinessFD` readable exactly while `isReadableLocked` (lock held).
    func updateReadinessLocked() {
        let ready = isReadableLocked
        if ready && !readySignalled {
            readinessFD.signal()
            readySignalled = true
        } else if !ready && readySignalled {
            readinessFD.wait()
            readySignalled = false
        }
    }

    /// The state as plain values (lock held).
    var stateLocked: VsockConnectionState {
        VsockConnectionState(localPort: localPort, peerPort: peerPort, phase: phase, hostInitiated: hostInitiated,
                             bufAlloc: bufAlloc, rxCount: rxCount, fwdCount: fwdCount,
                             advertisedFwdCount: advertisedFwdCount, txCount: txCount, peerBufAlloc: peerBufAlloc,
                             peerFwdCount: peerFwdCount, bufferedBytes: received.count, backlogBytes: backlogBytes,
                             peerShutdown: peerShutdown, localShutdownSend: localShutdownSend)
    }

    /// The connection as plain values.
    public var state: VsockConnectionState { device.lock.withLock { stateLocked } }

    /// Whether a `read` would return at once (data, end of stream or an error).
    public var isReadable: Bool { device.lock.withLock { isReadableLocked } }

    // MARK: Reading

    private enum ReadStep {
        case bytes(Int)
        case wouldBlock
        case failed(VsockError)
    }

    /// Reads up to `buffer.count` received bytes, blocking until at least one byte,
    /// the end of the stream or an error.
    /// - Parameters:
    ///   - buffer: where the bytes go.
    ///   - timeoutMillis: how long to wait for data; -1 waits forever.
    /// - Returns: the number of bytes read; 0 at end of stream (the guest shut down
    ///   sending, or reset the connection after sending everything).
    /// - Throws: `VsockError.timedOut`, `.closed` after `close()`, the protocol or
    ///   device error that ended the connection.
    public func read(into buffer: UnsafeMutableRawBufferPointer, timeoutMillis: Int32 = -1) throws(VsockError) -> Int {
        readLock.lock()
        defer { readLock.unlock() }
        let deadline = VsockDeadline(timeoutMillis)
        while true {
            switch device.lock.withLock({ readLocked(into: buffer) }) {
            case let .bytes(n): return n
            case let .failed(e): throw e
            case .wouldBlock:
                guard let wait = deadline.remainingMillis else { throw .timedOut }
                _ = waitReadable(readinessFD.fd.rawValue, timeoutMillis: wait)
            }
        }
    }

    /// Reads up to `maxCount` bytes into a new array (empty at end of stream).
    public func read(maxCount: Int, timeoutMillis: Int32 = -1) throws(VsockError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: maxCount)
        var n = 0
        var failure: VsockError?
        out.withUnsafeMutableBytes { b in
            do throws(VsockError) { n = try read(into: b, timeoutMillis: timeoutMillis) } catch { failure = error }
        }
        if let failure { throw failure }
        out.removeLast(maxCount - n)
        return out
    }

    /// Reads without blocking: nil when `read` would block.
    public func tryRead(into buffer: UnsafeMutableRawBufferPointer) throws(VsockError) -> Int? {
        switch device.lock.withLock({ readLocked(into: buffer) }) {
        case let .bytes(n): return n
        case let .failed(e): throw e
        case .wouldBlock: return nil
        }
    }

    private func readLocked(into buffer: UnsafeMutableRawBufferPointer) -> ReadStep {
        if let failure { return .failed(failure) }
        if closedLocally { return .failed(.closed) }
        if !received.isEmpty {
            guard buffer.count > 0 else { return .bytes(0) }
            let n = received.read(into: buffer)
            fwdCount &+= UInt32(n)
            device.consumedLocked(self)
            updateReadinessLocked()
            return .bytes(n)
        }
        if peerShutdown & VsockShutdown.send != 0 || peerReset { return .bytes(0) }
        return .wouldBlock
    }

    // MARK: Writing

    private enum WriteStep {
        case wrote(Int)
        case wait
        case failed(VsockError)
    }

    /// Writes all of `bytes`, blocking while the guest has no credit (its buf_alloc
    /// minus what is in flight) or the backlog waiting for rx buffers is full.
    /// When the guest's credit is exhausted, asks it for an update (CREDIT_REQUEST).
    /// - Parameter timeoutMillis: overall limit; -1 waits forever. On timeout some
    ///   of the bytes may have been sent.
    /// - Throws: `VsockError.timedOut`, `.brokenPipe`, `.connectionReset`, `.closed`,
    ///   or the error that ended the connection.
    public func write(_ bytes: UnsafeRawBufferPointer, timeoutMillis: Int32 = -1) throws(VsockError) {
        writeLock.lock()
        defer { writeLock.unlock() }
        let deadline = VsockDeadline(timeoutMillis)
        var done = 0
        while done < bytes.count {
            let rest = UnsafeRawBufferPointer(rebasing: bytes[done...])
            switch device.lock.withLock({ writeLocked(rest) }) {
            case let .wrote(n): done += n
            case let .failed(e): throw e
            case .wait:
                guard let wait = deadline.remainingMillis else { throw .timedOut }
                _ = waitReadable(wakeFD.fd.rawValue, timeoutMillis: wait)
            }
        }
    }

    /// Writes all of `bytes` (see `write(_:timeoutMillis:)`).
    public func write(_ bytes: [UInt8], timeoutMillis: Int32 = -1) throws(VsockError) {
        var failure: VsockError?
        bytes.withUnsafeBytes { b in
            do throws(VsockError) { try write(b, timeoutMillis: timeoutMillis) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    private func writeLocked(_ bytes: UnsafeRawBufferPointer) -> WriteStep {
        // Drain first: any change after this point signals again and ends the wait.
        wakeFD.wait()
        if let failure { return .failed(failure) }
        if closedLocally || localShutdownSend { return .failed(.closed) }
        if peerReset { return .failed(.connectionReset) }
        if peerShutdown & VsockShutdown.receive != 0 { return .failed(.brokenPipe) }
        guard phase == .connected else { return .failed(.closed) }
        let credit = peerCredit
        let room = device.configuration.maxBacklogBytes - backlogBytes
        let n = min(credit, room, bytes.count, device.configuration.maxPacketPayload)
        if n > 0 {
            outbox.append(.data(Array(UnsafeRawBufferPointer(rebasing: bytes[..<n]))))
            txCount &+= UInt32(n)
            backlogBytes += n
            device.enqueuedLocked(self)
            return .wrote(n)
        }
        // One CREDIT_REQUEST at a time: queued or delivered but unanswered.
        if credit == 0 && !creditRequestOutstanding && !creditRequestQueued {
            creditRequestOutstanding = true
            creditRequestQueued = true
            outbox.append(.control(op: VsockOp.creditRequest, flags: 0))
            device.enqueuedLocked(self)
        }
        return .wait
    }

    // MARK: Shutdown and close

    /// Tells the guest the host will send nothing more (SHUTDOWN with SEND), after
    /// the data already written. Reading continues.
    public func shutdownWrite() {
        device.lock.withLock { device.shutdownWriteLocked(self) }
    }

    /// Ends the connection: queued data is still delivered, then SHUTDOWN (both
    /// directions) and RST. Blocked readers and writers of this connection fail
    /// with `.closed`. Safe to call more than once.
    public func close() {
        device.lock.withLock { device.closeLocked(self) }
    }
}

/// A connection's identity in the table: host port and guest port.
public struct VsockConnectionKey: Hashable, Sendable {
    public var localPort: UInt32
    public var peerPort: UInt32
}

/// A deadline for poll-based waits.
struct VsockDeadline {
    private let end: UInt64?

    init(_ timeoutMillis: Int32) {
        end = timeoutMillis < 0 ? nil : monotonicNanos() + UInt64(timeoutMillis) * 1_000_000
    }

    /// Milliseconds left for poll (-1 = forever), or nil when expired.
    var remainingMillis: Int32? {
        guard let end else { return -1 }
        let now = monotonicNanos()
        guard now < end else { return nil }
        return Int32(clamping: (end - now + 999_999) / 1_000_000)
    }
}
