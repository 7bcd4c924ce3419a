import AgentProtocol
import CInit
import Glibc
import SandboxABI
import SystemShims

/// Runs one ``Exec``: spawns the command in its own session/process group, forwards
/// stdin from the host, streams stdout/stderr as ordered ``Output`` frames, enforces
/// caps and the timeout, forwards Signal/Kill, and ends with exactly one of
/// Exited, Signalled, TimedOut or ExecFailed.
final class ExecRunner {
    /// Largest read from a pipe, hence the largest Output payload data.
    static let chunkSize = 64 * 1024
    /// Stop reading the connection while this many stdin bytes wait for the command.
    static let stdinBacklogLimit = 8 << 20
    /// After the command exits, how long stragglers may keep the pipes open.
    static let drainNanos: UInt64 = 2_000_000_000

    private let exec: Exec
    private let id: UInt32
    private let reaper: Reaper
    private let input: FrameConnection?
    private let send: (AgentMessage, UInt32) throws -> Void
    private let pong: (UInt64) -> AgentMessage

    /// Set when the host sent Shutdown during the exec; the caller then shuts down.
    private(set) var shutdownRequested = false

    private var sequence: UInt64 = 0
    private var forwarded: [UInt64] = [0, 0]
    private var truncated: [Bool] = [false, false]
    private var stdinFD: Int32 = -1
    private var stdinPending: [UInt8] = []
    private var stdinPendingOffset = 0
    private var stdinEOFRequested = false

    /// - Parameters:
    ///   - input: the connection whose queued and future frames feed stdin, Signal,
    ///     Kill and Ping during the exec; nil for local runs (selftest).
    ///   - send: delivers a message with a request id to the host.
    ///   - pong: builds the answer to a Ping received during the exec.
    init(exec: Exec, id: UInt32, reaper: Reaper, input: FrameConnection?,
         send: @escaping (AgentMessage, UInt32) throws -> Void, pong: @escaping (UInt64) -> AgentMessage) {
        self.exec = exec
        self.id = id
        self.reaper = reaper
        self.input = input
        self.send = send
        self.pong = pong
    }

