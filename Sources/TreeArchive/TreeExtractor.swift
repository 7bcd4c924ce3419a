#if canImport(Glibc)
import Glibc
#endif

/// Unpacks a tar stream into a destination directory, refusing anything that would land
/// outside it: absolute paths, `..` components, a path through a symbolic link (every
/// directory on the way is opened with O_NOFOLLOW from the destination's descriptor),
/// and links whose target leaves the destination. Made for streams from a hostile
/// writer (a guest's copy-out): the decoder's limits bound the bytes and entries.
///
/// Link targets are allowed in one form: some `..` components, no more than the link's
/// depth below the destination, then names only (`../../lib/x`). Checked at each link's
/// own directory (a real directory: no entry is ever made through a link), this keeps
/// every chain of links inside, which a purely lexical check of arbitrary targets would
/// not (`a -> ..` then `b -> a/..`).
public final class TreeExtractor {
    public struct Options: Sendable {
        /// Clear setuid and setgid bits (a host unpacking a guest's files).
        public var dropSetID = true
        public var limits = TarLimits()
        public init(dropSetID: Bool = true, limits: TarLimits = TarLimits()) {
            self.dropSetID = dropSetID
            self.limits = limits
        }
    }

    private let root: Int32
    private let options: Options
    private var decoder: TarDecoder
    /// The file being written, and its entry.
    private var current: (fd: Int32, entry: TarEntry, written: UInt64)?
    /// Directories to give their mode and mtime last (their files are written first).
    private var directories: [(components: [String], mode: UInt32, mtime: Int64)] = []
    private var failed = false

    /// Opens (making it and its parents, 0755) the destination directory.
    public init(destination: String, options: Options = Options()) throws(TarError) {
        var path = destination.hasPrefix("/") ? "" : "."
        for part in destination.split(separator: "/") {
            path += "/" + part
            _ = mkdir(path, 0o755)
        }
        let fd = open(destination, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw TarError("\(destination): cannot open the destination directory: \(String(cString: strerror(errno)))") }
        self.root = fd
        self.options = options
        self.decoder = TarDecoder(limits: options.limits)
    }

    deinit {
        if let c = current { close(c.fd) }
        close(root)
    }

    /// Entries and file bytes unpacked so far.
    public var entries: Int { decoder.entries }
    public var totalBytes: UInt64 { decoder.totalBytes }

    /// Feeds the next bytes of the stream.
    public func feed(_ bytes: [UInt8]) throws(TarError) {
        guard !failed else { throw TarError("the tree was already refused") }
        do {
            for event in try decoder.feed(bytes) { try apply(event) }
        } catch {
            failed = true
            throw error
        }
    }

    /// Ends the stream: checks it ended properly and gives directories their modes.
    public func finish() throws(TarError) {
        try decoder.finish()
        if let c = current {
            throw TarError("\(c.entry.path): the stream ends \(c.entry.size - c.written) bytes before the end of this file")
        }
        // Deepest first, so a read-only parent does not stop its children's chmod.
        for d in directories.reversed() {
            let fd = try openDirectory(d.components, create: false)
            defer { if fd != root { close(fd) } }
            var times = [timespec(tv_sec: Int(d.mtime), tv_nsec: 0), timespec(tv_sec: Int(d.mtime), tv_nsec: 0)]
            _ = futimens(fd, &times)
            guard fchmod(fd, mode_t(mode(d.mode))) == 0 else {
                throw TarError("\(d.components.joined(separator: "/")): chmod: \(String(cString: strerror(errno)))")
            }
        }
        directories = []
    }

    private func mode(_ m: UInt32) -> UInt32 { options.dropSetID ? m & 0o1777 : m & 0o7777 }

    /// The entry's path as components: no absolute path, no `..`; `.` and empty parts dropped.
    private static func components(_ path: String) throws(TarError) -> [String] {
        guard !path.hasPrefix("/") else { throw TarError("\(path): an absolute path in the tree is refused") }
        var parts: [String] = []
        for p in path.split(separator: "/", omittingEmptySubsequences: true) {
            if p == "." { continue }
            guard p != ".." else { throw TarError("\(path): a '..' component would leave the destination; refused") }
            parts.append(String(p))
        }
        return parts
    }

