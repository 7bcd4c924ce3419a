import AgentProtocol
import Foundation
import SandboxCore
import Synchronization
import SystemShims
#if canImport(Glibc)
import Glibc
#endif

extension RunningSandbox {
    /// Starts `command` in the background and returns at once: its output arrives on the
    /// handle's `output` as it is written, `write`/`closeStdin` feed its stdin (a pipe,
    /// open until `closeStdin()`), `signal`/`kill` reach its process group, and `wait()`
    /// gives its typed result. Other commands run meanwhile, e.g. a client of a server
    /// started this way.
    ///
    ///     let server = try await sandbox.spawn(["httpd", "-f", "-p", "8080"])
    ///     let page = await sandbox.exec(["wget", "-qO-", "http://127.0.0.1:8080/"])
    ///     await server.signal(SIGTERM)
    ///     let ended = await server.wait()      // .signalled(15)
    ///
    /// The timeout is `options.timeout` only: without one it runs until it ends, is
    /// signalled, or the sandbox stops (the configuration's timeout is for `exec`).
    /// Releasing the handle kills a process that still runs; a checkpoint waits for none
    /// (it refuses while one runs).
    public func spawn(_ command: [String], options: ExecOptions = ExecOptions()) async throws(SandboxError) -> SpawnedProcess {
        guard !command.isEmpty else { throw .invalidInput("no command given") }
        let (exec, timeout, limit) = makeExec(command, options: options, stdin: .stream, defaultTimeout: false)
        let r: Result<SpawnedProcess, SandboxError> = await onThread {
            do throws(SandboxError) { return .success(try self.spawnBlocking(command, exec: exec, timeout: timeout, limit: limit)) } catch {
                return .failure(error)
            }
        }
        return try r.get()
    }

    private func spawnBlocking(_ command: [String], exec: Exec, timeout: Double?, limit: UInt64) throws(SandboxError) -> SpawnedProcess {
        gate.enter()
        var handedOver = false
        defer { if !handedOver { gate.leave() } }
        if let ended = endedBecause { throw ended }
        let vm = self.vm
        let id: UInt32
        do { id = try vm.client.begin(exec) } catch { throw failed(error) }
        let process = SpawnedProcess(command: command, sandbox: self, client: vm.client, id: id,
                                     outputLimit: limit, keepOutput: configuration.keepOutput)
        // The pump holds the process's state, not its handle: releasing the handle kills
        // the command (its deinit), and the pump then ends with it.
        let core = process.core
        let deadline = timeout.flatMap { t in try? Watchdog(after: t + Self.hostGrace) { [vmm = vm.vmm] in vmm.kill() } }
        let t0 = monotonicNanos()
        weak let sandbox = self
        let pump: NativeThread
        do {
            pump = try NativeThread(name: "sandbox-spawned") { [core] in
                var result = ExecResult(command: command, outcome: .infrastructureError(.internal("not run")), stdout: [], stderr: [],
                                        timings: PhaseTimings(), consoleTail: "")
                var keeper = OutputKeeper(limit: limit, keep: core.keepOutput)
                do {
                    let status = try vm.client.results(of: id) { stream, bytes in
                        let event: OutputEvent = stream == .stdout ? .stdout(bytes) : .stderr(bytes)
                        keeper.add(event)
                        core.buffer.put(event)
                    }
                    deadline?.cancel()
                    (result.stdout, result.stderr) = (keeper.stdout, keeper.stderr)
                    SandboxRunner.apply(status, to: &result, onOutput: { core.buffer.put($0) })
                } catch {
                    deadline?.cancel()
                    (result.stdout, result.stderr) = (keeper.stdout, keeper.stderr)
                    if deadline?.fired == true {
                        result.outcome = .timedOut
                        sandbox?.end(SandboxError(.guest, "a spawned command outlived its timeout by \(InputCheck.format(Self.hostGrace)) s; the host stopped the sandbox"))
                    } else {
                        result.outcome = .infrastructureError(sandbox?.failed(error) ?? SandboxError(.cancelled, "the sandbox was released"))
                    }
                    result.consoleTail = vm.vmm.lastStopped?.consoleTail ?? ""
                }
                vm.client.end(id)
                result.timings.exec = Double(monotonicNanos() &- t0) / 1e6
                result.timings.total = result.timings.exec
                sandbox?.gate.leave()
                core.finish(result)
            }
        } catch {
            vm.client.killExec(id)
            vm.client.end(id)
            deadline?.cancel()
            throw SandboxError(.host, "cannot start a thread for the spawned command", underlying: error)
        }
        handedOver = true
        pump.detach()
        return process
    }
}

