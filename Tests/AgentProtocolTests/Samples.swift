@testable import AgentProtocol

/// One representative value of every message type (and a few edge values).
enum Samples {
    static let exec = Exec(arguments: ["/bin/sh", "-c", "echo héllo"], environment: ["PATH=/bin", "LANG=C.UTF-8"],
                           workingDirectory: "/tmp", uid: 1000, gid: 100, stdin: .stream, timeoutMillis: 1500,
                           stdoutCap: 1 << 20, stderrCap: 4096)

    static let messages: [(name: String, id: UInt32, message: AgentMessage)] = [
        ("hello", 0, .hello(Hello())),
        ("hello-old", 0, .hello(Hello(version: 7, capabilities: [.exec, .files]))),
        ("ping", 9, .ping(0xDEAD_BEEF_CAFE)),
        ("seed", 4, .seed(Seed(unixNanos: 1_764_600_000_000_000_000, entropy: Array(0..<64)))),
        ("pong", 9, .pong(Pong(echo: 1, guestNowNanos: 2, initStartedNanos: 3, agentReadyNanos: .max))),
        ("error", 0, .error(ErrorMessage(code: .busy, message: "an exec is running"))),
        ("error-unknown-code", 0, .error(ErrorMessage(code: AgentErrorCode(rawValue: 999), message: ""))),
        ("shutdown", 0, .shutdown),
        ("exec", 1, .exec(exec)),
        ("exec-minimal", 2, .exec(Exec(arguments: [""], workingDirectory: ""))),
        ("stdin-data", 1, .stdinData([0, 1, 2, 255])),
        ("stdin-data-empty", 1, .stdinData([])),
        ("stdin-eof", 1, .stdinEOF),
        ("signal", 1, .signal(15)),
        ("kill", 1, .kill),
        ("output-stdout", 1, .output(Output(stream: .stdout, sequence: 0, data: Array("out\n".utf8)))),
        ("output-stderr-truncated", 1, .output(Output(stream: .stderr, sequence: .max, truncated: true, data: []))),
        ("exited", 1, .exited(3)),
        ("exited-negative", 1, .exited(-1)),
        ("signalled", 1, .signalled(signal: 9, coreDumped: false)),
        ("signalled-core", 1, .signalled(signal: 11, coreDumped: true)),
        ("exec-failed", 1, .execFailed(ExecFailed(errno: 2, message: "execve nosuch: No such file or directory"))),
        ("timed-out", 1, .timedOut),
        ("write-file", 4, .writeFile(WriteFile(path: "/tmp/x", mode: 0o755, offset: 0, isFinal: false, data: [1, 2, 3]))),
        ("write-file-final", 4, .writeFile(WriteFile(path: "/tmp/x", mode: 0o755, offset: 3, isFinal: true, data: []))),
        ("read-file", 5, .readFile(path: "/etc/hostname")),
        ("file-data", 5, .fileData(FileData(offset: 1 << 40, data: Array(repeating: 7, count: 1000)))),
        ("file-end", 5, .fileEnd(size: 12345)),
        ("file-error", 5, .fileError(FileError(errno: 13, message: "open /root/x: Permission denied"))),
        ("write-tree", 6, .writeTree(WriteTree(path: "/data/tree", offset: 0, isFinal: false, data: Array(repeating: 0, count: 1024)))),
        ("write-tree-final", 6, .writeTree(WriteTree(path: "/data/tree", offset: 1024, isFinal: true, data: []))),
        ("read-tree", 7, .readTree(path: "/data/out")),
        ("resize", 8, .resize(rows: 50, columns: 132)),
    ]

    /// Header bytes with every field given explicitly.
    static func header(magic: UInt16 = FrameHeader.magic, version: UInt16 = 1, type: UInt8, flags: UInt8 = 0,
                       reserved: UInt16 = 0, id: UInt32 = 0, length: UInt32) -> [UInt8] {
        var w = ByteWriter()
        w.u16(magic); w.u16(version); w.u8(type); w.u8(flags); w.u16(reserved); w.u32(id); w.u32(length)
        return w.bytes
    }

    /// A frame with an arbitrary payload (length taken from the payload).
    static func frame(type: UInt8, payload: [UInt8], id: UInt32 = 0) -> [UInt8] {
        header(type: type, id: id, length: UInt32(payload.count)) + payload
    }
}

/// Deterministic PRNG (SplitMix64) so fuzz failures reproduce.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
