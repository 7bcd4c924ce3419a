import CInit
import Glibc

/// A failed system call: which call and its errno.
struct SystemError: Error, CustomStringConvertible {
    let call: String
    let errno: Int32
    var description: String { "\(call): \(errnoDescription(errno)) (errno \(errno))" }
}

/// strerror text for an errno value.
func errnoDescription(_ code: Int32) -> String {
    guard let s = strerror(code) else { return "errno \(code)" }
    return String(cString: s)
}

/// Writes one line `sandbox-init: message` to stderr (the console when PID 1).
func log(_ message: String) {
    let bytes = Array("sandbox-init: \(message)\n".utf8)
    try? writeAll(2, bytes)
}

/// Writes every byte, retrying EINTR and short writes (blocking descriptor).
func writeAll(_ fd: Int32, _ bytes: [UInt8]) throws(SystemError) {
    var done = 0
    while done < bytes.count {
        let n = bytes.withUnsafeBytes { buf in
            // SAFETY: done < count, so the base address plus done stays inside buf.
            Glibc.write(fd, buf.baseAddress! + done, buf.count - done)
        }
        if n < 0 {
            if errno == EINTR { continue }
            throw SystemError(call: "write", errno: errno)
        }
        done += n
    }
}

/// Result of one read on a possibly non-blocking descriptor.
enum ReadResult {
    case data([UInt8])
    case endOfFile
    case wouldBlock
}

/// One read of up to `max` bytes, retrying EINTR.
func readSome(_ fd: Int32, max: Int) throws(SystemError) -> ReadResult {
    var buffer = [UInt8](repeating: 0, count: max)
    while true {
        let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        if n > 0 { return .data(Array(buffer[0..<n])) }
        if n == 0 { return .endOfFile }
        switch errno {
        case EINTR: continue
        case EAGAIN, EWOULDBLOCK: return .wouldBlock
        default: throw SystemError(call: "read", errno: errno)
        }
    }
}

/// poll(2) retrying EINTR (the remaining timeout is not recomputed; callers loop anyway).
func pollFDs(_ fds: inout [pollfd], timeoutMillis: Int32) throws(SystemError) -> Int32 {
    while true {
        let n = poll(&fds, nfds_t(fds.count), timeoutMillis)
        if n >= 0 { return n }
        if errno != EINTR { throw SystemError(call: "poll", errno: errno) }
    }
}

/// Nanoseconds on CLOCK_BOOTTIME.
func nowNanos() -> UInt64 { cinit_boottime_ns() }

/// Builds a NULL-terminated C string array that lives for the duration of `body`.
func withCStringArray<R>(_ strings: [String], _ body: (UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>) -> R) -> R {
    let pointers = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: strings.count + 1)
    for (i, s) in strings.enumerated() { pointers[i] = strdup(s) }
    pointers[strings.count] = nil
    defer {
        for i in 0..<strings.count { free(pointers[i]) }
        pointers.deallocate()
    }
    return body(pointers)
}
