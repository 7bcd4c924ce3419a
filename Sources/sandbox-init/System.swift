import CInit
import Glibc
import SystemShims

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

/// Result of one read on a possibly non-blocking descriptor.
enum ReadResult {
    case data([UInt8])
    case endOfFile
    case wouldBlock
}

/// One read of up to `max` bytes, retrying EINTR; says when a non-blocking descriptor
/// has nothing.
func readChunk(_ fd: Int32, max: Int) throws(SystemError) -> ReadResult {
    var buffer = [UInt8](repeating: 0, count: max)
    while true {
        let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        if n > 0 { return .data(Array(buffer[0..<n])) }
        if n == 0 { return .endOfFile }
        switch errno {
        case EINTR: continue
        case EAGAIN, EWOULDBLOCK: return .wouldBlock
        default: throw SystemError("read", errno: errno)
        }
    }
}

/// poll(2) retrying EINTR (the remaining timeout is not recomputed; callers loop anyway).
func pollFDs(_ fds: inout [pollfd], timeoutMillis: Int32) throws(SystemError) -> Int32 {
    while true {
        let n = poll(&fds, nfds_t(fds.count), timeoutMillis)
        if n >= 0 { return n }
        if errno != EINTR { throw SystemError("poll", errno: errno) }
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
