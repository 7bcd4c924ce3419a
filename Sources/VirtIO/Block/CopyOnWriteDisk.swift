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
///
/// Between the base and the overlay there may be one read-only **layer** (a snapshot's
/// or template's writes, `DiskLayer`): a block is read from the overlay if the overlay
/// holds it, else from the layer if the layer holds it, else from the base. The layer,
/// like the base, is opened `O_RDONLY` and shared by every sandbox started over it.
///
/// ```
///   overlay (private, rw)   ·  X  ·  ·  X      ← this sandbox's writes
///   layer   (shared, ro)    X  X  ·  ·  ·      ← the snapshot's writes
///   base    (shared, ro)    B  B  B  B  ·      ← the image (past its end: zeros)
/// ```
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
    /// The read-only layer between base and overlay, if any.
    public let layerPath: String?

    // The descriptors are closed only once, by close() inside `state.withLock`.
    private let base: FileDescriptor
    private let overlay: FileDescriptor
    private let layer: FileDescriptor?
    /// One bit per block: set when the layer holds the block (never changes).
    private let layerMap: [UInt64]
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
    ///   - layer: a read-only layer between base and overlay; the disk then has the
    ///     layer's capacity, which must be at least the base's.
    /// - Throws: `SystemError` if a file cannot be opened or created, or `EINVAL` when
    ///   the layer does not fit the base.
    public init(baseImage: String, overlayDirectory: String, keepOverlay: Bool = false,
                minimumCapacity: UInt64? = nil, layer: DiskLayer? = nil) throws(SystemError) {
        base = try FileDescriptor.open(baseImage, O_RDONLY)
        let size = try base.size()
        let baseCapacity = size - size % 512
        let bs = UInt64(Self.blockSize)
        let grown = (minimumCapacity ?? 0) / bs * bs
        var capacity = max(baseCapacity, grown)
        if let layer {
            guard layer.capacity >= baseCapacity, layer.capacity >= grown else {
                base.close()
                throw SystemError("layer \(layer.dataPath): its disk (\(layer.capacity) bytes) is smaller than the base (\(baseCapacity)) or the size asked for (\(grown))", errno: EINVAL)
            }
            capacity = layer.capacity
            do throws(SystemError) { self.layer = try FileDescriptor.open(layer.dataPath, O_RDONLY) } catch {
                base.close()
                throw error
            }
            layerMap = layer.map
        } else {
            self.layer = nil
            layerMap = []
        }
        layerPath = layer?.dataPath
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
            // it that the layer does not hold is the overlay's (a hole: zeros) from the start.
            let baseBlocks = Int(baseCapacity / bs)
            if baseCapacity % bs != 0 && !Self.isSet(layerMap, baseBlocks) {
                let start = UInt64(baseBlocks) * bs
                let n = Int(baseCapacity - start)
                // SAFETY: a private scratch buffer, deallocated on every path by the defer.
                let b = UnsafeMutableRawBufferPointer.allocate(byteCount: n, alignment: 16)
                defer { b.deallocate() }
                try SyncEngine.readFully(fd: base.rawValue, into: b, at: start)
                try overlay.writeAll(UnsafeRawBufferPointer(b), at: start)
            }
            for block in baseBlocks ..< blocks where !Self.isSet(layerMap, block) { initial.markInOverlay(block) }
        }
        state = Mutex(initial)
    }

    private static func isSet(_ map: [UInt64], _ block: Int) -> Bool {
        block / 64 < map.count && map[block / 64] & (1 << UInt64(block % 64)) != 0
    }

    /// Where `block` is read from: the overlay, the layer, or the base.
    private func source(_ block: Int, _ s: State) -> Int32 {
        if s.isInOverlay(block) { return overlay.rawValue }
        if let layer, Self.isSet(layerMap, block) { return layer.rawValue }
        return base.rawValue
    }

    deinit { close() }

    /// Closes both files. The overlay's space is freed unless it was kept. Idempotent.
    public func close() {
        state.withLock { s in
            guard !s.closed else { return }
            s.closed = true
            overlay.close()
            layer?.close()
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
                let fd = source(block, s)
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

    /// Copies one block from the layer or base into the overlay (inside `state.withLock`).
    private func copyUp(_ block: Int, _ s: inout State) throws(BlockBackendError) {
        let start = UInt64(block) * UInt64(Self.blockSize)
        let count = Int(min(UInt64(Self.blockSize), capacity - start))
        // SAFETY: a private scratch buffer, deallocated on every path by the defer.
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 16)
        defer { b.deallocate() }
        do throws(SystemError) {
            try SyncEngine.readFully(fd: source(block, s), into: b, at: start)
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
            (Int(offset / bs) ... Int((end - 1) / bs)).contains { s.isInOverlay($0) || Self.isSet(layerMap, $0) }
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

extension CopyOnWriteDisk {
    /// Writes every block this disk holds above its base (the overlay's and the layer's)
    /// as a new layer: `dataPath` (a sparse file of the disk's size, blocks at their own
    /// offsets) and `mapPath` (the block map, `DiskLayer.encodeMap`). Blocks inside the
    /// base's range are kept even when zero (they hide base data); blocks past it only
    /// when they hold data. Both files are fsynced. Returns the layer, ready to open.
    /// - Throws: `BlockBackendError.io` on any host I/O failure (the files are removed).
    public func exportLayer(dataPath: String, mapPath: String) throws(BlockBackendError) -> DiskLayer {
        let bs = Self.blockSize
        let blocks = Int((capacity + UInt64(bs) - 1) / UInt64(bs))
        let held: [UInt64] = state.withLock { s in
            var m = s.bitmap
            for i in 0 ..< min(m.count, layerMap.count) { m[i] |= layerMap[i] }
            return m
        }
        func isHeld(_ b: Int) -> Bool { held[b / 64] & (1 << UInt64(b % 64)) != 0 }
        var out = [UInt64](repeating: 0, count: (blocks + 63) / 64)
        let data: FileDescriptor
        do throws(SystemError) { data = try FileDescriptor.open(dataPath, O_WRONLY | O_CREAT | O_TRUNC, mode: 0o444) } catch { throw .io(error) }
        defer { data.close() }
        let chunkBlocks = 256
        // SAFETY: private scratch buffers, deallocated on every path by the defers.
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkBlocks * bs, alignment: 16)
        defer { buffer.deallocate() }
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: bs, alignment: 16)
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        defer { zeros.deallocate() }
        do throws(BlockBackendError) {
            var b = 0
            while b < blocks {
                guard isHeld(b) else { b += 1; continue }
                if UInt64(b) * UInt64(bs) >= baseCapacity && !Self.isSet(layerMap, b) {
                    // Past the base the overlay holds every block from the start, mostly
                    // as holes: skip to its next data (or the next block of the layer).
                    let next = lseek(overlay.rawValue, off_t(UInt64(b) * UInt64(bs)), 3)  // SEEK_DATA
                    let dataBlock = next < 0 ? blocks : Int(UInt64(next) / UInt64(bs))
                    if dataBlock > b {
                        var nb = b + 1
                        while nb < dataBlock && !Self.isSet(layerMap, nb) { nb += 1 }
                        b = nb
                        continue
                    }
                }
                var n = 1
                while n < chunkBlocks && b + n < blocks && isHeld(b + n) { n += 1 }
                let start = UInt64(b) * UInt64(bs)
                let length = Int(min(UInt64(n * bs), capacity - start))
                try read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0 ..< length]), at: start)
                // Write runs of blocks with data; mark what must be kept.
                var i = 0
                while i < n {
                    let off = i * bs
                    let len = min(bs, length - off)
                    let nonZero = memcmp(buffer.baseAddress! + off, zeros.baseAddress!, len) != 0
                    let block = b + i
                    if nonZero || UInt64(block) * UInt64(bs) < baseCapacity { out[block / 64] |= 1 << UInt64(block % 64) }
                    if nonZero {
                        var j = i + 1
                        while j < n, memcmp(buffer.baseAddress! + j * bs, zeros.baseAddress!, min(bs, length - j * bs)) != 0 {
                            let bj = b + j
                            out[bj / 64] |= 1 << UInt64(bj % 64)
                            j += 1
                        }
                        let end = min(j * bs, length)
                        do throws(SystemError) {
                            try data.writeAll(UnsafeRawBufferPointer(rebasing: buffer[off ..< end]), at: start + UInt64(off))
                        } catch { throw .io(error) }
                        i = j
                    } else {
                        i += 1
                    }
                }
                b += n
            }
            do throws(SystemError) {
                try retryingEINTR("ftruncate(\(dataPath))") { ftruncate(data.rawValue, off_t(capacity)) }
                try retryingEINTR("fsync(\(dataPath))") { fsync(data.rawValue) }
                let mapFile = try FileDescriptor.open(mapPath, O_WRONLY | O_CREAT | O_TRUNC, mode: 0o444)
                defer { mapFile.close() }
                let bytes = DiskLayer.encodeMap(out)
                try writeAll(mapFile.rawValue, bytes)
                try retryingEINTR("fsync(\(mapPath))") { fsync(mapFile.rawValue) }
            } catch { throw BlockBackendError.io(error) }
        } catch {
            unlink(dataPath)
            unlink(mapPath)
            throw error
        }
        return DiskLayer(uncheckedDataPath: dataPath, capacity: capacity, map: out)
    }
}

