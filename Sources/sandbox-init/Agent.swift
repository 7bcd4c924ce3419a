import AgentProtocol
import CInit
import Glibc
import SystemShims

/// Serves the agent protocol on a listening socket, one connection at a time. A
/// connection that breaks or sends garbage is closed and the next one accepted.
final class Agent {
    let reaper: Reaper
    let initStartedNanos: UInt64
    private(set) var agentReadyNanos: UInt64 = 0
    /// Write requests whose earlier chunk failed: later chunks are dropped silently
    /// until the final chunk (or a new offset-0 chunk) of that id.
    private var failedWrites: Set<UInt32> = []

    init(reaper: Reaper, initStartedNanos: UInt64) {
        self.reaper = reaper
        self.initStartedNanos = initStartedNanos
    }

    /// Accepts and serves connections until a client sends Shutdown.
    func serve(listenFD: Int32) {
        agentReadyNanos = nowNanos()
        while true {
            var fds = [pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: reaper.fd, events: Int16(POLLIN), revents: 0)]
            do { _ = try pollFDs(&fds, timeoutMillis: -1) } catch {
                log("\(error)")
                sleep(1)
                continue
            }
            if fds[1].revents != 0 { reaper.reap() }
            guard fds[0].revents != 0 else { continue }
            let fd = cinit_accept(listenFD)
            if fd < 0 {
                log("accept: \(errnoDescription(-fd))")
                continue
            }
            let connection = FrameConnection(fd: fd)
            if session(connection) { return }
        }
    }

    /// Serves one connection. Returns true if the host asked for Shutdown.
    func session(_ connection: FrameConnection) -> Bool {
        var greeted = false
        failedWrites = []
        let send: (AgentMessage, UInt32) throws -> Void = { message, id in try connection.send(message, id: id) }
        do {
            while true {
                let frame = try connection.nextFrame(reaper: reaper)
                if !greeted {
                    guard case .hello(let hello) = frame.message else {
                        try send(.error(ErrorMessage(code: .protocolViolation, message: "expected Hello, got \(frame.message.type)")), frame.id)
                        return false
                    }
                    guard hello.version >= 1 else {
                        try send(.error(ErrorMessage(code: .unsupported, message: "protocol version \(hello.version) not supported")), frame.id)
                        return false
                    }
                    try send(.hello(Hello(version: min(hello.version, AgentProtocolVersion.current), capabilities: .all)), frame.id)
                    greeted = true
                    continue
                }
                switch frame.message {
                case .exec(let exec):
                    let runner = ExecRunner(exec: exec, id: frame.id, reaper: reaper, input: connection, send: send, pong: pong)
                    _ = try runner.run()
                    if runner.shutdownRequested { return true }
                case .ping(let value):
                    try send(pong(value), frame.id)
                case .seed(let seed):
                    if let failure = Self.apply(seed) { try send(.error(ErrorMessage(code: .internal, message: failure)), frame.id) }
                case .writeFile(let chunk):
                    try writeFile(chunk, id: frame.id, send: send)
                case .readFile(let path):
                    try readFile(path, id: frame.id, send: send)
                case .shutdown:
                    return true
                case .stdinData, .stdinEOF, .signal, .kill:
                    break // late input for a finished exec
                case .error(let e):
                    log("host reported error \(e.code.rawValue): \(e.message)")
                case .hello, .pong, .output, .exited, .signalled, .execFailed, .timedOut, .fileData, .fileEnd, .fileError:
                    try send(.error(ErrorMessage(code: .protocolViolation, message: "unexpected \(frame.message.type)")), frame.id)
                }
            }
        } catch ConnectionError.closedByPeer {
            return false
        } catch ConnectionError.malformed(let error) {
            log("closing connection: malformed frame: \(error)")
            try? connection.send(.error(ErrorMessage(code: .malformedFrame, message: "\(error)")), id: 0)
            return false
        } catch {
            log("closing connection: \(error)")
            return false
        }
    }

    /// Makes this guest unique (random pool, wall clock); nil, or what failed.
    static func apply(_ seed: Seed) -> String? {
        let rc = seed.entropy.withUnsafeBufferPointer { cinit_seed_random($0.baseAddress, Int32($0.count)) }
        if rc < 0 { return "seeding the random pool: \(errnoDescription(-rc))" }
        let clock = cinit_set_realtime(seed.unixNanos)
        if clock < 0 { return "setting the clock: \(errnoDescription(-clock))" }
        return nil
    }

    func pong(_ echo: UInt64) -> AgentMessage {
        .pong(Pong(echo: echo, guestNowNanos: nowNanos(), initStartedNanos: initStartedNanos, agentReadyNanos: agentReadyNanos))
    }

    // MARK: - Files

    private func writeFile(_ chunk: WriteFile, id: UInt32, send: (AgentMessage, UInt32) throws -> Void) throws {
        if chunk.offset == 0 { failedWrites.remove(id) }
        if failedWrites.contains(id) {
            if chunk.isFinal { failedWrites.remove(id) }
            return
        }
        func fail(_ call: String, _ code: Int32) throws {
            if !chunk.isFinal { failedWrites.insert(id) }
            try send(.fileError(FileError(errno: code, message: "\(call) \(chunk.path): \(errnoDescription(code))")), id)
        }
        let create = chunk.offset == 0
        let flags = O_WRONLY | O_CLOEXEC | (create ? O_CREAT | O_TRUNC : 0)
        var fd = open(chunk.path, flags, mode_t(chunk.mode & 0o7777))
        if fd < 0 && errno == ENOENT && create {
            // Missing parents are made (0755), as `install -D` does.
            makeParents(of: chunk.path)
            fd = open(chunk.path, flags, mode_t(chunk.mode & 0o7777))
        }
        guard fd >= 0 else { return try fail("open", errno) }
        defer { close(fd) }
        if create && fchmod(fd, mode_t(chunk.mode & 0o7777)) < 0 { return try fail("fchmod", errno) }
        var done = 0
        while done < chunk.data.count {
            let n = chunk.data.withUnsafeBytes { buf in
                // SAFETY: done < count keeps the pointer and length inside buf.
                pwrite(fd, buf.baseAddress! + done, buf.count - done, off_t(chunk.offset) + off_t(done))
            }
            if n < 0 {
                if errno == EINTR { continue }
                return try fail("write", errno)
            }
            done += n
        }
        if chunk.isFinal {
            var st = stat()
            guard fstat(fd, &st) == 0 else { return try fail("fstat", errno) }
            try send(.fileEnd(size: UInt64(st.st_size)), id)
        }
    }

    /// `mkdir -p` of `path`'s directory; what cannot be made shows in the open that follows.
    private func makeParents(of path: String) {
        var prefix = ""
        let parts = path.split(separator: "/", omittingEmptySubsequences: true).dropLast()
        for part in parts {
            prefix += "/" + part
            _ = mkdir(prefix, 0o755)
        }
    }

    private func readFile(_ path: String, id: UInt32, send: (AgentMessage, UInt32) throws -> Void) throws {
        func fail(_ call: String, _ code: Int32) throws {
            try send(.fileError(FileError(errno: code, message: "\(call) \(path): \(errnoDescription(code))")), id)
        }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return try fail("open", errno) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return try fail("fstat", errno) }
        let kind = st.st_mode & S_IFMT
        guard kind == S_IFREG else { return try fail("read", kind == S_IFDIR ? EISDIR : EINVAL) }
        var offset: UInt64 = 0
        while true {
            let result: ReadResult
            do { result = try readChunk(fd, max: AgentProtocolLimits.maxChunkSize) } catch { return try fail("read", error.errno) }
            guard case .data(let bytes) = result else { break }
            try send(.fileData(FileData(offset: offset, data: bytes)), id)
            offset += UInt64(bytes.count)
        }
        try send(.fileEnd(size: offset), id)
    }
}
