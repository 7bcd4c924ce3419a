import AgentProtocol
import Foundation
import SandboxCore
import SandboxImages
import Synchronization
import SystemShims
import TreeArchive
import VMMProtocol
#if canImport(Glibc)
import Glibc
#endif

/// One VM that lives across many commands: started once (restored from the start
/// snapshot of its configuration, or booted), then any number of `exec` calls, file
/// writes and reads, and `stop()`. What a command leaves in the guest (files, the disk,
/// processes it started in the background) is there for the next one.
///
///     let sandbox = try await Sandbox.start(configuration)
///     _ = await sandbox.exec(["sh", "-c", "echo hi > /greeting"])
///     let r = await sandbox.exec(["cat", "/greeting"])     // "hi\n"
///     await sandbox.stop()
///
/// `Sendable`: calls from concurrent tasks run at once in the one VM (the guest agent
/// serves any number of requests on its connection, each with its own id); `spawn`
/// starts a command in the background. `checkpoint()`, `rewind()` and `fork(count:)` run
/// alone. The VM stops on `stop()`, when the object is released, or when this process
/// exits (the VMM dies with its parent). A command that breaks the agent connection (or
/// outlives its timeout by the host's grace) ends the sandbox: later calls return that
/// reason.
public final class RunningSandbox: Sendable {
    /// The configuration it was started with (a template resolved to its snapshot).
    public let configuration: SandboxConfiguration
    /// How the start went (VMM start, restore or boot, agent ready; in milliseconds).
    public let startTimings: PhaseTimings

    /// The VM serving requests now (a rewind replaces it) and why the sandbox ended.
    struct VM: Sendable {
        let vmm: VMMProcess
        let client: AgentClient
    }
    private struct State {
        var vm: VM
        var ended: SandboxError?
    }
    private let state: Mutex<State>
    /// Requests run at once; checkpoint, rewind and fork run alone.
    let gate = RequestGate()
    /// Held while a broken connection's cause is found (see `failed`).
    private let diagnosing = Mutex(())
    /// `<cache>/running/PID-N`: `next/`, where the VMM writes a checkpoint when asked, and
    /// `checkpoint/`, the last one taken. Removed when the sandbox ends.
    private let workDirectory: String
    private var nextDirectory: String { workDirectory + "/next" }
    private var checkpointDirectory: String { workDirectory + "/checkpoint" }

    /// Extra time past a command's timeout before the host stops the VM itself (the
    /// guest agent stops the command at its timeout; this bounds an agent that does not).
    static let hostGrace = 2.0

    private init(configuration: SandboxConfiguration, startTimings: PhaseTimings, vm: VM, workDirectory: String) {
        self.configuration = configuration
        self.startTimings = startTimings
        self.state = Mutex(State(vm: vm))
        self.workDirectory = workDirectory
    }

    deinit {
        let (vm, live) = state.withLock { ($0.vm, $0.ended == nil) }
        let dir = workDirectory
        if live {
            vm.vmm.requestStop()
            try? NativeThread(name: "sandbox-release") {
                vm.vmm.reap(patienceMillis: 3000)
                try? FileManager.default.removeItem(atPath: dir)
            }.detach()
        }
    }

    var vm: VM { state.withLock { $0.vm } }

    // MARK: Start

    /// Starts a sandbox (blocking; `Sandbox.start` is the async form).
    static func start(_ configuration: SandboxConfiguration, progress: (String) -> Void) throws(SandboxError) -> RunningSandbox {
        let t0 = monotonicNanos()
        let config: SandboxConfiguration
        do { config = try SandboxRunner.resolvingTemplate(configuration) } catch { throw .from(error, code: .snapshot) }
        guard config.keepDiskPath == nil else {
            throw .invalidInput("keepDiskPath is for one-shot runs (Sandbox.run); a running sandbox's disk lives as long as it does")
        }
        guard config.consoleFD == nil else { throw .invalidInput("consoleFD is for one-shot runs (Sandbox.run)") }
        try InputCheck.check(config)
        try SandboxRunner.checkCopyIn(config.copyIn)
        let snapshot = try SandboxRunner.prepare(config, progress: progress).snapshot
        var boot: (kernel: String, image: String)?
        if snapshot == nil {
            do { boot = try SandboxRunner.bootInputs(config, progress: progress) } catch { throw .from(error, code: .host) }
        }
        let dir = try makeWorkDirectory()
        let launched: (vm: VM, timings: PhaseTimings)
        do {
            launched = try launch(config, restoreFrom: snapshot, boot: boot, checkpointInto: dir + "/next")
        } catch {
            try? FileManager.default.removeItem(atPath: dir)
            throw error
        }
        do {
            try SandboxRunner.copyIn(config.copyIn, with: launched.vm.client)
        } catch {
            launched.vm.vmm.kill()
            launched.vm.vmm.reap(patienceMillis: 3000)
            try? FileManager.default.removeItem(atPath: dir)
            throw .from(error, code: .agent, context: "starting the sandbox: copy-in failed")
        }
        var timings = launched.timings
        timings.total = Double(monotonicNanos() &- t0) / 1e6
        return RunningSandbox(configuration: config, startTimings: timings, vm: launched.vm, workDirectory: dir)
    }

