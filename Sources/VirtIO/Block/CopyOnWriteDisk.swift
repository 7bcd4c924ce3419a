#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import SystemShims

/// A copy-on-write view of a shared, read-only base image.
///
/// ```
///   disk offset:  0        4K       8K       12K ...
///   bitmap:       0        1        0        1
///   reads from:   base     overlay  base     overlay
/// ```
///
/// The base image is opened `O_RDONLY` and never written. Writes go to a private
/// sparse overlay file of the same size (same offsets), created in a given directory;
/// an in-memory bitmap records which 4 KiB blocks the overlay holds. A write that
/// covers a block only partially first copies that block from the base into the
/// overlay (read-modify-write). Unless `keepOverlay` is set, the overlay file is
/// unlinked right after creation, so nothing is left on disk even if the process is
/// killed; its space is freed when the disk is closed.
///
/// The disk may be larger than the base (`minimumCapacity`): the blocks past the base's
/// end belong to the overlay from the start and read as zeros until written, so the
/// growth costs no host space until the guest uses it.
public final class CopyOnWriteDisk: BlockBackend, Sendable {
    /// Copy-on-write granularity.
    public static let blockSize = 4096

    /// Disk size: the base image size rounded down to 512-byte sectors, or the
    /// requested larger size rounded down to whole blocks.
    public let capacity: UInt64
    /// The part of the disk backed by the base image (its size rounded down to sectors).
    public let baseCapacity: UInt64
    public var isReadOnly: Bool { false }
    /// The base image.
    public let baseImagePath: String
    /// The overlay file (already unlinked unless `keepsOverlay`).
    public let overlayPath: String
    /// Whether the overlay file stays on disk after close.
    public let keepsOverlay: Bool

    // The descriptors are closed only once, by close() inside `state.withLock`.
    private let base: FileDescriptor
    private let overlay: FileDescriptor
    private struct State {
        /// One bit per block: set when the overlay holds the block.
        var bitmap: [UInt64]
        var closed = false

        func isInOverlay(_ block: Int) -> Bool {
            bitmap[block / 64] & (1 << UInt64(block % 64)) != 0
        }

        mutating func markInOverlay(_ block: Int) {
            bitmap[block / 64] |= 1 << UInt64(block % 64)
        }
    }
    private let state: Mutex<State>

