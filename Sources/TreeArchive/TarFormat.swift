#if canImport(Glibc)
import Glibc
#endif

/// Directory trees as tar streams (POSIX ustar, with pax extended headers for long
/// names), the way `copyIn`/`copyOut` of a directory move them between host and guest.
/// Foundation-free: the guest agent uses the same code. Only what a copy needs is
/// written or read: regular files, directories and symbolic links, with mode and mtime.
///
/// ```
///   a tar stream = (header block [pax header block + records] [data blocks])* 2 zero blocks
///   header block (512 bytes): name[100] mode[8] uid[8] gid[8] size[12] mtime[12]
///                             chksum[8] type[1] linkname[100] "ustar\0" "00" ... prefix[155]
/// ```
public enum TarEntryKind: Sendable, Equatable {
    case file
    case directory
    case symlink(target: String)
}

/// One entry of a tar stream.
public struct TarEntry: Sendable, Equatable {
    /// The path inside the tree, '/'-separated, relative (as stored).
    public var path: String
    public var kind: TarEntryKind
    /// Permission bits (and setuid/setgid/sticky), `& 0o7777`.
    public var mode: UInt32
    /// Seconds since the epoch.
    public var mtime: Int64
    /// Bytes of data that follow (files only).
    public var size: UInt64

    public init(path: String, kind: TarEntryKind, mode: UInt32, mtime: Int64 = 0, size: UInt64 = 0) {
        self.path = path
        self.kind = kind
        self.mode = mode
        self.mtime = mtime
        self.size = size
    }
}

/// Why a tar stream or a tree was refused. The message names the entry.
public struct TarError: Error, CustomStringConvertible, Sendable, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Bounds a reader keeps, whoever wrote the stream.
public struct TarLimits: Sendable {
    /// Bytes of file data, all entries together.
    public var maxTotalBytes: UInt64 = 1 << 30
    /// Entries (files, directories, links).
    public var maxEntries: Int = 1_000_000
    /// Length of a path or link target.
    public var maxPathLength: Int = 4096
    /// Size of one pax extended header or GNU long name.
    public var maxExtendedHeader: Int = 1 << 20
    public init() {}
}

enum TarBlock {
    static let size = 512

    /// Encodes `entry`'s header block(s): a pax header first when the path or link
    /// target does not fit its ustar field, or the size does not fit 11 octal digits.
    static func header(for entry: TarEntry) -> [UInt8] {
        var records: [(String, String)] = []
        let name = entry.kind == .directory && !entry.path.hasSuffix("/") ? entry.path + "/" : entry.path
        if name.utf8.count > 100 { records.append(("path", name)) }
        var link = ""
        if case .symlink(let target) = entry.kind {
            link = target
            if target.utf8.count > 100 { records.append(("linkpath", target)) }
        }
        if entry.size >= 0o77777777777 { records.append(("size", String(entry.size))) }
        var out: [UInt8] = []
        if !records.isEmpty {
            var body: [UInt8] = []
            for (key, value) in records { body += paxRecord(key, value) }
            out += block(name: "PaxHeader", mode: 0o644, size: UInt64(body.count), mtime: entry.mtime, type: UInt8(ascii: "x"), link: "")
            out += body
            out += [UInt8](repeating: 0, count: padding(UInt64(body.count)))
        }
        let type: UInt8 = switch entry.kind {
        case .file: UInt8(ascii: "0")
        case .directory: UInt8(ascii: "5")
        case .symlink: UInt8(ascii: "2")
        }
        out += block(name: String(decoding: name.utf8.prefix(100), as: UTF8.self), mode: entry.mode,
                     size: entry.size >= 0o77777777777 ? 0 : entry.size, mtime: entry.mtime, type: type,
                     link: String(decoding: link.utf8.prefix(100), as: UTF8.self))
        return out
    }

    /// "LEN key=value\n", LEN counting itself.
    static func paxRecord(_ key: String, _ value: String) -> [UInt8] {
        let rest = " \(key)=\(value)\n".utf8.count
        var n = rest + 1
        while String(n).utf8.count + rest != n { n = String(n).utf8.count + rest }
        return Array("\(n) \(key)=\(value)\n".utf8)
    }

    static func padding(_ size: UInt64) -> Int { Int((UInt64(size) + 511) / 512 * 512 - size) }

