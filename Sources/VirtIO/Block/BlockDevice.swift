import GuestMemory
import Synchronization
import SystemShims

/// virtio-blk feature bits (virtio spec 5.2.3).
public enum VirtioBlockFeature {
    public static let segMax: UInt64 = 1 << 2
    public static let readOnly: UInt64 = 1 << 5
    public static let blockSize: UInt64 = 1 << 6
    public static let flush: UInt64 = 1 << 9
}

/// virtio-blk request types and status values (virtio spec 5.2.6).
public enum VirtioBlockRequest {
    public static let typeIn: UInt32 = 0
    public static let typeOut: UInt32 = 1
    public static let typeFlush: UInt32 = 4
    public static let typeGetID: UInt32 = 8
    public static let statusOK: UInt8 = 0
    public static let statusIOError: UInt8 = 1
    public static let statusUnsupported: UInt8 = 2
    /// Size of `struct virtio_blk_req`'s header (type, reserved, sector).
    public static let headerSize = 16
    /// Length of the GET_ID string.
    public static let idBytes = 20
}

/// A virtio-blk device (device ID 2) with one request queue.
///
/// Every chain is checked: the 16-byte header must be device-readable, the status
/// byte is the last device-writable byte, data lengths are multiples of 512 and
/// sector ranges are checked against the capacity without overflow. A bad request
/// completes with VIRTIO_BLK_S_IOERR (or UNSUPP for unknown types). A chain that
/// breaks the virtqueue rules, or has no writable status byte, stops the device and
/// sets DEVICE_NEEDS_RESET (`lastError` says why).
///
/// All requests popped in one notify round are mapped onto host file segments and
/// handed to the I/O engine as one batch (one io_uring submission), then completed
/// together with at most one interrupt. Data moves through host bounce buffers.
public final class BlockDevice: VirtioDevice, Sendable {

    /// Largest data part of one request; bigger requests get IOERR. Linux's default
    /// limit is 1.25 MiB (max_sectors_kb).
    public static let maxRequestBytes = 32 << 20
    /// A notify round stops popping once its bounce buffers reach this size.
    public static let maxBatchBytes = 64 << 20

    public let deviceType: UInt32 = 2
    public let deviceFeatures: UInt64
    public let queueMaxSizes: [UInt16]
    /// The storage.
    public let backend: any BlockBackend
    /// The host I/O engine.
    public let engine: any BlockIOEngine
    /// The GET_ID serial (at most 20 bytes, zero-padded).
    public let serial: [UInt8]
    private let config: [UInt8]

    /// The activation state.
    private struct State {
        var memory: GuestMemory?
        var queue: VirtQueue?
        var interrupt: VirtioInterrupt?
        var broken = false
        var lastError: String?
    }
    private let state = Mutex(State())

    /// - Parameters:
    ///   - backend: the disk.
    ///   - engine: the I/O engine (see `BlockEngineKind.auto`).
    ///   - serial: the GET_ID string (truncated to 20 bytes).
    ///   - queueSize: maximum queue size (power of two).
    public init(backend: any BlockBackend, engine: any BlockIOEngine, serial: String = "sandbox", queueSize: UInt16 = 256) {
        precondition(queueSize >= 4 && queueSize & (queueSize - 1) == 0)
        self.backend = backend
        self.engine = engine
        self.serial = Array(serial.utf8.prefix(VirtioBlockRequest.idBytes))
        self.queueMaxSizes = [queueSize]
        var features = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX
            | VirtioBlockFeature.segMax | VirtioBlockFeature.blockSize | VirtioBlockFeature.flush
        if backend.isReadOnly { features |= VirtioBlockFeature.readOnly }
        self.deviceFeatures = features
        // struct virtio_blk_config up to blk_size: capacity u64 @0, size_max u32 @8,
        // seg_max u32 @12, geometry @16, blk_size u32 @20; the rest reads as zero.
        var c = [UInt8](repeating: 0, count: 60)
        func put<T: FixedWidthInteger>(_ v: T, at offset: Int) {
            withUnsafeBytes(of: v.littleEndian) { for (i, b) in $0.enumerated() { c[offset + i] = b } }
        }
        put(backend.capacity / 512, at: 0)
        put(UInt32(queueSize - 2), at: 12)
        put(UInt32(512), at: 20)
        self.config = c
    }

    /// Creates a device over a copy-on-write view of `baseImage` (grown to
    /// `minimumCapacity` if that is larger; with `layer` between base and overlay), with the overlay in
    /// `overlayDirectory` and the engine picked by `BlockEngineKind.auto` (or `engine`).
    /// - Throws: `SystemError` if the files or the io_uring ring cannot be created.
    public convenience init(baseImage: String, overlayDirectory: String, keepOverlay: Bool = false,
                            minimumCapacity: UInt64? = nil, layer: DiskLayer? = nil,
                            serial: String = "sandbox", engine kind: BlockEngineKind = BlockEngineKind.auto.kind) throws(SystemError) {
        let disk = try CopyOnWriteDisk(baseImage: baseImage, overlayDirectory: overlayDirectory, keepOverlay: keepOverlay,
                                       minimumCapacity: minimumCapacity, layer: layer)
        self.init(backend: disk, engine: try kind.makeEngine(), serial: serial)
    }

