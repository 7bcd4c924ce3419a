import AgentProtocol
import Foundation
import Synchronization
import SystemShims
import TreeArchive
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
///
/// Two ways to read: directly (one request at a time, the caller's thread reads the
/// socket: one-shot runs), or demultiplexed after `startReader()` (a reader thread owns
/// the socket's read side and hands each frame to the mailbox of its request id, so any
/// number of requests run at once from any threads: a running sandbox).
public final class AgentClient: Sendable {
    public let fd: FileDescriptor
    /// Held for each whole frame's send(2)s, so frames from the session thread and
    /// the stdin pump (its own thread) never interleave.
    private let writeLock = Mutex(())
    /// The session thread's state (never held across I/O).
    private struct State {
        var decoder = FrameDecoder()
        var nextID: UInt32 = 1
        /// The Exec in progress in direct mode, for `killExec`.
        var execID: UInt32?
    }
    private let state = Mutex(State())
    /// Demultiplexed mode: the mailbox of each request in flight, and why the connection
    /// ended once it has (every mailbox then ends with that).
    private struct Demux {
        var boxes: [UInt32: FrameMailbox] = [:]
        var closed: Swift.Error?
    }
    private let demux = Mutex<Demux?>(nil)

    public enum Error: Swift.Error, CustomStringConvertible, Sendable {
        case connectionClosed
        case protocolError(String)
        case agentError(String)
        case io(SystemError)
        /// The connection was closed on purpose (the sandbox stopped or was rewound).
        case closed(SandboxError)
        public var description: String {
            switch self {
            case .closed(let why): return "\(why)"
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

    /// Hello, then (for a restored guest, `seed`) Seed, then Ping, sent back to back: the
    /// agent answers them in order, so a session starts in one round trip instead of two.
    /// Direct mode only (before `startReader()`). Returns the Pong.
    public func greet(seed: Bool) throws -> Pong {
        try send(.hello(Hello()))
        if seed { try self.seed() }
        let id = takeID()
        try send(.ping(UInt64(id)), id: id)
        try checkHello(try receive())
        while true {
            let f = try next(nil, id: id)
            if case .pong(let p) = f.message, p.echo == UInt64(id) { return p }
            if case .error(let m) = f.message { throw Error.agentError(m.message) }
        }
    }

    private func checkHello(_ f: Frame) throws {
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
        try send(.seed(Seed(unixNanos: now, entropy: entropy)), id: takeID())
    }

    /// Ping: the agent answers with its boot timestamps.
    public func ping() throws -> Pong {
        let id = takeID()
        let box = try openMailbox(id)
        defer { closeMailbox(id) }
        try send(.ping(UInt64(id)), id: id)
        while true {
            let f = try next(box, id: id)
            if case .pong(let p) = f.message, p.echo == UInt64(id) { return p }
            if case .error(let m) = f.message { throw Error.agentError(m.message) }
        }
    }

    /// Runs a command, delivering output chunks in order as they arrive.
    /// - Parameters:
    ///   - stdin: bytes to feed the command (then EOF); nil = no stdin.
    ///   - stdinFD: a host descriptor to pump into the command's stdin until EOF (terminal passthrough).
    ///   - terminal: run it on a pseudo-terminal (input typed into it, all output as stdout).
    ///   - onStarted: called with the Exec's request id once it is sent (for `killExec`).
    public func exec(_ exec: Exec, stdin: [UInt8]? = nil, stdinFD: Int32? = nil, terminal: Bool = false,
                     onStarted: ((UInt32) -> Void)? = nil,
                     onOutput: (StdioStream, [UInt8]) -> Void) throws -> CommandStatus {
        var e = exec
        // Without input the command reads /dev/null (fd 0 open, at end of file), as under a
        // shell with `</dev/null`; a closed fd 0 breaks programs that dup or check it.
        e.stdin = terminal ? .tty : (stdin != nil || stdinFD != nil) ? .stream : .none
        let id = try begin(e)
        defer { end(id) }
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
        return try results(of: id, onOutput: onOutput)
    }

    /// Sends an Exec as it is (its stdin mode included) and returns its request id; its
    /// frames are then read with `results(of:)`, and `end(_:)` forgets it.
    public func begin(_ exec: Exec) throws -> UInt32 {
        let id = takeID()
        if try openMailbox(id) == nil { state.withLock { $0.execID = id } }
        do { try send(.exec(exec), id: id) } catch {
            end(id)
            throw error
        }
        return id
    }

    /// Reads Exec `id`'s frames until its end, delivering output chunks in order.
    public func results(of id: UInt32, onOutput: (StdioStream, [UInt8]) -> Void) throws -> CommandStatus {
        let box = mailbox(id)
        while true {
            let f = try next(box, id: id)
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

    /// Forgets request `id` (its late frames are dropped).
    public func end(_ id: UInt32) {
        closeMailbox(id)
        state.withLock { if $0.execID == id { $0.execID = nil } }
    }

    /// Writes a file in the guest (copy-in).
    public func writeFile(path: String, mode: UInt32, contents: [UInt8]) throws {
        let id = takeID()
        let box = try openMailbox(id)
        defer { closeMailbox(id) }
        let chunk = AgentProtocolLimits.maxChunkSize
        var offset = 0
        repeat {
            let end = min(offset + chunk, contents.count)
            try send(.writeFile(WriteFile(path: path, mode: mode, offset: UInt64(offset), isFinal: end == contents.count,
                                          data: Array(contents[offset..<end]))), id: id)
            offset = end
        } while offset < contents.count
        while true {
            let f = try next(box, id: id)
            switch f.message {
            case .fileEnd: return
            case .fileError(let e): throw Error.agentError("writing \(path) in the guest: \(e.message)")
            case .error(let m): throw Error.agentError(m.message)
            default: continue
            }
        }
    }

    /// Reads a guest file. More than `limit` bytes is an error (the guest decides what
    /// it sends; the host decides how much it keeps).
    public func readFile(path: String, limit: UInt64 = 1 << 30) throws -> [UInt8] {
        try readFile(path: path, limit: limit, nilIfDirectory: false)!
    }

    /// Reads a guest file (at most `limit` bytes), or returns nil when `path` is a
    /// directory (the caller then copies its tree with `readTree`).
    public func readFileUnlessDirectory(path: String, limit: UInt64) throws -> [UInt8]? {
        try readFile(path: path, limit: limit, nilIfDirectory: true)
    }

    private func readFile(path: String, limit: UInt64, nilIfDirectory: Bool) throws -> [UInt8]? {
        let id = takeID()
        let box = try openMailbox(id)
        defer { closeMailbox(id) }
        try send(.readFile(path: path), id: id)
        var out: [UInt8] = []
        while true {
            let f = try next(box, id: id)
            switch f.message {
            case .fileData(let d):
                guard UInt64(out.count) + UInt64(d.data.count) <= limit else {
                    throw Error.agentError("\(path) in the guest is larger than the copy-out limit of \(limit) bytes")
                }
                out += d.data
            case .fileEnd: return out
            case .fileError(let e) where nilIfDirectory && e.errno == EISDIR: return nil
            case .fileError(let e): throw Error.agentError("reading \(path) in the guest: \(e.message)")
            case .error(let m): throw Error.agentError(m.message)
            default: continue
            }
        }
    }

    /// Copies the tree under the host directory `source` into the guest directory `path`
    /// (made with its parents): a tar stream in WriteTree pieces, read from the host as it
    /// is sent. Returns the stream's size in bytes.
    /// - Throws: `TarError` for what the host tree holds that cannot be copied (nothing is
    ///   then left half-sent: the guest is told with a final empty piece), the guest's
    ///   FileError, or the connection's end.
    @discardableResult
    public func writeTree(path: String, from source: String) throws -> UInt64 {
        let id = takeID()
        let box = try openMailbox(id)
        defer { closeMailbox(id) }
        var offset: UInt64 = 0
        var refused: Swift.Error?
        do {
            try TreeWriter.write(directory: source, chunkSize: AgentProtocolLimits.maxChunkSize) { chunk in
                try send(.writeTree(WriteTree(path: path, offset: offset, isFinal: false, data: chunk)), id: id)
                offset += UInt64(chunk.count)
            }
        } catch let e as TarError {
            refused = e
        }
        if let refused {
            // Ends the guest's half stream (it answers with FileError, dropped with the mailbox).
            try send(.writeTree(WriteTree(path: path, offset: UInt64.max, isFinal: true, data: [])), id: id)
            throw refused
        }
        try send(.writeTree(WriteTree(path: path, offset: offset, isFinal: true, data: [])), id: id)
        while true {
            let f = try next(box, id: id)
            switch f.message {
            case .fileEnd(let size): return size
            case .fileError(let e): throw Error.agentError("copying \(source) into \(path) in the guest: \(e.message)")
            case .error(let m): throw Error.agentError(m.message)
            default: continue
            }
        }
    }

    /// Copies the guest tree under `path` into the host directory `destination` (made
    /// with its parents), unpacking the guest's tar stream as it arrives with every
    /// check of `TreeExtractor` (nothing lands outside `destination`; set-id bits are
    /// dropped) and `limits` (bytes and entries). Returns the stream's size in bytes.
    @discardableResult
    public func readTree(path: String, into destination: String, limits: TarLimits = TarLimits()) throws -> UInt64 {
        let id = takeID()
        let box = try openMailbox(id)
        defer { closeMailbox(id) }
        try send(.readTree(path: path), id: id)
        let extractor: TreeExtractor
        do { extractor = try TreeExtractor(destination: destination, options: .init(dropSetID: true, limits: limits)) } catch {
            throw Error.agentError("copying \(path) out of the guest: \(error)")
        }
        var offset: UInt64 = 0
        while true {
            let f = try next(box, id: id)
            switch f.message {
            case .fileData(let d):
                guard d.offset == offset else { throw Error.protocolError("tree data of \(path) at offset \(d.offset), expected \(offset)") }
                do { try extractor.feed(d.data) } catch {
                    throw Error.agentError("copying \(path) out of the guest into \(destination): \(error)")
                }
                offset += UInt64(d.data.count)
            case .fileEnd(let size):
                guard size == offset else { throw Error.protocolError("the guest says the tree of \(path) is \(size) bytes, it sent \(offset)") }
                do { try extractor.finish() } catch {
                    throw Error.agentError("copying \(path) out of the guest into \(destination): \(error)")
                }
                return size
            case .fileError(let e): throw Error.agentError("copying \(path) out of the guest: \(e.message)")
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

    /// The id of the Exec in progress in direct mode, if any.
    public var currentExecID: UInt32? { state.withLock { $0.execID } }

    /// Whether request `id` is still in flight.
    private func inFlight(_ id: UInt32) -> Bool {
        if let d = demux.withLock({ $0 }) { return d.boxes[id] != nil }
        return state.withLock { $0.execID } == id
    }

    /// SIGKILLs the process group of Exec `id` if it is still in flight (from any
    /// thread; that exec then returns its `signalled(9)`). Returns whether it was.
    @discardableResult
    public func killExec(_ id: UInt32) -> Bool {
        guard inFlight(id) else { return false }
        return (try? send(.kill, id: id)) != nil
    }

    /// Sends signal `number` to the process group of Exec `id` if it is still in flight.
    @discardableResult
    public func signalExec(_ id: UInt32, _ number: Int32) -> Bool {
        guard inFlight(id) else { return false }
        return (try? send(.signal(number), id: id)) != nil
    }

    // MARK: Demultiplexed mode

    /// Starts the reader thread: from now on frames go to the mailbox of their request
    /// id and requests may run at once. Frames for no request in flight (late ones of a
    /// finished request) are dropped; an Error frame with id 0 (the agent could not
    /// decode what it got) goes to every request.
    public func startReader() throws {
        let started = demux.withLock { d -> Bool in
            if d != nil { return false }
            d = Demux()
            return true
        }
        guard started else { return }
        try NativeThread(name: "agent-reader") { [self] in
            while true {
                let frame: Frame
                do { frame = try receive() } catch {
                    close(because: error)
                    return
                }
                let targets: [FrameMailbox] = demux.withLock { d in
                    guard let d else { return [] }
                    if frame.id == 0, case .error = frame.message { return Array(d.boxes.values) }
                    return d.boxes[frame.id].map { [$0] } ?? []
                }
                for box in targets { box.put(frame) }
            }
        }.detach()
    }

    /// Ends every request in flight and every later one with `error` (the first reason
    /// given is kept). The socket itself is the owner's to close.
    public func close(because error: Swift.Error) {
        let boxes: [FrameMailbox] = demux.withLock { d in
            guard d != nil else { return [] }
            if d!.closed == nil { d!.closed = error }
            let all = Array(d!.boxes.values)
            d!.boxes = [:]
            return all
        }
        for box in boxes { box.close(error) }
    }

    /// A new mailbox for request `id` in demultiplexed mode; nil in direct mode.
    private func openMailbox(_ id: UInt32) throws -> FrameMailbox? {
        try demux.withLock { d throws -> FrameMailbox? in
            guard d != nil else { return nil }
            if let closed = d!.closed { throw closed }
            let box = FrameMailbox()
            d!.boxes[id] = box
            return box
        }
    }

    private func mailbox(_ id: UInt32) -> FrameMailbox? { demux.withLock { $0?.boxes[id] } }

    /// Forgets request `id`'s mailbox; a reader waiting to put into it goes on.
    private func closeMailbox(_ id: UInt32) {
        demux.withLock { $0?.boxes.removeValue(forKey: id) }?.close(Error.protocolError("request \(id) has ended"))
    }

    /// The next frame of a request: from its mailbox, or from the socket in direct mode.
    /// A request whose mailbox was already closed (the connection ended before it was
    /// looked up) gets the connection's end.
    /// In direct mode, frames of other requests (late ones of a request given up on) are
    /// skipped, except Error frames: the agent's refusal of a request that has no answer
    /// otherwise (Seed) must reach the next one.
    private func next(_ box: FrameMailbox?, id: UInt32) throws -> Frame {
        if let box { return try box.take() }
        if let closed = demux.withLock({ $0?.closed }) { throw closed }
        if demux.withLock({ $0 != nil }) { throw Error.connectionClosed }
        while true {
            let f = try receive()
            if f.id == id || f.id == 0 { return f }
            if case .error = f.message { return f }
        }
    }

    /// Asks the guest to sync and power off.
    public func shutdown() { try? send(.shutdown) }
}

/// The frames of one request in flight, put by the reader thread and taken by the
/// request's thread. Bounded: a reader that would queue more than `limitBytes` of
/// payload waits for the taker (the guest then waits on vsock credit), so a slow
/// consumer costs memory up to the bound, not without end.
final class FrameMailbox: @unchecked Sendable {
    // @unchecked: every field is read and written with `condition` held.
    static let limitBytes = 16 << 20
    private let condition = NSCondition()
    private var frames: [Frame] = []
    private var head = 0
    private var bytes = 0
    private var closed: Swift.Error?

    private static func size(_ frame: Frame) -> Int {
        switch frame.message {
        case .output(let o): o.data.count
        case .fileData(let d): d.data.count
        default: 64
        }
    }

    func put(_ frame: Frame) {
        condition.lock()
        defer { condition.unlock() }
        while bytes >= Self.limitBytes && closed == nil { condition.wait() }
        guard closed == nil else { return }
        frames.append(frame)
        bytes += Self.size(frame)
        condition.broadcast()
    }

    func close(_ error: Swift.Error) {
        condition.lock()
        if closed == nil { closed = error }
        condition.broadcast()
        condition.unlock()
    }

    /// The next frame; after `close`, the frames already put and then the error.
    func take() throws -> Frame {
        condition.lock()
        defer { condition.unlock() }
        while head == frames.count && closed == nil { condition.wait() }
        if head < frames.count {
            let f = frames[head]
            head += 1
            bytes -= Self.size(f)
            if head == frames.count { frames.removeAll(keepingCapacity: true); head = 0 }
            condition.broadcast()
            return f
        }
        throw closed!
    }
}