    static func block(name: String, mode: UInt32, size: UInt64, mtime: Int64, type: UInt8, link: String) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: size_)
        func put(_ s: [UInt8], at offset: Int, max: Int) {
            for (i, c) in s.prefix(max).enumerated() { b[offset + i] = c }
        }
        func octal(_ v: UInt64, at offset: Int, width: Int) {
            var digits = Array(String(v, radix: 8).utf8)
            while digits.count < width - 1 { digits.insert(UInt8(ascii: "0"), at: 0) }
            put(digits, at: offset, max: width - 1)
        }
        put(Array(name.utf8), at: 0, max: 100)
        octal(UInt64(mode & 0o7777), at: 100, width: 8)
        octal(0, at: 108, width: 8)
        octal(0, at: 116, width: 8)
        octal(size, at: 124, width: 12)
        octal(UInt64(max(0, mtime)), at: 136, width: 12)
        b[156] = type
        put(Array(link.utf8), at: 157, max: 100)
        put(Array("ustar\0".utf8), at: 257, max: 6)
        put(Array("00".utf8), at: 263, max: 2)
        for i in 148..<156 { b[i] = UInt8(ascii: " ") }
        let sum = b.reduce(0) { $0 + UInt32($1) }
        var digits = Array(String(sum, radix: 8).utf8)
        while digits.count < 6 { digits.insert(UInt8(ascii: "0"), at: 0) }
        put(digits + [0, UInt8(ascii: " ")], at: 148, max: 8)
        return b
    }
    private static let size_ = 512

    /// The end of a stream: two zero blocks.
    static let trailer = [UInt8](repeating: 0, count: 1024)
}

/// Reads a tar stream fed in pieces of any size, as `Event`s. Every header is checked
/// (checksum, magic, numbers, type, lengths) and the limits are kept before anything is
/// buffered; a stream that breaks a rule is refused with an error naming the entry.
public struct TarDecoder {
    public enum Event: Equatable {
        case entry(TarEntry)
        /// Data of the last file entry, in order.
        case data([UInt8])
        /// The end of the stream (its zero blocks).
        case end
    }

    private enum State {
        case header
        /// Data of the current entry: bytes left, then padding; `deliver` false for data
        /// that is skipped (the size of a directory entry).
        case data(left: UInt64, padding: Int, deliver: Bool)
        /// A pax header ('x' or 'g') or GNU long name ('L', 'K') being collected.
        case extended(type: UInt8, left: Int, padding: Int)
        case ended
    }

    public let limits: TarLimits
    private var state = State.header
    private var buffer: [UInt8] = []
    private var extendedData: [UInt8] = []
    /// What the pax header or GNU long names say about the next entry.
    private var pendingPath: String?
    private var pendingLink: String?
    private var pendingSize: UInt64?
    private(set) public var entries = 0
    private(set) public var totalBytes: UInt64 = 0

    public init(limits: TarLimits = TarLimits()) { self.limits = limits }

    public var isEnded: Bool { if case .ended = state { return true } else { return false } }

    /// Feeds bytes; returns the events they complete.
    public mutating func feed(_ bytes: [UInt8]) throws(TarError) -> [Event] {
        var events: [Event] = []
        var input = bytes[...]
        while !input.isEmpty {
            switch state {
            case .ended:
                // Some writers pad the end to a record size with more zeros.
                guard input.allSatisfy({ $0 == 0 }) else { throw TarError("the tar stream has data after its end") }
                return events
            case .data(let left, let padding, let deliver):
                if left > 0 {
                    let n = Int(min(UInt64(input.count), left))
                    if deliver { events.append(.data(Array(input.prefix(n)))) }
                    input = input.dropFirst(n)
                    state = .data(left: left - UInt64(n), padding: padding, deliver: deliver)
                } else {
                    let n = min(input.count, padding)
                    input = input.dropFirst(n)
                    state = padding - n == 0 ? .header : .data(left: 0, padding: padding - n, deliver: deliver)
                }
            case .extended(let type, let left, let padding):
                if left > 0 {
                    let n = min(input.count, left)
                    extendedData += input.prefix(n)
                    input = input.dropFirst(n)
                    state = .extended(type: type, left: left - n, padding: padding)
                    if left - n == 0 && padding == 0 { try finishExtended(type) }
                } else {
                    let n = min(input.count, padding)
                    input = input.dropFirst(n)
                    if padding - n == 0 { try finishExtended(type) } else { state = .extended(type: type, left: 0, padding: padding - n) }
                }
            case .header:
                let need = TarBlock.size - buffer.count
                buffer += input.prefix(need)
                input = input.dropFirst(min(need, input.count))
                guard buffer.count == TarBlock.size else { continue }
                let block = buffer
                buffer = []
                if let e = try header(block) { events.append(e) }
            }
        }
        return events
    }