    private static let workCounter = Mutex<UInt64>(0)

    /// A new `<cache>/running/PID-N` with an empty `next/`. The first one of a process
    /// also removes the directories of processes that are gone (a process that exits
    /// with sandboxes still running leaves theirs: its VMMs die with it, nobody cleans up).
    static func makeWorkDirectory() throws(SandboxError) -> String {
        let n = workCounter.withLock { c in c += 1; return c }
        if n == 1 { sweepWorkDirectories() }
        let dir = SandboxPaths.cacheDirectory + "/running/\(getpid())-\(n)"
        try? FileManager.default.removeItem(atPath: dir)
        do { try FileManager.default.createDirectory(atPath: dir + "/next", withIntermediateDirectories: true) } catch {
            throw SandboxError(.host, "cannot create \(dir)", underlying: error)
        }
        return dir
    }

    static func sweepWorkDirectories() {
        let root = SandboxPaths.cacheDirectory + "/running"
        for name in (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? [] {
            guard let pid = name.split(separator: "-").first.flatMap({ Int32($0) }), pid != getpid(),
                  kill(pid, 0) != 0, errno == ESRCH else { continue }
            try? FileManager.default.removeItem(atPath: root + "/" + name)
        }
    }

    /// Spawns a VMM (restoring `restoreFrom`, or booting `boot`) whose checkpoints go to
    /// `checkpointInto`, and greets its agent (Hello, Seed after a restore, Ping).
    static func launch(_ config: SandboxConfiguration, restoreFrom snapshot: String?, boot: (kernel: String, image: String)?,
                       checkpointInto: String) throws(SandboxError) -> (vm: VM, timings: PhaseTimings) {
        let t0 = monotonicNanos()
        let bootTimeout: Double
        do { bootTimeout = try SandboxConfiguration.resolvedBootTimeout(config.bootTimeout) } catch { throw .from(error, code: .invalidInput) }
        // No lifetime limit in the VMM: the sandbox lives until it is stopped or its
        // owner goes away.
        var vmConfig = VMMConfig(mode: .agent, kernelPath: boot?.kernel ?? "", imagePath: boot?.image ?? "", overlayDirectory: SandboxPaths.overlayDirectory,
                                 memoryMiB: config.memoryMiB, cpus: config.cpus, vmTimeoutSeconds: nil,
                                 bootTimeoutSeconds: bootTimeout,
                                 diskSizeBytes: snapshot == nil ? config.diskSizeMiB.map { $0 << 20 } : nil)
        vmConfig.restoreDirectory = snapshot
        vmConfig.snapshotDirectory = checkpointInto
        vmConfig.jail = config.jail
        // Spawned by a thread that lives as long as this process: the VMM's parent-death
        // signal fires when the spawning *thread* ends, and this one's does not.
        let vmm = try ProcessLifetimeSpawner.spawn(vmConfig, executable: config.vmmExecutable)
        let spawned = monotonicNanos()
        let bootWait = bootTimeout + 10
        let first = vmm.nextEvent(timeoutMillis: Int32(min(bootWait * 1000, Double(Int32.max))))
        guard let ready = first, ready.kind == .ready else {
            let outcome: Outcome = first == nil && vmm.isAlive
                ? .infrastructureError(.vmm("the VMM process did not report within \(InputCheck.format(bootWait)) s of starting (stopped or hung); it was killed"))
                : vmm.outcomeForEarlyEnd(first)
            vmm.kill()
            vmm.reap(patienceMillis: 3000)
            throw Self.startError(outcome)
        }
        let client = AgentClient(fd: vmm.agent)
        let setupDeadline = try? Watchdog(after: 30) { [vmm] in vmm.kill() }
        defer { setupDeadline?.cancel() }
        do {
            _ = try client.greet(seed: ready.restoreMillis != nil)
            // From here on requests run at once, each reading its own frames.
            try client.startReader()
        } catch {
            vmm.kill()
            vmm.reap(patienceMillis: 3000)
            if setupDeadline?.fired == true {
                throw SandboxError(.agent, "the guest agent did not answer Hello and Ping within 30 s of the VM being ready; the host stopped the VM")
            }
            throw .from(error, code: .agent, context: "starting the sandbox: talking to the guest agent failed")
        }
        var timings = PhaseTimings()
        timings.vmmStart = Double(spawned &- t0) / 1e6
        timings.restore = ready.restoreMillis ?? 0
        timings.restored = ready.restoreMillis != nil
        timings.prefaultPages = ready.prefaultPages ?? 0
        timings.prefaultNote = ready.prefaultNote
        timings.snapshot = snapshot
        timings.total = Double(monotonicNanos() &- t0) / 1e6
        return (VM(vmm: vmm, client: client), timings)
    }

    static func startError(_ outcome: Outcome) -> SandboxError {
        switch outcome {
        case .infrastructureError(let e): return e
        case .guestCrashed(let tail):
            return SandboxError(.guest, "the guest crashed while the sandbox started: " + (tail.split(whereSeparator: \.isNewline).last.map(String.init) ?? "no console output"))
        case .timedOut: return SandboxError(.guest, "the guest did not finish starting in time")
        default: return SandboxError(.guest, "the sandbox did not start: \(outcome)")
        }
    }

    // MARK: Requests

    /// The VMM process's id (for diagnostics: `/proc`, strace).
    public var vmmProcessID: Int32 { vm.vmm.pid }

    /// Why the sandbox has ended, if it has (stopped, or broken by a failed request).
    public var endedBecause: SandboxError? { state.withLock { $0.ended } }

    /// Runs `body` as one of this sandbox's requests in flight (others may run at once),
    /// unless the sandbox has ended. An error of the connection ends the sandbox; the
    /// guest's answer to a request (no such file) does not.
    private func request<T>(_ body: (VM) throws -> T) throws(SandboxError) -> T {
        gate.enter()
        defer { gate.leave() }
        if let ended = endedBecause { throw ended }
        do { return try body(vm) } catch {
            throw failed(error)
        }
    }

    /// A file request (read, write, tree in or out) bounded in time: the configuration's
    /// `transferTimeout` (default max(300 s, its timeout)). A guest that stalls one past
    /// that (stops reading what is sent, or never ends what it sends) is not to be
    /// trusted: the sandbox is stopped and the request fails saying so.
    private func fileRequest<T>(_ what: String, _ body: (VM) throws -> T) throws(SandboxError) -> T {
        let seconds = SandboxRunner.transferSeconds(configuration)
        let why = SandboxError(.guest, "\(what) did not finish within \(InputCheck.format(seconds)) s; the host stopped the sandbox")
        let deadline = try? Watchdog(after: seconds) { [weak self] in self?.end(why) }
        defer { deadline?.cancel() }
        do { return try request(body) } catch {
            throw deadline?.fired == true ? why : error
        }
    }

    /// What a request's error means for the sandbox: the guest's answer (the connection
    /// is fine), the reason the connection was closed on purpose (stopped, rewound), or a
    /// broken connection, which ends the sandbox.
    func failed(_ error: Swift.Error) -> SandboxError {
        // Already said (cancelled before anything was sent, a host-side failure, a
        // refused copy-in source): the connection is fine.
        if let e = error as? SandboxError { return e }
        switch error as? AgentClient.Error {
        case .agentError(let message)?: return SandboxError(.agent, message)
        case .closed(let why)?: return why
        default: break
        }
        // One request at a time finds out why (requests in flight all see the break;
        // the first to reap a killed VMM is the one that learns its signal).
        return diagnosing.withLock { _ in
            if let ended = endedBecause { return ended }
            var e = SandboxError.from(error, code: .agent, context: "talking to the guest agent failed")
            if let how = endedOnItsOwn() { e = SandboxError(.guest, "the VM stopped on its own (\(how))", underlying: e) }
            end(e)
            return endedBecause ?? e
        }
    }

    /// A broken connection is most often a VM that ended by itself (the guest reset or
    /// powered off, the VMM was killed): which, if the VMM says so within a moment.
    private func endedOnItsOwn() -> String? {
        let vm = self.vm
        if let stopped = vm.vmm.waitStopped(timeoutMillis: 500) {
            if stopped.stop == .stopped { return nil }
            if let line = stopped.crashLine { return "the guest kernel crashed: \(line)" }
            return stopped.reason
        }
        if let failure = vm.vmm.failure { return failure.message }
        return vm.vmm.reap(patienceMillis: 500).map { "the VMM process " + SandboxRunner.describeExit($0) }
    }

    /// Stops the VM (once), removes the work directory, and remembers why. Requests in
    /// flight end with `why`.
    func end(_ why: SandboxError) {
        let vm: VM? = state.withLock { s in
            guard s.ended == nil else { return nil }
            s.ended = why
            return s.vm
        }
        guard let vm else { return }
        vm.client.close(because: AgentClient.Error.closed(why))
        vm.vmm.requestStop()
        _ = vm.vmm.waitStopped(timeoutMillis: 3000)
        vm.vmm.reap(patienceMillis: 3000)
        try? FileManager.default.removeItem(atPath: workDirectory)
    }

    /// The Exec for `command` with `options` over the sandbox's configuration.
    func makeExec(_ command: [String], options: ExecOptions, stdin: StdinMode, defaultTimeout: Bool) -> (exec: Exec, timeout: Double?, limit: UInt64) {
        var config = configuration
        config.environment.merge(options.environment) { _, new in new }
        let chosen = defaultTimeout ? (options.timeout ?? configuration.timeout) : options.timeout
        let timeout = chosen.map(SandboxRunner.seconds)
        let limit = options.outputLimit ?? configuration.outputLimit
        var exec = Exec(arguments: command, environment: SandboxRunner.environment(config),
                        workingDirectory: options.workingDirectory ?? configuration.workingDirectory,
                        timeoutMillis: timeout.map { UInt64($0 * 1000) } ?? 0, stdoutCap: limit, stderrCap: limit)
        exec.stdin = stdin
        return (exec, timeout, limit)
    }

    /// Runs `command` in the sandbox (blocking; see `exec` for the async form).
    func execBlocking(_ command: [String], options: ExecOptions, stdin: [UInt8]?, cancel: CancelToken? = nil,
                      onOutput: (OutputEvent) -> Void) -> ExecResult {
        let t0 = monotonicNanos()
        var result = ExecResult(command: command, outcome: .infrastructureError(.internal("not run")), stdout: [], stderr: [],
                                timings: PhaseTimings(), consoleTail: "")
        guard !command.isEmpty else {
            result.outcome = .infrastructureError(.invalidInput("no command given"))
            return result
        }
        let (exec, timeout, limit) = makeExec(command, options: options, stdin: .none, defaultTimeout: true)
        var keeper = OutputKeeper(limit: limit, keep: configuration.keepOutput)
        var deadline: Watchdog?
        var used: VM?
        do {
            let status = try request { (vm: VM) throws -> CommandStatus in
                used = vm
                if cancel?.isCancelled == true { throw SandboxError.cancelled }
                if let timeout { deadline = try? Watchdog(after: timeout + Self.hostGrace) { [vmm = vm.vmm] in vmm.kill() } }
                defer { deadline?.cancel() }
                // A cancel kills this command (and no other): its id is known once the
                // Exec is sent; a cancel that came first is handled at registration.
                let mine = Mutex<UInt32?>(nil)
                cancel?.onCancel { [client = vm.client] in
                    if let id = mine.withLock({ $0 }) { client.killExec(id) }
                }
                return try vm.client.exec(exec, stdin: stdin, onStarted: { id in
                    mine.withLock { $0 = id }
                    if cancel?.isCancelled == true { vm.client.killExec(id) }
                }) { stream, bytes in
                    let event: OutputEvent = stream == .stdout ? .stdout(bytes) : .stderr(bytes)
                    onOutput(event)
                    keeper.add(event)
                }
            }
            (result.stdout, result.stderr) = (keeper.stdout, keeper.stderr)
            SandboxRunner.apply(status, to: &result, onOutput: onOutput)
            if cancel?.isCancelled == true { result.outcome = .infrastructureError(.cancelled) }
        } catch {
            (result.stdout, result.stderr) = (keeper.stdout, keeper.stderr)
            if deadline?.fired == true {
                result.outcome = .timedOut
                end(SandboxError(.guest, "a command outlived its timeout by \(InputCheck.format(Self.hostGrace)) s; the host stopped the sandbox"))
            } else {
                result.outcome = .infrastructureError(error)
            }
            result.consoleTail = (used ?? vm).vmm.lastStopped?.consoleTail ?? ""
        }
        result.timings.exec = Double(monotonicNanos() &- t0) / 1e6
        result.timings.total = result.timings.exec
        return result
    }

    // MARK: Public API

    /// What one `exec` may change from the sandbox's configuration.
    public struct ExecOptions: Sendable {
        /// Added to (and overriding) the configuration's environment.
        public var environment: [String: String] = [:]
        /// nil: the configuration's working directory.
        public var workingDirectory: String?
        /// nil: the configuration's timeout.
        public var timeout: Duration?
        /// nil: the configuration's output limit (bytes per stream).
        public var outputLimit: UInt64?
        public init(environment: [String: String] = [:], workingDirectory: String? = nil, timeout: Duration? = nil, outputLimit: UInt64? = nil) {
            self.environment = environment
            self.workingDirectory = workingDirectory
            self.timeout = timeout
            self.outputLimit = outputLimit
        }
    }

    /// Runs `command` (argv) in the sandbox and returns its typed result. Output is
    /// kept up to the output limit. Other commands may run at the same time.
    /// Cancelling the calling task kills the command (its process group) and returns
    /// `.infrastructureError(.cancelled)`; the sandbox stays usable.
    public func exec(_ command: [String], options: ExecOptions = ExecOptions(), stdin: [UInt8]? = nil) async -> ExecResult {
        let token = CancelToken()
        return await withTaskCancellationHandler {
            await onThread { self.execBlocking(command, options: options, stdin: stdin, cancel: token, onOutput: { _ in }) }
        } onCancel: {
            token.cancel()
        }
    }

    /// Asks the guest agent to answer (a health check): the round trip, host to guest
    /// and back, with no command run. Throws if the sandbox has ended or the agent
    /// does not answer.
    @discardableResult
    public func ping() async throws(SandboxError) -> Duration {
        try await onThreadThrowing { () throws(SandboxError) -> Duration in
            try self.request { vm throws -> Duration in
                let t = monotonicNanos()
                _ = try vm.client.ping()
                return .nanoseconds(Int64(monotonicNanos() &- t))
            }
        }
    }

    /// Runs `script` with `sh -c`.
    public func sh(_ script: String, options: ExecOptions = ExecOptions(), stdin: [UInt8]? = nil) async -> ExecResult {
        await exec(["sh", "-c", script], options: options, stdin: stdin)
    }

    /// Writes `contents` to `path` in the guest (parents are made), with `mode`.
    public func writeFile(_ path: String, contents: [UInt8], mode: UInt32 = 0o644) async throws(SandboxError) {
        let r: Result<Void, SandboxError> = await onThread {
            do throws(SandboxError) { try self.fileRequest("writing \(path)") { try $0.client.writeFile(path: path, mode: mode, contents: contents) }; return .success(()) } catch { return .failure(error) }
        }
        try r.get()
    }

    /// Reads the guest file at `path` (at most `limit` bytes, else an error).
    public func readFile(_ path: String, limit: UInt64? = nil) async throws(SandboxError) -> [UInt8] {
        let limit = limit ?? configuration.copyOutLimit
        let r: Result<[UInt8], SandboxError> = await onThread {
            do throws(SandboxError) { return .success(try self.fileRequest("reading \(path)") { try $0.client.readFile(path: path, limit: limit) }) } catch { return .failure(error) }
        }
        return try r.get()
    }

    /// Copies the host file or directory at `hostPath` to `guestPath` (parents are made):
    /// a directory's whole tree (files, directories, symbolic links, modes, mtimes) as a
    /// tar stream; a special file in it (a FIFO, a device) is refused with its name.
    public func copyIn(_ hostPath: String, to guestPath: String) async throws(SandboxError) {
        let copy = [FileCopy(hostPath: hostPath, guestPath: guestPath)]
        try SandboxRunner.checkCopyIn(copy)
        try await onThreadThrowing { () throws(SandboxError) in
            try self.fileRequest("copying \(hostPath) in") { vm throws in try SandboxRunner.copyIn(copy, with: vm.client) }
        }
    }

    /// Copies the guest file or directory tree at `guestPath` to `hostPath` (parents
    /// are made). What the guest sends is checked as it arrives: nothing lands outside
    /// `hostPath` (no absolute paths, `..`, paths through links, or links that leave
    /// it), set-id bits are dropped, and at most `limit` bytes of file data (default: the
    /// configuration's `copyOutLimit`) and a million entries are taken.
    public func copyOut(_ guestPath: String, to hostPath: String, limit: UInt64? = nil) async throws(SandboxError) {
        let copy = FileCopy(hostPath: hostPath, guestPath: guestPath)
        let limit = limit ?? configuration.copyOutLimit
        try await onThreadThrowing { () throws(SandboxError) in
            try self.fileRequest("copying \(guestPath) out") { vm throws in try SandboxRunner.copyOutRaw(copy, limit: limit, with: vm.client) }
        }
    }

    // MARK: Checkpoint, rewind, fork

    /// Takes a checkpoint of the sandbox as it is now (memory, devices, disk), replacing
    /// the previous one; `rewind()` goes back to it and `fork(count:)` copies it. The VM is
    /// paused for it and then goes on as a VM restored from it (the guest's processes,
    /// files and clock go on; its connection to the host is new).
    /// - Returns: milliseconds it took (snapshot written and the VM back).
    /// - Throws: `invalidInput` while commands run (a checkpoint needs a quiet agent:
    ///   wait for them, or for spawned processes, first).
    @discardableResult
    public func checkpoint() async throws(SandboxError) -> Double {
        try await onThreadThrowing { () throws(SandboxError) -> Double in
            try self.replacingVM { old, inFlight throws(SandboxError) in
                guard inFlight == 0 else {
                    throw .invalidInput("checkpoint() needs no command running in the sandbox; \(inFlight) still run (spawned processes count until they end)")
                }
                old.vmm.requestSnapshot()
                guard let e = old.vmm.nextEvent(timeoutMillis: 120_000) else {
                    throw SandboxError(.snapshot, "the VMM did not report the checkpoint within 120 s")
                }
                guard e.kind == .snapshotted else {
                    throw e.error ?? SandboxError(.snapshot, "the VMM did not write the checkpoint (event \(e.kind.rawValue))")
                }
                _ = old.vmm.waitStopped(timeoutMillis: 10_000)
                old.vmm.reap(patienceMillis: 3000)
                let fm = FileManager.default
                try? fm.removeItem(atPath: self.checkpointDirectory)
                guard rename(self.nextDirectory, self.checkpointDirectory) == 0 else {
                    throw SandboxError(.host, "cannot keep the checkpoint at \(self.checkpointDirectory): \(String(cString: strerror(errno)))")
                }
            }
        }
    }

    /// Goes back to the last checkpoint: the current VM is discarded and a new one is
    /// restored from it (memory, processes, files and disk as they were). Commands still
    /// running in the discarded VM end with a `cancelled` infrastructure error.
    /// - Returns: milliseconds it took.
    /// - Throws: `invalidInput` without a checkpoint; why the restore failed (the sandbox
    ///   has then ended).
    @discardableResult
    public func rewind() async throws(SandboxError) -> Double {
        try await onThreadThrowing { () throws(SandboxError) -> Double in
            guard self.hasCheckpoint else { throw .invalidInput("rewind() needs a checkpoint: call checkpoint() first") }
            return try self.replacingVM { old, _ throws(SandboxError) in
                // Nothing of the old VM is kept: kill it and reap it off this path (its
                // exit unmaps its RAM, which takes a while).
                old.client.close(because: AgentClient.Error.closed(SandboxError(.cancelled, "the sandbox was rewound while the command ran")))
                old.vmm.kill()
                let vmm = old.vmm
                if (try? NativeThread(name: "sandbox-rewound") { vmm.reap(patienceMillis: 3000) }.detach()) == nil {
                    vmm.reap(patienceMillis: 3000)
                }
            }
        }
    }

    /// `count` new, independent sandboxes, each restored from the last checkpoint (this
    /// one goes on as it is). Each has its own disk overlay, entropy and clock, and its own
    /// checkpoints.
    public func fork(count: Int) async throws(SandboxError) -> [RunningSandbox] {
        guard count >= 0 else { throw .invalidInput("fork(count:) needs a count >= 0, not \(count)") }
        var config = configuration
        config.snapshot = checkpointDirectory
        config.template = nil
        config.diskSizeMiB = nil
        config.copyIn = []
        let c = config
        return try await onThreadThrowing { () throws(SandboxError) -> [RunningSandbox] in
            try self.alone { _ throws(SandboxError) -> [RunningSandbox] in
                guard self.hasCheckpoint else { throw .invalidInput("fork(count:) needs a checkpoint: call checkpoint() first") }
                var forks: [RunningSandbox] = []
                for _ in 0 ..< count { forks.append(try RunningSandbox.start(c, progress: { _ in })) }
                return forks
            }
        }
    }

    private var hasCheckpoint: Bool { FileManager.default.fileExists(atPath: checkpointDirectory) }

    /// Alone: `discard` ends the current VM (writing a checkpoint, or not; it is told how
    /// many requests are in flight), then a new VM is restored from the checkpoint and
    /// takes over. A failure ends the sandbox. Returns the milliseconds it all took.
    private func replacingVM(_ discard: (VM, Int) throws(SandboxError) -> Void) throws(SandboxError) -> Double {
        try alone { inFlight throws(SandboxError) -> Double in
            let t0 = monotonicNanos()
            do throws(SandboxError) { try discard(vm, inFlight) } catch where error.code == .invalidInput { throw error } catch {
                end(SandboxError(.snapshot, "the sandbox could not go on from its checkpoint", underlying: error))
                throw error
            }
            func goOn() throws(SandboxError) {
                try? FileManager.default.removeItem(atPath: nextDirectory)
                do { try FileManager.default.createDirectory(atPath: nextDirectory, withIntermediateDirectories: true) } catch {
                    throw SandboxError(.host, "cannot create \(nextDirectory)", underlying: error)
                }
                let fresh = try Self.launch(configuration, restoreFrom: checkpointDirectory, boot: nil, checkpointInto: nextDirectory)
                state.withLock { $0.vm = fresh.vm }
            }
            do throws(SandboxError) { try goOn() } catch {
                end(SandboxError(.snapshot, "the sandbox could not go on from its checkpoint", underlying: error))
                throw error
            }
            return Double(monotonicNanos() &- t0) / 1e6
        }
    }

    /// Runs `body` with no other checkpoint, rewind or fork, and no new request, at the
    /// same time (it is told how many requests are in flight), unless the sandbox has ended.
    private func alone<T>(_ body: (Int) throws(SandboxError) -> T) throws(SandboxError) -> T {
        try gate.exclusively { inFlight throws(SandboxError) -> T in
            if let ended = endedBecause { throw ended }
            return try body(inFlight)
        }
    }

    /// Stops the VM. Requests in flight, and later ones, end with "the sandbox was
    /// stopped" (a `cancelled` infrastructure error). Idempotent.
    public func stop() async {
        await onThread { self.end(SandboxError(.cancelled, "the sandbox was stopped")) }
    }

    /// `onThread` for a body that throws.
    private func onThreadThrowing<T: Sendable>(_ body: @escaping @Sendable () throws(SandboxError) -> T) async throws(SandboxError) -> T {
        let r: Result<T, SandboxError> = await onThread {
            do throws(SandboxError) { return .success(try body()) } catch { return .failure(error) }
        }
        return try r.get()
    }

    /// Runs blocking `body` on a thread of its own (never on the cooperative pool).
    func onThread<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        await runOnThread(body)
    }
}

