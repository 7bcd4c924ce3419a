/// The type byte of a frame header.
public enum MessageType: UInt8, Sendable, CaseIterable {
    case hello = 0x01
    case ping = 0x02
    case pong = 0x03
    case error = 0x04
    case shutdown = 0x05
    case seed = 0x06
    case exec = 0x10
    case stdinData = 0x11
    case stdinEOF = 0x12
    case signal = 0x13
    case kill = 0x14
    case resize = 0x15
    case output = 0x20
    case exited = 0x21
    case signalled = 0x22
    case execFailed = 0x23
    case timedOut = 0x24
    case writeFile = 0x30
    case readFile = 0x31
    case fileData = 0x32
    case fileEnd = 0x33
    case fileError = 0x34
    case writeTree = 0x35
    case readTree = 0x36
}

/// Every message of protocol version 1. See Docs/AgentProtocol.md for directions and
/// the payload layout of each case.
public enum AgentMessage: Equatable, Sendable {
    case hello(Hello)
    /// Host → guest; the value is echoed in ``Pong/echo``.
    case ping(UInt64)
    case pong(Pong)
    case error(ErrorMessage)
    /// Host → guest: sync and power off; no reply.
    case shutdown
    /// Host → guest: make this guest unique after a restore: mix `entropy` into the
    /// kernel's random pool and reseed it, and set the wall clock. No reply on success
    /// (a Ping after it confirms it was handled), Error on failure.
    case seed(Seed)
    case exec(Exec)
    /// Host → guest: bytes for the command's stdin (``StdinMode/stream``).
    case stdinData([UInt8])
    /// Host → guest: close the command's stdin.
    case stdinEOF
    /// Host → guest: send this signal number to the command's process group.
    case signal(Int32)
    /// Host → guest: SIGKILL the command's process group.
    case kill
    /// Host → guest: the window size of the command's terminal (``StdinMode/tty``); its
    /// foreground process group gets SIGWINCH.
    case resize(rows: UInt16, columns: UInt16)
    case output(Output)
    /// Guest → host: the command exited with this status (0...255).
    case exited(Int32)
    /// Guest → host: the command was killed by a signal.
    case signalled(signal: Int32, coreDumped: Bool)
    case execFailed(ExecFailed)
    /// Guest → host: the Exec timeout expired and the process group was killed.
    case timedOut
    case writeFile(WriteFile)
    /// Host → guest: send this file as FileData chunks then FileEnd, or FileError.
    case readFile(path: String)
    case fileData(FileData)
    /// Guest → host: a transfer completed; the file's total size in bytes.
    case fileEnd(size: UInt64)
    case fileError(FileError)
    /// Host → guest: a piece of a tar stream to unpack under `path` (made with its
    /// parents); the final piece is answered with FileEnd (the stream's size) or FileError.
    case writeTree(WriteTree)
    /// Host → guest: send the tree under this directory as a tar stream in FileData
    /// chunks then FileEnd (the stream's size), or FileError.
    case readTree(path: String)

    /// The header type byte for this message.
    public var type: MessageType {
        switch self {
        case .hello: .hello
        case .ping: .ping
        case .pong: .pong
        case .error: .error
        case .shutdown: .shutdown
        case .seed: .seed
        case .exec: .exec
        case .stdinData: .stdinData
        case .stdinEOF: .stdinEOF
        case .signal: .signal
        case .kill: .kill
        case .resize: .resize
        case .output: .output
        case .exited: .exited
        case .signalled: .signalled
        case .execFailed: .execFailed
        case .timedOut: .timedOut
        case .writeFile: .writeFile
        case .readFile: .readFile
        case .fileData: .fileData
        case .fileEnd: .fileEnd
        case .fileError: .fileError
        case .writeTree: .writeTree
        case .readTree: .readTree
        }
    }

