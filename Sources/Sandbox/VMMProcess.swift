import Foundation
import SystemShims
#if canImport(Glibc)
import Glibc
#endif

/// The library's handle on one VMM child process (`sandbox _vmm`).
final class VMMProcess: @unchecked Sendable {
    // @unchecked: `pid`/`reaped`/`buffer` are guarded by `lock`; the descriptors are immutable.
    let pid: pid_t
    /// The agent byte stream (relayed by the child to the guest's vsock port).
    let agent: FileDescriptor
    /// Control channel: JSON-line events in, "stop" out.
    let control: FileDescriptor
    private let lock = Lock()
    private var reaped = false
    private var buffer: [UInt8] = []
    private(set) var lastStopped: VMMEvent?
    private var lastFailure: VMMEvent?

    private init(pid: pid_t, agent: FileDescriptor, control: FileDescriptor) {
        self.pid = pid
        self.agent = agent
        self.control = control
    }

    static func socketPair() throws -> (FileDescriptor, FileDescriptor) {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw SandboxError.infrastructure("socketpair: \(String(cString: strerror(errno)))")
        }
        return (FileDescriptor(owning: fds[0]), FileDescriptor(owning: fds[1]))
    }

    /// Spawns `sandbox _vmm` with the agent and control sockets at fds 3 and 4.
    static func spawn(_ config: VMMConfig, consoleFD: Int32?) throws -> VMMProcess {
        let exe = try SandboxRunner.vmmExecutable()
        let (agentParent, agentChild) = try socketPair()
        let (controlParent, controlChild) = try socketPair()
        let json = String(decoding: try JSONEncoder().encode(config), as: UTF8.self)
        var env = ProcessInfo.processInfo.environment
        env["SANDBOX_VMM_CONFIG"] = json
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        if let c = consoleFD { posix_spawn_file_actions_adddup2(&actions, c, 2) }
        posix_spawn_file_actions_adddup2(&actions, agentChild.rawValue, VMMFileDescriptors.agent)
        posix_spawn_file_actions_adddup2(&actions, controlChild.rawValue, VMMFileDescriptors.control)
        let argv = [exe, "_vmm"]
        let envp = env.map { "\($0.key)=\($0.value)" }
        var cArgv = argv.map { strdup($0) } + [nil]
        var cEnv = envp.map { strdup($0) } + [nil]
        defer { for p in cArgv { free(p) }; for p in cEnv { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, exe, &actions, nil, &cArgv, &cEnv)
        guard rc == 0 else { throw SandboxError.infrastructure("cannot start the VMM process \(exe): \(String(cString: strerror(rc)))") }
        agentChild.close()
        controlChild.close()
        return VMMProcess(pid: pid, agent: agentParent, control: controlParent)
    }

    /// The next control event, or nil on timeout / EOF.
    func nextEvent(timeoutMillis: Int32) -> VMMEvent? {
        let deadline = monotonicNanos() + UInt64(max(timeoutMillis, 0)) * 1_000_000
        while true {
            if let nl = buffer.firstIndex(of: 0x0A) {
                let line = Array(buffer[..<nl])
                buffer.removeFirst(nl + 1)
                guard let e = try? JSONDecoder().decode(VMMEvent.self, from: Data(line)) else { continue }
                if e.kind == .stopped { lastStopped = e }
                if e.kind == .failed { lastFailure = e }
                return e
            }
            let now = monotonicNanos()
            guard now < deadline else { return nil }
            guard waitReadable(control.rawValue, timeoutMillis: Int32(min((deadline - now) / 1_000_000 + 1, UInt64(Int32.max)))) else { return nil }
            var chunk = [UInt8](repeating: 0, count: 64 * 1024)
            let n = chunk.withUnsafeMutableBytes { read(control.rawValue, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return nil }
            buffer += chunk[0..<n]
        }
    }

    /// Waits for the "stopped" event, asking the VMM to stop if it takes longer than `timeoutMillis`.
    func waitStopped(timeoutMillis: Int32) -> VMMEvent? {
        if let s = lastStopped { return s }
        var asked = false
        var budget = timeoutMillis
        while true {
            guard let e = nextEvent(timeoutMillis: budget) else {
                if asked || lastFailure != nil { return lastStopped }
                requestStop()
                asked = true
                budget = max(5000, timeoutMillis)
                continue
            }
            if e.kind == .stopped { return e }
            if e.kind == .failed { return nil }
        }
    }

    /// What to report when the VM ended (or failed) before the agent was reachable.
    func outcomeForEarlyEnd(_ event: VMMEvent?) -> Outcome {
        var e = event
        if e?.kind != .stopped && e?.kind != .failed { e = waitStopped(timeoutMillis: 2000) ?? lastFailure }
        guard let e else { return .infrastructureError("the VMM process ended without reporting (crashed?)") }
        switch e.kind {
        case .failed: return .infrastructureError(e.error ?? "VMM set-up failed")
        case .stopped:
            switch e.reasonKind {
            case "crash", "clean":
                // Keep the VMM's reason with the console tail: a guest that resets before
                // printing anything (quiet kernel) would otherwise say nothing at all.
                let tail = e.consoleTail ?? ""
                let why = "[sandbox: the VM stopped before the agent answered: \(e.reason ?? "unknown")]"
                return .guestCrashed(consoleTail: tail.isEmpty ? why : tail + "\n" + why)
            case "timeout": return .timedOut
            case "bootTimeout":
                return .infrastructureError("the guest did not finish booting in time: \(e.reason ?? "no agent"); the VM was still running and its console shows no crash (a slow or overloaded host? raise SandboxConfiguration.bootTimeout or SANDBOX_BOOT_TIMEOUT)")
            default: return .infrastructureError(e.reason ?? "the VM stopped before the agent was ready")
            }
        case .ready: return .infrastructureError("unexpected ready event")
        }
    }

    /// Asks the VMM to stop the VM now.
    func requestStop() {
        let s: [UInt8] = Array("stop\n".utf8)
        s.withUnsafeBytes { _ = send(control.rawValue, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    /// Waits for the child to exit (killing it if it does not within `patienceMillis`). Idempotent.
    func reap(patienceMillis: Int32 = 3000) {
        let already: Bool = lock.withLock { defer { reaped = true }; return reaped }
        if already { return }
        agent.close()
        var status: Int32 = 0
        for _ in 0..<max(1, Int(patienceMillis) / 10) {
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid || (r < 0 && errno == ECHILD) { control.close(); return }
            usleep(10_000)
        }
        kill(pid, SIGKILL)
        _ = waitpid(pid, &status, 0)
        control.close()
    }
}