    /// Opens `baseImage` read-only and creates the overlay in `overlayDirectory`.
    /// - Parameters:
    ///   - baseImage: path of the shared base image (never opened for writing).
    ///   - overlayDirectory: where the sparse overlay file is created.
    ///   - keepOverlay: keep the overlay file after close (debugging); by default it
    ///     is unlinked immediately.
    ///   - minimumCapacity: grow the disk to this size (rounded down to 4 KiB blocks)
    ///     when the base is smaller; nil or a smaller value keeps the base's size.
    /// - Throws: `SystemError` if a file cannot be opened or created.
    public init(baseImage: String, overlayDirectory: String, keepOverlay: Bool = false,
                minimumCapacity: UInt64? = nil) throws(SystemError) {
        base = try FileDescriptor.open(baseImage, O_RDONLY)
        let size = try base.size()
        let baseCapacity = size - size % 512
        let bs = UInt64(Self.blockSize)
        let grown = (minimumCapacity ?? 0) / bs * bs
        let capacity = max(baseCapacity, grown)
        self.baseCapacity = baseCapacity
        self.capacity = capacity
        baseImagePath = baseImage
        keepsOverlay = keepOverlay
        var template = Array((overlayDirectory + "/sandbox-overlay-XXXXXX").utf8CString)
        // SAFETY: `template` is a NUL-terminated mutable buffer that mkostemp rewrites in place.
        let fd = try retryingEINTR("mkstemp(\(overlayDirectory))") { template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) } }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        overlay = FileDescriptor(owning: fd)
        let overlayPath = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        self.overlayPath = overlayPath
        // Size the file before unlinking it: some file systems (9p) refuse ftruncate on
        // an unlinked file, while reads and writes through the open descriptor still work.
        do throws(SystemError) {
            try retryingEINTR("ftruncate(overlay)") { ftruncate(fd, off_t(capacity)) }
        } catch {
            unlink(overlayPath)
            throw error
        }
        if !keepOverlay { unlink(overlayPath) }
        let blocks = (Int(capacity) + Self.blockSize - 1) / Self.blockSize
        var initial = State(bitmap: [UInt64](repeating: 0, count: (blocks + 63) / 64))
        if capacity > baseCapacity {
            // The base's last, partial block (if any) is copied up now; every block past
            // it is the overlay's (a hole: zeros) from the start.
            let baseBlocks = Int(baseCapacity / bs)
            if baseCapacity % bs != 0 {
                let start = UInt64(baseBlocks) * bs
                let n = Int(baseCapacity - start)
                // SAFETY: a private scratch buffer, deallocated on every path by the defer.
                let b = UnsafeMutableRawBufferPointer.allocate(byteCount: n, alignment: 16)
                defer { b.deallocate() }
                try SyncEngine.readFully(fd: base.rawValue, into: b, at: start)
                try overlay.writeAll(UnsafeRawBufferPointer(b), at: start)
            }
            for block in baseBlocks ..< blocks { initial.markInOverlay(block) }
        }
        state = Mutex(initial)
    }

    deinit { close() }

    /// Closes both files. The overlay's space is freed unless it was kept. Idempotent.
    public func close() {
        state.withLock { s in
            guard !s.closed else { return }
            s.closed = true
            overlay.close()
            base.close()
        }
    }

    /// Number of 4 KiB blocks held by the overlay.
    public var overlayBlockCount: Int {
        state.withLock { s in s.bitmap.reduce(0) { $0 + $1.nonzeroBitCount } }
    }

    public var flushDescriptors: [Int32] { state.withLock { s in s.closed ? [] : [overlay.rawValue] } }

    public func mapRead(offset: UInt64, length: Int) throws(BlockBackendError) -> [FileSegment] {
        try checkRange(offset: offset, length: length)
        guard length > 0 else { return [] }
        return try state.withLock { (s: inout State) throws(BlockBackendError) in
            guard !s.closed else { throw BlockBackendError.io(SystemError("read(closed disk)", errno: EBADF)) }
            var segments: [FileSegment] = []
            let end = offset + UInt64(length)
            var pos = offset
            let bs = UInt64(Self.blockSize)
            while pos < end {
                let block = Int(pos / bs)
                let pieceEnd = min(end, (UInt64(block) + 1) * bs)
                let fd = s.isInOverlay(block) ? overlay.rawValue : base.rawValue
                let bufferOffset = Int(pos - offset)
                let len = Int(pieceEnd - pos)
                if var last = segments.last, last.fd == fd, last.bufferOffset + last.length == bufferOffset {
                    last.length += len
                    segments[segments.count - 1] = last
                } else {
                    segments.append(FileSegment(fd: fd, fileOffset: pos, bufferOffset: bufferOffset, length: len))
                }
                pos = pieceEnd
            }
            return segments
        }
    }

    public func mapWrite(offset: UInt64, length: Int) throws(BlockBackendError) -> [FileSegment] {
        try checkRange(offset: offset, length: length)
        guard length > 0 else { return [] }
        return try state.withLock { (s: inout State) throws(BlockBackendError) in
            guard !s.closed else { throw BlockBackendError.io(SystemError("write(closed disk)", errno: EBADF)) }
            let bs = UInt64(Self.blockSize)
            let end = offset + UInt64(length)
            let first = Int(offset / bs), last = Int((end - 1) / bs)
            // Partially covered edge blocks need the base's bytes around the write.
            for block in Set([first, last]) where !s.isInOverlay(block) {
                let start = UInt64(block) * bs
                let covered = offset <= start && end >= min(start + bs, capacity)
                if !covered { try copyUp(block, &s) }
            }
            for block in first ... last { s.markInOverlay(block) }
            // Marking before the write completes is fine: a read racing with a write
            // to the same sectors has undefined contents in virtio-blk anyway.
            return [FileSegment(fd: overlay.rawValue, fileOffset: offset, bufferOffset: 0, length: length)]
        }
    }

    /// Copies one block from the base into the overlay (inside `state.withLock`).
    private func copyUp(_ block: Int, _ s: inout State) throws(BlockBackendError) {
        let start = UInt64(block) * UInt64(Self.blockSize)
        let count = Int(min(UInt64(Self.blockSize), capacity - start))
        // SAFETY: a private scratch buffer, deallocated on every path by the defer.
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 16)
        defer { b.deallocate() }
        do throws(SystemError) {
            try SyncEngine.readFully(fd: base.rawValue, into: b, at: start)
            try overlay.writeAll(UnsafeRawBufferPointer(b), at: start)
        } catch {
            throw .io(error)
        }
        s.markInOverlay(block)
    }

    /// Whether `[offset, offset + length)` reads as zeros for sure: no block of it is in
    /// the overlay and the base has no data there (SEEK_DATA), or it is past the base.
    private func isHole(offset: UInt64, length: Int) -> Bool {
        let bs = UInt64(Self.blockSize)
        let end = offset + UInt64(length)
        let inOverlay = state.withLock { s in
            (Int(offset / bs) ... Int((end - 1) / bs)).contains { s.isInOverlay($0) }
        }
        if inOverlay { return false }
        if offset >= baseCapacity { return true }
        let next = lseek(base.rawValue, off_t(offset), 3)  // SEEK_DATA (Linux; Glibc hides it without _GNU_SOURCE)
        if next < 0 { return errno == ENXIO }  // no data at or after offset
        return UInt64(next) >= min(end, baseCapacity)
    }

    /// Writes the merged disk (base plus overlay) to a new file at `path`, via a
    /// temporary file in the same directory renamed into place (for `--keep-disk`).
    /// - Throws: `BlockBackendError.io` on any host I/O failure.
    public func exportMerged(to path: String) throws(BlockBackendError) {
        let tmp = path + ".partial"
        let out: FileDescriptor
        do throws(SystemError) { out = try FileDescriptor.open(tmp, O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644) } catch { throw .io(error) }
        defer { out.close() }
        let chunk = 1 << 20
        // SAFETY: a private scratch buffer, deallocated on every path by the defer.
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 16)
        defer { buffer.deallocate() }
        // SAFETY: as above; zero-filled once, compared against with memcmp (a byte loop
        // over a 1 GiB image is slow in debug builds).
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 16)
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        defer { zeros.deallocate() }
        var pos: UInt64 = 0
        do throws(BlockBackendError) {
            while pos < capacity {
                let n = Int(min(UInt64(chunk), capacity - pos))
                // A chunk that is a hole in the base and has no overlay block stays a hole
                // without being read (images are mostly sparse headroom).
                if isHole(offset: pos, length: n) {
                    pos += UInt64(n)
                    continue
                }
                let part = UnsafeMutableRawBufferPointer(rebasing: buffer[0 ..< n])
                try read(into: part, at: pos)
                // All-zero chunks stay holes (a grown disk is mostly zeros).
                if memcmp(part.baseAddress!, zeros.baseAddress!, n) != 0 {
                    do throws(SystemError) { try out.writeAll(UnsafeRawBufferPointer(part), at: pos) } catch { throw .io(error) }
                }
                pos += UInt64(n)
            }
            do throws(SystemError) {
                try retryingEINTR("ftruncate(\(tmp))") { ftruncate(out.rawValue, off_t(capacity)) }
                try retryingEINTR("fsync(\(tmp))") { fsync(out.rawValue) }
                try retryingEINTR("rename(\(tmp))") { rename(tmp, path) }
            } catch { throw BlockBackendError.io(error) }
        } catch {
            unlink(tmp)
            throw error
        }
    }
}