    /// Runs the command to completion and returns the final message it sent.
    /// - Throws: whatever `send` or the connection throws (the host went away); the
    ///   process group is killed and the command reaped before the error propagates.
    func run() throws -> AgentMessage {
        var spawn = cinit_spawn_result()
        let changeIDs = exec.uid != getuid() || exec.gid != getgid()
        let stdinMode: Int32 = switch exec.stdin {
        case .none: Int32(CINIT_STDIN_NULL.rawValue)
        case .stream: Int32(CINIT_STDIN_PIPE.rawValue)
        case .closed: Int32(CINIT_STDIN_CLOSED.rawValue)
        }
        let rc: Int32 = withCStringArray(exec.arguments) { argv in
            withCStringArray(exec.environment) { envp in
                exec.workingDirectory.withCString { workdir in
                    GuestABI.defaultPath.withCString { defaultPath in
                        var request = cinit_spawn_request(argv: argv, envp: envp, default_path: defaultPath, workdir: workdir,
                                                          uid: exec.uid, gid: exec.gid, change_ids: changeIDs ? 1 : 0, stdin_mode: stdinMode)
                        return cinit_spawn(&request, &spawn)
                    }
                }
            }
        }
        if rc != 0 {
            let code = rc > 0 ? rc : -rc
            let what = rc > 0 ? Self.stageName(spawn.stage) : "spawn"
            // The message starts with the stage that failed; for chdir it names the
            // working directory, since the command itself was never looked at.
            let subject = what == "chdir" ? (exec.workingDirectory.isEmpty ? "/" : exec.workingDirectory) : exec.arguments[0]
            let message = AgentMessage.execFailed(ExecFailed(errno: code, message: "\(what) \(subject): \(errnoDescription(code))"))
            try send(message, id)
            return message
        }
        let pid = spawn.pid
        reaper.track(pid)
        stdinFD = spawn.stdin_fd
        var pipes: [Int32] = [spawn.stdout_fd, spawn.stderr_fd]
        var status: Int32? = nil
        var timedOut = false
        var drainDeadline: UInt64? = nil
        let deadline: UInt64? = exec.timeoutMillis == 0 ? nil
            : nowNanos().addingReportingOverflow(exec.timeoutMillis.multipliedReportingOverflow(by: 1_000_000).partialValue).partialValue

        defer {
            for fd in pipes where fd >= 0 { close(fd) }
            closeStdin()
            if status == nil {
                // Leaving early (host gone): do not leave the command running.
                Glibc.kill(-pid, SIGKILL)
                _ = reaper.waitFor(pid)
            }
        }

        while true {
            // Frames already decoded (e.g. StdinData right behind the Exec) come first.
            while let input, let frame = input.popQueued() { try handle(frame, pid: pid) }
            flushStdin()

            if status == nil, let s = reaper.takeStatus(pid) {
                status = s
                // One-shot semantics: background processes of the command die with it.
                Glibc.kill(-pid, SIGKILL)
                drainDeadline = nowNanos() + Self.drainNanos
            }
            if status != nil && (pipes.allSatisfy { $0 < 0 } || nowNanos() >= (drainDeadline ?? 0)) { break }

            var timeout: Int32 = -1
            let now = nowNanos()
            if status == nil, let deadline, !timedOut {
                if now >= deadline {
                    timedOut = true
                    Glibc.kill(-pid, SIGKILL)
                    Glibc.kill(pid, SIGKILL)
                    continue
                }
                timeout = Self.millis(until: deadline, from: now)
            }
            if let drainDeadline { timeout = Self.millis(until: drainDeadline, from: now) }

            var fds: [pollfd] = []
            var roles: [Int] = [] // 0 stdout, 1 stderr, 2 stdin, 3 connection, 4 reaper
            for (i, fd) in pipes.enumerated() where fd >= 0 {
                fds.append(pollfd(fd: fd, events: Int16(POLLIN), revents: 0)); roles.append(i)
            }
            if stdinFD >= 0 && stdinPendingOffset < stdinPending.count {
                fds.append(pollfd(fd: stdinFD, events: Int16(POLLOUT), revents: 0)); roles.append(2)
            }
            if let input, stdinPending.count - stdinPendingOffset < Self.stdinBacklogLimit {
                fds.append(pollfd(fd: input.fd, events: Int16(POLLIN), revents: 0)); roles.append(3)
            }
            fds.append(pollfd(fd: reaper.fd, events: Int16(POLLIN), revents: 0)); roles.append(4)

            _ = try pollFDs(&fds, timeoutMillis: timeout)
            for (k, pfd) in fds.enumerated() where pfd.revents != 0 {
                switch roles[k] {
                case 0, 1:
                    let stream = roles[k]
                    switch try readChunk(pipes[stream], max: Self.chunkSize) {
                    case .data(let bytes): try forward(bytes, stream: stream)
                    case .endOfFile: close(pipes[stream]); pipes[stream] = -1
                    case .wouldBlock: break
                    }
                case 2: flushStdin()
                case 3: try input?.readOnce()
                default: reaper.reap()
                }
            }
        }

        let final: AgentMessage
        let s = status ?? 0
        if timedOut {
            final = .timedOut
        } else if (s & 0x7f) == 0 {
            final = .exited((s >> 8) & 0xff)
        } else {
            final = .signalled(signal: s & 0x7f, coreDumped: (s & 0x80) != 0)
        }
        try send(final, id)
        return final
    }

    // MARK: - Host frames during the exec

