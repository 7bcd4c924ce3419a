#if canImport(Glibc)
import Glibc
#endif
import CSystem

/// An owned mmap(2) mapping, unmapped when released.
public final class MappedRegion: @unchecked Sendable {
    // @unchecked: the pointer and size never change after init; what is stored in the
    // mapping is shared by design (guest RAM, the vCPU run page).
    public let pointer: UnsafeMutableRawPointer
    public let size: Int

    /// Anonymous private read/write memory (guest RAM). Pages are allocated lazily by the kernel.
    public static func anonymous(size: Int, noReserve: Bool = true) throws(SystemError) -> MappedRegion {
        var flags = MAP_PRIVATE | MAP_ANONYMOUS
        if noReserve { flags |= MAP_NORESERVE }
        let p = mmap(nil, size, PROT_READ | PROT_WRITE, flags, -1, 0)
        guard let p, p != MAP_FAILED else { throw SystemError("mmap(anonymous, \(size))", errno: Glibc.errno) }
        return MappedRegion(pointer: p, size: size)
    }

    /// A shared mapping of `fd` (e.g. the vCPU's kvm_run page).
    public static func shared(fd: Int32, size: Int, offset: Int = 0) throws(SystemError) -> MappedRegion {
        let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off_t(offset))
        guard let p, p != MAP_FAILED else { throw SystemError("mmap(fd \(fd), \(size))", errno: Glibc.errno) }
        return MappedRegion(pointer: p, size: size)
    }

    /// A private copy-on-write mapping of `fd` (restored guest RAM): reads come from the
    /// file's page cache, shared by every mapping of the same file; a write gives this
    /// mapping its own copy of the page and never reaches the file.
    public static func privateFile(fd: Int32, size: Int) throws(SystemError) -> MappedRegion {
        let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, 0)
        guard let p, p != MAP_FAILED else { throw SystemError("mmap(private file, \(size))", errno: Glibc.errno) }
        return MappedRegion(pointer: p, size: size)
    }

    private init(pointer: UnsafeMutableRawPointer, size: Int) {
        self.pointer = pointer
        self.size = size
    }

    deinit { munmap(pointer, size) }
}

/// An eventfd(2) counter, used for irqfd (VMM -> guest interrupt) and ioeventfd
/// (guest doorbell -> VMM) plumbing.
public final class EventFD: @unchecked Sendable {
    // @unchecked: only the immutable descriptor is stored.
    public let fd: FileDescriptor

    /// - Parameter semaphore: EFD_SEMAPHORE: each read takes 1 from the counter (so N
    ///   waiting threads can each take one of N signals) instead of all of it.
    public init(nonBlocking: Bool = false, initial: UInt32 = 0, semaphore: Bool = false) throws(SystemError) {
        var flags = Int32(EFD_CLOEXEC)
        if nonBlocking { flags |= Int32(EFD_NONBLOCK) }
        if semaphore { flags |= Int32(EFD_SEMAPHORE) }
        let raw = try retryingEINTR("eventfd") { eventfd(initial, flags) }
        fd = FileDescriptor(owning: raw)
    }

    /// Adds `value` to the counter.
    public func signal(_ value: UInt64 = 1) {
        var v = value
        _ = withUnsafeBytes(of: &v) { Glibc.write(fd.rawValue, $0.baseAddress, 8) }
    }

    /// Reads and resets the counter; blocks unless non-blocking (then returns 0 when
    /// empty). Any other failure of read(2) on an eventfd this object owns means the
    /// descriptor was broken behind its back: that is a bug, and stops the process
    /// rather than reading as "nothing happened".
    @discardableResult
    public func wait() -> UInt64 {
        do { return try tryWait() } catch {
            preconditionFailure("EventFD.wait: \(error)")
        }
    }

    /// Reads and resets the counter: the value, or 0 when a non-blocking eventfd is
    /// empty; throws for any other failure.
    public func tryWait() throws(SystemError) -> UInt64 {
        var v: UInt64 = 0
        while true {
            let n = withUnsafeMutableBytes(of: &v) { Glibc.read(fd.rawValue, $0.baseAddress, 8) }
            if n == 8 { return v }
            let e = Glibc.errno
            if n < 0 && e == EINTR { continue }
            if n < 0 && (e == EAGAIN || e == EWOULDBLOCK) { return 0 }
            throw SystemError("read(eventfd)", errno: n < 0 ? e : EIO)
        }
    }
}

/// The current monotonic clock in nanoseconds.
public func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
