import AgentProtocol
import Foundation
import Glibc
import Testing

/// End-to-end tests of sandbox-init over `--listen-unix`, without a VM. The binary is
/// taken from $SANDBOX_INIT_BINARY or from next to the test bundle (swift build puts
/// every product there).
enum AgentBinary {
    static var path: String? {
        if let p = ProcessInfo.processInfo.environment["SANDBOX_INIT_BINARY"] { return p }
        guard let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") else { return nil }
        var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
        // On Linux the bundle is a plain executable; on some layouts it sits in *.xctest/.
        if dir.pathExtension == "xctest" { dir = dir.deletingLastPathComponent() }
        let candidate = dir.appendingPathComponent("sandbox-init").path
        return FileManager.default.isExecutableFile(atPath: candidate) ? candidate : nil
    }
}

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// A running `sandbox-init --listen-unix` process, killed on deinit.
final class AgentServer {
    let process = Process()
    let socketPath: String

    init() throws {
        guard let binary = AgentBinary.path else {
            throw TestFailure("sandbox-init binary not found; build it (swift build) or set SANDBOX_INIT_BINARY")
        }
        socketPath = "/tmp/sandbox-init-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = ["--listen-unix", socketPath]
        try process.run()
        // Wait for the socket to appear.
        for _ in 0..<500 {
            if FileManager.default.fileExists(atPath: socketPath) { return }
            usleep(10_000)
        }
        throw TestFailure("sandbox-init did not create \(socketPath)")
    }

    deinit {
        if process.isRunning { process.terminate(); process.waitUntilExit() }
        unlink(socketPath)
    }

    /// Connects and performs the Hello exchange.
    func connect(hello: Bool = true) throws -> AgentClient {
        let client = try AgentClient(path: socketPath)
        if hello {
            try client.send(.hello(Hello()))
            let reply = try client.next()
            guard reply.message == .hello(Hello(version: 1, capabilities: .all)) else { throw TestFailure("bad hello \(reply)") }
        }
        return client
    }
}

/// Minimal blocking client with a receive timeout.
final class AgentClient {
    let fd: Int32
    var decoder = FrameDecoder()

    init(path: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestFailure("socket: \(errno)") }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        withUnsafeMutableBytes(of: &addr.sun_path) { buf in
            for (i, b) in bytes.prefix(buf.count - 1).enumerated() { buf[i] = b }
        }
        // The socket file exists from bind(); until the agent calls listen(), connect is
        // refused, so retry that (and only that) for a few seconds.
        var rc: Int32 = -1
        for _ in 0..<500 {
            rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            if rc == 0 || errno != ECONNREFUSED { break }
            usleep(10_000)
        }
        guard rc == 0 else { close(fd); throw TestFailure("connect \(path): errno \(errno)") }
    }

    deinit { close(fd) }

    func send(_ message: AgentMessage, id: UInt32 = 0) throws {
        try sendRaw(try message.encode(id: id))
    }

    func sendRaw(_ bytes: [UInt8]) throws {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, $0.count - done) }
            guard n > 0 else { throw TestFailure("write: errno \(errno)") }
            done += n
        }
    }

    /// The next frame; throws on timeout or end of stream.
    func next(timeoutSeconds: Int32 = 30) throws -> Frame {
        while true {
            if let frame = try decoder.next() { return frame }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, timeoutSeconds * 1000) == 1 else { throw TestFailure("timed out waiting for a frame") }
            var buf = [UInt8](repeating: 0, count: 256 * 1024)
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            guard n > 0 else { throw TestFailure("connection closed") }
            decoder.append(buf[0..<n])
        }
    }

    /// True if the peer closed the connection (within the timeout).
    func isClosed(timeoutSeconds: Int32 = 10) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, timeoutSeconds * 1000) == 1 else { return false }
        var b: UInt8 = 0
        return read(fd, &b, 1) == 0
    }

    struct Result {
        var stdout: [UInt8] = []
        var stderr: [UInt8] = []
        var final: AgentMessage?
        var sequences: [UInt64] = []
        var truncated: [StdioStream] = []
        var stdoutText: String { String(decoding: stdout, as: UTF8.self) }
        var stderrText: String { String(decoding: stderr, as: UTF8.self) }
    }

    /// Sends an Exec (plus optional stdin) and collects everything up to the final message.
    func run(_ exec: Exec, id: UInt32 = 1, stdin: [[UInt8]]? = nil, afterStart: ((AgentClient) throws -> Void)? = nil) throws -> Result {
        try send(.exec(exec), id: id)
        if let stdin {
            for chunk in stdin { try send(.stdinData(chunk), id: id) }
            try send(.stdinEOF, id: id)
        }
        try afterStart?(self)
        var result = Result()
        while true {
            let frame = try next()
            guard frame.id == id else { throw TestFailure("frame for id \(frame.id): \(frame.message)") }
            switch frame.message {
            case .output(let o):
                result.sequences.append(o.sequence)
                if o.truncated { result.truncated.append(o.stream) }
                if o.stream == .stdout { result.stdout += o.data } else { result.stderr += o.data }
            case .exited, .signalled, .timedOut, .execFailed:
                result.final = frame.message
                return result
            default:
                throw TestFailure("unexpected \(frame.message)")
            }
        }
    }
}

