import GuestMemory
import SystemShims

/// A virtio-vsock device (device ID 19, virtio spec 1.2 section 5.10) with the host
/// side of every stream in this process (no vhost).
///
/// Queues: 0 = rx (device to guest), 1 = tx (guest to device), 2 = event (only
/// TRANSPORT_RESET, see `sendTransportReset()`).
/// Configuration space: `guest_cid` (le64). Feature: VIRTIO_F_VERSION_1 only.
///
/// The host opens streams to guest ports with `connect(guestPort:timeoutMillis:)`
/// and may accept guest-initiated streams with `listen(port:accept:)`. Every guest
/// packet is validated (addresses, type, length against the chain and a cap, credit,
/// connection state); a bad packet resets its connection or is answered with RST,
/// a broken descriptor chain stops the device (DEVICE_NEEDS_RESET). See
/// Docs/Vsock.md.
///
/// Threading: one lock guards the device, its queues and all connections. Guest
/// packets are handled on the transport's worker thread (`queueNotify`); rx buffers
/// are filled by whichever thread has something to send (the worker, or a host
/// thread in `write`/`connect`/`read`/`close`), under the lock.
public final class VsockDevice: VirtioDevice, @unchecked Sendable {
    // @unchecked: all mutable state is guarded by `lock`; the rest is immutable.

    /// The rx queue index (device to driver).
    public static let rxQueue = 0
    /// The tx queue index (driver to device).
    public static let txQueue = 1
    /// The event queue index.
    public static let eventQueue = 2

    public let deviceType: UInt32 = 19
    public let deviceFeatures: UInt64 = VIRTIO_F_VERSION_1
    public let queueMaxSizes: [UInt16]
    /// The guest's context ID (config space `guest_cid`).
    public let guestCID: UInt64
    /// Buffer sizes and limits.
    public let configuration: VsockConfiguration

    /// Called with a new guest-initiated connection, outside the device lock, on the
    /// device worker thread: hand it off, do not block.
    public typealias AcceptHandler = @Sendable (VsockConnection) -> Void

    let lock = Lock()
    private var memory: GuestMemory?
    private var rx: VirtQueue?
    private var tx: VirtQueue?
    private var event: VirtQueue?
    private var interrupt: VirtioInterrupt?
    private var failed = false
    private var shutDown = false
    private var lastErrorValue: String?
    private var connections: [VsockConnectionKey: VsockConnection] = [:]
    private var localPortUse: [UInt32: Int] = [:]
    private var readyList: [VsockConnection] = []
    private var pendingResets: [VsockHeader] = []
    private var listeners: [UInt32: AcceptHandler] = [:]
    private var nextPort: UInt32
    private var stats = VsockStatistics()
    private var transportResetPending = false
    /// The tx queue waits for rx buffers: `maxPendingResets` RST replies are queued, so
    /// the device takes no more guest packets until the guest posts rx buffers (its
    /// flood stalls itself; no answer is dropped and the queue stays bounded).
    private var txPaused = false
    /// How many event buffers the guest had posted right after a TRANSPORT_RESET took
    /// one: its driver posts the buffer again once it has handled the reset.
    private var eventBuffersAfterReset: UInt16?

    /// - Parameters:
    ///   - guestCID: the guest's context ID (3 or more; 0-2 are reserved).
    ///   - queueSize: maximum size of each queue (power of two).
    ///   - configuration: buffer sizes and limits.
    public init(guestCID: UInt64, queueSize: UInt16 = 256, configuration: VsockConfiguration = VsockConfiguration()) {
        precondition(guestCID > VsockCID.host && guestCID < UInt64(UInt32.max), "vsock guest CID must be 3 ... 2^32-2")
        precondition(queueSize >= 4 && queueSize & (queueSize - 1) == 0)
        precondition(configuration.maxPacketPayload > 0 && configuration.bufferSize > 0)
        self.guestCID = guestCID
        self.queueMaxSizes = [queueSize, queueSize, queueSize]
        self.configuration = configuration
        // A random start: a restored guest may still hold state for the ports the VMM
        // it was snapshotted from used, which started at the bottom of the range.
        self.nextPort = UInt32.random(in: configuration.ephemeralPorts)
    }

    /// Why the device set DEVICE_NEEDS_RESET, if it did.
    public var lastError: String? { lock.withLock { lastErrorValue } }

    /// Counters.
    public var statistics: VsockStatistics { lock.withLock { stats } }

