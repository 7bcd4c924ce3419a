/// The pages of guest RAM a restored sandbox writes in its first moments (the agent's
/// session set-up and a first command), recorded once per snapshot in its `working-set`
/// file: a VMM restoring the snapshot copies those pages in ahead of the guest (one
/// `MADV_POPULATE_WRITE` per range, on a thread of its own), instead of the guest taking
/// one copy-on-write fault per page through KVM. Docs/SnapshotFormat.md has the layout.
///
/// It is a hint: pages outside it are still faulted in as they are touched, and a file
/// that does not decode is ignored (the restore is the same, only slower), so the VMM
/// checks every range against the snapshot's RAM and never trusts the file further.
public struct WorkingSet: Equatable, Sendable {
    /// `count` pages of 4 KiB from page `first` of the memory file.
    public struct Range: Equatable, Sendable {
        public var first: UInt32
        public var count: UInt32
        public init(first: UInt32, count: UInt32) {
            self.first = first
            self.count = count
        }
    }

    /// Bytes per page the ranges count in.
    public static let pageSize: UInt64 = 4096
    /// The file name in a snapshot directory.
    public static let fileName = "working-set"
    static let magic: [UInt8] = Array("SBXWSET1".utf8)
    /// Most ranges a file may hold (a real one has a few hundred).
    public static let maxRanges = 65_536
    /// Most of the RAM a working set may cover: a larger one would copy pages most runs
    /// never write, and is refused as implausible.
    public static let maxFraction: UInt64 = 4

    /// The RAM size, in pages, the ranges were recorded against.
    public var memoryPages: UInt32
    /// Sorted, non-overlapping, non-empty, inside `memoryPages`.
    public var ranges: [Range]

    public init(memoryPages: UInt32, ranges: [Range]) {
        self.memoryPages = memoryPages
        self.ranges = ranges
    }

    /// Pages covered.
    public var pages: UInt64 { ranges.reduce(0) { $0 + UInt64($1.count) } }

    /// The file's bytes: "SBXWSET1", memoryPages, range count, then (first, count) pairs,
    /// all little-endian UInt32.
    public func encoded() -> [UInt8] {
        var out = Self.magic
        out.reserveCapacity(16 + ranges.count * 8)
        func put(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { out += $0 } }
        put(memoryPages)
        put(UInt32(ranges.count))
        for r in ranges {
            put(r.first)
            put(r.count)
        }
        return out
    }

    /// Why a working-set file was not used.
    public enum DecodeError: Error, Equatable, Sendable, CustomStringConvertible {
        case truncated(Int)
        case badMagic
        case wrongMemory(recorded: UInt32, expected: UInt32)
        case tooManyRanges(UInt32)
        case badRange(index: Int, first: UInt32, count: UInt32)
        case tooLarge(pages: UInt64, memoryPages: UInt32)

        public var description: String {
            switch self {
            case .truncated(let n): return "the working-set file is \(n) bytes, shorter than its header and ranges say"
            case .badMagic: return "the working-set file does not start with SBXWSET1"
            case let .wrongMemory(r, e): return "the working set was recorded for \(r) pages of RAM, the snapshot has \(e)"
            case .tooManyRanges(let n): return "the working set lists \(n) ranges (at most \(WorkingSet.maxRanges))"
            case let .badRange(i, f, c):
                return "range \(i) of the working set (pages \(f) +\(c)) is empty, out of order, overlapping or outside RAM"
            case let .tooLarge(p, m): return "the working set covers \(p) of \(m) pages, more than 1/\(WorkingSet.maxFraction) of RAM"
            }
        }
    }

    /// Decodes and checks a file for RAM of `memoryBytes`: every range non-empty, sorted,
    /// apart from the previous one, inside RAM; the whole at most 1/`maxFraction` of RAM;
    /// no bytes after the last range.
    public static func decode(_ bytes: [UInt8], memoryBytes: UInt64) throws(DecodeError) -> WorkingSet {
        guard bytes.count >= 16 else { throw .truncated(bytes.count) }
        guard Array(bytes[0 ..< 8]) == magic else { throw .badMagic }
        func word(_ at: Int) -> UInt32 {
            UInt32(bytes[at]) | UInt32(bytes[at + 1]) << 8 | UInt32(bytes[at + 2]) << 16 | UInt32(bytes[at + 3]) << 24
        }
        let expected = memoryBytes / pageSize
        let recorded = word(8)
        guard UInt64(recorded) == expected, expected <= UInt64(UInt32.max) else {
            throw .wrongMemory(recorded: recorded, expected: UInt32(clamping: expected))
        }
        let n = word(12)
        guard n <= maxRanges else { throw .tooManyRanges(n) }
        guard bytes.count == 16 + Int(n) * 8 else { throw .truncated(bytes.count) }
        var ranges: [Range] = []
        ranges.reserveCapacity(Int(n))
        var nextFree: UInt64 = 0  // first page a range may start at (after the previous one)
        var total: UInt64 = 0
        for i in 0 ..< Int(n) {
            let first = word(16 + i * 8), count = word(20 + i * 8)
            let end = UInt64(first) + UInt64(count)
            guard count > 0, UInt64(first) >= nextFree, end <= expected else {
                throw .badRange(index: i, first: first, count: count)
            }
            nextFree = end
            total += UInt64(count)
            ranges.append(Range(first: first, count: count))
        }
        guard total <= expected / maxFraction else { throw .tooLarge(pages: total, memoryPages: recorded) }
        return WorkingSet(memoryPages: recorded, ranges: ranges)
    }
}
