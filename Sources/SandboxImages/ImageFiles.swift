import Crypto
import Foundation
import SandboxCore
import SystemShims
#if canImport(Glibc)
import Glibc
#endif

/// File, process and hashing helpers for the image store: SHA-256 (swift-crypto),
/// ext4 superblock checks, fsync, flock and atomic writes.
enum ImageFiles {
    static let mebibyte: UInt64 = 1 << 20

    // MARK: Processes

    struct ToolResult { var status: Int32; var stdout: String; var stderr: String }

    /// Runs `tool` to completion, capturing stdout and stderr (read on separate threads so
    /// neither pipe can fill up and block the child). Stdin is /dev/null.
    static func capture(_ tool: String, _ arguments: [String], currentDirectory: String? = nil) throws -> ToolResult {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tool)
        p.arguments = arguments
        if let currentDirectory { p.currentDirectoryURL = URL(fileURLWithPath: currentDirectory) }
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        do { try p.run() } catch {
            throw SandboxError.image("cannot run \(tool): \(error.localizedDescription)")
        }
        let group = DispatchGroup()
        nonisolated(unsafe) var errData = Data()
        DispatchQueue.global().async(group: group) { errData = err.fileHandleForReading.readDataToEndOfFile() }
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        group.wait()
        return ToolResult(status: p.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                          stderr: String(decoding: errData, as: UTF8.self))
    }

    /// The absolute path of `name` on `$PATH` or in the sbin directories (which a
    /// non-login root shell may not have on its path), or nil.
    static func findTool(_ name: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        let dirs = path.split(separator: ":").map(String.init) + ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        for d in dirs where !d.isEmpty {
            let candidate = d + "/" + name
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    /// `name`, installing Debian package `package` with apt-get first if it is missing.
    static func requireTool(_ name: String, package: String, progress: (String) -> Void) throws -> String {
        if let t = findTool(name) { return t }
        progress("[image] \(name) is not installed; installing \(package) with apt-get…")
        guard let apt = findTool("apt-get") else {
            throw SandboxError.image("\(name) is not installed and apt-get is not available; install \(package)")
        }
        let (status, _) = try runTool(apt, ["install", "-y", "-q", package])
        guard status == 0, let t = findTool(name) else {
            throw SandboxError.image("installing \(package) for \(name) failed (apt-get exit status \(status)); install it by hand")
        }
        return t
    }

    // MARK: SHA-256 (swift-crypto, streamed: no process and no temporary file per hash)

    /// SHA-256 of each file, keyed by the path as given.
    static func sha256(files: [String]) throws -> [String: String] {
        var result: [String: String] = [:]
        for f in files { result[f] = try sha256(file: f) }
        return result
    }

    /// SHA-256 of a file's contents, read in 1 MiB chunks.
    static func sha256(file: String) throws -> String {
        let fd = open(file, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SandboxError(.image, "cannot hash \(file)", underlying: SystemError("open(\(file))", errno: errno)) }
        defer { close(fd) }
        var hasher = SHA256()
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            let n: Int
            do { n = try buffer.withUnsafeMutableBytes { try readSome(fd, into: $0) } } catch {
                throw SandboxError(.image, "cannot hash \(file)", underlying: error)
            }
            if n == 0 { break }
            buffer.withUnsafeBytes { hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
        }
        return hex(hasher.finalize())
    }

    /// SHA-256 of a string's UTF-8 bytes.
    static func sha256(text: String) -> String {
        hex(SHA256.hash(data: Array(text.utf8)))
    }

    static func hex(_ digest: SHA256.Digest) -> String { hexString(digest) }

    /// "HASH  relative/path" lines, sorted by path, for every regular file under each
    /// of `directories` (paths relative to `base`). Symlinks are listed by their target.
    static func manifest(of directories: [String], relativeTo base: String) throws -> String {
        let fm = FileManager.default
        var files: [String] = []
        var links: [String] = []
        for dir in directories {
            guard let e = fm.enumerator(atPath: base + "/" + dir) else { continue }
            while let rel = e.nextObject() as? String {
                let full = base + "/" + dir + "/" + rel
                let attrs = try? fm.attributesOfItem(atPath: full)
                let type = attrs?[.type] as? FileAttributeType
                if type == .typeRegular { files.append(dir + "/" + rel) }
                if type == .typeSymbolicLink { links.append(dir + "/" + rel) }
            }
        }
        let hashes = try sha256(files: files.map { base + "/" + $0 })
        var lines = files.map { f -> String in
            let mode = isExecutable(base + "/" + f) ? "x" : "-"
            return "\(hashes[base + "/" + f] ?? "?") \(mode) \(f)"
        }
        lines += links.map { "link \((try? fm.destinationOfSymbolicLink(atPath: base + "/" + $0)) ?? "?") \($0)" }
        return lines.sorted { $0.split(separator: " ").last! < $1.split(separator: " ").last! }.joined(separator: "\n") + "\n"
    }

    static func isExecutable(_ path: String) -> Bool { access(path, X_OK) == 0 }

    // MARK: ext4

    /// What a superblock check found wrong, or nil for a plausible ext4 image.
    enum Ext4Problem: Equatable { case missing, notAFile, truncated(String), unreadable(String), notExt4(UInt16) }

    /// Checks that `path` is a regular file holding an ext2/3/4 superblock (magic 0xEF53
    /// at byte 1080) and at least as many bytes as the superblock's block count says.
    static func ext4Problem(_ path: String) -> Ext4Problem? {
        var st = stat()
        guard stat(path, &st) == 0 else { return errno == ENOENT || errno == ENOTDIR ? .missing : .unreadable(String(cString: strerror(errno))) }
        guard (st.st_mode & S_IFMT) == S_IFREG else { return .notAFile }
        let size = UInt64(st.st_size)
        if size < 2048 { return .truncated("it has \(size) bytes, fewer than the 2048 that hold the boot block and superblock") }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return .unreadable(String(cString: strerror(errno))) }
        defer { close(fd) }
        var sb = [UInt8](repeating: 0, count: 1024)
        let n = sb.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, 1024, 1024) }
        if n < 0 { return .unreadable(String(cString: strerror(errno))) }
        if n < 1024 { return .truncated("the superblock at byte 1024 is cut short (\(n) of 1024 bytes)") }
        func u16(_ o: Int) -> UInt64 { UInt64(sb[o]) | UInt64(sb[o + 1]) << 8 }
        func u32(_ o: Int) -> UInt64 { u16(o) | u16(o + 2) << 16 }
        let magic = UInt16(u16(56))
        guard magic == 0xEF53 else { return .notExt4(magic) }
        let logBlockSize = u32(24)
        guard logBlockSize <= 6 else { return .unreadable("the superblock has an impossible block size (log \(logBlockSize))") }
        var blocks = u32(4)
        if u32(0x60) & 0x80 != 0 { blocks |= u32(0x150) << 32 }  // INCOMPAT_64BIT: s_blocks_count_hi
        let expected = blocks * (1024 << logBlockSize)
        if size < expected { return .truncated("it has \(size) bytes but its superblock describes \(expected)") }
        return nil
    }

    // MARK: Durable files

    /// fsync(2) on `path` (a file or a directory).
    static func fsync(path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SandboxError.image("cannot open \(path) to sync it: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard Glibc.fsync(fd) == 0 else { throw SandboxError.image("fsync \(path): \(String(cString: strerror(errno)))") }
    }

    /// Writes `data` to a temp file next to `path`, fsyncs it, renames it over `path`
    /// and fsyncs the directory: readers see the old or the new file, never a mix.
    static func writeAtomically(_ data: Data, to path: String) throws {
        let dir = (path as NSString).deletingLastPathComponent
        let tmp = path + ".\(getpid()).\(UInt32.random(in: 0...UInt32.max)).tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SandboxError.image("cannot create \(tmp): \(String(cString: strerror(errno)))") }
        var ok = false
        defer { if !ok { unlink(tmp) } }
        let wrote: Bool = data.withUnsafeBytes { buf in
            var done = 0
            while done < buf.count {
                let n = write(fd, buf.baseAddress! + done, buf.count - done)
                if n < 0 { if errno == EINTR { continue }; return false }
                done += n
            }
            return Glibc.fsync(fd) == 0
        }
        let err = errno
        close(fd)
        guard wrote else { throw SandboxError.image("cannot write \(tmp): \(String(cString: strerror(err)))") }
        guard rename(tmp, path) == 0 else { throw SandboxError.image("cannot rename \(tmp) to \(path): \(String(cString: strerror(errno)))") }
        ok = true
        try fsync(path: dir)
    }

    /// Runs `body` holding an exclusive flock(2) on `lockPath` (created if needed).
    static func withLock<T>(_ lockPath: String, _ body: () throws -> T) throws -> T {
        let fd = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SandboxError.image("cannot open the lock file \(lockPath): \(String(cString: strerror(errno)))") }
        defer { close(fd) }  // closing releases the lock
        while flock(fd, LOCK_EX) != 0 {
            if errno == EINTR { continue }
            throw SandboxError.image("cannot lock \(lockPath): \(String(cString: strerror(errno)))")
        }
        return try body()
    }

    /// Makes `dir` (and its parents) and checks that it is a writable directory, with
    /// errors that name the directory at fault.
    static func ensureWritableDirectory(_ dir: String, what: String) throws {
        let fm = FileManager.default
        var isDir: ObjCBool = false
        if fm.fileExists(atPath: dir, isDirectory: &isDir) {
            guard isDir.boolValue else {
                throw SandboxError.image("the \(what) \(dir) is not a directory (a file is in the way); remove it or set SANDBOX_CACHE to a writable directory")
            }
        } else {
            // Find the nearest existing ancestor to say precisely what is wrong.
            var ancestor = (dir as NSString).deletingLastPathComponent
            while !ancestor.isEmpty && ancestor != "/" && !fm.fileExists(atPath: ancestor) {
                ancestor = (ancestor as NSString).deletingLastPathComponent
            }
            if fm.fileExists(atPath: ancestor, isDirectory: &isDir), !isDir.boolValue {
                throw SandboxError.image("cannot create the \(what) \(dir): \(ancestor) is a file, not a directory; set SANDBOX_CACHE to a writable directory")
            }
            if !ancestor.isEmpty, access(ancestor, W_OK) != 0 {
                throw SandboxError.image("cannot create the \(what) \(dir): \(ancestor) is not writable (\(String(cString: strerror(errno)))); set SANDBOX_CACHE to a writable directory")
            }
            do { try fm.createDirectory(atPath: dir, withIntermediateDirectories: true) } catch {
                throw SandboxError.image("cannot create the \(what) \(dir): \(error.localizedDescription)")
            }
        }
        guard access(dir, W_OK) == 0 else {
            throw SandboxError.image("the \(what) \(dir) is not writable (\(String(cString: strerror(errno)))); set SANDBOX_CACHE to a writable directory")
        }
    }

    /// Allocated bytes under `dir` (du, counting hard links once) and the number of entries.
    static func usage(of dir: String) throws -> (bytes: UInt64, entries: Int) {
        guard let du = findTool("du") else { throw SandboxError.image("du (coreutils) is not installed") }
        let r = try capture(du, ["-s", "-x", "--block-size=1", dir])
        guard r.status == 0, let bytes = UInt64(r.stdout.split(whereSeparator: { $0 == "\t" || $0 == " " }).first ?? "") else {
            throw SandboxError.image("du \(dir) failed (status \(r.status)): \(r.stderr)")
        }
        var entries = 1
        if let e = FileManager.default.enumerator(atPath: dir) { while e.nextObject() != nil { entries += 1 } }
        return (bytes, entries)
    }
}
