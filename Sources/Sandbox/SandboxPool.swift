import Synchronization
import SystemShims

/// Bounds how many sandboxes run at once and queues the rest, first come first served.
///
/// A test suite that starts one sandbox per test can ask for more VMs than the host
/// can hold; the pool runs at most `maxConcurrent` of them (see `SandboxPoolLimits`)
/// and parks the other callers on continuations, so a waiting test holds no thread.
///
///     let pool = SandboxPool(limit: 4)
///     let r = await pool.run(["make", "test"], configuration: config)
///
/// Cancellation: a caller cancelled while queued leaves the queue at once and gets an
/// `.infrastructureError(.cancelled)` result; a caller cancelled while its sandbox
/// runs stops that VM (`Sandbox.run` handles it) and frees its slot.
public final class SandboxPool: Sendable {
    /// Runs one command; `Sandbox.run` unless a test injects something else.
    public typealias Runner = @Sendable (_ command: [String], _ configuration: SandboxConfiguration, _ stdin: [UInt8]?) async -> ExecResult

    /// The bounds this pool was created with.
    public let limits: SandboxPoolLimits
    /// The number of sandboxes allowed to run at once.
    public var maxConcurrent: Int { limits.maxConcurrent }

    private let runner: Runner
    private let state = Mutex(State())

    private struct State {
        var running = 0
        var nextTicket: UInt64 = 0
        /// Callers waiting for a slot, oldest first.
        var waiters: [(ticket: UInt64, continuation: CheckedContinuation<Void, any Error>)] = []
    }

    /// A pool with the given bounds.
    /// - Parameters:
    ///   - limits: how many sandboxes may run at once.
    ///   - runner: runs one command (default `Sandbox.run`); inject a fake to test
    ///     code that uses the pool without booting VMs.
    public init(limits: SandboxPoolLimits, runner: @escaping Runner = { c, cfg, i in await Sandbox.run(c, configuration: cfg, stdin: i) }) {
        self.limits = limits
        self.runner = runner
    }

    /// A pool sized for this host: at most `limit` (nil = no explicit limit), host
    /// CPUs * 2 and what `/proc/meminfo`'s MemAvailable minus `reserveMiB` can hold
    /// of sandboxes with `sandboxMemoryMiB` of guest memory each.
    public convenience init(limit: Int? = nil, sandboxMemoryMiB: UInt64 = SandboxConfiguration().memoryMiB,
                            sandboxCPUs: Int = SandboxConfiguration().cpus,
                            reserveMiB: UInt64 = SandboxPoolLimits.defaultReserveMiB,
                            runner: @escaping Runner = { c, cfg, i in await Sandbox.run(c, configuration: cfg, stdin: i) }) {
        self.init(limits: .host(explicitLimit: limit, sandboxMemoryMiB: sandboxMemoryMiB, sandboxCPUs: sandboxCPUs,
                                reserveMiB: reserveMiB), runner: runner)
    }

    /// Sandboxes running now.
    public var runningCount: Int { state.withLock { $0.running } }
    /// Callers waiting for a slot now.
    public var queuedCount: Int { state.withLock { $0.waiters.count } }

    /// Runs `command` in a fresh sandbox once a slot is free.
    /// - Returns: the run's result; `.infrastructureError(.cancelled)` if the calling
    ///   task was cancelled before the sandbox started.
    public func run(_ command: [String], configuration: SandboxConfiguration = SandboxConfiguration(),
                    stdin: [UInt8]? = nil) async -> ExecResult {
        do {
            return try await withSlot { await runner(command, configuration, stdin) }
        } catch {
            return ExecResult(command: command, outcome: .infrastructureError(.cancelled), stdout: [], stderr: [],
                              timings: PhaseTimings(), consoleTail: "")
        }
    }

    /// Runs `body` while holding one slot (for callers that drive `Sandbox.stream` or
    /// several steps themselves).
    /// - Throws: `CancellationError` if the task is cancelled while queued (the slot is
    ///   then never taken); otherwise whatever `body` throws.
    public func withSlot<T>(isolation: isolated (any Actor)? = #isolation, _ body: () async throws -> T) async throws -> T {
        try await acquire()
        defer { release() }
        return try await body()
    }

    /// A slot held until `release()` (or until the reservation is released from memory):
    /// for a sandbox that lives across many calls (`RunningSandbox`).
    public final class Reservation: Sendable {
        private let pool: SandboxPool
        private let released = Atomic<Bool>(false)
        init(pool: SandboxPool) { self.pool = pool }
        /// Gives the slot back (once).
        public func release() {
            if !released.exchange(true, ordering: .acquiringAndReleasing) { pool.release() }
        }
        deinit { release() }
    }

    /// Takes a slot (waiting in FIFO order) and holds it until the reservation is released.
    /// - Throws: `CancellationError` if the calling task is cancelled while it waits.
    public func reserve() async throws -> Reservation {
        try await acquire()
        return Reservation(pool: self)
    }

    /// Takes a slot, waiting in FIFO order.
    private func acquire() async throws {
        let ticket = state.withLock { s -> UInt64 in
            s.nextTicket += 1
            return s.nextTicket
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (cont: CheckedContinuation<Void, any Error>) in
                // Under the lock, so it orders with `onCancel` below: a cancellation that
                // came first is seen here (the task's flag is set before handlers run);
                // one that comes later finds the waiter in the queue.
                enum Decision { case go, cancelled, wait }
                let decision = state.withLock { s -> Decision in
                    if Task.isCancelled { return .cancelled }
                    if s.running < limits.maxConcurrent && s.waiters.isEmpty {
                        s.running += 1
                        return .go
                    }
                    s.waiters.append((ticket, cont))
                    return .wait
                }
                switch decision {
                case .go: cont.resume()
                case .cancelled: cont.resume(throwing: CancellationError())
                case .wait: break
                }
            }
        } onCancel: {
            let waiter = state.withLock { s -> CheckedContinuation<Void, any Error>? in
                guard let i = s.waiters.firstIndex(where: { $0.ticket == ticket }) else { return nil }
                return s.waiters.remove(at: i).continuation
            }
            waiter?.resume(throwing: CancellationError())
        }
    }

    /// Gives a slot back: to the oldest waiter if there is one (the running count stays),
    /// otherwise to the pool.
    private func release() {
        let next = state.withLock { s -> CheckedContinuation<Void, any Error>? in
            if !s.waiters.isEmpty && s.running <= limits.maxConcurrent {
                return s.waiters.removeFirst().continuation
            }
            s.running -= 1
            return nil
        }
        next?.resume()
    }
}
