#if canImport(Glibc)
import Glibc
#endif
import CURing
import SystemShims

/// A piece of a disk access mapped onto a host file: `length` bytes at
/// `fileOffset` of `fd`, corresponding to bytes [bufferOffset, bufferOffset+length)
/// of the request's buffer.
public struct FileSegment: Equatable, Sendable {
    public var fd: Int32
    public var fileOffset: UInt64
    public var bufferOffset: Int
    public var length: Int
    public init(fd: Int32, fileOffset: UInt64, bufferOffset: Int, length: Int) {
        self.fd = fd
        self.fileOffset = fileOffset
        self.bufferOffset = bufferOffset
        self.length = length
    }
}

/// Disk access errors.
public enum BlockBackendError: Error, Equatable, Sendable {
    /// [offset, offset+length) is not inside the disk.
    case outOfRange(offset: UInt64, length: Int)
    /// Write to a read-only disk.
    case readOnly
    /// A host I/O call failed.
    case io(SystemError)
}

/// The storage behind a virtio-blk device. A backend does not do I/O itself: it maps
/// a disk range onto host file segments, which an I/O engine (io_uring or
/// pread/pwrite) then executes, so that all segments of all requests of one notify
/// round go out in one batch. Synchronous `read`/`write`/`flush` helpers are provided
/// on top.
public protocol BlockBackend: AnyObject, Sendable {
    /// Size of the disk in bytes.
    var capacity: UInt64 { get }
    /// Whether writes are refused.
    var isReadOnly: Bool { get }
    /// Maps a read of `length` bytes at disk `offset`. Byte ranges not covered by a
    /// segment read as zeros; segments may return fewer bytes at end of file (the rest
    /// reads as zeros).
    func mapRead(offset: UInt64, length: Int) throws(BlockBackendError) -> [FileSegment]
    /// Maps a write of `length` bytes at disk `offset`, preparing the target (e.g.
    /// copy-on-write of partially written blocks) so that writing the returned
    /// segments completes the write.
    func mapWrite(offset: UInt64, length: Int) throws(BlockBackendError) -> [FileSegment]
    /// Descriptors to fdatasync for a flush.
    var flushDescriptors: [Int32] { get }
    /// Releases the backend's files. Idempotent; later accesses fail with EBADF.
    func close()
}

extension BlockBackend {
    /// Checks that [offset, offset+length) lies inside the disk, without overflow.
    public func checkRange(offset: UInt64, length: Int) throws(BlockBackendError) {
        guard length >= 0 else { throw .outOfRange(offset: offset, length: length) }
        let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
        guard !overflow, end <= capacity else { throw .outOfRange(offset: offset, length: length) }
    }

    /// Reads `buffer.count` bytes at disk `offset` (synchronously, pread).
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlockBackendError) {
        let segments = try mapRead(offset: offset, length: buffer.count)
        if buffer.count > 0 { buffer.initializeMemory(as: UInt8.self, repeating: 0) }
        for s in segments {
            do {
                // SAFETY: mapRead returns segments inside [0, buffer.count).
                try SyncEngine.readFully(fd: s.fd, into: UnsafeMutableRawBufferPointer(rebasing: buffer[s.bufferOffset ..< s.bufferOffset + s.length]), at: s.fileOffset)
            } catch { throw .io(error) }
        }
    }

    /// Writes `buffer` at disk `offset` (synchronously, pwrite).
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlockBackendError) {
        let segments = try mapWrite(offset: offset, length: buffer.count)
        guard let base = buffer.baseAddress else { return }
        for s in segments {
            // SAFETY: mapWrite returns segments inside [0, buffer.count); pwrite only
            // reads through the pointer, the mutable cast is for IOOperation's type.
            let op = IOOperation(kind: .write, fd: s.fd, buffer: UnsafeMutableRawPointer(mutating: base + s.bufferOffset),
                                 length: s.length, offset: s.fileOffset)
            do { try SyncEngine.perform(op, from: 0) } catch { throw .io(error) }
        }
    }

    /// fdatasync on every flush descriptor.
    public func flush() throws(BlockBackendError) {
        for fd in flushDescriptors {
            do { try retryingEINTR("fdatasync") { fdatasync(fd) } } catch { throw .io(error) }
        }
    }
}

/// One primitive host I/O operation for an engine.
public struct IOOperation: @unchecked Sendable {
    // @unchecked: `buffer` points at a host bounce buffer owned by the caller for the
    // duration of `perform`.
    public enum Kind: Sendable, Equatable { case read, write, fdatasync }
    public var kind: Kind
    public var fd: Int32
    public var buffer: UnsafeMutableRawPointer?
    public var length: Int
    public var offset: UInt64
    public init(kind: Kind, fd: Int32, buffer: UnsafeMutableRawPointer?, length: Int, offset: UInt64) {
        self.kind = kind
        self.fd = fd
        self.buffer = buffer
        self.length = length
        self.offset = offset
    }
}

/// Executes batches of host I/O for a block device (on the device worker thread).
public protocol BlockIOEngine: AnyObject, Sendable {
    /// Which engine this is.
    var kind: BlockEngineKind { get }
    /// Performs every operation and returns, per operation, 0 or -errno. Reads that
    /// hit end of file fill the rest of their buffer with zeros; short transfers are
    /// continued until complete.
    func perform(_ operations: [IOOperation]) -> [Int32]
}

/// The available block I/O engines.
public enum BlockEngineKind: String, Sendable, Equatable, CaseIterable {
    /// io_uring through CURing: one batched submission per notify round.
    case ioUring = "io_uring"
    /// pread/pwrite, one call per segment (fallback when io_uring is unavailable).
    case sync = "sync"

    /// An engine choice and why it was made (for `sandbox doctor`).
    public struct Selection: Sendable, Equatable {
        public var kind: BlockEngineKind
        public var reason: String
    }

    /// Picks io_uring when a probe ring can be created, else pread/pwrite.
    public static var auto: Selection {
        let rc = curing_probe()
        if rc >= 1 { return Selection(kind: .ioUring, reason: "io_uring probe ring created") }
        let err = SystemError("io_uring_setup", errno: -rc)
        return Selection(kind: .sync, reason: "io_uring unavailable (\(err.message)); using pread/pwrite")
    }

    /// Creates an engine of this kind.
    public func makeEngine() throws(SystemError) -> any BlockIOEngine {
        switch self {
        case .ioUring: return try IOUringEngine()
        case .sync: return SyncEngine()
        }
    }
}
