/// Features an endpoint offers, exchanged in ``Hello``.
public struct AgentCapabilities: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// Exec with Output/Exited/Signalled/ExecFailed/TimedOut.
    public static let exec = AgentCapabilities(rawValue: 1 << 0)
    /// StdinData / StdinEOF streaming.
    public static let stdin = AgentCapabilities(rawValue: 1 << 1)
    /// Signal / Kill forwarding to the process group.
    public static let signals = AgentCapabilities(rawValue: 1 << 2)
    /// WriteFile / ReadFile.
    public static let files = AgentCapabilities(rawValue: 1 << 3)
    /// Ping / Pong with boot timestamps.
    public static let ping = AgentCapabilities(rawValue: 1 << 4)
    /// Many requests at once on one connection (told apart by request id).
    public static let concurrentRequests = AgentCapabilities(rawValue: 1 << 5)
    /// WriteTree / ReadTree: directory trees as tar streams.
    public static let trees = AgentCapabilities(rawValue: 1 << 6)
    /// Exec with a pseudo-terminal (``StdinMode/tty``) and Resize.
    public static let tty = AgentCapabilities(rawValue: 1 << 7)
    /// Everything version 1 defines.
    public static let all: AgentCapabilities = [.exec, .stdin, .signals, .files, .ping, .concurrentRequests, .trees, .tty]
}

/// Version and capability exchange; the first message in each direction.
public struct Hello: Equatable, Sendable {
    /// Highest protocol version the sender speaks.
    public var version: UInt16
    public var capabilities: AgentCapabilities
    public init(version: UInt16 = AgentProtocolVersion.current, capabilities: AgentCapabilities = .all) {
        self.version = version
        self.capabilities = capabilities
    }
}

/// Where the command's standard input comes from.
public enum StdinMode: UInt8, Sendable {
    /// `/dev/null`.
    case none = 0
    /// A pipe fed by ``AgentMessage/stdinData(_:)`` frames until ``AgentMessage/stdinEOF``.
    case stream = 1
    /// File descriptor 0 is closed.
    case closed = 2
    /// A pseudo-terminal for stdin, stdout and stderr (the command's controlling
    /// terminal, 24×80 until a ``AgentMessage/resize(rows:columns:)``): StdinData is
    /// typed into it, its output arrives as stdout; StdinEOF types the terminal's EOF
    /// character (Ctrl-D).
    case tty = 3
}

/// Run one command (host → guest).
public struct Exec: Equatable, Sendable {
    /// argv[0] is the program; without a `/` it is searched in `PATH` from `environment`
    /// (default `/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`). Never empty.
    public var arguments: [String]
    /// The complete environment, `NAME=value` entries.
    public var environment: [String]
    /// Working directory; empty means `/`.
    public var workingDirectory: String
    public var uid: UInt32
    public var gid: UInt32
    public var stdin: StdinMode
    /// Wall-clock limit in milliseconds; 0 = none.
    public var timeoutMillis: UInt64
    /// Most stdout bytes forwarded; 0 = unlimited.
    public var stdoutCap: UInt64
    /// Most stderr bytes forwarded; 0 = unlimited.
    public var stderrCap: UInt64

    public init(arguments: [String], environment: [String] = [], workingDirectory: String = "/",
                uid: UInt32 = 0, gid: UInt32 = 0, stdin: StdinMode = .none, timeoutMillis: UInt64 = 0,
                stdoutCap: UInt64 = 0, stderrCap: UInt64 = 0) {
        self.arguments = arguments
        self.environment = environment
        self.workingDirectory = workingDirectory
        self.uid = uid
        self.gid = gid
        self.stdin = stdin
        self.timeoutMillis = timeoutMillis
        self.stdoutCap = stdoutCap
        self.stderrCap = stderrCap
    }
}

/// Which output stream an ``Output`` frame belongs to.
public enum StdioStream: UInt8, Sendable {
    case stdout = 1
    case stderr = 2
}

/// A chunk of the command's output (guest → host).
public struct Output: Equatable, Sendable {
    public var stream: StdioStream
    /// Starts at 0 for each Exec and increases by one per Output frame across both
    /// streams, so the host can check order and interleave stdout/stderr.
    public var sequence: UInt64
    /// Set on the frame where the stream reached its cap; later bytes of that stream
    /// are discarded and no further Output frames are sent for it.
    public var truncated: Bool
    public var data: [UInt8]
    public init(stream: StdioStream, sequence: UInt64, truncated: Bool = false, data: [UInt8]) {
        self.stream = stream
        self.sequence = sequence
        self.truncated = truncated
        self.data = data
    }
}