    /// Checks that the stream ended properly (its zero blocks, or at least a header
    /// boundary after the last entry's data: some writers leave the trailer out).
    public func finish() throws(TarError) {
        switch state {
        case .ended: return
        case .header where buffer.isEmpty && pendingPath == nil && pendingLink == nil: return
        default: throw TarError("the tar stream ends in the middle of an entry")
        }
    }

    private mutating func finishExtended(_ type: UInt8) throws(TarError) {
        let data = extendedData
        extendedData = []
        state = .header
        switch type {
        case UInt8(ascii: "L"): pendingPath = try Self.cString(data, field: "GNU long name", limit: limits.maxPathLength)
        case UInt8(ascii: "K"): pendingLink = try Self.cString(data, field: "GNU long link", limit: limits.maxPathLength)
        case UInt8(ascii: "x"): try parsePax(data)
        default: break  // 'g': global pax header, nothing of it is used
        }
    }

    private mutating func parsePax(_ data: [UInt8]) throws(TarError) {
        var rest = data[...]
        while !rest.isEmpty {
            guard let space = rest.firstIndex(of: UInt8(ascii: " ")),
                  let length = Int(String(decoding: rest[rest.startIndex..<space], as: UTF8.self)),
                  length > space - rest.startIndex + 1, length <= rest.count else {
                throw TarError("a pax extended header has a malformed record")
            }
            let record = rest[(space + 1)..<(rest.startIndex + length)]
            rest = rest.dropFirst(length)
            guard record.last == UInt8(ascii: "\n"), let eq = record.firstIndex(of: UInt8(ascii: "=")) else {
                throw TarError("a pax extended header has a malformed record")
            }
            let key = String(decoding: record[record.startIndex..<eq], as: UTF8.self)
            let value = String(decoding: record[(eq + 1)..<(record.endIndex - 1)], as: UTF8.self)
            switch key {
            case "path":
                guard value.utf8.count <= limits.maxPathLength else { throw TarError("a pax path is longer than \(limits.maxPathLength) bytes") }
                pendingPath = value
            case "linkpath":
                guard value.utf8.count <= limits.maxPathLength else { throw TarError("a pax link target is longer than \(limits.maxPathLength) bytes") }
                pendingLink = value
            case "size":
                guard let n = UInt64(value) else { throw TarError("a pax size '\(value)' is not a number") }
                pendingSize = n
            default: break  // times, owners, xattrs: not copied
            }
        }
    }

    private static func cString(_ bytes: [UInt8], field: String, limit: Int) throws(TarError) -> String {
        let end = bytes.firstIndex(of: 0) ?? bytes.count
        guard end <= limit else { throw TarError("a \(field) is longer than \(limit) bytes") }
        guard let s = String(validating: bytes[0..<end], as: UTF8.self) else { throw TarError("a \(field) is not UTF-8") }
        return s
    }

    /// A ustar number: octal digits (spaces and NULs around them), or GNU base-256.
    private static func number(_ field: ArraySlice<UInt8>, name: String) throws(TarError) -> UInt64 {
        if let first = field.first, first & 0x80 != 0 {
            guard first == 0x80 else { throw TarError("a header's \(name) is a negative or oversized base-256 number") }
            var v: UInt64 = 0
            for (i, b) in field.dropFirst().enumerated() {
                if i < field.count - 9 { guard b == 0 else { throw TarError("a header's \(name) does not fit 64 bits") }; continue }
                v = v << 8 | UInt64(b)
            }
            return v
        }
        var v: UInt64 = 0
        var seenDigit = false
        for b in field {
            if b == 0 || b == UInt8(ascii: " ") { if seenDigit { break } else { continue } }
            guard b >= UInt8(ascii: "0") && b <= UInt8(ascii: "7") else { throw TarError("a header's \(name) is not an octal number") }
            let (m, o1) = v.multipliedReportingOverflow(by: 8)
            guard !o1 else { throw TarError("a header's \(name) does not fit 64 bits") }
            v = m + UInt64(b - UInt8(ascii: "0"))
            seenDigit = true
        }
        return v
    }