    /// Encodes the payload only (no header).
    /// - Throws: ``AgentProtocolError`` if a string, array or the payload exceeds its limit.
    public func encodePayload() throws(AgentProtocolError) -> [UInt8] {
        let L = AgentProtocolLimits.self
        var w = ByteWriter()
        switch self {
        case .hello(let h):
            w.u16(h.version)
            w.u64(h.capabilities.rawValue)
        case .ping(let v):
            w.u64(v)
        case .pong(let p):
            w.u64(p.echo); w.u64(p.guestNowNanos); w.u64(p.initStartedNanos); w.u64(p.agentReadyNanos)
        case .error(let e):
            w.u16(e.code.rawValue)
            try w.string(e.message, field: "error.message", limit: L.maxMessageLength)
        case .shutdown, .stdinEOF, .kill, .timedOut:
            break
        case .seed(let s):
            guard (Seed.minEntropy...Seed.maxEntropy).contains(s.entropy.count) else {
                throw .invalidValue(field: "seed.entropy.count", value: UInt64(s.entropy.count))
            }
            w.u64(s.unixNanos); w.raw(s.entropy)
        case .exec(let e):
            guard !e.arguments.isEmpty else { throw .invalidValue(field: "exec.argv.count", value: 0) }
            try w.strings(e.arguments, field: "exec.argv", countLimit: L.maxArguments, lengthLimit: L.maxArgumentLength)
            try w.strings(e.environment, field: "exec.env", countLimit: L.maxEnvironment, lengthLimit: L.maxArgumentLength)
            try w.string(e.workingDirectory, field: "exec.workdir", limit: L.maxPathLength)
            w.u32(e.uid); w.u32(e.gid)
            w.u8(e.stdin.rawValue)
            w.u64(e.timeoutMillis); w.u64(e.stdoutCap); w.u64(e.stderrCap)
        case .stdinData(let d):
            w.raw(d)
        case .signal(let s):
            w.i32(s)
        case .resize(let rows, let columns):
            w.u16(rows); w.u16(columns)
        case .output(let o):
            w.u8(o.stream.rawValue); w.u64(o.sequence); w.bool(o.truncated); w.raw(o.data)
        case .exited(let c):
            w.i32(c)
        case .signalled(let s, let core):
            w.i32(s); w.bool(core)
        case .execFailed(let f):
            w.i32(f.errno)
            try w.string(f.message, field: "execFailed.message", limit: L.maxMessageLength)
        case .writeFile(let f):
            try w.string(f.path, field: "writeFile.path", limit: L.maxPathLength)
            w.u32(f.mode); w.u64(f.offset); w.bool(f.isFinal); w.raw(f.data)
        case .readFile(let path):
            try w.string(path, field: "readFile.path", limit: L.maxPathLength)
        case .fileData(let d):
            w.u64(d.offset); w.raw(d.data)
        case .fileEnd(let size):
            w.u64(size)
        case .fileError(let f):
            w.i32(f.errno)
            try w.string(f.message, field: "fileError.message", limit: L.maxMessageLength)
        case .writeTree(let t):
            try w.string(t.path, field: "writeTree.path", limit: L.maxPathLength)
            w.u64(t.offset); w.bool(t.isFinal); w.raw(t.data)
        case .readTree(let path):
            try w.string(path, field: "readTree.path", limit: L.maxPathLength)
        }
        guard w.bytes.count <= L.maxPayloadSize else {
            throw .payloadTooLarge(length: w.bytes.count, limit: L.maxPayloadSize)
        }
        return w.bytes
    }

    /// Encodes a complete frame (header + payload).
    /// - Parameter id: the request/stream id; replies carry the id of their request.
    /// - Throws: ``AgentProtocolError`` if a field exceeds its limit.
    public func encode(id: UInt32 = 0) throws(AgentProtocolError) -> [UInt8] {
        let payload = try encodePayload()
        var bytes = FrameHeader(type: type.rawValue, id: id, payloadLength: UInt32(payload.count)).encode()
        bytes.append(contentsOf: payload)
        return bytes
    }