    /// Opens the directory at `components` below the root, each step with O_NOFOLLOW
    /// (making missing ones, 0755, when `create`). Returns `root` itself for [].
    private func openDirectory(_ components: [String], create: Bool, entry: String? = nil) throws(TarError) -> Int32 {
        var fd = root
        for (i, name) in components.enumerated() {
            if create { _ = mkdirat(fd, name, 0o755) }
            let next = openat(fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            let e = errno
            if fd != root { close(fd) }
            guard next >= 0 else {
                let at = components[0...i].joined(separator: "/")
                if e == ELOOP || e == ENOTDIR {
                    throw TarError("\(entry ?? at): \(at) is a symbolic link or not a directory; the tree would go through it; refused")
                }
                throw TarError("\(entry ?? at): cannot open the directory \(at): \(String(cString: strerror(e)))")
            }
            fd = next
        }
        return fd
    }

    private func apply(_ event: TarDecoder.Event) throws(TarError) {
        switch event {
        case .end:
            if current != nil { try endFile() }
        case .data(let bytes):
            guard let c = current else { return }
            var done = 0
            while done < bytes.count {
                let n = bytes.withUnsafeBytes { buf in
                    // SAFETY: done < count keeps the pointer and length inside buf.
                    write(c.fd, buf.baseAddress! + done, buf.count - done)
                }
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw TarError("\(c.entry.path): write: \(String(cString: strerror(errno)))") }
                done += n
            }
            current!.written += UInt64(bytes.count)
            if current!.written == c.entry.size { try endFile() }
        case .entry(let entry):
            if current != nil { try endFile() }
            let parts = try Self.components(entry.path)
            guard let name = parts.last else {
                if entry.kind == .directory { directories.append(([], entry.mode, entry.mtime)) }  // the root itself ("./")
                return
            }
            let parent = try openDirectory(Array(parts.dropLast()), create: true, entry: entry.path)
            defer { if parent != root { close(parent) } }
            switch entry.kind {
            case .directory:
                if mkdirat(parent, name, 0o700) != 0 && errno != EEXIST {
                    throw TarError("\(entry.path): mkdir: \(String(cString: strerror(errno)))")
                }
                let fd = try openDirectory(parts, create: false, entry: entry.path)
                if fd != root { close(fd) }
                directories.append((parts, entry.mode, entry.mtime))
            case .file:
                // O_NONBLOCK: a FIFO already in the way must not block the open (it is
                // refused below); writes to a regular file do not change with it.
                let fd = openat(parent, name, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY, 0o600)
                guard fd >= 0 else {
                    let e = errno
                    if e == ELOOP { throw TarError("\(entry.path): a symbolic link is in the way of this file; refused") }
                    if e == ENXIO { throw TarError("\(entry.path): a FIFO (or a device) is in the way of this file; refused") }
                    throw TarError("\(entry.path): open: \(String(cString: strerror(e)))")
                }
                var opened = stat()
                guard fstat(fd, &opened) == 0, opened.st_mode & S_IFMT == S_IFREG else {
                    close(fd)
                    throw TarError("\(entry.path): something that is not a regular file (a FIFO, a device) is in the way of this file; refused")
                }
                current = (fd, entry, 0)
                if entry.size == 0 { try endFile() }
            case .symlink(let target):
                try Self.checkLink(target, depth: parts.count - 1, entry: entry.path)
                if symlinkat(target, parent, name) != 0 {
                    guard errno == EEXIST, unlinkat(parent, name, 0) == 0, symlinkat(target, parent, name) == 0 else {
                        throw TarError("\(entry.path): symlink: \(String(cString: strerror(errno)))")
                    }
                }
            }
        }
    }

    private func endFile() throws(TarError) {
        guard let c = current else { return }
        current = nil
        defer { close(c.fd) }
        guard c.written == c.entry.size else {
            throw TarError("\(c.entry.path): \(c.written) of \(c.entry.size) bytes arrived")
        }
        var times = [timespec(tv_sec: Int(c.entry.mtime), tv_nsec: 0), timespec(tv_sec: Int(c.entry.mtime), tv_nsec: 0)]
        _ = futimens(c.fd, &times)
        guard fchmod(c.fd, mode_t(mode(c.entry.mode))) == 0 else {
            throw TarError("\(c.entry.path): chmod: \(String(cString: strerror(errno)))")
        }
    }

    /// A link target: relative, at most `depth` leading `..`, then names only.
    static func checkLink(_ target: String, depth: Int, entry: String) throws(TarError) {
        guard !target.isEmpty else { throw TarError("\(entry): a symbolic link with an empty target is refused") }
        guard !target.hasPrefix("/") else {
            throw TarError("\(entry): a symbolic link to the absolute path \(target) would leave the destination; refused")
        }
        var ups = 0
        var named = false
        for p in target.split(separator: "/", omittingEmptySubsequences: true) {
            if p == "." { continue }
            if p == ".." {
                guard !named else { throw TarError("\(entry): the link target \(target) has '..' after a name; refused") }
                ups += 1
            } else {
                named = true
            }
        }
        guard ups <= depth else { throw TarError("\(entry): the link target \(target) leaves the destination; refused") }
    }
}
