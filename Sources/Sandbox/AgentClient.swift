import AgentProtocol
import Synchronization
import SystemShims
#if canImport(Glibc)
import Glibc
#endif

/// How a command ended, as the agent reported it.
public enum CommandStatus: Equatable, Sendable {
    case exited(Int32)
    case signalled(Int32)
    case timedOut
    /// The command could not be started (errno from the guest, e.g. ENOENT).
    case failedToStart(errno: Int32, message: String)
}

/// The host side of the agent protocol over a connected byte stream (a socket to the
/// VMM process, which relays it to the guest's vsock port; or a Unix socket in tests).
/// Blocking; use it from a dedicated thread, never the async cooperative pool.
public final class AgentClient: Sendable {
    public let fd: FileDescriptor
    /// Held for each whole frame's send(2)s, so frames from the session thread and
    /// the stdin pump (its own thread) never interleave.
    private let writeLock = Mutex(())
    /// The session thread's state (never held across I/O).
    private struct State {
        var decoder = FrameDecoder()
        var nextID: UInt32 = 1
        /// The Exec in progress, for `killCurrentExec`.
        var execID: UInt32?
    }
    private let state = Mutex(State())

    public enum Error: Swift.Error, CustomStringConvertible, Sendable {
        case connectionClosed
        case protocolError(String)
        case agentError(String)
        case io(SystemError)
        public var description: String {
            switch self {
            case .connectionClosed: return "the guest agent closed the connection"
            case .protocolError(let s): return "agent protocol error: \(s)"
            case .agentError(let s): return "the guest agent reported an error: \(s)"
            case .io(let e): return "agent connection: \(e)"
            }
        }
    }

    public init(fd: FileDescriptor) { self.fd = fd }

    /// Sends one frame.
    public func send(_ message: AgentMessage, id: UInt32 = 0) throws {
        let bytes: [UInt8]
        do { bytes = try message.encode(id: id) } catch { throw Error.protocolError("\(error)") }
        // send(MSG_NOSIGNAL), not write: a VM that went away must not SIGPIPE the caller.
        try writeLock.withLock { _ in
            try bytes.withUnsafeBytes { raw in
                var done = 0
                while done < raw.count {
                    let n = Glibc.send(fd.rawValue, raw.baseAddress! + done, raw.count - done, Int32(MSG_NOSIGNAL))
                    if n < 0 {
                        if errno == EINTR { continue }
                        throw Error.io(SystemError("send(agent)", errno: errno))
                    }
                    done += n
                }
            }
        }
    }

