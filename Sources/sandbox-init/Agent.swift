import AgentProtocol
import CInit
import Glibc
import SystemShims
import TreeArchive

/// Serves the agent protocol on a listening socket, one connection at a time; on that
/// connection any number of requests at once (up to `maxConcurrentExecs` Execs), told
/// apart by their request id. One event loop (poll) drives the connection, the reaper and
/// every running Exec; file requests are served whole when they arrive. A connection that
/// breaks or sends garbage is closed (its commands killed) and the next one accepted.
final class Agent {
    /// Execs running at once on one connection; one more gets `Error(busy)`.
    static let maxConcurrentExecs = 64
    /// Stop reading the connection while this many stdin bytes (all Execs together) wait
    /// for their commands.
    static let stdinBacklogLimit = 8 << 20

    let reaper: Reaper
    let initStartedNanos: UInt64
    private(set) var agentReadyNanos: UInt64 = 0
    /// Write requests whose earlier chunk failed: later chunks are dropped silently
    /// until the final chunk (or a new offset-0 chunk) of that id.
    private var failedWrites: Set<UInt32> = []
    /// Trees being unpacked (WriteTree), by request id: the extractor (nil once it
    /// failed: later pieces are dropped until the final one) and the next offset.
    private var trees: [UInt32: (extractor: TreeExtractor?, next: UInt64)] = [:]

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
        var execs: [UInt32: ExecRunner] = [:]
        failedWrites = []
        trees = [:]
        let send: (AgentMessage, UInt32) throws -> Void = { message, id in try connection.send(message, id: id) }
        // Whatever ends the session, no command of it keeps running.
        defer { for runner in execs.values { runner.abandon() } }

        /// Handles one frame; true when it was Shutdown.
        func handle(_ frame: Frame) throws -> Bool {
            if !greeted {
                guard case .hello(let hello) = frame.message else {
                    try send(.error(ErrorMessage(code: .protocolViolation, message: "expected Hello, got \(frame.message.type)")), frame.id)
                    throw ConnectionError.closedByPeer
                }
                guard hello.version >= 1 else {
                    try send(.error(ErrorMessage(code: .unsupported, message: "protocol version \(hello.version) not supported")), frame.id)
                    throw ConnectionError.closedByPeer
                }
                try send(.hello(Hello(version: min(hello.version, AgentProtocolVersion.current), capabilities: .all)), frame.id)
                greeted = true
                return false
            }
            switch frame.message {
            case .exec(let exec):
                guard execs[frame.id] == nil else {
                    try send(.error(ErrorMessage(code: .protocolViolation, message: "request id \(frame.id) is already running an exec")), frame.id)
                    return false
                }
                guard execs.count < Self.maxConcurrentExecs else {
                    try send(.error(ErrorMessage(code: .busy, message: "\(Self.maxConcurrentExecs) execs are already running on this connection")), frame.id)
                    return false
                }
                let runner = ExecRunner(exec: exec, id: frame.id, reaper: reaper, send: send)
                try runner.start()
                if runner.final == nil { execs[frame.id] = runner }
            case .stdinData, .stdinEOF, .signal, .kill, .resize:
                execs[frame.id]?.handle(frame.message)  // none: late input for a finished exec
            case .ping(let value):
                try send(pong(value), frame.id)
            case .seed(let seed):
                if let failure = Self.apply(seed) { try send(.error(ErrorMessage(code: .internal, message: failure)), frame.id) }
            case .writeFile(let chunk):
                try writeFile(chunk, id: frame.id, send: send)
            case .readFile(let path):
                try readFile(path, id: frame.id, send: send)
            case .writeTree(let piece):
                try writeTree(piece, id: frame.id, send: send)
            case .readTree(let path):
                try readTree(path, id: frame.id, send: send)
            case .shutdown:
                return true
            case .error(let e):
                log("host reported error \(e.code.rawValue): \(e.message)")
            case .hello, .pong, .output, .exited, .signalled, .execFailed, .timedOut, .fileData, .fileEnd, .fileError:
                try send(.error(ErrorMessage(code: .protocolViolation, message: "unexpected \(frame.message.type)")), frame.id)
            }
            return false
        }