    /// The device and its connections as plain values.
    public var state: VsockDeviceState {
        lock.withLock {
            VsockDeviceState(guestCID: guestCID, active: rx != nil, failed: failed, shutDown: shutDown,
                             connections: connections.values.map(\.stateLocked)
                                 .sorted { ($0.localPort, $0.peerPort) < ($1.localPort, $1.peerPort) },
                             listeningPorts: listeners.keys.sorted(), nextEphemeralPort: nextPort,
                             pendingResets: pendingResets.count, statistics: stats)
        }
    }

    // MARK: Host API

    /// Opens a stream to `guestPort` and waits for the guest's answer. Call from a
    /// thread that may block (never a vCPU thread).
    /// - Parameters:
    ///   - guestPort: the port a guest process listens on (the agent: 1024).
    ///   - timeoutMillis: how long to wait for RESPONSE; -1 waits forever.
    /// - Returns: the connected stream.
    /// - Throws: `VsockError.connectionRefused` (guest RST), `.timedOut`,
    ///   `.notActive`, `.noFreePort`, `.deviceReset`, `.deviceFailed`, `.deviceShutdown`.
    public func connect(guestPort: UInt32, timeoutMillis: Int32 = 5000) throws(VsockError) -> VsockConnection {
        let deadline = VsockDeadline(timeoutMillis)
        let conn: VsockConnection = try withLockTyped { () throws(VsockError) -> VsockConnection in
            if shutDown { throw .deviceShutdown }
            if failed { throw .deviceFailed(lastErrorValue ?? "driver error") }
            guard rx != nil else { throw .notActive }
            guard connections.count < configuration.maxConnections, let port = allocatePortLocked(peerPort: guestPort) else {
                throw .noFreePort
            }
            let conn = try VsockConnection(device: self, localPort: port, peerPort: guestPort, hostInitiated: true,
                                           bufAlloc: configuration.bufferSize, phase: .connecting)
            insertLocked(conn)
            conn.outbox.append(.control(op: VsockOp.request, flags: 0))
            enqueuedLocked(conn)
            return conn
        }
        while true {
            enum Step { case done, wait, failed(VsockError) }
            let step: Step = lock.withLock {
                conn.wakeFD.wait()
                if let f = conn.failure { return .failed(f) }
                switch conn.phase {
                case .connected: return .done
                case .connecting: return .wait
                case .closing, .closed: return .failed(.connectionReset)
                }
            }
            switch step {
            case .done: return conn
            case let .failed(e): throw e
            case .wait:
                guard let wait = deadline.remainingMillis else {
                    lock.withLock {
                        if conn.phase == .connecting { resetLocked(conn, failure: .timedOut) }
                    }
                    throw .timedOut
                }
                _ = waitReadable(conn.wakeFD.fd.rawValue, timeoutMillis: wait)
            }
        }
    }

    /// Accepts guest-initiated streams to host port `port`. The guest connects to
    /// CID 2, `port`; `accept` receives each new (already answered) connection.
    /// - Throws: `VsockError.portInUse` if something listens on `port` already.
    public func listen(port: UInt32, accept: @escaping AcceptHandler) throws(VsockError) {
        try withLockTyped { () throws(VsockError) in
            if shutDown { throw .deviceShutdown }
            guard listeners[port] == nil else { throw .portInUse(port) }
            listeners[port] = accept
        }
    }

    /// Stops accepting on `port` (existing connections stay).
    public func stopListening(port: UInt32) {
        _ = lock.withLock { listeners.removeValue(forKey: port) }
    }

    /// Tells the guest that every connection is gone (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    /// on the event queue, spec 5.10.6.7), e.g. after restoring a snapshot; the guest
    /// then resets its sockets. Host connections fail with `.deviceReset`. The event
    /// waits for an event buffer if the guest has none posted.
    /// Whether the guest has handled the last TRANSPORT_RESET: it was delivered and the
    /// guest has posted the event buffer again (its driver does that after resetting its
    /// sockets). A host connection made before that may be reset with them.
    public var transportResetHandled: Bool {
        lock.withLock {
            if transportResetPending { return false }
            guard let after = eventBuffersAfterReset, let q = event, let memory else { return true }
            return ((try? q.pendingCount(memory: memory)) ?? 0) > after
        }
    }