    /// Blocks until the next frame arrives.
    public func receive() throws -> Frame {
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            do throws(AgentProtocolError) {
                if let f = try state.withLock({ (s: inout State) throws(AgentProtocolError) in try s.decoder.next() }) { return f }
            } catch { throw Error.protocolError("\(error)") }
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd.rawValue, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw Error.io(SystemError("read(agent)", errno: errno))
            }
            if n == 0 { throw Error.connectionClosed }
            state.withLock { $0.decoder.append(buffer[0..<n]) }
        }
    }

    /// Exchanges Hello frames.
    public func hello() throws {
        try send(.hello(Hello()))
        let f = try receive()
        guard case .hello(let h) = f.message else { throw Error.protocolError("expected Hello, got \(f.message.type)") }
        guard AgentProtocolVersion.supported.contains(h.version) else {
            throw Error.protocolError("agent speaks protocol \(h.version), host supports \(AgentProtocolVersion.supported)")
        }
    }

    /// Makes a restored guest unique: 64 bytes from the host's random source for its
    /// kernel's random pool, and the host's wall clock. The agent answers only on failure
    /// (an Error), so a following `ping()` confirms it.
    public func seed() throws {
        var rng = SystemRandomNumberGenerator()
        let entropy = (0..<64).map { _ in UInt8.random(in: 0...255, using: &rng) }
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        let now = UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
        try send(.seed(Seed(unixNanos: now, entropy: entropy)))
    }

    /// Ping: the agent answers with its boot timestamps.
    public func ping() throws -> Pong {
        let token = UInt64(state.withLock { $0.nextID })
        try send(.ping(token))
        while true {
            let f = try receive()
            if case .pong(let p) = f.message, p.echo == token { return p }
            if case .error(let m) = f.message { throw Error.agentError(m.message) }
        }
    }

    /// Runs a command, delivering output chunks in order as they arrive.
    /// - Parameters:
    ///   - stdin: bytes to feed the command (then EOF); nil = no stdin.
    ///   - stdinFD: a host descriptor to pump into the command's stdin until EOF (terminal passthrough).
    ///   - onStarted: called with the Exec's request id once it is sent (for `killExec`).
    public func exec(_ exec: Exec, stdin: [UInt8]? = nil, stdinFD: Int32? = nil, onStarted: ((UInt32) -> Void)? = nil,
                     onOutput: (StdioStream, [UInt8]) -> Void) throws -> CommandStatus {
        var e = exec
        // Without input the command reads /dev/null (fd 0 open, at end of file), as under a
        // shell with `</dev/null`; a closed fd 0 breaks programs that dup or check it.
        e.stdin = (stdin != nil || stdinFD != nil) ? .stream : .none
        let id = takeID()
        state.withLock { $0.execID = id }
        defer { state.withLock { $0.execID = nil } }
        try send(.exec(e), id: id)
        onStarted?(id)
        var pump: NativeThread?
        if let stdin {
            pump = try NativeThread(name: "stdin-pump") { [self] in
                var offset = 0
                let chunk = AgentProtocolLimits.maxChunkSize
                while offset < stdin.count {
                    let end = min(offset + chunk, stdin.count)
                    guard (try? send(.stdinData(Array(stdin[offset..<end])), id: id)) != nil else { return }
                    offset = end
                }
                try? send(.stdinEOF, id: id)
            }
        } else if let stdinFD {
            pump = try NativeThread(name: "stdin-pump") { [self] in
                var buf = [UInt8](repeating: 0, count: 64 * 1024)
                while true {
                    let n = buf.withUnsafeMutableBytes { Glibc.read(stdinFD, $0.baseAddress, $0.count) }
                    if n < 0 && errno == EINTR { continue }
                    if n <= 0 { break }
                    guard (try? send(.stdinData(Array(buf[0..<n])), id: id)) != nil else { return }
                }
                try? send(.stdinEOF, id: id)
            }
        }
        defer { if stdin != nil { pump?.join() } }
        while true {
            let f = try receive()
            switch f.message {
            case .output(let o): onOutput(o.stream, o.data)
            case .exited(let code): return .exited(code)
            case .signalled(let sig, _): return .signalled(sig)
            case .timedOut: return .timedOut
            case .execFailed(let ef): return .failedToStart(errno: ef.errno, message: ef.message)
            case .error(let m): throw Error.agentError(m.message)
            default: continue
            }
        }
    }

    /// Writes a file in the guest (copy-in).
    public func writeFile(path: String, mode: UInt32, contents: [UInt8]) throws {
        let id = takeID()
        let chunk = AgentProtocolLimits.maxChunkSize
        var offset = 0
        repeat {
            let end = min(offset + chunk, contents.count)
            try send(.writeFile(WriteFile(path: path, mode: mode, offset: UInt64(offset), isFinal: end == contents.count,
                                          data: Array(contents[offset..<end]))), id: id)
            offset = end
        } while offset < contents.count
        while true {
            let f = try receive()
            switch f.message {
            case .fileEnd: return
            case .fileError(let e): throw Error.agentError("writing \(path) in the guest: \(e.message)")
            case .error(let m): throw Error.agentError(m.message)
            default: continue
            }
        }
    }

    /// Reads a file from the guest (copy-out).
    /// Reads a guest file. More than `limit` bytes is an error (the guest decides what
    /// it sends; the host decides how much it keeps).
    public func readFile(path: String, limit: UInt64 = 1 << 30) throws -> [UInt8] {
        let id = takeID()
        try send(.readFile(path: path), id: id)
        var out: [UInt8] = []
        while true {
            let f = try receive()
            switch f.message {
            case .fileData(let d):
                guard UInt64(out.count) + UInt64(d.data.count) <= limit else {
                    throw Error.agentError("\(path) in the guest is larger than the copy-out limit of \(limit) bytes")
                }
                out += d.data
            case .fileEnd: return out
            case .fileError(let e): throw Error.agentError("reading \(path) in the guest: \(e.message)")
            case .error(let m): throw Error.agentError(m.message)
            default: continue
            }
        }
    }

    /// The next request ID.
    private func takeID() -> UInt32 {
        state.withLock { s in
            let id = s.nextID
            s.nextID &+= 1
            return id
        }
    }

    /// The id of the Exec in progress, if any.
    public var currentExecID: UInt32? { state.withLock { $0.execID } }

    /// SIGKILLs the process group of Exec `id` if it is still the one in progress (from
    /// any thread; that exec then returns its `signalled(9)`). Returns whether it was.
    @discardableResult
    public func killExec(_ id: UInt32) -> Bool {
        guard state.withLock({ $0.execID }) == id else { return false }
        return (try? send(.kill, id: id)) != nil
    }

    /// Asks the guest to sync and power off.
    public func shutdown() { try? send(.shutdown) }
}
