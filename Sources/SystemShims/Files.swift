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