/// Runs blocking `body` on a thread of its own (never on the cooperative pool).
func runOnThread<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { (cont: CheckedContinuation<T, Never>) in
        do {
            try NativeThread(name: "sandbox-request") { cont.resume(returning: body()) }.detach()
        } catch {
            cont.resume(returning: body())
        }
    }
}

/// Requests of a running sandbox run at once (`enter`/`leave`); checkpoint, rewind and
/// fork run `exclusively`: new requests wait for them, and they are told how many are
/// already in flight.
final class RequestGate: @unchecked Sendable {
    // @unchecked: both fields are read and written with `condition` held.
    private let condition = NSCondition()
    private var inFlight = 0
    private var exclusive = false

    func enter() {
        condition.lock()
        while exclusive { condition.wait() }
        inFlight += 1
        condition.unlock()
    }

    func leave() {
        condition.lock()
        inFlight -= 1
        condition.broadcast()
        condition.unlock()
    }

    func exclusively<T>(_ body: (Int) throws(SandboxError) -> T) throws(SandboxError) -> T {
        condition.lock()
        while exclusive { condition.wait() }
        exclusive = true
        let n = inFlight
        condition.unlock()
        defer {
            condition.lock()
            exclusive = false
            condition.broadcast()
            condition.unlock()
        }
        return try body(n)
    }
}

