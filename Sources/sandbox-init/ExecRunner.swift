import AgentProtocol
import CInit
import Glibc
import SandboxABI
import SystemShims

/// One ``Exec`` as a state machine the agent's event loop drives: spawns the command in
/// its own session/process group, forwards stdin from the host, streams stdout/stderr as
/// ordered ``Output`` frames, enforces caps and the timeout, takes Signal/Kill, and ends
/// with exactly one of Exited, Signalled, TimedOut or ExecFailed. Several run at once on
/// one connection, told apart by their request id.
final class ExecRunner {
    /// Largest read from a pipe, hence the largest Output payload data.
    static let chunkSize = 64 * 1024
    /// After the command exits, how long stragglers may keep the pipes open.
    static let drainNanos: UInt64 = 2_000_000_000
    /// After the command exits, how long what is left of its process group may go on
    /// before it is killed: a daemon forks and its child calls setsid (leaving the
    /// group) a moment later; killing the group at once would kill it in that window.
    static let groupGraceNanos: UInt64 = 200_000_000

    /// What a descriptor this exec polls is for.
    enum Role { case stdout, stderr, stdin }

    let exec: Exec
    let id: UInt32
    private let reaper: Reaper
    private let send: (AgentMessage, UInt32) throws -> Void

    private var pid: pid_t = 0
    private var sequence: UInt64 = 0
    private var forwarded: [UInt64] = [0, 0]
    private var truncated: [Bool] = [false, false]
    private var pipes: [Int32] = [-1, -1]
    private var stdinFD: Int32 = -1
    private var stdinPending: [UInt8] = []
    private var stdinPendingOffset = 0
    private var stdinEOFRequested = false
    private var status: Int32?
    private var timedOut = false
    private var deadline: UInt64?
    private var drainDeadline: UInt64?
    /// When the rest of the process group is killed (nil: not pending).
    private var groupKillAt: UInt64?
    /// The final message, once sent.
    private(set) var final: AgentMessage?

    init(exec: Exec, id: UInt32, reaper: Reaper, send: @escaping (AgentMessage, UInt32) throws -> Void) {
        self.exec = exec
        self.id = id
        self.reaper = reaper
        self.send = send
    }

    deinit { abandon() }

    /// Bytes of stdin received from the host and not yet written to the command.
    var stdinBacklog: Int { stdinPending.count - stdinPendingOffset }

    /// Starts the command. A command that cannot start has sent its ExecFailed and is
    /// finished (`final` set) when this returns.
    func start() throws {
        var spawn = cinit_spawn_result()
        let changeIDs = exec.uid != getuid() || exec.gid != getgid()
        let stdinMode: Int32 = switch exec.stdin {
        case .none: Int32(CINIT_STDIN_NULL.rawValue)
        case .stream: Int32(CINIT_STDIN_PIPE.rawValue)
        case .closed: Int32(CINIT_STDIN_CLOSED.rawValue)
        case .tty: Int32(CINIT_STDIN_PTY.rawValue)
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
            try finish(.execFailed(ExecFailed(errno: code, message: "\(what) \(subject): \(errnoDescription(code))")))
            return
        }
        pid = spawn.pid
        reaper.track(pid)
        stdinFD = spawn.stdin_fd
        pipes = [spawn.stdout_fd, spawn.stderr_fd]
        deadline = exec.timeoutMillis == 0 ? nil
            : nowNanos().addingReportingOverflow(exec.timeoutMillis.multipliedReportingOverflow(by: 1_000_000).partialValue).partialValue
    }

    /// The descriptors to poll now, with what each is for.
    func pollSet() -> [(fd: Int32, events: Int16, role: Role)] {
        guard final == nil else { return [] }
        var set: [(fd: Int32, events: Int16, role: Role)] = []
        if pipes[0] >= 0 { set.append((pipes[0], Int16(POLLIN), .stdout)) }
        if pipes[1] >= 0 { set.append((pipes[1], Int16(POLLIN), .stderr)) }
        if stdinFD >= 0 && stdinBacklog > 0 { set.append((stdinFD, Int16(POLLOUT), .stdin)) }
        return set
    }

    /// When this exec next needs a `step` without any descriptor being ready (its
    /// timeout, or the end of the drain after the command exited).
    var wakeAt: UInt64? {
        guard final == nil else { return nil }
        if let groupKillAt { return min(groupKillAt, drainDeadline ?? groupKillAt) }
        if let drainDeadline { return drainDeadline }
        if status == nil, !timedOut { return deadline }
        return nil
    }

