import Sandbox
import Foundation
import Synchronization
import SystemShims

/// How a batch job ended, relative to its expectation.
public enum BatchVerdict: String, Sendable, Equatable {
    /// The outcome met the expectation.
    case passed
    /// The command ran to an exit or signal, but not the expected one.
    case failed
    /// Timed out unexpectedly, crashed, ran out of memory, or the sandbox could not run it.
    case error
    /// The batch was stopped while the job ran.
    case interrupted

    static func of(_ outcome: Outcome, expectation: BatchExpectation, cancelled: Bool) -> BatchVerdict {
        if cancelled { return .interrupted }
        if expectation.isMet(by: outcome) { return .passed }
        switch outcome {
        case .exited, .signalled: return .failed
        case .timedOut, .outOfMemory, .guestCrashed, .infrastructureError: return .error
        }
    }
}

/// The result of one job (its last attempt).
public struct BatchResult: Sendable {
    public var name: String
    /// Position in the job file (`BatchJob.position`).
    public var index: Int
    public var outcome: Outcome
    public var expectation: BatchExpectation
    public var verdict: BatchVerdict
    public var attempts: Int
    /// Wall-clock seconds over all attempts.
    public var duration: Double
    /// The last bytes of each stream (at most `BatchRunner.Options.tailBytes`).
    public var stdoutTail: [UInt8]
    public var stderrTail: [UInt8]
    /// Bytes received per stream (at most the output limit).
    public var stdoutBytes: UInt64
    public var stderrBytes: UInt64
    /// True if a stream reached the output limit (the rest was dropped in the guest).
    public var outputTruncated: Bool
    public var timings: PhaseTimings
    public var consoleTail: String

    public var passed: Bool { verdict == .passed }
    public var exitStatus: Int32 { outcome.exitStatus }
    public var stdoutTailText: String { String(decoding: stdoutTail, as: UTF8.self) }
    public var stderrTailText: String { String(decoding: stderrTail, as: UTF8.self) }
}

/// What the runner reports while it works (from its worker threads).
public enum BatchEvent: Sendable {
    case started(name: String, attempt: Int)
    case finished(BatchResult)
}

/// The last `capacity` bytes of a stream, plus how many bytes went by.
struct OutputTail {
    let capacity: Int
    private(set) var bytes: [UInt8] = []
    private(set) var total: UInt64 = 0

    init(capacity: Int) { self.capacity = capacity }

    mutating func append(_ chunk: [UInt8]) {
        total += UInt64(chunk.count)
        guard capacity > 0 else { return }
        if chunk.count >= capacity {
            bytes = Array(chunk.suffix(capacity))
            return
        }
        bytes += chunk
        if bytes.count > capacity { bytes.removeFirst(bytes.count - capacity) }
    }
}

/// Runs batch jobs on a fixed number of worker threads. Each attempt is one
/// `SandboxRunner.run` (its own VM and VMM process) with its own `CancelToken`, so a
/// crash, timeout or bad image in one job is just that job's result.
///
/// `run` blocks; `stop()` may be called from any thread: no new job or attempt starts,
/// and running VMs are cancelled (their results are `.interrupted`).
public final class BatchRunner: Sendable {
    public struct Options: Sendable {
        /// Worker threads (VMs running at once).
        public var parallel: Int = 1
        /// Bytes of each stream kept per result.
        public var tailBytes: Int = 4096
        /// Bytes of each stream the guest sends at most (`SandboxConfiguration.outputLimit`);
        /// bounds the memory a running job can use for output.
        public var outputLimit: UInt64 = 1 << 20
        /// Overrides every job's kernel when set.
        public var kernel: String?
        /// Every job boots instead of restoring its start snapshot.
        public var cold = false
        /// Jail every job's VMM (false only for debugging: `--no-jail`).
        public var jail = true
        /// VMs of each start kept restored and waiting while the batch runs
        /// (`SandboxRunner.keepWarm`); 0 = none, each job restores its own.
        public var warm = 0
        public init() {}
    }

    public let jobs: [BatchJob]
    public let options: Options

    private struct State {
        var next = 0
        var stopping = false
        var running: [Int: CancelToken] = [:]
        var results: [BatchResult?]
        var workersLeft = 0
    }
    private let state: Mutex<State>

    public init(jobs: [BatchJob], options: Options) {
        self.jobs = jobs
        self.options = options
        state = Mutex(State(results: Array(repeating: nil, count: jobs.count)))
    }

    /// True once `stop()` was called.
    public var isStopping: Bool { state.withLock { $0.stopping } }

    /// Stops the batch: nothing new starts; running VMs are cancelled.
    public func stop() {
        let tokens: [CancelToken] = state.withLock { s in
            s.stopping = true
            return Array(s.running.values)
        }
        for t in tokens { t.cancel() }
    }