/// Output kept for a result: each stream up to `limit` bytes (0: no limit).
struct OutputKeeper {
    let limit: UInt64
    let keep: Bool
    var stdout: [UInt8] = []
    var stderr: [UInt8] = []
    private var seen: (UInt64, UInt64) = (0, 0)

    init(limit: UInt64, keep: Bool) {
        self.limit = limit
        self.keep = keep
    }

    mutating func add(_ event: OutputEvent) {
        guard keep else { return }
        switch event {
        case .stdout(let bytes):
            if limit == 0 || seen.0 < limit { stdout += limit == 0 ? bytes[...] : bytes.prefix(Int(limit - seen.0)) }
            seen.0 += UInt64(bytes.count)
        case .stderr(let bytes):
            if limit == 0 || seen.1 < limit { stderr += limit == 0 ? bytes[...] : bytes.prefix(Int(limit - seen.1)) }
            seen.1 += UInt64(bytes.count)
        }
    }
}

extension Sandbox {
    /// Starts a sandbox that lives across many commands (see `RunningSandbox`). A start
    /// whose task is cancelled stops its VM once it is up and throws `cancelled`.
    public static func start(_ configuration: SandboxConfiguration = SandboxConfiguration(),
                             progress: @escaping @Sendable (String) -> Void = { _ in }) async throws(SandboxError) -> RunningSandbox {
        let r: Result<RunningSandbox, SandboxError> = await withCheckedContinuation { cont in
            do {
                try NativeThread(name: "sandbox-start") {
                    do throws(SandboxError) { cont.resume(returning: .success(try RunningSandbox.start(configuration, progress: progress))) } catch {
                        cont.resume(returning: .failure(error))
                    }
                }.detach()
            } catch {
                cont.resume(returning: .failure(SandboxError(.host, "cannot start a thread for the sandbox", underlying: error)))
            }
        }
        let sandbox = try r.get()
        if Task.isCancelled {
            await sandbox.stop()
            throw .cancelled
        }
        return sandbox
    }
}