func shell(_ script: String, stdin: StdinMode = .none, timeoutMillis: UInt64 = 0, stdoutCap: UInt64 = 0) -> Exec {
    Exec(arguments: ["sh", "-c", script], environment: ["PATH=/usr/local/bin:/usr/bin:/bin"],
         workingDirectory: "/tmp", uid: getuid(), gid: getgid(), stdin: stdin,
         timeoutMillis: timeoutMillis, stdoutCap: stdoutCap)
}

/// FNV-1a, enough to compare 20 MB streams.
func fnv1a(_ bytes: [UInt8]) -> UInt64 {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for b in bytes { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
    return h
}

@Suite(.serialized) struct AgentServerTests {
    @Test func outputAndExitCode() throws {
        let server = try AgentServer()
        let client = try server.connect()
        let r = try client.run(shell("echo out; echo err >&2; exit 3"))
        #expect(r.stdoutText == "out\n")
        #expect(r.stderrText == "err\n")
        #expect(r.final == .exited(3))
        #expect(r.sequences == Array(0..<UInt64(r.sequences.count)))
    }

    @Test func twentyMegabytesOfOutputArriveIntactAndInOrder() throws {
        let server = try AgentServer()
        let client = try server.connect()
        let size = 20_000_000
        let r = try client.run(shell("yes 0123456789abcdefghijklmnopqrstu | head -c \(size)"))
        let line = Array("0123456789abcdefghijklmnopqrstu\n".utf8)
        var expected: [UInt8] = []
        expected.reserveCapacity(size)
        while expected.count < size { expected += line }
        expected.removeLast(expected.count - size)
        #expect(r.final == .exited(0))
        #expect(r.stdout.count == size)
        #expect(fnv1a(r.stdout) == fnv1a(expected))
        #expect(r.sequences == Array(0..<UInt64(r.sequences.count)))
    }

    @Test func stdinRoundTrip() throws {
        let server = try AgentServer()
        let client = try server.connect()
        var big = [UInt8](repeating: 0, count: 300_000)
        for i in big.indices { big[i] = UInt8(truncatingIfNeeded: i &* 31 &+ i >> 8) }
        let chunks = [Array("hello\n".utf8), big, [0, 255, 10]]
        let r = try client.run(shell("cat", stdin: .stream), stdin: chunks)
        #expect(r.final == .exited(0))
        #expect(r.stdout == chunks.flatMap { $0 })
        // none → /dev/null, closed → fd 0 closed.
        let none = try client.run(shell("wc -c"), id: 2)
        #expect(none.stdoutText.trimmingCharacters(in: .whitespacesAndNewlines) == "0")
        let closed = try client.run(shell("cat; echo rc=$?", stdin: .closed), id: 3)
        #expect(closed.stdoutText.hasPrefix("rc=") && closed.stdoutText != "rc=0\n")
    }

    @Test func missingCommandIsExecFailedENOENT() throws {
        let server = try AgentServer()
        let client = try server.connect()
        var exec = shell("")
        exec.arguments = ["no-such-command-\(getpid())"]
        let r = try client.run(exec)
        guard case .execFailed(let failure) = r.final else { Issue.record("got \(String(describing: r.final))"); return }
        #expect(failure.errno == ENOENT)
        #expect(failure.message.contains("No such file"))
        // A bad working directory is reported too, and the connection still works.
        var badDir = shell("true")
        badDir.workingDirectory = "/no/such/dir"
        guard case .execFailed(let f2) = try client.run(badDir, id: 2).final else { Issue.record("no ExecFailed"); return }
        #expect(f2.errno == ENOENT && f2.message.hasPrefix("chdir"))
        #expect(try client.run(shell("exit 0"), id: 3).final == .exited(0))
    }

    @Test func timeoutKillsTheProcessGroup() throws {
        let server = try AgentServer()
        let client = try server.connect()
        let start = ContinuousClock.now
        let r = try client.run(shell("echo started; sleep 30 & sleep 30", timeoutMillis: 300))
        #expect(r.final == .timedOut)
        #expect(r.stdoutText == "started\n")
        #expect(ContinuousClock.now - start < .seconds(5))
    }

    @Test func killDashNineIsSignalled9() throws {
        let server = try AgentServer()
        let client = try server.connect()
        #expect(try client.run(shell("kill -9 $$")).final == .signalled(signal: 9, coreDumped: false))
    }

    @Test func hostSignalAndKillReachTheProcessGroup() throws {
        let server = try AgentServer()
        let client = try server.connect()
        let r1 = try client.run(shell("echo ready; sleep 30"), id: 5) { c in
            usleep(200_000)
            try c.send(.signal(SIGTERM), id: 5)
        }
        #expect(r1.final == .signalled(signal: SIGTERM, coreDumped: false))
        let r2 = try client.run(shell("sleep 30"), id: 6) { c in try c.send(.kill, id: 6) }
        #expect(r2.final == .signalled(signal: 9, coreDumped: false))
    }

    @Test func outputCapTruncates() throws {
        let server = try AgentServer()
        let client = try server.connect()
        let r = try client.run(shell("yes | head -c 200000; echo done >&2", stdoutCap: 1000))
        #expect(r.final == .exited(0))
        #expect(r.stdout.count == 1000)
        #expect(r.truncated == [.stdout])
        #expect(r.stderrText == "done\n")
    }

    @Test func filesCopyInAndOut() throws {
        let server = try AgentServer()
        let client = try server.connect()
        let path = "/tmp/sandbox-init-test-file-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { unlink(path) }
        let content = (0..<600_000).map { UInt8(truncatingIfNeeded: $0 * 7) }
        let chunk = AgentProtocolLimits.maxChunkSize
        var offset = 0
        repeat {
            let end = min(offset + chunk, content.count)
            try client.send(.writeFile(WriteFile(path: path, mode: 0o640, offset: UInt64(offset), isFinal: end == content.count,
                                                 data: Array(content[offset..<end]))), id: 7)
            offset = end
        } while offset < content.count
        #expect(try client.next().message == .fileEnd(size: UInt64(content.count)))
        var st = stat()
        #expect(stat(path, &st) == 0 && st.st_mode & 0o777 == 0o640)

        try client.send(.readFile(path: path), id: 8)
        var received: [UInt8] = []
        while true {
            let f = try client.next()
            #expect(f.id == 8)
            if case .fileData(let d) = f.message { #expect(d.offset == UInt64(received.count)); received += d.data; continue }
            #expect(f.message == .fileEnd(size: UInt64(content.count)))
            break
        }
        #expect(received == content)

        try client.send(.readFile(path: "/no/such/file"), id: 9)
        guard case .fileError(let e) = try client.next().message else { Issue.record("expected FileError"); return }
        #expect(e.errno == ENOENT)
        // A parent that is a file cannot be made a directory.
        try client.send(.writeFile(WriteFile(path: "/etc/passwd/x", data: [1])), id: 10)
        guard case .fileError(let e2) = try client.next().message else { Issue.record("expected FileError"); return }
        #expect(e2.errno == ENOTDIR)
        // Missing parents are made.
        let deep = NSTemporaryDirectory() + "sandbox-agent-parents-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: deep) }
        try client.send(.writeFile(WriteFile(path: deep + "/a/b/c.txt", data: [7])), id: 11)
        #expect(try client.next().message == .fileEnd(size: 1))
        #expect(FileManager.default.contents(atPath: deep + "/a/b/c.txt") == Data([7]))
    }

    @Test func pingAndProtocolRules() throws {
        let server = try AgentServer()
        // Exec before Hello is refused and the connection closed.
        let rude = try server.connect(hello: false)
        try rude.send(.exec(shell("true")), id: 1)
        guard case .error(let e) = try rude.next().message else { Issue.record("expected Error"); return }
        #expect(e.code == .protocolViolation)
        #expect(rude.isClosed())

        let client = try server.connect()
        try client.send(.ping(77), id: 3)
        let pong = try client.next()
        guard case .pong(let p) = pong.message else { Issue.record("expected Pong"); return }
        #expect(pong.id == 3 && p.echo == 77 && p.initStartedNanos <= p.agentReadyNanos && p.agentReadyNanos <= p.guestNowNanos)
    }

    @Test func serverSurvivesBrokenConnections() throws {
        let server = try AgentServer()
        // Garbage: the agent answers malformedFrame and closes.
        let garbage = try server.connect()
        try garbage.sendRaw(Array("GET / HTTP/1.0\r\n\r\n".utf8))
        guard case .error(let e) = try garbage.next().message else { Issue.record("expected Error"); return }
        #expect(e.code == .malformedFrame)
        #expect(garbage.isClosed())
        // Hang up in the middle of a running command.
        do {
            let quitter = try server.connect()
            try quitter.send(.exec(shell("echo x; sleep 30")), id: 1)
            _ = try quitter.next()
        }
        // Half a frame then hang up.
        do {
            let half = try server.connect()
            try half.sendRaw(Array(try AgentMessage.exec(shell("true")).encode(id: 1).prefix(20)))
        }
        let client = try server.connect()
        #expect(try client.run(shell("echo still here")).stdoutText == "still here\n")
        // The abandoned `sleep 30` was killed.
        let check = try client.run(shell("ps -eo args 2>/dev/null | grep -c '^sleep 30$' || true"), id: 2)
        #expect(check.stdoutText == "0\n")
    }

    @Test("requests run at once on one connection: a command waiting on stdin does not hold up seven others or a ping")
    func concurrentRequestsOnOneConnection() throws {
        let server = try AgentServer()
        let client = try server.connect()
        // Id 1 waits for its stdin for as long as the others take.
        try client.send(.exec(shell("cat; exit 41", stdin: .stream)), id: 1)
        for i in 2...8 {
            try client.send(.exec(shell("head -c \(i * 50_000) /dev/zero | tr '\\0' '\(i)'; echo >&2 err\(i); exit \(i)")), id: UInt32(i))
        }
        try client.send(.exec(shell("true")), id: 1)  // an id already running
        try client.send(.ping(5), id: 20)
        var stdout: [UInt32: [UInt8]] = [:], stderr: [UInt32: [UInt8]] = [:], finals: [UInt32: AgentMessage] = [:]
        var sequences: [UInt32: [UInt64]] = [:]
        var sawDuplicateRefused = false, sawPong = false
        while finals.count < 7 || !sawDuplicateRefused || !sawPong {
            let f = try client.next()
            switch f.message {
            case .output(let o):
                sequences[f.id, default: []].append(o.sequence)
                if o.stream == .stdout { stdout[f.id, default: []] += o.data } else { stderr[f.id, default: []] += o.data }
            case .exited, .signalled, .timedOut, .execFailed:
                finals[f.id] = f.message
            case .error(let e):
                #expect(f.id == 1 && e.code == .protocolViolation, "\(e)")
                sawDuplicateRefused = true
            case .pong(let p):
                #expect(f.id == 20 && p.echo == 5)
                sawPong = true
            default:
                Issue.record("unexpected \(f.message) for id \(f.id)")
            }
        }
        #expect(finals[1] == nil, "the command waiting on stdin ended early: \(String(describing: finals[1]))")
        for i in 2...8 {
            let id = UInt32(i)
            #expect(finals[id] == .exited(Int32(i)))
            #expect(stdout[id] == [UInt8](repeating: UInt8(ascii: "0") + UInt8(i), count: i * 50_000))
            #expect(stderr[id] == Array("err\(i)\n".utf8))
            #expect(sequences[id] == Array(0..<UInt64(sequences[id]?.count ?? 0)), "id \(i): sequences not 0, 1, 2, ...")
        }
        // Id 1 goes on: its stdin arrives now.
        try client.send(.stdinData(Array("late input\n".utf8)), id: 1)
        try client.send(.stdinEOF, id: 1)
        var rest: [UInt8] = []
        while true {
            let f = try client.next()
            #expect(f.id == 1, "frame for id \(f.id): \(f.message)")
            if case .output(let o) = f.message { rest += o.data; continue }
            #expect(f.message == .exited(41))
            break
        }
        #expect(String(decoding: rest, as: UTF8.self) == "late input\n")
    }

    @Test("more than 64 execs at once on one connection: the 65th is refused as busy, the others run")
    func tooManyConcurrentExecsAreRefused() throws {
        let server = try AgentServer()
        let client = try server.connect()
        for i in 1...65 { try client.send(.exec(shell("cat >/dev/null", stdin: .stream)), id: UInt32(i)) }
        let f = try client.next()
        guard case .error(let e) = f.message else { Issue.record("expected Error(busy), got \(f.message)"); return }
        #expect(f.id == 65 && e.code == .busy)
        for i in 1...64 { try client.send(.stdinEOF, id: UInt32(i)) }
        var ended = Set<UInt32>()
        while ended.count < 64 {
            let f = try client.next()
            #expect(f.message == .exited(0), "id \(f.id): \(f.message)")
            ended.insert(f.id)
        }
    }

    @Test("a terminal: the command's stdio is a pty of the size the host sets, input is typed into it, Ctrl-C interrupts, the status comes back")
    func terminal() throws {
        let server = try AgentServer()
        let client = try server.connect()
        try client.send(.exec(shell("read go; stty size; tty; trap 'echo interrupted; exit 7' INT; echo ready; while :; do sleep 0.05; done", stdin: .tty)), id: 1)
        try client.send(.resize(rows: 33, columns: 111), id: 1)
        try client.send(.stdinData(Array("go\n".utf8)), id: 1)
        var text = ""
        func readUntil(_ needle: String) throws {
            while !text.contains(needle) {
                let f = try client.next()
                guard case .output(let o) = f.message else { throw TestFailure("expected output before \(needle.debugDescription), got \(f.message); so far \(text.debugDescription)") }
                #expect(o.stream == .stdout)
                text += String(decoding: o.data, as: UTF8.self)
            }
        }
        try readUntil("ready")
        #expect(text.contains("33 111"), "\(text.debugDescription)")
        #expect(text.contains("/dev/pts/"), "\(text.debugDescription)")
        #expect(text.contains("\r\n"), "a terminal turns \\n into \\r\\n: \(text.debugDescription)")
        try client.send(.stdinData([3]), id: 1)  // Ctrl-C, as typed
        var final: AgentMessage?
        while final == nil {
            let f = try client.next()
            switch f.message {
            case .output(let o): text += String(decoding: o.data, as: UTF8.self)
            default: final = f.message
            }
        }
        #expect(final == .exited(7), "\(String(describing: final)) \(text.debugDescription)")
        #expect(text.contains("interrupted"), "\(text.debugDescription)")
    }

    @Test func orphansAreReaped() throws {
        let server = try AgentServer()
        let client = try server.connect()
        // setsid escapes the process group; the orphan is re-parented to the agent.
        let r = try client.run(shell("setsid sh -c 'sleep 0.2' & echo $!"))
        #expect(r.final == .exited(0))
        usleep(800_000)
        let pid = server.process.processIdentifier
        let children = (try? String(contentsOfFile: "/proc/\(pid)/task/\(pid)/children", encoding: .utf8)) ?? "?"
        #expect(children.trimmingCharacters(in: .whitespaces).isEmpty, "children left: \(children)")
    }

    @Test func shutdownStopsTheServer() throws {
        let server = try AgentServer()
        let client = try server.connect()
        try client.send(.shutdown)
        #expect(client.isClosed())
        server.process.waitUntilExit()
        #expect(server.process.terminationStatus == 0)
    }
}