/// A read-only disk layer: the blocks one disk held above its base, at their own offsets
/// in a sparse data file, and a map of which blocks those are (one bit per 4 KiB block,
/// little-endian 64-bit words, bit `b % 64` of word `b / 64` for block `b`).
public struct DiskLayer: Sendable, Equatable {
    /// The data file (the disk's size; sparse).
    public let dataPath: String
    /// The disk's size in bytes (a multiple of 512).
    public let capacity: UInt64
    /// The block map.
    public let map: [UInt64]

    /// Number of blocks the layer holds.
    public var blockCount: Int { map.reduce(0) { $0 + $1.nonzeroBitCount } }

    init(uncheckedDataPath: String, capacity: UInt64, map: [UInt64]) {
        dataPath = uncheckedDataPath
        self.capacity = capacity
        self.map = map
    }

    /// Checks a layer read from files (untrusted: a snapshot may be damaged): the
    /// capacity is a positive multiple of 512, the map has exactly one bit per block of
    /// it with no bit past the last block, and the data file is exactly `capacity` bytes.
    /// - Throws: `DiskLayer.Invalid` naming what is wrong.
    public init(dataPath: String, capacity: UInt64, mapBytes: [UInt8]) throws(Invalid) {
        guard capacity > 0, capacity % 512 == 0, capacity <= 1 << 44 else {
            throw Invalid(description: "\(dataPath): a disk of \(capacity) bytes is not a valid layer size")
        }
        let blocks = Int((capacity + UInt64(CopyOnWriteDisk.blockSize) - 1) / UInt64(CopyOnWriteDisk.blockSize))
        let words = (blocks + 63) / 64
        guard mapBytes.count == words * 8 else {
            throw Invalid(description: "\(dataPath): its block map is \(mapBytes.count) bytes; a disk of \(capacity) bytes needs \(words * 8)")
        }
        var map = [UInt64](repeating: 0, count: words)
        for i in 0 ..< words {
            var w: UInt64 = 0
            for k in 0 ..< 8 { w |= UInt64(mapBytes[i * 8 + k]) << (8 * UInt64(k)) }
            map[i] = w
        }
        if blocks % 64 != 0, map[words - 1] >> UInt64(blocks % 64) != 0 {
            throw Invalid(description: "\(dataPath): its block map marks blocks past the end of the disk")
        }
        var st = stat()
        guard stat(dataPath, &st) == 0 else {
            throw Invalid(description: "\(dataPath): cannot read the layer's data file (\(String(cString: strerror(errno))))")
        }
        guard UInt64(st.st_size) == capacity else {
            throw Invalid(description: "\(dataPath): the layer's data file is \(st.st_size) bytes; its disk is \(capacity)")
        }
        self.dataPath = dataPath
        self.capacity = capacity
        self.map = map
    }

    /// The map as bytes (the map file's contents).
    public static func encodeMap(_ map: [UInt64]) -> [UInt8] {
        var bytes = [UInt8]()
        bytes.reserveCapacity(map.count * 8)
        for w in map { for k in 0 ..< 8 { bytes.append(UInt8(truncatingIfNeeded: w >> (8 * UInt64(k)))) } }
        return bytes
    }

    /// What is wrong with a layer's files.
    public struct Invalid: Error, CustomStringConvertible, Sendable {
        public var description: String
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