    /// Decodes a payload of the given type, requiring every byte to be consumed.
    /// - Throws: ``AgentProtocolError`` for unknown types, truncated or invalid fields,
    ///   limits exceeded and trailing bytes.
    public static func decode(type rawType: UInt8, payload: [UInt8]) throws(AgentProtocolError) -> AgentMessage {
        guard let type = MessageType(rawValue: rawType) else { throw .unknownMessageType(rawType) }
        let L = AgentProtocolLimits.self
        var r = ByteReader(payload)
        let message: AgentMessage
        switch type {
        case .hello:
            let version = try r.u16("hello.version")
            message = .hello(Hello(version: version, capabilities: AgentCapabilities(rawValue: try r.u64("hello.capabilities"))))
        case .ping:
            message = .ping(try r.u64("ping.value"))
        case .pong:
            message = .pong(Pong(echo: try r.u64("pong.echo"), guestNowNanos: try r.u64("pong.guestNow"),
                                 initStartedNanos: try r.u64("pong.initStarted"), agentReadyNanos: try r.u64("pong.agentReady")))
        case .error:
            let code = AgentErrorCode(rawValue: try r.u16("error.code"))
            message = .error(ErrorMessage(code: code, message: try r.string("error.message", limit: L.maxMessageLength)))
        case .shutdown: message = .shutdown
        case .seed:
            let nanos = try r.u64("seed.unixNanos")
            let entropy = r.rest()
            guard (Seed.minEntropy...Seed.maxEntropy).contains(entropy.count) else {
                throw .invalidValue(field: "seed.entropy.count", value: UInt64(entropy.count))
            }
            message = .seed(Seed(unixNanos: nanos, entropy: entropy))
        case .stdinEOF: message = .stdinEOF
        case .kill: message = .kill
        case .timedOut: message = .timedOut
        case .exec:
            let argv = try r.strings("exec.argv", countLimit: L.maxArguments, lengthLimit: L.maxArgumentLength)
            guard !argv.isEmpty else { throw .invalidValue(field: "exec.argv.count", value: 0) }
            let env = try r.strings("exec.env", countLimit: L.maxEnvironment, lengthLimit: L.maxArgumentLength)
            let workdir = try r.string("exec.workdir", limit: L.maxPathLength)
            let uid = try r.u32("exec.uid"), gid = try r.u32("exec.gid")
            let rawStdin = try r.u8("exec.stdin")
            guard let stdin = StdinMode(rawValue: rawStdin) else { throw .invalidValue(field: "exec.stdin", value: UInt64(rawStdin)) }
            let timeout = try r.u64("exec.timeoutMillis")
            let outCap = try r.u64("exec.stdoutCap"), errCap = try r.u64("exec.stderrCap")
            message = .exec(Exec(arguments: argv, environment: env, workingDirectory: workdir, uid: uid, gid: gid,
                                 stdin: stdin, timeoutMillis: timeout, stdoutCap: outCap, stderrCap: errCap))
        case .stdinData:
            message = .stdinData(r.rest())
        case .signal:
            message = .signal(try r.i32("signal.number"))
        case .resize:
            let rows = try r.u16("resize.rows")
            message = .resize(rows: rows, columns: try r.u16("resize.columns"))
        case .output:
            let rawStream = try r.u8("output.stream")
            guard let stream = StdioStream(rawValue: rawStream) else { throw .invalidValue(field: "output.stream", value: UInt64(rawStream)) }
            let seq = try r.u64("output.sequence")
            let truncated = try r.bool("output.truncated")
            message = .output(Output(stream: stream, sequence: seq, truncated: truncated, data: r.rest()))
        case .exited:
            message = .exited(try r.i32("exited.code"))
        case .signalled:
            let sig = try r.i32("signalled.signal")
            message = .signalled(signal: sig, coreDumped: try r.bool("signalled.coreDumped"))
        case .execFailed:
            let errno = try r.i32("execFailed.errno")
            message = .execFailed(ExecFailed(errno: errno, message: try r.string("execFailed.message", limit: L.maxMessageLength)))
        case .writeFile:
            let path = try r.string("writeFile.path", limit: L.maxPathLength)
            let mode = try r.u32("writeFile.mode")
            let offset = try r.u64("writeFile.offset")
            let final = try r.bool("writeFile.final")
            message = .writeFile(WriteFile(path: path, mode: mode, offset: offset, isFinal: final, data: r.rest()))
        case .readFile:
            message = .readFile(path: try r.string("readFile.path", limit: L.maxPathLength))
        case .fileData:
            let offset = try r.u64("fileData.offset")
            message = .fileData(FileData(offset: offset, data: r.rest()))
        case .fileEnd:
            message = .fileEnd(size: try r.u64("fileEnd.size"))
        case .fileError:
            let errno = try r.i32("fileError.errno")
            message = .fileError(FileError(errno: errno, message: try r.string("fileError.message", limit: L.maxMessageLength)))
        case .writeTree:
            let path = try r.string("writeTree.path", limit: L.maxPathLength)
            let offset = try r.u64("writeTree.offset")
            let final = try r.bool("writeTree.final")
            message = .writeTree(WriteTree(path: path, offset: offset, isFinal: final, data: r.rest()))
        case .readTree:
            message = .readTree(path: try r.string("readTree.path", limit: L.maxPathLength))
        }
        guard r.remaining == 0 else { throw .trailingBytes(messageType: rawType, count: r.remaining) }
        return message
    }
}

/// Payload of ``AgentMessage/seed(_:)``: u64 wall-clock time (ns since 1970, UTC), then
/// 16 to 512 bytes of entropy from the host's random source.
public struct Seed: Equatable, Sendable {
    public static let minEntropy = 16
    public static let maxEntropy = 512
    public var unixNanos: UInt64
    public var entropy: [UInt8]
    public init(unixNanos: UInt64, entropy: [UInt8]) {
        self.unixNanos = unixNanos
        self.entropy = entropy
    }
}