    private func handle(_ frame: Frame, pid: pid_t) throws {
        switch frame.message {
        case .stdinData(let bytes) where frame.id == id:
            if stdinFD >= 0 && !stdinEOFRequested { stdinPending.append(contentsOf: bytes) }
        case .stdinEOF where frame.id == id:
            stdinEOFRequested = true
        case .signal(let number) where frame.id == id:
            if number > 0 && number < 65 { Glibc.kill(-pid, number) }
        case .kill where frame.id == id:
            Glibc.kill(-pid, SIGKILL)
        case .stdinData, .stdinEOF, .signal, .kill:
            break // for another (finished) request: ignore
        case .ping(let value):
            try send(pong(value), frame.id)
        case .shutdown:
            shutdownRequested = true
            Glibc.kill(-pid, SIGKILL)
        case .error(let e):
            log("host reported error \(e.code.rawValue): \(e.message)")
        case .exec, .readFile, .writeFile, .seed:
            try send(.error(ErrorMessage(code: .busy, message: "an exec is running on this connection")), frame.id)
        case .hello, .pong, .output, .exited, .signalled, .execFailed, .timedOut, .fileData, .fileEnd, .fileError:
            try send(.error(ErrorMessage(code: .protocolViolation, message: "unexpected \(frame.message.type) during exec")), frame.id)
        }
    }

    // MARK: - Output

    private func forward(_ bytes: [UInt8], stream: Int) throws {
        if truncated[stream] { return }
        let cap = stream == 0 ? exec.stdoutCap : exec.stderrCap
        var data = bytes
        var hitCap = false
        if cap != 0 {
            let room = cap - forwarded[stream]
            if UInt64(data.count) > room {
                data = Array(data.prefix(Int(room)))
                hitCap = true
            }
        }
        forwarded[stream] += UInt64(data.count)
        truncated[stream] = hitCap
        try send(.output(Output(stream: stream == 0 ? .stdout : .stderr, sequence: sequence, truncated: hitCap, data: data)), id)
        sequence += 1
    }

    // MARK: - Stdin

    private func flushStdin() {
        guard stdinFD >= 0 else { return }
        while stdinPendingOffset < stdinPending.count {
            let n = stdinPending.withUnsafeBytes { buf in
                // SAFETY: offset < count, so the pointer and length stay inside buf.
                Glibc.write(stdinFD, buf.baseAddress! + stdinPendingOffset, buf.count - stdinPendingOffset)
            }
            if n > 0 { stdinPendingOffset += n; continue }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { break }
            // EPIPE: the command closed its stdin; drop the rest.
            closeStdin()
            return
        }
        if stdinPendingOffset == stdinPending.count {
            stdinPending.removeAll(keepingCapacity: stdinPending.count <= Self.chunkSize)
            stdinPendingOffset = 0
            if stdinEOFRequested { closeStdin() }
        } else if stdinPendingOffset > Self.stdinBacklogLimit {
            stdinPending.removeSubrange(0..<stdinPendingOffset)
            stdinPendingOffset = 0
        }
    }

    private func closeStdin() {
        if stdinFD >= 0 { close(stdinFD); stdinFD = -1 }
        stdinPending = []
        stdinPendingOffset = 0
    }

    // MARK: - Helpers

    private static func millis(until deadline: UInt64, from now: UInt64) -> Int32 {
        guard deadline > now else { return 0 }
        let ms = (deadline - now + 999_999) / 1_000_000
        return Int32(min(ms, UInt64(Int32.max)))
    }

    static func stageName(_ stage: Int32) -> String {
        switch UInt32(bitPattern: stage) {
        case CINIT_STAGE_STDIO.rawValue: "stdio"
        case CINIT_STAGE_CHDIR.rawValue: "chdir"
        case CINIT_STAGE_SETGROUPS.rawValue: "setgroups"
        case CINIT_STAGE_SETGID.rawValue: "setgid"
        case CINIT_STAGE_SETUID.rawValue: "setuid"
        default: "execve"
        }
    }
}