/// Spawns VMMs from one thread that never ends. PR_SET_PDEATHSIG (which makes a VMM die
/// with its owner) fires when the *thread* that spawned it ends, so a VMM that outlives
/// the call that started it (a `RunningSandbox`) must be spawned by a thread that lives
/// as long as the process.
enum ProcessLifetimeSpawner {
    private final class Request: @unchecked Sendable {
        // @unchecked: `result` is written by the spawner thread before `done` is
        // signalled and read by the caller only after it waited for `done`.
        let config: VMMConfig
        let executable: String?
        var result: Result<VMMProcess, SandboxError> = .failure(.internal("not spawned"))
        let done = DispatchSemaphore(value: 0)
        init(config: VMMConfig, executable: String?) { self.config = config; self.executable = executable }
    }
    private static let queue = Mutex<[Request]>([])
    private static let wake = DispatchSemaphore(value: 0)
    private static let thread: Result<NativeThread, SandboxError> = {
        do {
            return .success(try NativeThread(name: "vmm-spawner") {
                while true {
                    wake.wait()
                    while let r = queue.withLock({ $0.isEmpty ? nil : $0.removeFirst() }) {
                        do throws(SandboxError) { r.result = .success(try VMMProcess.spawn(r.config, executable: r.executable)) } catch {
                            r.result = .failure(error)
                        }
                        r.done.signal()
                    }
                }
            })
        } catch {
            return .failure(SandboxError(.host, "cannot start the VMM spawner thread", underlying: error))
        }
    }()

    static func spawn(_ config: VMMConfig, executable: String?) throws(SandboxError) -> VMMProcess {
        if case .failure(let e) = thread { throw e }
        let r = Request(config: config, executable: executable)
        queue.withLock { $0.append(r) }
        wake.signal()
        r.done.wait()
        return try r.result.get()
    }
}