/// A command running in the background of a `RunningSandbox` (see `spawn`).
///
/// `output` is one sequence of the command's stdout and stderr chunks in the order the
/// guest wrote them; it ends when the command ends. Chunks wait for the reader up to the
/// output limit (bytes, both streams together; 64 MiB when the limit is 0, none); past
/// that, newer chunks are dropped and counted in `droppedOutputBytes` (a command that
/// writes faster than it is read costs bounded memory, and never stalls the sandbox's
/// other requests). `wait()`'s result keeps each stream up to the output limit, whether
/// or not `output` was read.
public final class SpawnedProcess: Sendable {
    /// How much unread output waits when the output limit is 0 (none).
    public static let unlimitedBufferBytes = 64 << 20

    /// What the handle and the thread that reads the command's frames share.
    final class Core: Sendable {
        let keepOutput: Bool
        let buffer: OutputBuffer
        struct Done {
            var result: ExecResult?
            var waiters: [CheckedContinuation<ExecResult, Never>] = []
            var stdinClosed = false
        }
        let done = Mutex(Done())

        init(keepOutput: Bool, bufferLimit: Int) {
            self.keepOutput = keepOutput
            self.buffer = OutputBuffer(limit: bufferLimit)
        }

        func finish(_ result: ExecResult) {
            buffer.finish()
            let waiters = done.withLock { d -> [CheckedContinuation<ExecResult, Never>] in
                d.result = result
                defer { d.waiters = [] }
                return d.waiters
            }
            for w in waiters { w.resume(returning: result) }
        }
    }

    public let command: [String]
    /// Keeps the sandbox alive while the handle is.
    private let sandbox: RunningSandbox
    private let client: AgentClient
    /// The Exec's request id on the agent connection.
    let id: UInt32
    let core: Core

    init(command: [String], sandbox: RunningSandbox, client: AgentClient, id: UInt32, outputLimit: UInt64, keepOutput: Bool) {
        self.command = command
        self.sandbox = sandbox
        self.client = client
        self.id = id
        self.core = Core(keepOutput: keepOutput, bufferLimit: outputLimit == 0 ? Self.unlimitedBufferBytes : Int(clamping: outputLimit))
    }

    deinit {
        if core.done.withLock({ $0.result == nil }) { client.killExec(id) }
    }

    /// The command's stdout and stderr chunks, in order, until it ends. Read it once.
    public var output: OutputBuffer.Sequence { OutputBuffer.Sequence(buffer: core.buffer) }

    /// Output bytes dropped because `output` was not read fast enough.
    public var droppedOutputBytes: UInt64 { core.buffer.dropped }

    /// The result, once the command has ended (nil while it runs).
    public var result: ExecResult? { core.done.withLock { $0.result } }