    /// Handles a ready descriptor.
    func ready(_ role: Role) throws {
        switch role {
        case .stdout, .stderr:
            let stream = role == .stdout ? 0 : 1
            var result = ReadResult.wouldBlock
            do { result = try readChunk(pipes[stream], max: Self.chunkSize) } catch {
                // A terminal's master reads EIO once every slave is closed: its end.
                guard exec.stdin == .tty, error.errno == EIO else { throw error }
                result = .endOfFile
            }
            switch result {
            case .data(let bytes): try forward(bytes, stream: stream)
            case .endOfFile: close(pipes[stream]); pipes[stream] = -1
            case .wouldBlock: break
            }
        case .stdin: flushStdin()
        }
    }

    /// Advances the state after anything happened: stdin, the child's status (the caller
    /// reaps), the timeout, the drain. Sends the final message when the exec is over.
    func step() throws {
        guard final == nil else { return }
        flushStdin()
        if status == nil, let s = reaper.takeStatus(pid) {
            status = s
            // Background processes of the command that stay in its process group die
            // with it, after a short grace (daemons leave the group with setsid).
            let now = nowNanos()
            groupKillAt = now + Self.groupGraceNanos
            drainDeadline = now + Self.drainNanos
        }
        if let at = groupKillAt {
            if Glibc.kill(-pid, 0) != 0 && errno == ESRCH {
                groupKillAt = nil  // nobody is left in the group
            } else if nowNanos() >= at {
                Glibc.kill(-pid, SIGKILL)
                groupKillAt = nil
            }
        }
        if status == nil, let deadline, !timedOut, nowNanos() >= deadline {
            timedOut = true
            Glibc.kill(-pid, SIGKILL)
            Glibc.kill(pid, SIGKILL)
        }
        guard let s = status, groupKillAt == nil, pipes.allSatisfy({ $0 < 0 }) || nowNanos() >= (drainDeadline ?? 0) else { return }
        for i in pipes.indices where pipes[i] >= 0 { close(pipes[i]); pipes[i] = -1 }
        closeStdin()
        if timedOut {
            try finish(.timedOut)
        } else if (s & 0x7f) == 0 {
            try finish(.exited((s >> 8) & 0xff))
        } else {
            try finish(.signalled(signal: s & 0x7f, coreDumped: (s & 0x80) != 0))
        }
    }

    private func finish(_ message: AgentMessage) throws {
        final = message
        try send(message, id)
    }

    /// Leaves without a final message (the host went away, or Shutdown): the command's
    /// process group is killed and the command reaped.
    func abandon() {
        for i in pipes.indices where pipes[i] >= 0 { close(pipes[i]); pipes[i] = -1 }
        closeStdin()
        if final == nil && status == nil && pid > 0 {
            Glibc.kill(-pid, SIGKILL)
            Glibc.kill(pid, SIGKILL)
            status = reaper.waitFor(pid) ?? 0
        }
        if final == nil { final = .kill }  // marks it over; nothing is sent
    }

    // MARK: - Host frames for this exec

    /// StdinData, StdinEOF, Signal or Kill for this exec's id.
    func handle(_ message: AgentMessage) {
        guard final == nil else { return }
        switch message {
        case .stdinData(let bytes):
            if stdinFD >= 0 && !stdinEOFRequested { stdinPending.append(contentsOf: bytes) }
        case .stdinEOF where exec.stdin == .tty:
            // A terminal has no end of input: type its EOF character instead (Ctrl-D).
            if stdinFD >= 0 { stdinPending.append(4) }
        case .stdinEOF:
            stdinEOFRequested = true
        case .resize(let rows, let columns):
            if exec.stdin == .tty && stdinFD >= 0 { _ = cinit_set_winsize(stdinFD, rows, columns) }
        case .signal(let number):
            if number > 0 && number < 65 && pid > 0 && status == nil { Glibc.kill(-pid, number) }
        case .kill:
            if pid > 0 && status == nil { Glibc.kill(-pid, SIGKILL) }
        default:
            break
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
        } else if stdinPendingOffset > Self.chunkSize {
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

    static func millis(until deadline: UInt64, from now: UInt64) -> Int32 {
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

    /// Runs this exec alone to its end (no host connection: `--selftest`).
    func runAlone() throws -> AgentMessage {
        try start()
        while final == nil {
            let set = pollSet()
            var fds = set.map { pollfd(fd: $0.fd, events: $0.events, revents: 0) }
            fds.append(pollfd(fd: reaper.fd, events: Int16(POLLIN), revents: 0))
            let timeout = wakeAt.map { Self.millis(until: $0, from: nowNanos()) } ?? -1
            _ = try pollFDs(&fds, timeoutMillis: timeout)
            for (k, entry) in set.enumerated() where fds[k].revents != 0 { try ready(entry.role) }
            if fds[set.count].revents != 0 { reaper.reap() }
            try step()
        }
        return final!
    }
}