    public func sendTransportReset() {
        lock.withLock {
            guard event != nil, !failed else { return }
            dropAllConnectionsLocked(.deviceReset)
            transportResetPending = true
            deliverEventLocked()
        }
    }

    /// Tears the device down for good (VMM shutdown): every connection fails with
    /// `.deviceShutdown`, blocked readers and writers wake up, and `connect` and
    /// `listen` fail from now on. Stop the transport's worker first.
    public func shutdown() {
        lock.withLock {
            shutDown = true
            listeners.removeAll()
            dropAllConnectionsLocked(.deviceShutdown)
            memory = nil
            rx = nil
            tx = nil
            event = nil
            interrupt = nil
        }
    }

    // MARK: VirtioDevice

    public func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        // struct virtio_vsock_config { le64 guest_cid; }
        withUnsafeBytes(of: guestCID.littleEndian) { readConfigSpace($0, offset: offset, into: data) }
    }

    public func writeConfig(offset: Int, from data: UnsafeRawBufferPointer) {
        // guest_cid is read-only.
    }

    public func acceptsFeatures(_ features: UInt64) -> Bool { true }

    public func activate(memory: GuestMemory, queues: [VirtQueue], features: UInt64, interrupt: VirtioInterrupt) throws {
        guard queues.count == 3, queues[Self.rxQueue].ready, queues[Self.txQueue].ready else {
            throw VirtQueueError.notReady
        }
        lock.withLock {
            guard !shutDown else { return }
            self.memory = memory
            self.rx = queues[Self.rxQueue]
            self.tx = queues[Self.txQueue]
            self.event = queues[Self.eventQueue]
            self.interrupt = interrupt
            self.failed = false
            self.lastErrorValue = nil
        }
    }

    public func queueNotify(_ index: Int) {
        var accepted: [(AcceptHandler, VsockConnection)] = []
        lock.withLock {
            switch index {
            case Self.rxQueue:
                deliverLocked()
                if txPaused {
                    txPaused = false
                    processTxLocked(&accepted)
                }
            case Self.txQueue: processTxLocked(&accepted)
            case Self.eventQueue: deliverEventLocked()
            default: break
            }
        }
        for (handler, conn) in accepted { handler(conn) }
    }

    public func reset() {
        lock.withLock {
            dropAllConnectionsLocked(.deviceReset)
            memory = nil
            rx = nil
            tx = nil
            event = nil
            interrupt = nil
            transportResetPending = false
            txPaused = false
            failed = false
            lastErrorValue = nil
        }
    }

    public func queueStates() -> [VirtQueueState]? {
        lock.withLock {
            guard let rx, let tx, let event else { return nil }
            return [rx.state, tx.state, event.state]
        }
    }

    /// `lock.withLock` keeping the closure's error type.
    private func withLockTyped<R>(_ body: () throws(VsockError) -> R) throws(VsockError) -> R {
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }

    // MARK: Connection table (lock held)

    private func allocatePortLocked(peerPort: UInt32) -> UInt32? {
        let range = configuration.ephemeralPorts
        let span = UInt64(range.upperBound - range.lowerBound) + 1
        for _ in 0 ..< span {
            let p = nextPort
            nextPort = p >= range.upperBound ? range.lowerBound : p + 1
            if localPortUse[p] == nil && listeners[p] == nil { return p }
        }
        return nil
    }

    private func insertLocked(_ conn: VsockConnection) {
        connections[conn.key] = conn
        localPortUse[conn.localPort, default: 0] += 1
    }

    /// Takes `conn` out of the table for good.
    private func removeLocked(_ conn: VsockConnection) {
        if connections[conn.key] === conn {
            connections[conn.key] = nil
            if let n = localPortUse[conn.localPort], n > 1 { localPortUse[conn.localPort] = n - 1 }
            else { localPortUse[conn.localPort] = nil }
        }
        conn.phase = .closed
        conn.outbox.removeAll()
        conn.outboxOffset = 0
        conn.backlogBytes = 0
        conn.creditUpdateQueued = false
        conn.creditRequestQueued = false
        if conn.inReadyList {
            conn.inReadyList = false
            readyList.removeAll { $0 === conn }
        }
        conn.wakeFD.signal()
        conn.updateReadinessLocked()
    }

    /// Ends `conn` with RST (it stays in the table, `.closing`, until the RST is
    /// delivered). Queued data is discarded.
    private func resetLocked(_ conn: VsockConnection, failure: VsockError?) {
        if conn.failure == nil { conn.failure = failure }
        guard conn.phase == .connecting || conn.phase == .connected else {
            conn.wakeFD.signal()
            conn.updateReadinessLocked()
            return
        }
        conn.phase = .closing
        conn.outbox.removeAll()
        conn.outboxOffset = 0
        conn.backlogBytes = 0
        conn.creditUpdateQueued = false
        conn.creditRequestQueued = false
        conn.outbox.append(.control(op: VsockOp.rst, flags: 0))
        stats.resetsSent += 1
        enqueuedLocked(conn)
        conn.wakeFD.signal()
        conn.updateReadinessLocked()
    }

    private func dropAllConnectionsLocked(_ error: VsockError) {
        let all = Array(connections.values)
        for conn in all {
            if conn.failure == nil { conn.failure = error }
            removeLocked(conn)
        }
        connections.removeAll()
        localPortUse.removeAll()
        readyList.removeAll()
        pendingResets.removeAll()
    }

    /// `conn` has something new in its outbox: schedule it and try to deliver.
    func enqueuedLocked(_ conn: VsockConnection) {
        if !conn.inReadyList, !conn.outbox.isEmpty {
            conn.inReadyList = true
            readyList.append(conn)
        }
        deliverLocked()
    }

    /// The host application consumed received bytes of `conn`: tell the guest about
    /// the freed space when it is running low on credit or we have nothing buffered
    /// (Linux's rule in virtio_transport_stream_do_dequeue).
    func consumedLocked(_ conn: VsockConnection) {
        guard conn.phase == .connected else { return }
        let unannounced = conn.fwdCount &- conn.advertisedFwdCount
        guard unannounced > 0 else { return }
        let guestView = conn.rxCount &- conn.advertisedFwdCount  // what the guest thinks is buffered
        let guestFree = guestView >= conn.bufAlloc ? 0 : Int(conn.bufAlloc - guestView)
        if guestFree < min(configuration.maxPacketPayload, Int(conn.bufAlloc / 2)) || conn.received.isEmpty {
            queueCreditUpdateLocked(conn)
        }
    }

    private func queueCreditUpdateLocked(_ conn: VsockConnection) {
        guard !conn.creditUpdateQueued else { return }
        conn.creditUpdateQueued = true
        conn.outbox.append(.control(op: VsockOp.creditUpdate, flags: 0))
        enqueuedLocked(conn)
    }

    func shutdownWriteLocked(_ conn: VsockConnection) {
        guard conn.phase == .connected, !conn.localShutdownSend, !conn.closedLocally else { return }
        conn.localShutdownSend = true
        conn.outbox.append(.control(op: VsockOp.shutdown, flags: VsockShutdown.send))
        enqueuedLocked(conn)
        conn.wakeFD.signal()
        finishIfBothShutLocked(conn)
    }

    func closeLocked(_ conn: VsockConnection) {
        guard !conn.closedLocally else { return }
        conn.closedLocally = true
        switch conn.phase {
        case .connecting:
            resetLocked(conn, failure: nil)
        case .connected:
            // Data already written still goes out, then SHUTDOWN and RST (the guest
            // keeps what it buffered and reads end of stream).
            conn.phase = .closing
            conn.outbox.append(.control(op: VsockOp.shutdown, flags: VsockShutdown.both))
            conn.outbox.append(.control(op: VsockOp.rst, flags: 0))
            stats.resetsSent += 1
            enqueuedLocked(conn)
        case .closing, .closed:
            break
        }
        conn.wakeFD.signal()
        conn.updateReadinessLocked()
    }

    /// Both sides said they send nothing more: finish with RST.
    private func finishIfBothShutLocked(_ conn: VsockConnection) {
        guard conn.phase == .connected, conn.localShutdownSend,
              conn.peerShutdown & VsockShutdown.send != 0 else { return }
        conn.phase = .closing
        conn.outbox.append(.control(op: VsockOp.rst, flags: 0))
        stats.resetsSent += 1
        enqueuedLocked(conn)
    }

    // MARK: rx: host to guest (lock held)

    private var hasOutgoingLocked: Bool { !pendingResets.isEmpty || !readyList.isEmpty }

    /// A driver error the device cannot recover from.
    private struct FatalError: Error { var reason: String }

    private func failLocked(_ reason: String) {
        guard !failed else { return }
        failed = true
        lastErrorValue = reason
        interrupt?.signalNeedsReset()
        dropAllConnectionsLocked(.deviceFailed(reason))
    }

    /// Fills posted rx buffers with queued packets: pending RST replies first, then
    /// one packet per connection in turn.
    private func deliverLocked() {
        guard !failed, var q = rx, let memory, let interrupt, q.ready, hasOutgoingLocked else { return }
        var used = 0
        do {
            while hasOutgoingLocked {
                guard let chain = try q.popAvailable(memory: memory) else { break }
                guard chain.readable.isEmpty, chain.writableLength >= VsockHeader.size else {
                    throw FatalError(reason: "rx chain \(chain.head): \(chain.readableLength) readable and \(chain.writableLength) writable bytes (want 0 and >= \(VsockHeader.size))")
                }
                let capacity = min(chain.writableLength - VsockHeader.size, configuration.maxPacketPayload)
                guard let (header, payload) = nextPacketLocked(capacity: capacity) else {
                    // Only data is left and this buffer has no room for payload.
                    q.undoPop()
                    break
                }
                do {
                    try chain.writeBytes(header.bytes, to: memory, offset: 0)
                    if !payload.isEmpty {
                        try payload.withUnsafeBytes { try chain.write(to: memory, offset: VsockHeader.size, from: $0) }
                    }
                } catch {
                    throw FatalError(reason: "rx chain \(chain.head): \(error)")
                }
                try q.addUsed(memory: memory, head: chain.head, length: UInt32(VsockHeader.size + payload.count))
                stats.packetsToGuest += 1
                used += 1
            }
            if used > 0, try q.needsInterrupt(memory: memory) {
                interrupt.signalUsedBuffer()
            }
            rx = q
        } catch let e as FatalError {
            failLocked(e.reason)
        } catch {
            failLocked("rx virtqueue: \(error)")
        }
    }

    /// Writes a pending TRANSPORT_RESET event (struct virtio_vsock_event { le32 id; },
    /// id 0) into the next event buffer.
    private func deliverEventLocked() {
        guard transportResetPending, !failed, var q = event, q.ready, let memory, let interrupt else { return }
        do {
            guard let chain = try q.popAvailable(memory: memory) else { return }
            guard chain.readable.isEmpty, chain.writableLength >= 4 else {
                throw FatalError(reason: "event chain \(chain.head): \(chain.readableLength) readable and \(chain.writableLength) writable bytes (want 0 and >= 4)")
            }
            do { try chain.writeBytes([0, 0, 0, 0], to: memory, offset: 0) } catch {
                throw FatalError(reason: "event chain \(chain.head): \(error)")
            }
            try q.addUsed(memory: memory, head: chain.head, length: 4)
            transportResetPending = false
            eventBuffersAfterReset = try q.pendingCount(memory: memory)
            if try q.needsInterrupt(memory: memory) { interrupt.signalUsedBuffer() }
            event = q
        } catch let e as FatalError {
            failLocked(e.reason)
        } catch {
            failLocked("event virtqueue: \(error)")
        }
    }

    /// The next packet for a buffer with `capacity` payload bytes, or nil if only
    /// data is pending and `capacity` is 0.
    private func nextPacketLocked(capacity: Int) -> (VsockHeader, ArraySlice<UInt8>)? {
        if !pendingResets.isEmpty {
            return (pendingResets.removeFirst(), [])
        }
        for _ in 0 ..< readyList.count {
            let conn = readyList.removeFirst()
            guard let item = conn.outbox.first else {
                conn.inReadyList = false
                continue
            }
            var header = VsockHeader(srcCID: VsockCID.host, dstCID: guestCID, srcPort: conn.localPort,
                                     dstPort: conn.peerPort, op: VsockOp.rw,
                                     bufAlloc: conn.bufAlloc, fwdCnt: conn.fwdCount)
            var payload: ArraySlice<UInt8> = []
            switch item {
            case let .control(op, flags):
                header.op = op
                header.flags = flags
                conn.outbox.removeFirst()
                if op == VsockOp.creditUpdate { conn.creditUpdateQueued = false }
                if op == VsockOp.creditRequest { conn.creditRequestQueued = false }
            case let .data(bytes):
                guard capacity > 0 else {
                    readyList.append(conn)
                    continue
                }
                let n = min(capacity, bytes.count - conn.outboxOffset)
                payload = bytes[conn.outboxOffset ..< conn.outboxOffset + n]
                header.len = UInt32(n)
                conn.outboxOffset += n
                conn.backlogBytes -= n
                if conn.outboxOffset == bytes.count {
                    conn.outbox.removeFirst()
                    conn.outboxOffset = 0
                }
                conn.wakeFD.signal()  // backlog room for writers
            }
            // Every packet carries our current credit.
            conn.advertisedFwdCount = conn.fwdCount
            if header.op == VsockOp.rst {
                // RST is the last word on a connection.
                removeLocked(conn)
            } else if conn.outbox.isEmpty {
                conn.inReadyList = false
            } else {
                readyList.append(conn)
            }
            return (header, payload)
        }
        return nil
    }

    /// Queues RST in reply to `packet`, which belongs to no connection.
    private func replyResetLocked(to packet: VsockHeader) {
        guard packet.op != VsockOp.rst else { return }  // never answer RST with RST
        guard pendingResets.count < configuration.maxPendingResets else {
            stats.resetsDropped += 1
            return
        }
        pendingResets.append(VsockHeader(srcCID: VsockCID.host, dstCID: guestCID, srcPort: packet.dstPort,
                                         dstPort: packet.srcPort, type: VsockType.stream, op: VsockOp.rst))
        stats.resetsSent += 1
    }

    // MARK: tx: guest to host (lock held)

    private func processTxLocked(_ accepted: inout [(AcceptHandler, VsockConnection)]) {
        guard !failed, var q = tx, let memory, let interrupt, q.ready else { return }
        do {
            repeat {
                var used = 0
                var paused = false
                while !failed {
                    if pendingResets.count >= configuration.maxPendingResets {
                        deliverLocked()  // into the rx buffers the guest has posted
                        if pendingResets.count >= configuration.maxPendingResets { paused = true; break }
                    }
                    guard !failed, let chain = try q.popAvailable(memory: memory) else { break }
                    // Replies (RST, RESPONSE, credit) are delivered on the rx queue as
                    // they are queued; a driver error there sets `failed`.
                    try handleTxChainLocked(chain, memory, &accepted)
                    try q.addUsed(memory: memory, head: chain.head, length: 0)
                    used += 1
                }
                if failed { return }
                if used > 0, try q.needsInterrupt(memory: memory) {
                    interrupt.signalUsedBuffer()
                }
                if paused {
                    // Resumed by the guest's next rx notify (queueNotify).
                    txPaused = true
                    tx = q
                    return
                }
            } while try q.enableNotification(memory: memory)
            tx = q
            deliverLocked()  // RST replies to packets for unknown connections
        } catch let e as FatalError {
            failLocked(e.reason)
        } catch {
            failLocked("tx virtqueue: \(error)")
        }
    }

    private func handleTxChainLocked(_ chain: DescriptorChain, _ memory: GuestMemory,
                                     _ accepted: inout [(AcceptHandler, VsockConnection)]) throws {
        guard chain.writable.isEmpty, chain.readableLength >= VsockHeader.size else {
            throw FatalError(reason: "tx chain \(chain.head): \(chain.readableLength) readable and \(chain.writableLength) writable bytes (want >= \(VsockHeader.size) and 0)")
        }
        stats.packetsFromGuest += 1
        let header: VsockHeader
        do {
            header = VsockHeader(decoding: try chain.readBytes(from: memory, offset: 0, count: VsockHeader.size))
        } catch {
            throw FatalError(reason: "tx chain \(chain.head): \(error)")
        }
        let key = VsockConnectionKey(localPort: header.dstPort, peerPort: header.srcPort)

        // Addressing, type and length come before any connection state.
        var problem: String? = nil
        if header.srcCID != guestCID {
            problem = "src_cid \(header.srcCID) is not the guest's \(guestCID)"
        } else if header.dstCID != VsockCID.host {
            problem = "dst_cid \(header.dstCID) is not the host's \(VsockCID.host)"
        } else if header.type != VsockType.stream {
            problem = "type \(header.type) is not STREAM"
        } else if Int(header.len) > configuration.maxPacketPayload {
            problem = "len \(header.len) above the \(configuration.maxPacketPayload)-byte packet limit"
        } else if Int(header.len) > chain.readableLength - VsockHeader.size {
            problem = "len \(header.len) but the chain has \(chain.readableLength - VsockHeader.size) payload bytes"
        }
        if let problem {
            rejectLocked(header, key: key, reason: problem)
            return
        }

        guard let conn = connections[key] else {
            if header.op == VsockOp.request, let handler = listeners[header.dstPort] {
                acceptLocked(header, handler: handler, &accepted)
            } else {
                if header.op != VsockOp.rst { stats.rejectedPackets += 1 }
                replyResetLocked(to: header)
            }
            return
        }
        try handleConnectionPacketLocked(conn, header, chain, memory)
    }

    /// Refuses a packet: its connection (if any) ends with RST, otherwise RST goes
    /// back to the sender's port.
    private func rejectLocked(_ header: VsockHeader, key: VsockConnectionKey, reason: String) {
        stats.rejectedPackets += 1
        if let conn = connections[key] {
            if header.op == VsockOp.rst {
                removeLocked(conn)
                if conn.failure == nil { conn.failure = .protocolViolation(reason) }
                conn.updateReadinessLocked()
            } else {
                resetLocked(conn, failure: .protocolViolation(reason))
            }
        } else {
            replyResetLocked(to: header)
        }
    }

    private func acceptLocked(_ header: VsockHeader, handler: @escaping AcceptHandler,
                              _ accepted: inout [(AcceptHandler, VsockConnection)]) {
        guard connections.count < configuration.maxConnections,
              let conn = try? VsockConnection(device: self, localPort: header.dstPort, peerPort: header.srcPort,
                                              hostInitiated: false, bufAlloc: configuration.bufferSize,
                                              phase: .connected) else {
            stats.rejectedPackets += 1
            replyResetLocked(to: header)
            return
        }
        conn.peerBufAlloc = header.bufAlloc
        conn.peerFwdCount = header.fwdCnt
        insertLocked(conn)
        conn.outbox.append(.control(op: VsockOp.response, flags: 0))
        enqueuedLocked(conn)
        accepted.append((handler, conn))
    }

    /// The connection state machine for one validated guest packet.
    private func handleConnectionPacketLocked(_ conn: VsockConnection, _ header: VsockHeader,
                                              _ chain: DescriptorChain, _ memory: GuestMemory) throws {
        func violation(_ what: String) {
            stats.rejectedPackets += 1
            resetLocked(conn, failure: .protocolViolation(what))
        }
        switch conn.phase {
        case .closed:
            return  // not in the table; cannot happen
        case .closing:
            // Our RST is on its way; the guest's RST ends it now, the rest is dropped.
            if header.op == VsockOp.rst { removeLocked(conn) }
            return
        case .connecting:
            conn.peerBufAlloc = header.bufAlloc
            conn.peerFwdCount = header.fwdCnt
            switch header.op {
            case VsockOp.response:
                conn.phase = .connected
                conn.wakeFD.signal()
            case VsockOp.rst:
                conn.failure = .connectionRefused(port: conn.peerPort)
                removeLocked(conn)
            default:
                violation("\(VsockOp.name(header.op)) while connecting")
            }
        case .connected:
            // Every packet carries the guest's credit (spec 5.10.6.3).
            conn.peerBufAlloc = header.bufAlloc
            conn.peerFwdCount = header.fwdCnt
            conn.creditRequestOutstanding = false
            conn.wakeFD.signal()
            switch header.op {
            case VsockOp.rw:
                guard conn.peerShutdown & VsockShutdown.send == 0 else {
                    return violation("RW after the guest shut down sending")
                }
                let len = Int(header.len)
                guard len > 0 else { return }
                guard conn.received.count + len <= Int(conn.bufAlloc) else {
                    return violation("\(len) bytes with \(Int(conn.bufAlloc) - conn.received.count) bytes of credit")
                }
                do {
                    try conn.received.append(from: chain, memory: memory, offset: VsockHeader.size, count: len)
                } catch {
                    throw FatalError(reason: "tx chain \(chain.head): \(error)")
                }
                conn.rxCount &+= UInt32(len)
                conn.updateReadinessLocked()
            case VsockOp.creditUpdate:
                break
            case VsockOp.creditRequest:
                queueCreditUpdateLocked(conn)
            case VsockOp.shutdown:
                conn.peerShutdown |= header.flags & VsockShutdown.both
                conn.updateReadinessLocked()
                finishIfBothShutLocked(conn)
            case VsockOp.rst:
                conn.peerReset = true
                removeLocked(conn)
            default:
                violation("\(VsockOp.name(header.op)) on an open connection")
            }
        }
    }
}
