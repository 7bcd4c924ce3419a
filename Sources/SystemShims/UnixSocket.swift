import CSystem
#if canImport(Glibc)
import Glibc
#endif

/// AF_UNIX stream sockets and descriptor passing (SCM_RIGHTS), for the `sandbox server`
/// and its clients. The sockaddr and cmsg handling is in the C shim (its macros do not
/// import); this layer owns the descriptors.
public enum UnixSocket {
    /// A connection to the socket bound at `path`.
    public static func connect(_ path: String) throws(SystemError) -> FileDescriptor {
        FileDescriptor(owning: try checkNegErrno("connect(\(path))", csystem_unix_connect(path)))
    }

    /// A socket listening at `path` (mode 0600: this user only). EADDRINUSE when a
    /// socket file is already there, live or stale: the caller decides.
    public static func listen(_ path: String, backlog: Int32 = 32) throws(SystemError) -> FileDescriptor {
        FileDescriptor(owning: try checkNegErrno("bind(\(path))", csystem_unix_listen(path, backlog)))
    }

    /// The next connection on `listener`.
    public static func accept(_ listener: Int32) throws(SystemError) -> FileDescriptor {
        FileDescriptor(owning: try checkNegErrno("accept", csystem_unix_accept(listener)))
    }

    /// Sets SO_RCVTIMEO and SO_SNDTIMEO of `socket`: a send or receive that waits longer
    /// fails with EAGAIN (0: wait for ever).
    public static func setTimeouts(_ socket: Int32, seconds: Double) {
        var tv = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - seconds.rounded(.down)) * 1e6))
        setsockopt(socket, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(socket, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// poll(2) events for "the peer shut its end" (POLLRDHUP).
    public static let peerHangUpEvent = Int16(CSYSTEM_POLLRDHUP)

    /// Sends `bytes` with `descriptors` attached (at most 8), all of it or an error.
    /// Only the first piece carries the descriptors.
    public static func send(_ socket: Int32, _ bytes: [UInt8], descriptors: [Int32] = []) throws(SystemError) {
        precondition(descriptors.count <= 8, "at most 8 descriptors per message")
        precondition(!bytes.isEmpty, "a message has at least one byte")
        var done = 0
        var fds = descriptors
        repeat {
            let n = bytes.withUnsafeBytes { b in
                fds.withUnsafeBufferPointer { f in
                    csystem_send_with_fds(socket, b.baseAddress! + done, UInt(b.count - done), f.baseAddress, Int32(f.count))
                }
            }
            if n < 0 { throw SystemError("sendmsg", errno: Int32(-n)) }
            fds = []
            done += n
        } while done < bytes.count
    }

    /// Reads what `socket` has (at most `max` bytes), and the descriptors that came with
    /// it (owned by the caller; at most `maxDescriptors`, any more are closed). Empty at
    /// end of stream.
    public static func receive(_ socket: Int32, max: Int, maxDescriptors: Int) throws(SystemError) -> (bytes: [UInt8], descriptors: [FileDescriptor]) {
        var buffer = [UInt8](repeating: 0, count: max)
        var fds = [Int32](repeating: -1, count: Swift.max(1, Swift.min(8, maxDescriptors)))
        var count: Int32 = 0
        let n = buffer.withUnsafeMutableBytes { b in
            fds.withUnsafeMutableBufferPointer { f in
                csystem_recv_with_fds(socket, b.baseAddress, UInt(b.count), f.baseAddress, Int32(Swift.min(8, maxDescriptors)), &count)
            }
        }
        if n < 0 { throw SystemError("recvmsg", errno: Int32(-n)) }
        return (Array(buffer.prefix(n)), fds.prefix(Int(count)).map { FileDescriptor(owning: $0) })
    }

    /// The uid of the process at the other end of `socket`.
    public static func peerUID(_ socket: Int32) throws(SystemError) -> uid_t {
        let r = csystem_peer_uid(socket)
        if r < 0 { throw SystemError("getsockopt(SO_PEERCRED)", errno: Int32(-r)) }
        return uid_t(r)
    }
}
