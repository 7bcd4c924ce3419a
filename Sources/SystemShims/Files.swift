#if canImport(Glibc)
import Glibc
#endif

/// Why a file could not be read, in words a user can act on.
public enum FileReadError: Error, Equatable, Sendable, CustomStringConvertible {
    case notFound(String)
    case permissionDenied(String)
    case isDirectory(String)
    case tooLarge(String, size: UInt64, limit: UInt64)
    case other(String, SystemError)

    public var description: String {
        switch self {
        case .notFound(let p): return "\(p): no such file"
        case .permissionDenied(let p): return "\(p): permission denied"
        case .isDirectory(let p): return "\(p): is a directory, not a file"
        case let .tooLarge(p, s, l): return "\(p): \(s) bytes is larger than the limit of \(l) bytes"
        case let .other(p, e): return "\(p): \(e.message)"
        }
    }
}

/// Reads a whole regular file into memory (kernels, initrds), with specific errors.
public func readWholeFile(_ path: String, limit: UInt64 = 1 << 30) throws(FileReadError) -> [UInt8] {
    let fd: FileDescriptor
    do {
        fd = try FileDescriptor.open(path, O_RDONLY)
    } catch {
        switch error.errno {
        case ENOENT, ENOTDIR: throw .notFound(path)
        case EACCES, EPERM: throw .permissionDenied(path)
        default: throw .other(path, error)
        }
    }
    var st = stat()
    guard fstat(fd.rawValue, &st) == 0 else { throw .other(path, SystemError("fstat", errno: errno)) }
    if (st.st_mode & S_IFMT) == S_IFDIR { throw .isDirectory(path) }
    let size = UInt64(st.st_size)
    guard size <= limit else { throw .tooLarge(path, size: size, limit: limit) }
    var bytes = [UInt8](repeating: 0, count: Int(size))
    var done = 0
    while done < bytes.count {
        let n = bytes.withUnsafeMutableBytes { raw in
            Glibc.read(fd.rawValue, raw.baseAddress! + done, raw.count - done)
        }
        if n < 0 {
            if errno == EINTR { continue }
            throw .other(path, SystemError("read", errno: errno))
        }
        if n == 0 { break }
        done += n
    }
    return Array(bytes.prefix(done))
}

/// Reads a file to its end, however large its size says it is (`/proc` files say 0), up
/// to `limit` bytes; nil if it cannot be opened or read. For small files read on every
/// run, without Foundation's String(contentsOfFile:) and its costs.
public func readToEnd(_ path: String, limit: Int = 1 << 20) -> [UInt8]? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 16 * 1024)
    while bytes.count < limit {
        let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, min($0.count, limit - bytes.count)) }
        if n < 0 && errno == EINTR { continue }
        guard n >= 0 else { return nil }
        if n == 0 { break }
        bytes += chunk[0 ..< n]
    }
    return bytes
}

/// Every entry under `root` (files, directories, links; links not followed), as paths
/// relative to `root`, in no particular order; empty when `root` is not a readable
/// directory. Entries of subdirectories that cannot be opened are left out.
public func entriesRecursively(under root: String) -> [String] {
    var out: [String] = []
    func visit(_ relative: String) {
        guard let dir = opendir(relative.isEmpty ? root : root + "/" + relative) else { return }
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            // SAFETY: d_name is a NUL-terminated array inside the dirent readdir returned,
            // valid until the next readdir on `dir`; it is copied into a String at once.
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(cString: raw.baseAddress!.assumingMemoryBound(to: CChar.self))
            }
            if name == "." || name == ".." { continue }
            let path = relative.isEmpty ? name : relative + "/" + name
            out.append(path)
            var isDirectory = entry.pointee.d_type == UInt8(DT_DIR)
            if entry.pointee.d_type == UInt8(DT_UNKNOWN) {
                var st = stat()
                isDirectory = lstat(root + "/" + path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
            }
            if isDirectory { visit(path) }
        }
    }
    visit("")
    return out
}

/// `bytes` as UTF-8 text without the spaces, tabs and line ends around it.
public func textTrimmingBlanks(_ bytes: some BidirectionalCollection<UInt8>) -> String {
    let blank: (UInt8) -> Bool = { $0 == 0x20 || $0 == 0x0A || $0 == 0x09 || $0 == 0x0D }
    return String(decoding: bytes.drop(while: blank).reversed().drop(while: blank).reversed(), as: UTF8.self)
}

/// Lower-case hex of `bytes` (digests in file names, keys and manifests), without
/// `String(format:)`, which costs a process its first call dearly.
public func hexString(_ bytes: some Sequence<UInt8>) -> String {
    let digits = Array("0123456789abcdef".utf8)
    var out: [UInt8] = []
    out.reserveCapacity(bytes.underestimatedCount * 2)
    for b in bytes { out += [digits[Int(b >> 4)], digits[Int(b & 15)]] }
    return String(decoding: out, as: UTF8.self)
}
