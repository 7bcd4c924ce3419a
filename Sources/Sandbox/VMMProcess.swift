import Foundation
import SandboxCore
import SandboxImages
import Synchronization
import SystemShims
import VMMProtocol
#if canImport(Glibc)
import Glibc
#endif

/// Where the VMM executable (`sandbox-vmm`) is, by one rule, in order:
/// 1. an explicit path (`SandboxConfiguration.vmmExecutable`);
/// 2. `$SANDBOX_VMM`;
/// 3. `sandbox-vmm` in the directory of the running executable: where SwiftPM puts it
///    when the package (or its test target) depends on the `sandbox-vmm` product, and
///    where `swift build` puts it next to the `sandbox` CLI.
public enum VMMExecutable {
    public static let name = "sandbox-vmm"

    public static func locate(explicit: String? = nil) throws(SandboxError) -> String {
        let fm = FileManager.default
        var tried: [String] = []
        func usable(_ p: String, _ origin: String) throws(SandboxError) -> String {
            guard fm.isExecutableFile(atPath: p) else {
                throw SandboxError(.vmm, "the VMM executable \(p) (\(origin)) does not exist or is not executable")
            }
            return p
        }
        if let explicit, !explicit.isEmpty { return try usable(explicit, "SandboxConfiguration.vmmExecutable") }
        if let env = ProcessInfo.processInfo.environment["SANDBOX_VMM"], !env.isEmpty { return try usable(env, "SANDBOX_VMM") }
        if let exe = try? fm.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            let candidate = (exe as NSString).deletingLastPathComponent + "/" + name
            if fm.isExecutableFile(atPath: candidate) { return candidate }
            tried.append(candidate)
        }
        throw SandboxError(.vmm, "cannot find the VMM executable `\(name)` (tried \(tried.isEmpty ? "nothing: /proc/self/exe is unreadable" : tried.joined(separator: ", "))); depend on the `\(name)` product from the target that runs sandboxes so that SwiftPM builds it next to it, or set SandboxConfiguration.vmmExecutable or SANDBOX_VMM")
    }
}

/// The library's handle on one VMM process (`sandbox-vmm run`).
final class VMMProcess: Sendable {
    let pid: pid_t
    /// The agent byte stream (relayed by the VMM to the guest agent's vsock port).
    let agent: FileDescriptor
    /// Control channel: JSON-line events in, "stop" out.
    let control: FileDescriptor
    /// Its cgroup under `$SANDBOX_CGROUP`, removed once it is reaped.
    let cgroup: VMMCgroup?

    private struct State {
        var reaped = false
        var buffer: [UInt8] = []
        var lastStopped: VMMEvent?
        var lastFailure: VMMEvent?
    }
    private let state = Mutex(State())
    /// Held by the one thread reading the control channel at a time (a request that
    /// finds the connection broken and a stop asked for elsewhere may both wait for the
    /// stop report), so chunks are appended in the order they were read.
    private let reader = Mutex(())

    private init(pid: pid_t, agent: FileDescriptor, control: FileDescriptor, cgroup: VMMCgroup?) {
        self.pid = pid
        self.agent = agent
        self.control = control
        self.cgroup = cgroup
    }

    var lastStopped: VMMEvent? { state.withLock { $0.lastStopped } }

