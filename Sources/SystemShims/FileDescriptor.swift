import CSystem
#if canImport(Glibc)
import Glibc
#endif

/// An owned file descriptor, closed exactly once when the last reference goes away
/// (or earlier through `close()`).
public final class FileDescriptor: @unchecked Sendable {
    // @unchecked: `raw` is only written by close(), which takes the lock; reads of an
    // Int32 are atomic on x86-64, and users must not use a descriptor after closing it.
    private var raw: Int32
    private let lock = Lock()

    /// Takes ownership of `raw`.
    public init(owning raw: Int32) {
        precondition(raw >= 0, "FileDescriptor(owning:) needs a valid descriptor")
        self.raw = raw
    }

    /// The raw descriptor, for syscalls. -1 after close().
    public var rawValue: Int32 { raw }

    /// Opens `path` with `flags` (O_CLOEXEC is always added).
    public static func open(_ path: String, _ flags: Int32, mode: mode_t = 0o644) throws(SystemError) -> FileDescriptor {
        let fd = try retryingEINTR("open(\(path))") { Glibc.open(path, flags | O_CLOEXEC, mode) }
        return FileDescriptor(owning: fd)
    }

    /// Closes now. Safe to call more than once.
    public func close() {
        lock.withLock {
            if raw >= 0 {
                _ = Glibc.close(raw)
                raw = -1
            }
        }
    }

    deinit {
        if raw >= 0 { _ = Glibc.close(raw) }
    }

    /// Reads up to `count` bytes at `offset` (pread).
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SystemError) -> Int {
        try retryingEINTR("pread") { Glibc.pread(raw, buffer.baseAddress, buffer.count, off_t(offset)) }
    }

    /// Writes all of `buffer` at `offset` (pwrite, looping on short writes).
    public func writeAll(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(SystemError) {
        var done = 0
        while done < buffer.count {
            let n = try retryingEINTR("pwrite") {
                Glibc.pwrite(raw, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            }
            if n == 0 { throw SystemError("pwrite", errno: EIO) }
            done += n
        }
    }

    /// Writes all of `buffer` to the current position (write(2), looping on short writes).
    public func writeAll(_ buffer: UnsafeRawBufferPointer) throws(SystemError) {
        try SystemShims.writeAll(raw, buffer)
    }

    /// The file's size (fstat).
    public func size() throws(SystemError) -> UInt64 {
        var st = stat()
        try retryingEINTR("fstat") { fstat(raw, &st) }
        return UInt64(st.st_size)
    }
}

/// Writes all of `buffer` to the raw descriptor `fd` (write(2), retrying EINTR and
/// looping on short writes). For descriptors the caller does not own (stdout, stderr,
/// a relay socket); owned ones use `FileDescriptor.writeAll`.
public func writeAll(_ fd: Int32, _ buffer: UnsafeRawBufferPointer) throws(SystemError) {
    var done = 0
    while done < buffer.count {
        let n = try retryingEINTR("write") { Glibc.write(fd, buffer.baseAddress! + done, buffer.count - done) }
        if n == 0 { throw SystemError("write", errno: EIO) }
        done += n
    }
}

/// Writes all of `bytes` to the raw descriptor `fd` (see the buffer variant).
public func writeAll(_ fd: Int32, _ bytes: [UInt8]) throws(SystemError) {
    var failure: SystemError?
    bytes.withUnsafeBytes { b in
        do throws(SystemError) { try writeAll(fd, b) } catch { failure = error }
    }
    if let failure { throw failure }
}

/// Reads what `fd` has (at most `buffer.count` bytes), retrying EINTR. Returns 0 at end
/// of file.
public func readSome(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> Int {
    try retryingEINTR("read") { Glibc.read(fd, buffer.baseAddress, buffer.count) }
}

/// A minimal pthread mutex (no Foundation dependency in the low layers).
public final class Lock: @unchecked Sendable {
    // @unchecked: the mutex itself is the synchronisation primitive.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

    public init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    public func lock() { pthread_mutex_lock(mutex) }
    public func unlock() { pthread_mutex_unlock(mutex) }

    @inline(__always)
    public func withLock<R>(_ body: () throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }
}

/// Fills `buffer` from the kernel's random source (getrandom(2)).
public func fillRandom(_ buffer: UnsafeMutableRawBufferPointer) throws(SystemError) {
    guard buffer.count > 0 else { return }
    try checkNegErrno("getrandom", csystem_fill_random(buffer.baseAddress, UInt(buffer.count)))
}