    /// Waits for the command to end and returns its typed result. Cancelling the waiting
    /// task kills the command (its process group); the result then says how it ended.
    public func wait() async -> ExecResult {
        let core = self.core
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (cont: CheckedContinuation<ExecResult, Never>) in
                let now: ExecResult? = core.done.withLock { d in
                    if let r = d.result { return r }
                    d.waiters.append(cont)
                    return nil
                }
                if let now { cont.resume(returning: now) }
            }
        } onCancel: {
            _ = client.killExec(id)
        }
    }

    /// Writes `bytes` to the command's stdin.
    /// - Throws: `invalidInput` after `closeStdin()` or once the command has ended.
    public func write(_ bytes: [UInt8]) async throws(SandboxError) {
        let (client, id, core, name) = (self.client, self.id, self.core, self.command[0])
        let r: Result<Void, SandboxError> = await runOnThread {
            guard core.done.withLock({ $0.result == nil && !$0.stdinClosed }) else {
                return .failure(.invalidInput("\(name): its stdin is closed (closeStdin() was called, or it has ended)"))
            }
            var offset = 0
            repeat {
                let end = min(offset + AgentProtocolLimits.maxChunkSize, bytes.count)
                do { try client.send(.stdinData(Array(bytes[offset..<end])), id: id) } catch {
                    return .failure(SandboxError.from(error, code: .agent, context: "writing to the stdin of \(name)"))
                }
                offset = end
            } while offset < bytes.count
            return .success(())
        }
        try r.get()
    }

    /// Closes the command's stdin (it reads end of file once what was written is read).
    public func closeStdin() async {
        let first = core.done.withLock { d -> Bool in
            defer { d.stdinClosed = true }
            return !d.stdinClosed && d.result == nil
        }
        guard first else { return }
        let (client, id) = (self.client, self.id)
        await runOnThread { try? client.send(.stdinEOF, id: id) }
    }

    /// Sends signal `number` to the command's process group (nothing once it has ended).
    public func signal(_ number: Int32) async {
        let (client, id) = (self.client, self.id)
        await runOnThread { _ = client.signalExec(id, number) }
    }

    /// SIGKILLs the command's process group.
    public func kill() async {
        let (client, id) = (self.client, self.id)
        await runOnThread { _ = client.killExec(id) }
    }
}

/// The chunks of a spawned command's output waiting for their reader, bounded by bytes.
public final class OutputBuffer: Sendable {
    private struct State {
        var chunks: [OutputEvent] = []
        var head = 0
        var bytes = 0
        var dropped: UInt64 = 0
        var finished = false
        var waiter: CheckedContinuation<OutputEvent?, Never>?
    }
    private let state = Mutex(State())
    private let limit: Int

    init(limit: Int) { self.limit = limit }

    private static func size(_ e: OutputEvent) -> Int {
        switch e { case .stdout(let b), .stderr(let b): b.count }
    }

    func put(_ event: OutputEvent) {
        let waiter: CheckedContinuation<OutputEvent?, Never>? = state.withLock { s in
            if let w = s.waiter { s.waiter = nil; return w }
            let n = Self.size(event)
            if s.bytes + n > limit { s.dropped += UInt64(n); return nil }
            s.chunks.append(event)
            s.bytes += n
            return nil
        }
        waiter?.resume(returning: event)
    }

    func finish() {
        let waiter = state.withLock { s -> CheckedContinuation<OutputEvent?, Never>? in
            s.finished = true
            defer { s.waiter = nil }
            return s.waiter
        }
        waiter?.resume(returning: nil)
    }

    var dropped: UInt64 { state.withLock { $0.dropped } }

    /// The next chunk, or nil at the end (or when the reading task is cancelled, or when
    /// another reader already waits).
    func next() async -> OutputEvent? {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (cont: CheckedContinuation<OutputEvent?, Never>) in
                enum Now { case event(OutputEvent?), wait }
                let now: Now = state.withLock { s in
                    if s.head < s.chunks.count {
                        let e = s.chunks[s.head]
                        s.head += 1
                        s.bytes -= Self.size(e)
                        if s.head == s.chunks.count { s.chunks.removeAll(keepingCapacity: true); s.head = 0 }
                        return .event(e)
                    }
                    if s.finished || s.waiter != nil || Task.isCancelled { return .event(nil) }
                    s.waiter = cont
                    return .wait
                }
                if case .event(let e) = now { cont.resume(returning: e) }
            }
        } onCancel: {
            let waiter = state.withLock { s -> CheckedContinuation<OutputEvent?, Never>? in
                defer { s.waiter = nil }
                return s.waiter
            }
            waiter?.resume(returning: nil)
        }
    }

    /// The output as an `AsyncSequence` of chunks.
    public struct Sequence: AsyncSequence, Sendable {
        public typealias Element = OutputEvent
        let buffer: OutputBuffer
        public struct AsyncIterator: AsyncIteratorProtocol {
            let buffer: OutputBuffer
            public mutating func next() async -> OutputEvent? { await buffer.next() }
        }
        public func makeAsyncIterator() -> AsyncIterator { AsyncIterator(buffer: buffer) }
    }
}