    static func socketPair() throws(SandboxError) -> (FileDescriptor, FileDescriptor) {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw SandboxError(.host, "socketpair", underlying: SystemError("socketpair", errno: errno))
        }
        return (FileDescriptor(owning: fds[0]), FileDescriptor(owning: fds[1]))
    }

    /// Starts `sandbox-vmm run` with `config`. The child gets /dev/null as stdin, `stdout`
    /// and `stderr` (default /dev/null), the agent socket at fd 3 and the control socket
    /// at fd 4, and nothing else of this process.
    static func spawn(_ config: VMMConfig, executable: String?, stdout: Int32? = nil, stderr: Int32? = nil) throws(SandboxError) -> VMMProcess {
        let exe = try VMMExecutable.locate(explicit: executable)
        let (agentParent, agentChild) = try socketPair()
        let (controlParent, controlChild) = try socketPair()
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        guard null >= 0 else { throw SandboxError(.host, "/dev/null", underlying: SystemError("open(/dev/null)", errno: errno)) }
        defer { Glibc.close(null) }
        let baseEnv = ProcessInfo.processInfo.environment
        var config = config
        // A measuring knob (Benchmarks/restore-vs-cold): restore without the working set.
        if baseEnv["SANDBOX_PREFAULT"] == "0" { config.prefault = false }
        func start(_ config: VMMConfig, _ namespaces: SpawnNamespaces) throws -> pid_t {
            let json: String
            do { json = String(decoding: try JSONEncoder().encode(config), as: UTF8.self) } catch {
                throw SandboxError(.internal, "cannot encode the VMM configuration", underlying: SandboxError.Described(description: "\(error)"))
            }
            var env = baseEnv
            env[VMMConfig.environmentKey] = json
            // A crash in the VMM must not try to start the Swift backtracer: the jail
            // allows no new process, and the attempt would read as a filter violation.
            env["SWIFT_BACKTRACE"] = "enable=no"
            return try spawnProcess(exe, arguments: ["run"], environment: env.map { "\($0.key)=\($0.value)" }, descriptors: [
                (null, 0), (stdout ?? null, 1), (stderr ?? null, 2),
                (agentChild.rawValue, VMMFileDescriptors.agent), (controlChild.rawValue, VMMFileDescriptors.control),
            ], namespaces: namespaces)
        }
        let cgroup = try VMMCgroup.parent.map { parent throws(SandboxError) in
            try VMMCgroup.create(parent: parent, memoryMiB: config.memoryMiB, cpus: config.cpus)
        }
        let pid: pid_t
        do {
            var config = config
            config.cgroup = cgroup?.path
            let wanted = config.jail ? jailNamespaces : []
            config.namespaces = wanted.names
            do {
                pid = try start(config, wanted)
            } catch let e as SystemError where !wanted.isEmpty && [EPERM, EINVAL, ENOSPC, EUSERS, EACCES].contains(e.errno) {
                // The host does not let this user make namespaces (a container without
                // CAP_SYS_ADMIN, user namespaces turned off): the VMM still drops what it
                // can, and its jail report says what is missing.
                config.namespaces = []
                config.namespacesRefused = "\(e)"
                pid = try start(config, [])
            }
        } catch {
            cgroup?.remove()
            throw SandboxError(.vmm, "cannot start the VMM process \(exe)", underlying: error)
        }
        agentChild.close()
        controlChild.close()
        cgroup?.register(pid: pid)
        return VMMProcess(pid: pid, agent: agentParent, control: controlParent, cgroup: cgroup)
    }

    /// The namespaces a jailed VMM starts in: mount, pid, net, ipc, uts, and a user
    /// namespace when this process is not root (it owns the others then).
    static let jailNamespaces: SpawnNamespaces = {
        var ns: SpawnNamespaces = [.mount, .pid, .network, .ipc, .uts]
        if geteuid() != 0 { ns.insert(.user) }
        return ns
    }()

    /// Starts a VMM that only applies its jail, and returns what it says it applied.
    static func checkJail(executable: String) throws(SandboxError) -> JailReport {
        let config = VMMConfig(mode: .jailCheck, kernelPath: "", imagePath: nil, overlayDirectory: SandboxPaths.overlayDirectory,
                               memoryMiB: 0, cpus: 0, vmTimeoutSeconds: nil, bootTimeoutSeconds: 0)
        let vmm = try spawn(config, executable: executable)
        defer { vmm.reap(patienceMillis: 2000) }
        guard let e = vmm.nextEvent(timeoutMillis: 10_000) else {
            throw SandboxError(.jail, "the VMM reported nothing about its jail")
        }
        if e.kind == .failed { throw e.error ?? SandboxError(.jail, "the VMM could not apply its jail") }
        guard let jail = e.jail else { throw SandboxError(.jail, "the VMM's report has no jail") }
        return jail
    }

    /// The next control event, or nil on timeout / EOF.
    func nextEvent(timeoutMillis: Int32) -> VMMEvent? {
        reader.withLock { _ in readEvent(timeoutMillis: timeoutMillis) }
    }

    private func readEvent(timeoutMillis: Int32) -> VMMEvent? {
        let deadline = monotonicNanos() + UInt64(max(timeoutMillis, 0)) * 1_000_000
        var chunk = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            let line: [UInt8]? = state.withLock { s in
                guard let nl = s.buffer.firstIndex(of: 0x0A) else { return nil }
                defer { s.buffer.removeFirst(nl + 1) }
                return Array(s.buffer[..<nl])
            }
            if let line {
                guard let e = VMMEvent.decode(line) else { continue }
                state.withLock { s in
                    if e.kind == .stopped { s.lastStopped = e }
                    if e.kind == .failed { s.lastFailure = e }
                }
                return e
            }
            let now = monotonicNanos()
            guard now < deadline else { return nil }
            // Closed by reap(): nothing more will come (polling -1 would only time out).
            if control.rawValue < 0 { return nil }
            guard waitReadable(control.rawValue, timeoutMillis: Int32(min((deadline - now) / 1_000_000 + 1, UInt64(Int32.max)))) else { return nil }
            let n = (try? chunk.withUnsafeMutableBytes { try readSome(control.rawValue, into: $0) }) ?? 0
            if n <= 0 { return nil }
            state.withLock { $0.buffer += chunk[0..<n] }
        }
    }

    /// Waits for the "stopped" event, asking the VMM to stop if it takes longer than `timeoutMillis`.
    func waitStopped(timeoutMillis: Int32) -> VMMEvent? {
        if let s = lastStopped { return s }
        var asked = false
        var budget = timeoutMillis
        while true {
            guard let e = nextEvent(timeoutMillis: budget) else {
                if asked || state.withLock({ $0.lastFailure != nil }) { return lastStopped }
                requestStop()
                asked = true
                budget = max(5000, timeoutMillis)
                continue
            }
            if e.kind == .stopped { return e }
            if e.kind == .failed { return nil }
        }
    }

    /// The VMM's set-up failure, if it reported one.
    var failure: SandboxError? { state.withLock { $0.lastFailure?.error } }

    /// What to report when the VM ended (or failed) before the agent was reachable.
    func outcomeForEarlyEnd(_ event: VMMEvent?) -> Outcome {
        var e = event
        if e?.kind != .stopped && e?.kind != .failed { e = waitStopped(timeoutMillis: 2000) ?? state.withLock { $0.lastFailure } }
        guard let e else {
            if let cgroup, cgroup.oomKills > 0 {
                return .infrastructureError(.vmm("the VMM was killed by the memory limit of its cgroup \(cgroup.path) (memory.max \(cgroup.memoryMax >> 20) MiB: the guest's RAM plus \(VMMCgroup.vmmAllowanceMiB) MiB)"))
            }
            return .infrastructureError(.vmm("the VMM process ended without reporting (it crashed or was killed)"))
        }
        switch e.kind {
        case .failed: return .infrastructureError(e.error ?? .vmm("the VMM failed to set the VM up"))
        case .stopped:
            switch e.stop {
            case .crash?, .clean?:
                // Keep the VMM's reason with the console tail: a guest that resets before
                // printing anything (quiet kernel) would otherwise say nothing at all.
                let tail = e.consoleTail ?? ""
                let why = "[sandbox: the VM stopped before the agent answered: \(e.reason ?? "unknown")]"
                return .guestCrashed(consoleTail: tail.isEmpty ? why : tail + "\n" + why)
            case .timeout?: return .timedOut
            case .bootTimeout?:
                let lines = (e.consoleTail ?? "").split(whereSeparator: \.isNewline).suffix(5)
                let console = lines.isEmpty ? "no console output (the kernel boots quietly)" : "console ends: " + lines.joined(separator: " | ")
                return .infrastructureError(.guest("the guest did not finish booting in time: \(e.reason ?? "no agent"); the VM was still running and its console shows no crash (\(console)); a slow or overloaded host? raise SandboxConfiguration.bootTimeout or SANDBOX_BOOT_TIMEOUT"))
            case .kvm?: return .infrastructureError(SandboxError(.vmm, e.reason ?? "KVM failed"))
            case .stopped?, nil: return .infrastructureError(.guest(e.reason ?? "the VM stopped before the agent was ready"))
            }
        case .ready: return .infrastructureError(.internal("unexpected ready event"))
        case .snapshotted: return .infrastructureError(.internal("unexpected snapshotted event"))
        }
    }

    /// Whether the VMM process still runs (not reaped, not exited).
    var isAlive: Bool {
        if state.withLock({ $0.reaped }) { return false }
        return Glibc.kill(pid, 0) == 0
    }

    /// Kills the VMM process (SIGKILL works on a stopped process too); its sockets close,
    /// so every wait on them ends. Reaping stays with `reap`.
    func kill() {
        if state.withLock({ $0.reaped }) { return }
        _ = Glibc.kill(pid, SIGKILL)
    }

    /// Asks the VMM to write a snapshot of the VM (into the configuration's snapshot
    /// directory); it answers with a `snapshotted` or `failed` event, then stops the VM.
    func requestSnapshot() {
        let s: [UInt8] = Array("snapshot\n".utf8)
        s.withUnsafeBytes { _ = send(control.rawValue, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    /// Asks the VMM to stop the VM now.
    func requestStop() {
        let s: [UInt8] = Array("stop\n".utf8)
        s.withUnsafeBytes { _ = send(control.rawValue, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    /// Waits for the child to exit (killing it if it does not within `patienceMillis`).
    /// Idempotent. Returns how the process ended (nil when an earlier call reaped it).
    @discardableResult
    func reap(patienceMillis: Int32 = 3000) -> Int32? {
        let already: Bool = state.withLock { s in defer { s.reaped = true }; return s.reaped }
        if already { return nil }
        defer { cgroup?.remove() }
        agent.close()
        if let status = reapChild(pid, timeoutMillis: patienceMillis) {
            closeControl()
            return status
        }
        if Glibc.kill(pid, 0) != 0 && errno == ESRCH { closeControl(); return nil }
        var status: Int32 = 0
        _ = Glibc.kill(pid, SIGKILL)
        _ = waitpid(pid, &status, 0)
        closeControl()
        return status
    }

    /// Closes the control channel; a thread waiting on it for an event is woken (by the
    /// shutdown: it reads end of file) before the descriptor goes.
    private func closeControl() {
        _ = Glibc.shutdown(control.rawValue, Int32(SHUT_RDWR))
        reader.withLock { _ in control.close() }
    }
}
