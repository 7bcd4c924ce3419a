#if canImport(Glibc)
import Glibc
#endif
import SystemShims

/// A guest physical address.
public struct GuestAddress: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public static func < (a: GuestAddress, b: GuestAddress) -> Bool { a.rawValue < b.rawValue }
    /// `self + offset`, or nil on overflow.
    public func adding(_ offset: UInt64) -> GuestAddress? {
        let (r, o) = rawValue.addingReportingOverflow(offset)
        return o ? nil : GuestAddress(r)
    }
    public var description: String { "0x" + String(rawValue, radix: 16) }
}

/// Why a guest memory access was refused.
public enum GuestMemoryError: Error, Equatable, Sendable, CustomStringConvertible {
    /// [address, address+length) is not entirely inside one RAM region.
    case outOfBounds(address: UInt64, length: UInt64)
    /// A memory file whose size is not the guest RAM size it should hold.
    case fileSize(expected: UInt64, actual: UInt64)

    public var description: String {
        switch self {
        case let .outOfBounds(a, l):
            return "guest memory access out of bounds: 0x\(String(a, radix: 16)) length \(l)"
        case let .fileSize(e, a):
            return "the memory file is \(a) bytes, the guest's RAM is \(e)"
        }
    }
}

/// One contiguous range of guest RAM backed by host memory.
public struct GuestRegion: Sendable {
    public let start: GuestAddress
    public let size: UInt64
    /// Offset of this region within the backing mapping.
    public let hostOffset: Int
    public var end: UInt64 { start.rawValue + size }

    public init(start: GuestAddress, size: UInt64, hostOffset: Int) {
        self.start = start
        self.size = size
        self.hostOffset = hostOffset
    }
}

/// Guest RAM: one anonymous mapping split into regions around the MMIO hole.
/// Every access is bounds-checked against the regions; device code never keeps raw
/// pointers into guest memory beyond the closure that lent them.
public final class GuestMemory: @unchecked Sendable {
    // @unchecked: the mapping and region table are immutable after init. The bytes
    // inside are shared with the guest by design; callers synchronise through the
    // virtio protocol (memory barriers), as a real device would.
    public let regions: [GuestRegion]
    private let mapping: MappedRegion

    /// The default layout: RAM from 0 to `min(size, mmioHoleStart)`, the rest from 4 GiB.
    public static let mmioHoleStart: UInt64 = 0xC000_0000
    public static let highRAMStart: UInt64 = 0x1_0000_0000

    /// The default layout of `size` bytes: RAM below the MMIO hole, the rest from 4 GiB.
    static func defaultRegions(size: UInt64) -> [GuestRegion] {
        let low = min(size, Self.mmioHoleStart)
        var regions = [GuestRegion(start: GuestAddress(0), size: low, hostOffset: 0)]
        if size > low {
            regions.append(GuestRegion(start: GuestAddress(Self.highRAMStart), size: size - low, hostOffset: Int(low)))
        }
        return regions
    }

    /// Allocates `size` bytes of guest RAM with the default layout.
    public convenience init(size: UInt64) throws {
        try self.init(regions: Self.defaultRegions(size: size), totalSize: Int(size))
    }

    /// Allocates guest RAM for explicit regions (tests).
    public init(regions: [GuestRegion], totalSize: Int) throws {
        precondition(totalSize > 0)
        self.mapping = try MappedRegion.anonymous(size: totalSize)
        self.regions = regions
        for r in regions { precondition(r.hostOffset + Int(r.size) <= totalSize) }
    }