/// The command could not be started (guest → host). The host maps `ENOENT` to exit
/// status 127 ("command not found") and other codes to 126.
public struct ExecFailed: Equatable, Sendable {
    /// Linux errno value (e.g. 2 = ENOENT, 13 = EACCES, 8 = ENOEXEC).
    public var errno: Int32
    /// What failed, starting with the stage: `execve nosuchcmd: No such file or
    /// directory`, `chdir /no/dir: No such file or directory`, `setuid ...`. Only an
    /// `execve` failure is the command's own (126/127); the others are the caller's.
    public var message: String
    public init(errno: Int32, message: String) { self.errno = errno; self.message = message }
}

/// One chunk of a file copied into the guest (host → guest).
///
/// The chunk at offset 0 creates or truncates the file with `mode`; the chunk with
/// `isFinal` set completes it and the guest answers with ``FileEnd`` or ``FileError``.
public struct WriteFile: Equatable, Sendable {
    public var path: String
    /// Permission bits (e.g. 0o644) used when the file is created.
    public var mode: UInt32
    public var offset: UInt64
    public var isFinal: Bool
    public var data: [UInt8]
    public init(path: String, mode: UInt32 = 0o644, offset: UInt64 = 0, isFinal: Bool = true, data: [UInt8]) {
        self.path = path
        self.mode = mode
        self.offset = offset
        self.isFinal = isFinal
        self.data = data
    }
}

/// One piece of a tar stream for the guest to unpack under `path` (host → guest), in
/// order: `offset` is where the piece starts in the stream (0 starts a new one).
public struct WriteTree: Equatable, Sendable {
    public var path: String
    public var offset: UInt64
    public var isFinal: Bool
    public var data: [UInt8]
    public init(path: String, offset: UInt64, isFinal: Bool, data: [UInt8]) {
        self.path = path
        self.offset = offset
        self.isFinal = isFinal
        self.data = data
    }
}

/// One chunk of a file read from the guest (guest → host), in offset order.
public struct FileData: Equatable, Sendable {
    public var offset: UInt64
    public var data: [UInt8]
    public init(offset: UInt64, data: [UInt8]) { self.offset = offset; self.data = data }
}

/// A file transfer failed (guest → host).
public struct FileError: Equatable, Sendable {
    public var errno: Int32
    public var message: String
    public init(errno: Int32, message: String) { self.errno = errno; self.message = message }
}

/// Liveness probe answered with guest timestamps (guest → host).
public struct Pong: Equatable, Sendable {
    /// The value from the Ping, echoed.
    public var echo: UInt64
    /// Guest CLOCK_BOOTTIME (ns) when the Pong was sent.
    public var guestNowNanos: UInt64
    /// Guest CLOCK_BOOTTIME (ns) when sandbox-init started.
    public var initStartedNanos: UInt64
    /// Guest CLOCK_BOOTTIME (ns) when the agent started listening.
    public var agentReadyNanos: UInt64
    public init(echo: UInt64, guestNowNanos: UInt64, initStartedNanos: UInt64, agentReadyNanos: UInt64) {
        self.echo = echo
        self.guestNowNanos = guestNowNanos
        self.initStartedNanos = initStartedNanos
        self.agentReadyNanos = agentReadyNanos
    }
}

/// Error category of an ``ErrorMessage``; unknown codes from newer peers are kept.
public struct AgentErrorCode: RawRepresentable, Hashable, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// The peer sent bytes that do not decode; the connection is closed after this.
    public static let malformedFrame = AgentErrorCode(rawValue: 1)
    /// The message is valid but not allowed now (e.g. Exec before Hello).
    public static let protocolViolation = AgentErrorCode(rawValue: 2)
    /// An Exec is already running on this connection.
    public static let busy = AgentErrorCode(rawValue: 3)
    /// The receiver does not implement this message.
    public static let unsupported = AgentErrorCode(rawValue: 4)
    /// The receiver failed for a reason of its own.
    public static let `internal` = AgentErrorCode(rawValue: 5)
}

/// A protocol-level error report (either direction).
public struct ErrorMessage: Equatable, Sendable {
    public var code: AgentErrorCode
    public var message: String
    public init(code: AgentErrorCode, message: String) { self.code = code; self.message = message }
}