/// A plain disk image file used directly (e.g. a scratch or data disk), optionally
/// read-only.
public final class RawFileDisk: BlockBackend, Sendable {
    public let capacity: UInt64
    public let isReadOnly: Bool
    private let file: FileDescriptor

    /// Opens `path`; read-only disks are opened `O_RDONLY`.
    public init(path: String, readOnly: Bool) throws(SystemError) {
        file = try FileDescriptor.open(path, readOnly ? O_RDONLY : O_RDWR)
        let size = try file.size()
        capacity = size - size % 512
        isReadOnly = readOnly
    }

    /// Closes the file. Idempotent.
    public func close() { file.close() }

    public var flushDescriptors: [Int32] { isReadOnly ? [] : [file.rawValue] }

    public func mapRead(offset: UInt64, length: Int) throws(BlockBackendError) -> [FileSegment] {
        try checkRange(offset: offset, length: length)
        return length == 0 ? [] : [FileSegment(fd: file.rawValue, fileOffset: offset, bufferOffset: 0, length: length)]
    }

    public func mapWrite(offset: UInt64, length: Int) throws(BlockBackendError) -> [FileSegment] {
        guard !isReadOnly else { throw .readOnly }
        try checkRange(offset: offset, length: length)
        return length == 0 ? [] : [FileSegment(fd: file.rawValue, fileOffset: offset, bufferOffset: 0, length: length)]
    }
}