    /// Guest RAM of `size` bytes (default layout) mapped copy-on-write from a memory file
    /// written by `write(to:)`: the file's pages are shared through the page cache and
    /// each write makes a private copy. The file must be exactly `size` bytes.
    public init(restoringFrom fd: Int32, size: UInt64) throws {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SystemError("fstat(memory file)", errno: errno) }
        guard UInt64(st.st_size) == size else {
            throw GuestMemoryError.fileSize(expected: size, actual: UInt64(st.st_size))
        }
        self.mapping = try MappedRegion.privateFile(fd: fd, size: Int(size))
        self.regions = Self.defaultRegions(size: size)
    }

    /// Writes all of guest RAM to `fd` from offset 0 (a memory file), leaving holes where
    /// whole 64 KiB chunks are zero, so a mostly untouched guest makes a small file.
    public func write(to fd: Int32) throws {
        let total = mapping.size
        let chunk = 64 * 1024
        // SAFETY: a private zero buffer of `chunk` bytes, freed by the defer.
        let zeros = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 16)
        zeros.initializeMemory(as: UInt8.self, repeating: 0, count: chunk)
        defer { zeros.deallocate() }
        guard ftruncate(fd, off_t(total)) == 0 else { throw SystemError("ftruncate(memory file)", errno: errno) }
        var offset = 0
        while offset < total {
            let n = min(chunk, total - offset)
            // SAFETY: offset + n <= mapping.size; the vCPUs are paused while this runs.
            let p = mapping.pointer + offset
            if memcmp(p, zeros, n) != 0 {
                var done = 0
                while done < n {
                    let w = pwrite(fd, p + done, n - done, off_t(offset + done))
                    if w < 0 && errno == EINTR { continue }
                    guard w > 0 else { throw SystemError("write(memory file)", errno: w < 0 ? errno : EIO) }
                    done += w
                }
            }
            offset += n
        }
    }

    /// Total bytes of RAM.
    public var size: UInt64 { regions.reduce(0) { $0 + $1.size } }

    /// The pages (4 KiB, counted from the start of the backing mapping, which is the
    /// memory file's offset for a restored VM) this process holds its own copy of, as
    /// (first page, count) ranges in order: for a restore's private mapping, the pages
    /// written since the restore. `pagemap` is an open `/proc/self/pagemap`.
    public func privatePageRanges(pagemap: Int32) throws(SystemError) -> [(first: UInt32, count: UInt32)] {
        let pages = mapping.size / 4096
        let base = UInt(bitPattern: mapping.pointer) / 4096
        var ranges: [(first: UInt32, count: UInt32)] = []
        var open: (first: Int, count: Int)?
        let batch = 16_384
        var entries = [UInt64](repeating: 0, count: batch)
        var page = 0
        while page < pages {
            let n = min(batch, pages - page)
            let want = n * 8
            let got = entries.withUnsafeMutableBytes { pread(pagemap, $0.baseAddress, want, off_t((base + UInt(page)) * 8)) }
            guard got == want else { throw SystemError("read(/proc/self/pagemap)", errno: got < 0 ? errno : EIO) }
            for i in 0 ..< n {
                // Bit 63: present; bit 61: a file page (or shared). Present and not a
                // file page: an anonymous page of this mapping, i.e. a private copy.
                let e = entries[i]
                if e >> 63 == 1 && (e >> 61) & 1 == 0 {
                    if let o = open, o.first + o.count == page + i { open = (o.first, o.count + 1) } else {
                        if let o = open { ranges.append((UInt32(o.first), UInt32(o.count))) }
                        open = (page + i, 1)
                    }
                }
            }
            page += n
        }
        if let o = open { ranges.append((UInt32(o.first), UInt32(o.count))) }
        return ranges
    }

    /// Makes this process's own copy of each page of `ranges` now (`MADV_POPULATE_WRITE`:
    /// the copy-on-write faults the guest would take, without changing a byte), so that
    /// KVM finds them mapped. Ranges past the mapping are clipped. Returns the pages done
    /// and, when one range failed (the kernel lacks the advice, or memory ran short), its
    /// errno; it stops there.
    public func populateForWrite(_ ranges: [(first: UInt32, count: UInt32)]) -> (pages: UInt64, errno: Int32) {
        let pages = UInt64(mapping.size / 4096)
        var done: UInt64 = 0
        for r in ranges {
            let first = UInt64(r.first)
            guard first < pages else { continue }
            let count = min(UInt64(r.count), pages - first)
            // SAFETY: [first, first + count) pages lie inside the mapping (clipped above);
            // populating does not change the memory's contents.
            if madvise(mapping.pointer + Int(first * 4096), Int(count * 4096), MADV_POPULATE_WRITE) != 0 {
                return (done, errno)
            }
            done += count
        }
        return (done, 0)
    }

    /// The host address of a region's first byte (to register it as a KVM memory slot).
    public func hostAddress(of region: GuestRegion) -> UInt64 {
        // SAFETY: hostOffset + size was checked to lie inside the mapping at init.
        UInt64(UInt(bitPattern: mapping.pointer + region.hostOffset))
    }

    /// Whether [address, address+length) lies inside guest RAM.
    public func contains(_ address: GuestAddress, length: UInt64) -> Bool {
        (try? hostOffset(address, length)) != nil
    }

    /// Bounds check: the host offset of [address, address+length), all inside one region.
    @inline(__always)
    func hostOffset(_ address: GuestAddress, _ length: UInt64) throws(GuestMemoryError) -> Int {
        let a = address.rawValue
        let (end, overflow) = a.addingReportingOverflow(length)
        if !overflow {
            for r in regions where a >= r.start.rawValue && end <= r.end {
                return r.hostOffset + Int(a - r.start.rawValue)
            }
        }
        throw .outOfBounds(address: a, length: length)
    }

    /// Lends a raw buffer over [address, address+length) for the duration of `body`.
    /// The buffer must not escape the closure.
    public func withBuffer<R>(at address: GuestAddress, length: Int,
                              _ body: (UnsafeMutableRawBufferPointer) throws -> R) throws -> R {
        guard length >= 0 else { throw GuestMemoryError.outOfBounds(address: address.rawValue, length: 0) }
        let off = try hostOffset(address, UInt64(length))
        // SAFETY: hostOffset guarantees [off, off+length) lies inside the live mapping,
        // which outlives this call (self is retained by the caller).
        return try body(UnsafeMutableRawBufferPointer(start: mapping.pointer + off, count: length))
    }

    /// Reads a plain value (little-endian in-memory layout) at `address`.
    public func read<T: BitwiseCopyable>(_ type: T.Type = T.self, at address: GuestAddress) throws(GuestMemoryError) -> T {
        let off = try hostOffset(address, UInt64(MemoryLayout<T>.size))
        // SAFETY: bounds checked above; loadUnaligned tolerates any guest alignment.
        return (mapping.pointer + off).loadUnaligned(as: T.self)
    }

    /// Writes a plain value at `address`.
    public func write<T: BitwiseCopyable>(_ value: T, at address: GuestAddress) throws(GuestMemoryError) {
        let off = try hostOffset(address, UInt64(MemoryLayout<T>.size))
        // SAFETY: bounds checked above; storeBytes with an unaligned-tolerant path.
        withUnsafeBytes(of: value) { src in
            (mapping.pointer + off).copyMemory(from: src.baseAddress!, byteCount: src.count)
        }
    }

    /// Copies `count` bytes out of guest memory.
    public func readBytes(at address: GuestAddress, count: Int) throws -> [UInt8] {
        try withBuffer(at: address, length: count) { Array($0.bindMemory(to: UInt8.self)) }
    }

    /// Copies `bytes` into guest memory.
    public func writeBytes(_ bytes: UnsafeRawBufferPointer, at address: GuestAddress) throws {
        try withBuffer(at: address, length: bytes.count) { dst in
            if let base = bytes.baseAddress, bytes.count > 0 { dst.baseAddress!.copyMemory(from: base, byteCount: bytes.count) }
        }
    }

    /// Copies `bytes` into guest memory.
    public func writeBytes(_ bytes: [UInt8], at address: GuestAddress) throws {
        try bytes.withUnsafeBytes { try writeBytes($0, at: address) }
    }

    /// Fills [address, address+count) with zeros.
    public func zero(at address: GuestAddress, count: Int) throws {
        try withBuffer(at: address, length: count) { $0.initializeMemory(as: UInt8.self, repeating: 0) }
    }
}