    private mutating func header(_ b: [UInt8]) throws(TarError) -> Event? {
        if b.allSatisfy({ $0 == 0 }) {
            guard pendingPath == nil && pendingLink == nil && pendingSize == nil else {
                throw TarError("the tar stream ends after an extended header without its entry")
            }
            state = .ended
            return .end
        }
        // Checksum: the sum of the block with the checksum field read as spaces.
        let stored = try Self.number(b[148..<156], name: "checksum")
        var sum: UInt64 = 0
        for (i, c) in b.enumerated() { sum += (148..<156).contains(i) ? 32 : UInt64(c) }
        guard stored == sum else { throw TarError("a tar header's checksum is wrong (not a tar stream, or a damaged one)") }
        guard b[257..<262].elementsEqual("ustar".utf8) else { throw TarError("a tar header is not ustar (no 'ustar' magic)") }
        let type = b[156]
        var size = try Self.number(b[124..<136], name: "size")
        let ustarName = try Self.cString(Array(b[0..<100]), field: "name", limit: 100)
        let prefix = try Self.cString(Array(b[345..<500]), field: "prefix", limit: 155)
        switch type {
        case UInt8(ascii: "x"), UInt8(ascii: "g"), UInt8(ascii: "L"), UInt8(ascii: "K"):
            guard size <= UInt64(limits.maxExtendedHeader) else {
                throw TarError("an extended header of \(size) bytes is over the limit of \(limits.maxExtendedHeader)")
            }
            // Counted like entries and data: a stream of nothing but extended headers is
            // bounded too.
            entries += 1
            guard entries <= limits.maxEntries else { throw TarError("the tree has more than \(limits.maxEntries) entries") }
            totalBytes += size
            guard totalBytes <= limits.maxTotalBytes else {
                throw TarError("the tree's headers and files are larger than the limit of \(limits.maxTotalBytes) bytes")
            }
            state = .extended(type: type, left: Int(size), padding: TarBlock.padding(size))
            if size == 0 { try finishExtended(type) }
            return nil
        default: break
        }
        let path = pendingPath ?? (prefix.isEmpty ? ustarName : prefix + "/" + ustarName)
        let ustarLink = try Self.cString(Array(b[157..<257]), field: "link name", limit: 100)
        let link = pendingLink ?? ustarLink
        if let s = pendingSize { size = s }
        (pendingPath, pendingLink, pendingSize) = (nil, nil, nil)
        guard !path.isEmpty else { throw TarError("a tar entry has an empty name") }
        let kind: TarEntryKind
        switch type {
        case UInt8(ascii: "0"), 0, UInt8(ascii: "7"): kind = path.hasSuffix("/") ? .directory : .file
        case UInt8(ascii: "5"): kind = .directory
        case UInt8(ascii: "2"): kind = .symlink(target: link)
        case UInt8(ascii: "1"): throw TarError("\(path): hard links are not copied")
        case UInt8(ascii: "3"), UInt8(ascii: "4"): throw TarError("\(path): device files are not copied")
        case UInt8(ascii: "6"): throw TarError("\(path): FIFOs are not copied")
        default: throw TarError("\(path): tar entry type '\(Character(Unicode.Scalar(type)))' is not copied")
        }
        entries += 1
        guard entries <= limits.maxEntries else { throw TarError("the tree has more than \(limits.maxEntries) entries") }
        let dataSize = kind == .file ? size : size  // other entries' data is skipped, but counted
        let (total, overflow) = totalBytes.addingReportingOverflow(dataSize)
        guard !overflow, total <= limits.maxTotalBytes else {
            throw TarError("\(path): the tree's files are larger than the limit of \(limits.maxTotalBytes) bytes")
        }
        totalBytes = total
        let mode = UInt32(try Self.number(b[100..<108], name: "mode") & 0o7777)
        let mtime = Int64(clamping: try Self.number(b[136..<148], name: "mtime"))
        state = .data(left: size, padding: TarBlock.padding(size), deliver: kind == .file)
        if size == 0 { state = .header }
        return .entry(TarEntry(path: path, kind: kind, mode: mode, mtime: mtime, size: kind == .file ? size : 0))
    }
}