        do {
            while true {
                while let frame = connection.popQueued() {
                    if try handle(frame) { return true }
                }
                for runner in execs.values { try runner.step() }
                execs = execs.filter { $0.value.final == nil }

                var fds: [pollfd] = []
                var owners: [(ExecRunner, ExecRunner.Role)?] = []
                let backlog = execs.values.reduce(0) { $0 + $1.stdinBacklog }
                if backlog < Self.stdinBacklogLimit {
                    fds.append(pollfd(fd: connection.fd, events: Int16(POLLIN), revents: 0)); owners.append(nil)
                }
                fds.append(pollfd(fd: reaper.fd, events: Int16(POLLIN), revents: 0)); owners.append(nil)
                let reaperIndex = fds.count - 1
                for runner in execs.values {
                    for entry in runner.pollSet() {
                        fds.append(pollfd(fd: entry.fd, events: entry.events, revents: 0)); owners.append((runner, entry.role))
                    }
                }
                let now = nowNanos()
                let wake = execs.values.compactMap(\.wakeAt).min()
                _ = try pollFDs(&fds, timeoutMillis: wake.map { ExecRunner.millis(until: $0, from: now) } ?? -1)
                for (k, pfd) in fds.enumerated() where pfd.revents != 0 {
                    if let (runner, role) = owners[k] {
                        try runner.ready(role)
                    } else if k == reaperIndex {
                        reaper.reap()
                    } else {
                        try connection.readOnce()
                    }
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
        // O_NONBLOCK: opening a FIFO nobody reads fails (ENXIO) instead of blocking the agent.
        let flags = O_WRONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY | (create ? O_CREAT | O_TRUNC : 0)
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
        // O_NONBLOCK: opening a FIFO must not block the agent (it is refused below as not
        // a regular file); a regular file's reads do not change with it.
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)
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

    // MARK: - Trees

    /// One piece of a tar stream to unpack (see ``WriteTree``). A failure is answered
    /// once, with FileError; the rest of that stream is dropped.
    private func writeTree(_ piece: WriteTree, id: UInt32, send: (AgentMessage, UInt32) throws -> Void) throws {
        func fail(_ message: String) throws {
            trees[id] = piece.isFinal ? nil : (nil, 0)
            try send(.fileError(FileError(errno: EINVAL, message: "unpacking into \(piece.path): \(message)")), id)
        }
        if piece.offset == 0 {
            // The guest's own disk bounds what the host may send; the host is trusted,
            // so set-id bits are kept.
            var limits = TarLimits()
            limits.maxTotalBytes = UInt64.max
            limits.maxEntries = Int.max
            do { trees[id] = (try TreeExtractor(destination: piece.path, options: .init(dropSetID: false, limits: limits)), 0) } catch {
                return try fail(error.description)
            }
        }
        guard let state = trees[id] else {
            return try send(.fileError(FileError(errno: EINVAL, message: "unpacking into \(piece.path): a piece at offset \(piece.offset) without the stream's start")), id)
        }
        guard let extractor = state.extractor else {
            if piece.isFinal { trees[id] = nil }
            return  // already refused
        }
        guard piece.offset == state.next else {
            return try fail("a piece at offset \(piece.offset), expected \(state.next)")
        }
        do {
            try extractor.feed(piece.data)
            if piece.isFinal { try extractor.finish() }
        } catch {
            return try fail(error.description)
        }
        let next = state.next + UInt64(piece.data.count)
        if piece.isFinal {
            trees[id] = nil
            try send(.fileEnd(size: next), id)
        } else {
            trees[id] = (extractor, next)
        }
    }

    /// Sends the tree under `path` as a tar stream (see ``AgentMessage/readTree(path:)``).
    private func readTree(_ path: String, id: UInt32, send: (AgentMessage, UInt32) throws -> Void) throws {
        var offset: UInt64 = 0
        /// A send failure (the host went away) is not the tree's fault: it ends the session.
        var sendFailure: Error?
        do {
            try TreeWriter.write(directory: path, chunkSize: AgentProtocolLimits.maxChunkSize) { chunk in
                do { try send(.fileData(FileData(offset: offset, data: chunk)), id) } catch {
                    sendFailure = error
                    throw error
                }
                offset += UInt64(chunk.count)
            }
        } catch {
            if let sendFailure { throw sendFailure }
            return try send(.fileError(FileError(errno: EINVAL, message: "packing \(path): \(error)")), id)
        }
        try send(.fileEnd(size: offset), id)
    }
}