    /// Why the device set DEVICE_NEEDS_RESET, if it did.
    public var lastError: String? { state.withLock { $0.lastError } }

    /// Deactivates the device and closes the backend (teardown; the transport's worker
    /// must be stopped first).
    public func close() {
        reset()
        backend.close()
    }

    // MARK: VirtioDevice

    public func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        config.withUnsafeBytes { readConfigSpace($0, offset: offset, into: data) }
    }

    public func writeConfig(offset: Int, from data: UnsafeRawBufferPointer) {
        // No writable fields (CONFIG_WCE is not offered).
    }

    public func acceptsFeatures(_ features: UInt64) -> Bool { true }

    public func activate(memory: GuestMemory, queues: [VirtQueue], features: UInt64, interrupt: VirtioInterrupt) throws {
        guard queues.count == 1, queues[0].ready else { throw VirtQueueError.notReady }
        state.withLock { s in
            s.memory = memory
            s.queue = queues[0]
            s.interrupt = interrupt
            s.broken = false
        }
    }

    public func queueNotify(_ index: Int) {
        guard index == 0 else { return }
        state.withLock { s in processQueue(&s) }
    }

    public func reset() {
        state.withLock { s in
            s.memory = nil
            s.queue = nil
            s.interrupt = nil
            s.broken = false
            s.lastError = nil
        }
    }

    public func queueStates() -> [VirtQueueState]? {
        state.withLock { s in s.queue.map { [$0.state] } }
    }

    // MARK: Request processing (inside `state.withLock`)

    /// A request whose host I/O is in the current batch.
    private struct Pending {
        var chain: DescriptorChain
        var isRead: Bool
        var isFlush = false
        var buffer: UnsafeMutableRawBufferPointer?
        var ops: Range<Int>
        var dataLength: Int
    }

    /// A driver error that makes the device stop (DEVICE_NEEDS_RESET).
    private struct FatalError: Error { var reason: String }

    private func processQueue(_ s: inout State) {
        guard var q = s.queue, let memory = s.memory, let interrupt = s.interrupt, !s.broken else { return }
        do {
            repeat {
                try runRound(&q, memory, interrupt)
            } while try q.enableNotification(memory: memory)
        } catch let e as VirtQueueError {
            fail(&s, "virtqueue: \(e)", interrupt)
        } catch let e as FatalError {
            fail(&s, e.reason, interrupt)
        } catch {
            fail(&s, "\(error)", interrupt)
        }
        if !s.broken { s.queue = q }
    }

    private func fail(_ s: inout State, _ reason: String, _ interrupt: VirtioInterrupt) {
        s.broken = true
        s.lastError = reason
        interrupt.signalNeedsReset()
    }

    /// Pops what is available (up to the batch limit), performs the I/O as one batch
    /// and completes every request.
    private func runRound(_ q: inout VirtQueue, _ memory: GuestMemory, _ interrupt: VirtioInterrupt) throws {
        var pending: [Pending] = []
        var ops: [IOOperation] = []
        var flushOps: [IOOperation] = []
        var batchBytes = 0
        var completed = 0
        defer { for p in pending { p.buffer?.deallocate() } }

        // A fatal driver error stops popping, but what was already prepared (e.g.
        // copy-on-write blocks already claimed by a write) is still carried out.
        var fatal: (any Error)? = nil
        while batchBytes < Self.maxBatchBytes {
            do {
                guard let chain = try q.popAvailable(memory: memory) else { break }
                switch try prepare(chain, memory, &ops, &flushOps) {
                case let .pending(p):
                    pending.append(p)
                    batchBytes += p.dataLength
                case let .answered(usedLength):
                    completed += 1
                    try q.addUsed(memory: memory, head: chain.head, length: usedLength)
                }
            } catch {
                fatal = error
                break
            }
        }

        let results = engine.perform(ops)
        let flushResults = flushOps.isEmpty ? [] : engine.perform(flushOps)
        let flushOK = flushResults.allSatisfy { $0 == 0 }

        for p in pending {
            var ok = p.ops.allSatisfy { results[$0] == 0 }
            if p.isFlush { ok = flushOK }
            var usedLength: UInt32 = 1
            if ok, p.isRead, let buffer = p.buffer {
                try p.chain.write(to: memory, offset: 0, from: UnsafeRawBufferPointer(buffer))
                usedLength += UInt32(p.dataLength)
            }
            try writeStatus(ok ? VirtioBlockRequest.statusOK : VirtioBlockRequest.statusIOError, p.chain, memory)
            try q.addUsed(memory: memory, head: p.chain.head, length: usedLength)
            completed += 1
        }
        if completed > 0, try q.needsInterrupt(memory: memory) {
            interrupt.signalUsedBuffer()
        }
        if let fatal { throw fatal }
    }

    /// What `prepare` did with a request.
    private enum Prepared {
        /// Host I/O queued in the batch.
        case pending(Pending)
        /// Answered at once; the status is written and `usedLength` bytes were written.
        case answered(usedLength: UInt32)
    }

    private func writeStatus(_ status: UInt8, _ chain: DescriptorChain, _ memory: GuestMemory) throws {
        do {
            try chain.writeBytes([status], to: memory, offset: chain.writableLength - 1)
        } catch {
            throw FatalError(reason: "cannot write status of chain \(chain.head): \(error)")
        }
    }

    /// Validates a request and either queues its I/O or answers it at once.
    private func prepare(_ chain: DescriptorChain, _ memory: GuestMemory,
                         _ ops: inout [IOOperation], _ flushOps: inout [IOOperation]) throws -> Prepared {
        guard chain.writableLength >= 1 else {
            throw FatalError(reason: "chain \(chain.head) has no writable status byte")
        }
        func answer(_ status: UInt8, written: Int = 0) throws -> Prepared {
            try writeStatus(status, chain, memory)
            return .answered(usedLength: UInt32(written + 1))
        }
        guard chain.readableLength >= VirtioBlockRequest.headerSize else {
            return try answer(VirtioBlockRequest.statusIOError)
        }
        let header = try chain.readBytes(from: memory, offset: 0, count: VirtioBlockRequest.headerSize)
        let type = header.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 0, as: UInt32.self)) }
        let sector = header.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)) }
        let extraReadable = chain.readableLength - VirtioBlockRequest.headerSize
        let extraWritable = chain.writableLength - 1

        switch type {
        case VirtioBlockRequest.typeIn, VirtioBlockRequest.typeOut:
            let isRead = type == VirtioBlockRequest.typeIn
            let length = isRead ? extraWritable : extraReadable
            guard (isRead ? extraReadable : extraWritable) == 0,
                  length % 512 == 0, length <= Self.maxRequestBytes,
                  sector <= UInt64.max / 512 else {
                return try answer(VirtioBlockRequest.statusIOError)
            }
            if !isRead && backend.isReadOnly { return try answer(VirtioBlockRequest.statusIOError) }
            let offset = sector * 512
            let segments: [FileSegment]
            do {
                segments = isRead ? try backend.mapRead(offset: offset, length: length)
                                  : try backend.mapWrite(offset: offset, length: length)
            } catch {
                return try answer(VirtioBlockRequest.statusIOError)
            }
            guard length > 0 else { return try answer(VirtioBlockRequest.statusOK) }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: 4096)
            if isRead {
                if segments.reduce(0, { $0 + $1.length }) != length {
                    buffer.initializeMemory(as: UInt8.self, repeating: 0)  // gaps read as zeros
                }
            } else {
                do {
                    try chain.read(from: memory, offset: VirtioBlockRequest.headerSize, into: buffer)
                } catch {
                    buffer.deallocate()
                    throw FatalError(reason: "cannot read data of chain \(chain.head): \(error)")
                }
            }
            let first = ops.count
            for s in segments {
                // SAFETY: backends return segments inside [0, length); `buffer` lives
                // until the batch has completed (deallocated in runRound's defer).
                ops.append(IOOperation(kind: isRead ? .read : .write, fd: s.fd, buffer: buffer.baseAddress! + s.bufferOffset,
                                       length: s.length, offset: s.fileOffset))
            }
            return .pending(Pending(chain: chain, isRead: isRead, buffer: buffer, ops: first ..< ops.count, dataLength: length))

        case VirtioBlockRequest.typeFlush:
            guard extraReadable == 0, extraWritable == 0 else { return try answer(VirtioBlockRequest.statusIOError) }
            for fd in backend.flushDescriptors {
                flushOps.append(IOOperation(kind: .fdatasync, fd: fd, buffer: nil, length: 0, offset: 0))
            }
            return .pending(Pending(chain: chain, isRead: false, isFlush: true, buffer: nil, ops: ops.count ..< ops.count, dataLength: 0))

        case VirtioBlockRequest.typeGetID:
            guard extraReadable == 0, extraWritable >= VirtioBlockRequest.idBytes else {
                return try answer(VirtioBlockRequest.statusIOError)
            }
            var id = serial
            id.append(contentsOf: [UInt8](repeating: 0, count: VirtioBlockRequest.idBytes - id.count))
            try chain.writeBytes(id, to: memory, offset: 0)
            return try answer(VirtioBlockRequest.statusOK, written: VirtioBlockRequest.idBytes)

        default:
            return try answer(VirtioBlockRequest.statusUnsupported)
        }
    }
}