    /// Gets every distinct start of the jobs ready (kernel, image, start snapshot) before
    /// they run, so that parallel jobs do not all wait on the first one's set-up. A start
    /// that cannot be prepared is reported through `progress`; its jobs then try
    /// themselves (and boot if no snapshot can be made).
    public func prepare(progress: (String) -> Void) {
        var seen: Set<String> = []
        for job in jobs {
            var c = job.configuration
            if let k = options.kernel { c.kernel = k }
            if options.cold { c.cold = true }
            if !options.jail { c.jail = false }
            let key = "\(c.image)|\(c.kernel ?? "")|\(c.memoryMiB)|\(c.cpus)|\(c.diskSizeMiB.map(String.init) ?? "")|\(c.snapshot ?? "")|\(c.template ?? "")|\(c.cold)"
            guard seen.insert(key).inserted, !isStopping else { continue }
            do {
                _ = try SandboxRunner.prepare(c, progress: progress)
                if options.warm > 0 { try SandboxRunner.keepWarm(c, count: options.warm) }
            } catch {
                progress("sandbox batch: could not prepare the start of job \(job.name): \(error)")
            }
        }
    }

    /// Runs the jobs; returns the results of the jobs that ran (in job-file order).
    /// - Parameters:
    ///   - tickInterval: how often to call `onTick` on the calling thread while jobs run.
    ///   - onTick: progress hook on the calling thread.
    ///   - onEvent: called from worker threads as attempts start and jobs finish.
    /// - Throws: `SystemError` if no worker thread could be started.
    public func run(tickInterval: Double = 0.25, onTick: () -> Void = {},
                    onEvent: @escaping @Sendable (BatchEvent) -> Void = { _ in }) throws -> [BatchResult] {
        let count = max(1, min(options.parallel, jobs.count))
        var threads: [NativeThread] = []
        // Each worker that ends signals `finished`; the calling thread ticks until all did.
        let finished = try EventFD()
        state.withLock { $0.workersLeft = count }
        for i in 0..<count {
            do {
                threads.append(try NativeThread(name: "batch-\(i)") { [self] in
                    work(onEvent: onEvent)
                    state.withLock { $0.workersLeft -= 1 }
                    finished.signal()
                })
            } catch {
                state.withLock { $0.workersLeft -= count - i }
                if threads.isEmpty { throw error }
                break
            }
        }
        let tickMillis = Int32(max(1, min(tickInterval * 1000, 60_000)))
        while state.withLock({ $0.workersLeft }) > 0 {
            onTick()
            if waitReadable(finished.fd.rawValue, timeoutMillis: tickMillis) { _ = finished.wait() }
        }
        for t in threads { t.join() }
        onTick()
        return state.withLock { $0.results.compactMap { $0 } }
    }

    /// The next job index to run, or nil when done or stopping.
    private func take() -> Int? {
        state.withLock { s in
            guard !s.stopping, s.next < jobs.count else { return nil }
            defer { s.next += 1 }
            return s.next
        }
    }

    private func work(onEvent: @Sendable (BatchEvent) -> Void) {
        while let index = take() {
            let result = runJob(index, onEvent: onEvent)
            state.withLock { $0.results[index] = result }
            onEvent(.finished(result))
        }
    }

    private func runJob(_ index: Int, onEvent: @Sendable (BatchEvent) -> Void) -> BatchResult {
        let job = jobs[index]
        var config = job.configuration
        config.outputLimit = options.outputLimit
        if let k = options.kernel { config.kernel = k }
        if options.cold { config.cold = true }
        if !options.jail { config.jail = false }
        let start = monotonicNanos()
        var attempt = 0
        while true {
            attempt += 1
            let token = CancelToken()
            let admitted: Bool = state.withLock { s in
                if s.stopping { return false }
                s.running[index] = token
                return true
            }
            if !admitted { token.cancel() }
            onEvent(.started(name: job.name, attempt: attempt))
            var out = OutputTail(capacity: options.tailBytes)
            var err = OutputTail(capacity: options.tailBytes)
            var outcome = Outcome.infrastructureError(.cancelled)
            var timings = PhaseTimings()
            var consoleTail = ""
            if admitted {
                let r = SandboxRunner.run(job.command, configuration: config, cancel: token) { event in
                    switch event {
                    case .stdout(let b): out.append(b)
                    case .stderr(let b): err.append(b)
                    }
                }
                (outcome, timings, consoleTail) = (r.outcome, r.timings, r.consoleTail)
            }
            state.withLock { _ = $0.running.removeValue(forKey: index) }
            // A VM that ended on its own while the batch stopped (a terminal's Ctrl-C reaches the
            // VMM processes too) counts as interrupted unless it met its expectation.
            let cancelled = token.isCancelled || (isStopping && !job.expectation.isMet(by: outcome))
            let verdict = BatchVerdict.of(outcome, expectation: job.expectation, cancelled: cancelled)
            let limit = options.outputLimit
            let result = BatchResult(name: job.name, index: job.position ?? index, outcome: outcome, expectation: job.expectation,
                                     verdict: verdict, attempts: attempt, duration: Double(monotonicNanos() - start) / 1e9,
                                     stdoutTail: out.bytes, stderrTail: err.bytes, stdoutBytes: out.total, stderrBytes: err.total,
                                     outputTruncated: limit > 0 && (out.total >= limit || err.total >= limit),
                                     timings: timings, consoleTail: verdict == .error ? String(consoleTail.suffix(2048)) : "")
            if verdict == .passed || verdict == .interrupted || attempt > job.retries || isStopping { return result }
        }
    }
}
