#if canImport(Glibc)
import Glibc
#endif

/// Writes the tree under a directory as a tar stream: its files, directories and
/// symbolic links (not the directory itself), in name order, with mode and mtime. A
/// hard-linked file is written once per name. Anything else (a FIFO, a socket, a device)
/// is refused with an error naming it: a copy never drops part of a tree silently.
/// Nothing is followed: links are written as links, and each directory is opened with
/// O_NOFOLLOW from its parent's descriptor.
public enum TreeWriter {
    /// Streams the tree at `directory` to `emit` in pieces of at most `chunkSize` bytes
    /// (the last piece holds the end of the stream).
    public static func write(directory: String, chunkSize: Int = 256 * 1024,
                             emit: ([UInt8]) throws -> Void) throws {
        let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw TarError("\(directory): cannot open the directory: \(String(cString: strerror(errno)))") }
        try withoutActuallyEscaping(emit) { emit in
            var out = Output(chunkSize: chunkSize, emit: emit)
            try walk(fd, prefix: "", out: &out)  // closes fd
            try out.append(TarBlock.trailer)
            try out.flush()
        }
    }

    struct Output {
        let chunkSize: Int
        let emit: ([UInt8]) throws -> Void
        var pending: [UInt8] = []
        mutating func append(_ bytes: [UInt8]) throws {
            pending += bytes
            while pending.count >= chunkSize {
                try emit(Array(pending.prefix(chunkSize)))
                pending.removeFirst(chunkSize)
            }
        }
        mutating func flush() throws {
            if !pending.isEmpty { try emit(pending) }
            pending = []
        }
    }

    /// Writes the entries of the directory open at `dirFD` (which this closes).
    private static func walk(_ dirFD: Int32, prefix: String, out: inout Output) throws {
        guard let dir = fdopendir(dirFD) else {
            close(dirFD)
            throw TarError("\(prefix.isEmpty ? "." : prefix): cannot read the directory: \(String(cString: strerror(errno)))")
        }
        defer { closedir(dir) }
        var names: [String] = []
        while let e = readdir(dir) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        names.sort()
        for name in names {
            let path = prefix + name
            var st = stat()
            guard fstatat(dirFD, name, &st, AT_SYMLINK_NOFOLLOW) == 0 else {
                throw TarError("\(path): stat: \(String(cString: strerror(errno)))")
            }
            let mode = UInt32(st.st_mode) & 0o7777
            let mtime = Int64(st.st_mtim.tv_sec)
            switch st.st_mode & S_IFMT {
            case S_IFDIR:
                try out.append(TarBlock.header(for: TarEntry(path: path, kind: .directory, mode: mode, mtime: mtime)))
                let child = openat(dirFD, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
                guard child >= 0 else { throw TarError("\(path): cannot open the directory: \(String(cString: strerror(errno)))") }
                try walk(child, prefix: path + "/", out: &out)
            case S_IFLNK:
                var buf = [UInt8](repeating: 0, count: 4097)
                let n = readlinkat(dirFD, name, &buf, buf.count)
                guard n >= 0 else { throw TarError("\(path): readlink: \(String(cString: strerror(errno)))") }
                guard n < buf.count else { throw TarError("\(path): the link target is longer than 4096 bytes") }
                let target = String(decoding: buf[0..<n], as: UTF8.self)
                try out.append(TarBlock.header(for: TarEntry(path: path, kind: .symlink(target: target), mode: mode, mtime: mtime)))
            case S_IFREG:
                // O_NONBLOCK: a FIFO swapped in after the lstat must not block the open
                // (and is refused below); it changes nothing for a regular file's reads.
                let fd = openat(dirFD, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)
                guard fd >= 0 else { throw TarError("\(path): open: \(String(cString: strerror(errno)))") }
                defer { close(fd) }
                var opened = stat()
                guard fstat(fd, &opened) == 0, opened.st_mode & S_IFMT == S_IFREG else {
                    throw TarError("\(path): it stopped being a regular file while the tree was read; refused")
                }
                let size = UInt64(st.st_size)
                try out.append(TarBlock.header(for: TarEntry(path: path, kind: .file, mode: mode, mtime: mtime, size: size)))
                // Exactly `size` bytes: a file that grows or shrinks meanwhile is an error,
                // never a stream whose sizes lie.
                var left = size
                var buf = [UInt8](repeating: 0, count: 256 * 1024)
                while left > 0 {
                    let want = Int(min(UInt64(buf.count), left))
                    let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, want) }
                    if n < 0 && errno == EINTR { continue }
                    guard n > 0 else {
                        throw TarError("\(path): \(n == 0 ? "the file shrank while it was copied" : "read: \(String(cString: strerror(errno)))")")
                    }
                    try out.append(Array(buf[0..<n]))
                    left -= UInt64(n)
                }
                try out.append([UInt8](repeating: 0, count: TarBlock.padding(size)))
            default:
                let what = switch st.st_mode & S_IFMT {
                case S_IFIFO: "a FIFO"
                case S_IFSOCK: "a socket"
                case S_IFCHR, S_IFBLK: "a device file"
                default: "of an unknown file type"
                }
                throw TarError("\(path): is \(what); only files, directories and symbolic links are copied")
            }
        }
    }
}
