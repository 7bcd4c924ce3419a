import Sandbox
import SystemShims
#if canImport(Glibc)
import Glibc
#endif

/// What `sandbox exec` and the sandbox server say to each other over the server's Unix
/// socket (Docs/Server.md). It uses no Foundation API: the client side runs before anything else
/// in `sandbox exec`, on every run.
///
/// A message is a little-endian u32 byte count (at most `maxMessage`) and that many bytes:
/// a u32 string count (at most `maxStrings`), then each string as a u32 byte count and its
/// UTF-8 bytes. The first string names the message:
///
///   client: exec VERSION IDENTITY ENVIRONMENT ARGS...   (+ stdin, stdout, stderr attached)
///           status | stop
///   server: accepted | exit STATUS | decline REASON | stale | status TEXT | stopping | refused REASON
enum ServerWire {
    static let version = "1"
    static let maxMessage = 1 << 20
    static let maxStrings = 65_536

    /// The socket: `$SANDBOX_SERVER_SOCKET`, else `server.sock` in the cache directory.
    static var socketPath: String {
        if let p = getenv("SANDBOX_SERVER_SOCKET"), p.pointee != 0 { return String(cString: p) }
        return SandboxPaths.cacheDirectory + "/server.sock"
    }

    /// This executable's identity (device, inode, size, change time): a server serves only
    /// clients of its own build, so a rebuilt `sandbox` never talks to an old server.
    static var executableIdentity: String {
        var st = stat()
        guard stat("/proc/self/exe", &st) == 0 else { return "unknown" }
        return "\(st.st_dev):\(st.st_ino):\(st.st_size):\(st.st_ctim.tv_sec).\(st.st_ctim.tv_nsec)"
    }

    /// The part of the environment a run depends on (every SANDBOX_* variable, HOME,
    /// XDG_CACHE_HOME), sorted, NUL-separated: a server runs only for clients whose
    /// environment it shares.
    static var relevantEnvironment: String {
        processEnvironment.filter { $0.hasPrefix("SANDBOX_") || $0.hasPrefix("HOME=") || $0.hasPrefix("XDG_CACHE_HOME=") }
            .sorted().joined(separator: "\u{0}")
    }

    /// This process's environment as K=V strings (from `environ`, without Foundation).
    static var processEnvironment: [String] {
        var all: [String] = []
        var p = environ
        while let entry = p.pointee {
            all.append(String(cString: entry))
            p += 1
        }
        return all
    }

    static func encode(_ strings: [String]) -> [UInt8] {
        var body: [UInt8] = []
        func put(_ v: Int) { for i in 0..<4 { body.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
        put(strings.count)
        for s in strings {
            put(s.utf8.count)
            body.append(contentsOf: s.utf8)
        }
        var out: [UInt8] = []
        out.reserveCapacity(body.count + 4)
        for i in 0..<4 { out.append(UInt8(truncatingIfNeeded: body.count >> (8 * i))) }
        return out + body
    }

    enum DecodeError: Error, CustomStringConvertible {
        case tooLarge(Int), malformed(String)
        var description: String {
            switch self {
            case .tooLarge(let n): return "a message of \(n) bytes (at most \(ServerWire.maxMessage))"
            case .malformed(let why): return "a malformed message: \(why)"
            }
        }
    }

    /// The strings of one message body (the bytes after its length), every count checked.
    static func decode(_ body: ArraySlice<UInt8>) throws(DecodeError) -> [String] {
        var at = body.startIndex
        func u32() throws(DecodeError) -> Int {
            guard body.endIndex - at >= 4 else { throw .malformed("it ends inside a length") }
            var v = 0
            for i in 0..<4 { v |= Int(body[at + i]) << (8 * i) }
            at += 4
            return v
        }
        let count = try u32()
        guard count <= maxStrings else { throw .malformed("\(count) strings (at most \(maxStrings))") }
        var strings: [String] = []
        strings.reserveCapacity(min(count, 64))
        for _ in 0..<count {
            let n = try u32()
            guard n <= body.endIndex - at else { throw .malformed("a string of \(n) bytes runs past its end") }
            strings.append(String(decoding: body[at..<at + n], as: UTF8.self))
            at += n
        }
        guard at == body.endIndex else { throw .malformed("\(body.endIndex - at) bytes after its last string") }
        return strings
    }

    /// Reads one whole message from `socket`, with the descriptors that came with it (at
    /// most `maxDescriptors`). nil at end of stream before any byte.
    static func read(_ socket: Int32, maxDescriptors: Int = 0) throws -> (strings: [String], descriptors: [FileDescriptor])? {
        var buffer: [UInt8] = []
        var fds: [FileDescriptor] = []
        var need = 4
        var length: Int?
        while buffer.count < need {
            let got = try UnixSocket.receive(socket, max: min(need - buffer.count, 64 * 1024), maxDescriptors: maxDescriptors - fds.count)
            fds += got.descriptors
            if got.bytes.isEmpty {
                if buffer.isEmpty { return nil }
                throw DecodeError.malformed("the connection ended inside a message")
            }
            buffer += got.bytes
            if length == nil && buffer.count >= 4 {
                let n = Int(buffer[0]) | Int(buffer[1]) << 8 | Int(buffer[2]) << 16 | Int(buffer[3]) << 24
                guard n <= maxMessage else { throw DecodeError.tooLarge(n) }
                length = n
                need = 4 + n
            }
        }
        return (try decode(buffer[4...]), fds)
    }
}
