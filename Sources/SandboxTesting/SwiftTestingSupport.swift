import Sandbox
import Synchronization
import Testing

// Helpers for Swift Testing suites. Sandboxes start through the shared pool
// (`SandboxTesting.sharedPool`), so tests may run in parallel without overcommitting the
// host.

/// A handle on a sandbox in a test. Inside `withSandbox` it is one VM for the whole
/// scope (started on the first call, stopped when the scope ends): what one `run` leaves
/// in the guest, the next one sees. Made with `TestSandbox(configuration:)` directly,
/// every `run` gets a fresh, throwaway VM instead.
public struct TestSandbox: Sendable {
    /// The configuration of its VM (or of every run, without a scope).
    public var configuration: SandboxConfiguration
    /// The pool its VM (or each run) waits in.
    public let pool: SandboxPool
    /// The scope's VM (`withSandbox`); nil: a fresh VM per run.
    let session: TestSession?

    /// A handle whose every `run` starts a fresh VM.
    public init(configuration: SandboxConfiguration = SandboxTesting.currentConfiguration,
                pool: SandboxPool = SandboxTesting.sharedPool) {
        self.configuration = configuration
        self.pool = pool
        self.session = nil
    }

    init(scopeOf configuration: SandboxConfiguration, pool: SandboxPool) {
        self.configuration = configuration
        self.pool = pool
        self.session = TestSession(configuration: configuration, pool: pool)
    }

    /// Runs `command` (argv).
    public func run(_ command: String..., stdin: [UInt8]? = nil) async -> ExecResult {
        await run(command, stdin: stdin)
    }

    /// Runs `command` (argv): in the scope's VM, or in a fresh one.
    public func run(_ command: [String], stdin: [UInt8]? = nil) async -> ExecResult {
        if let session { return await session.exec(command, stdin: stdin) }
        return await pool.run(command, configuration: configuration, stdin: stdin)
    }

    /// Runs `script` with `sh -c`.
    public func sh(_ script: String, stdin: [UInt8]? = nil) async -> ExecResult {
        await run(["sh", "-c", script], stdin: stdin)
    }

    /// The scope's running VM (started now if it has not been), for what `run` does not
    /// cover: files (`writeFile`, `readFile`), per-command options (`exec(_:options:)`).
    /// - Throws: why it could not start; `invalidInput` outside `withSandbox`.
    public func running() async throws(SandboxError) -> RunningSandbox {
        guard let session else { throw .invalidInput("TestSandbox.running() needs the one VM of a withSandbox scope") }
        return try await session.sandbox().get()
    }

    /// Starts `command` (argv) in the background of the scope's VM (see
    /// `RunningSandbox.spawn`): a server the test's next commands talk to, a process fed
    /// through stdin. It is killed when the handle is released, and ends with the scope.
    /// - Throws: why the VM could not start; `invalidInput` outside `withSandbox`.
    public func spawn(_ command: String..., options: RunningSandbox.ExecOptions = .init()) async throws(SandboxError) -> SpawnedProcess {
        try await running().spawn(command, options: options)
    }

    /// Runs `command` and records an issue unless it exits with status 0.
    @discardableResult
    public func expectSuccess(_ command: String..., stdin: [UInt8]? = nil,
                              sourceLocation: SourceLocation = #_sourceLocation) async -> ExecResult {
        let r = await run(command, stdin: stdin)
        recordUnlessExit(r, 0, sourceLocation: sourceLocation)
        return r
    }

    /// Runs `command` and records an issue unless it exits with status `code`.
    @discardableResult
    public func expectExit(_ code: Int32, _ command: String..., stdin: [UInt8]? = nil,
                           sourceLocation: SourceLocation = #_sourceLocation) async -> ExecResult {
        let r = await run(command, stdin: stdin)
        recordUnlessExit(r, code, sourceLocation: sourceLocation)
        return r
    }
}

/// The one VM of a `withSandbox` scope: started on first use, holding a pool slot while
/// it runs.
final class TestSession: Sendable {
    let configuration: SandboxConfiguration
    let pool: SandboxPool
    private typealias Started = Result<(sandbox: RunningSandbox, slot: SandboxPool.Reservation), SandboxError>
    private let starting = Mutex<Task<Started, Never>?>(nil)

    /// The suite's prepared sandbox (`SandboxSetupTrait`), if any.
    let prepared: PreparedSandbox?

    init(configuration: SandboxConfiguration, pool: SandboxPool, prepared: PreparedSandbox? = SandboxTesting.preparedSandbox) {
        self.configuration = configuration
        self.pool = pool
        self.prepared = prepared
    }

    func sandbox() async -> Result<RunningSandbox, SandboxError> {
        let task = starting.withLock { t in
            if let t { return t }
            let (configuration, pool, prepared) = (self.configuration, self.pool, self.prepared)
            let new = Task<Started, Never> {
                let slot: SandboxPool.Reservation
                do { slot = try await pool.reserve() } catch { return .failure(.cancelled) }
                do throws(SandboxError) {
                    // Under a set-up trait: a fork of the prepared sandbox's checkpoint.
                    if let prepared { return .success((try await prepared.fork(), slot)) }
                    return .success((try await Sandbox.start(configuration), slot))
                } catch {
                    slot.release()
                    return .failure(error)
                }
            }
            t = new
            return new
        }
        return await task.value.map { $0.sandbox }
    }

    func exec(_ command: [String], stdin: [UInt8]?) async -> ExecResult {
        switch await sandbox() {
        case .success(let s): return await s.exec(command, stdin: stdin)
        case .failure(let e):
            return ExecResult(command: command, outcome: .infrastructureError(e))
        }
    }

    /// Stops the VM if it was started, and gives its slot back.
    func stop() async {
        guard let task = starting.withLock({ $0 }) else { return }
        if case .success(let started) = await task.value {
            await started.sandbox.stop()
            started.slot.release()
        }
    }
}

/// Runs `body` with a `TestSandbox` that is one VM for the whole scope: started on its
/// first use, stopped when `body` returns or throws.
/// - Parameters:
///   - configuration: nil = the `.sandbox(...)` trait's configuration, else the default.
///   - pool: the pool the VM waits in.
@discardableResult
public func withSandbox<R>(_ configuration: SandboxConfiguration? = nil, pool: SandboxPool = SandboxTesting.sharedPool,
                           isolation: isolated (any Actor)? = #isolation,
                           _ body: (TestSandbox) async throws -> R) async rethrows -> R {
    let sandbox = TestSandbox(scopeOf: configuration ?? SandboxTesting.currentConfiguration, pool: pool)
    do {
        let r = try await body(sandbox)
        await sandbox.session?.stop()
        return r
    } catch {
        await sandbox.session?.stop()
        throw error
    }
}

/// Records an issue unless `result` exited with status `code`. The issue's comment
/// names the command, the outcome, the stderr tail and (after a guest crash) the console tail.
/// - Returns: whether the expectation held.
@discardableResult
public func expectExit(_ result: ExecResult, _ code: Int32, sourceLocation: SourceLocation = #_sourceLocation) -> Bool {
    recordUnlessExit(result, code, sourceLocation: sourceLocation)
}

/// Records an issue unless `result` exited with status 0.
@discardableResult
public func expectSuccess(_ result: ExecResult, sourceLocation: SourceLocation = #_sourceLocation) -> Bool {
    recordUnlessExit(result, 0, sourceLocation: sourceLocation)
}

/// Records an issue unless the command's standard output is exactly `stdout`; the issue
/// keeps the sandbox's context (command, outcome, both outputs, the console after a crash).
@discardableResult
public func expectOutput(_ result: ExecResult, stdout: String, sourceLocation: SourceLocation = #_sourceLocation) -> Bool {
    if result.stdoutText == stdout { return true }
    Issue.record(Comment(rawValue: SandboxFailureMessage.outputMismatch(result, stream: "stdout", expected: stdout)), sourceLocation: sourceLocation)
    return false
}

/// Records an issue unless the command's standard error is exactly `stderr`.
@discardableResult
public func expectOutput(_ result: ExecResult, stderr: String, sourceLocation: SourceLocation = #_sourceLocation) -> Bool {
    if result.stderrText == stderr { return true }
    Issue.record(Comment(rawValue: SandboxFailureMessage.outputMismatch(result, stream: "stderr", expected: stderr)), sourceLocation: sourceLocation)
    return false
}

/// Records an issue unless `result` ended with `outcome` (e.g. `.timedOut`).
@discardableResult
public func expectOutcome(_ result: ExecResult, _ outcome: Outcome, sourceLocation: SourceLocation = #_sourceLocation) -> Bool {
    if sameKind(result.outcome, outcome) { return true }
    Issue.record(Comment(rawValue: SandboxFailureMessage.make(result, expected: outcome.description)), sourceLocation: sourceLocation)
    return false
}

// The free function and `TestSandbox.expectExit(_:_:...)` share this body (inside the
// method, `expectExit` names the method itself).
@discardableResult
func recordUnlessExit(_ result: ExecResult, _ code: Int32, sourceLocation: SourceLocation) -> Bool {
    if result.outcome == .exited(code) { return true }
    Issue.record(Comment(rawValue: SandboxFailureMessage.make(result, expected: SandboxFailureMessage.expectedExit(code))),
                 sourceLocation: sourceLocation)
    return false
}

/// Outcomes compare by kind where the payload is incidental (a crash's console text,
/// an infrastructure error's reason); exit statuses and signals compare exactly.
func sameKind(_ a: Outcome, _ b: Outcome) -> Bool {
    switch (a, b) {
    case (.guestCrashed, .guestCrashed), (.infrastructureError, .infrastructureError): return true
    default: return a == b
    }
}

// MARK: Trait

/// Gives the tests it is applied to a sandbox configuration: `withSandbox`,
/// `TestSandbox()` and `SandboxTesting.currentConfiguration` use it. The field-wise form
/// changes only the fields it names, on top of what an enclosing trait set, so a test's
/// `.sandbox(timeout:)` keeps its suite's image and memory:
///
///     @Suite(.sandbox(image: "debian", memoryMiB: 512)) struct Builds {
///         @Test(.sandbox(timeout: .seconds(30))) func quick() async { ... }  // debian, 512 MiB, 30 s
///     }
///
/// `.sandbox(someConfiguration)` replaces the whole configuration.
public struct SandboxTrait: TestTrait, SuiteTrait, TestScoping {
    /// The configuration this trait gives when no enclosing trait set one.
    public var configuration: SandboxConfiguration
    public var isRecursive: Bool { true }
    private let change: @Sendable (inout SandboxConfiguration) -> Void

    /// A trait that replaces the whole configuration with `configuration`.
    public init(configuration: SandboxConfiguration) {
        self.configuration = configuration
        self.change = { $0 = configuration }
    }

    /// A trait that applies `change` to the enclosing configuration.
    public init(changing change: @escaping @Sendable (inout SandboxConfiguration) -> Void) {
        var c = SandboxConfiguration()
        change(&c)
        self.configuration = c
        self.change = change
    }

    /// The configuration inside this trait's scope, given the enclosing one.
    public func applied(to enclosing: SandboxConfiguration) -> SandboxConfiguration {
        var c = enclosing
        change(&c)
        return c
    }

    public func provideScope(for test: Test, testCase: Test.Case?,
                             performing function: @Sendable () async throws -> Void) async throws {
        try await SandboxTesting.$scopedConfiguration.withValue(applied(to: SandboxTesting.currentConfiguration)) { try await function() }
    }
}

extension Trait where Self == SandboxTrait {
    /// Changes the given fields of the enclosing configuration (the suite's, else
    /// `SandboxConfiguration()`); `environment` is merged into it, `copyIn` appended.
    public static func sandbox(image: String? = nil, memoryMiB: UInt64? = nil, cpus: Int? = nil,
                               timeout: Duration? = nil, environment: [String: String] = [:],
                               copyIn: [FileCopy] = []) -> SandboxTrait {
        SandboxTrait { c in
            if let image { c.image = image }
            if let memoryMiB { c.memoryMiB = memoryMiB }
            if let cpus { c.cpus = cpus }
            if let timeout { c.timeout = timeout }
            c.environment.merge(environment) { _, new in new }
            c.copyIn += copyIn
        }
    }

    /// Replaces the whole configuration for the tests.
    public static func sandbox(_ configuration: SandboxConfiguration) -> SandboxTrait {
        SandboxTrait(configuration: configuration)
    }
}

// MARK: Set-up once, a fresh copy per test

/// A suite's set-up, done once: the sandbox it ran in, checkpointed. Each test's
/// `withSandbox` gets its own fork of it.
final class PreparedSandbox: Sendable {
    let result: Result<RunningSandbox, SandboxError>
    init(_ result: Result<RunningSandbox, SandboxError>) { self.result = result }

    func fork() async throws(SandboxError) -> RunningSandbox {
        let parent = try result.get()
        guard let one = try await parent.fork(count: 1).first else { throw SandboxError(.internal, "fork(count: 1) gave no sandbox") }
        return one
    }
}

/// Runs a set-up script once for a suite, in one sandbox of the suite's configuration,
/// checkpoints it, and gives every test's `withSandbox` its own fork of that checkpoint:
/// each test starts from the prepared state in tens of milliseconds, and nothing a test
/// does reaches another.
///
///     @Suite(.sandbox(image: "debian"), .sandboxSetup("pip install ... && mkdir /work"))
///     struct Tools {
///         @Test func a() async { await withSandbox { s in ... } }   // a fork of the set-up
///     }
///
/// A set-up that fails (or a sandbox that cannot start) makes every test's runs return
/// `.infrastructureError` saying so.
public struct SandboxSetupTrait: SuiteTrait, TestScoping {
    public let script: String
    public var isRecursive: Bool { false }

    public init(script: String) { self.script = script }

    public func provideScope(for test: Test, testCase: Test.Case?,
                             performing function: @Sendable () async throws -> Void) async throws {
        let prepared = PreparedSandbox(await Self.prepare(script, configuration: SandboxTesting.currentConfiguration))
        defer { if case .success(let s) = prepared.result { Task { await s.stop() } } }
        try await SandboxTesting.$preparedSandbox.withValue(prepared) { try await function() }
    }

    static func prepare(_ script: String, configuration: SandboxConfiguration) async -> Result<RunningSandbox, SandboxError> {
        let sandbox: RunningSandbox
        do { sandbox = try await Sandbox.start(configuration) } catch { return .failure(error) }
        let r = await sandbox.sh(script)
        guard r.outcome == .exited(0) else {
            await sandbox.stop()
            let tail = SandboxFailureMessage.tail(r.stderrText, lines: 5).lines.joined(separator: " | ")
            return .failure(SandboxError(.invalidInput, "the suite's set-up `\(script)` \(r.outcome)" + (tail.isEmpty ? "" : "; stderr ends: \(tail)")))
        }
        do { try await sandbox.checkpoint() } catch {
            await sandbox.stop()
            return .failure(error)
        }
        return .success(sandbox)
    }
}

extension Trait where Self == SandboxSetupTrait {
    /// Runs `script` (sh -c) once for the suite and gives each test a fork of the result.
    public static func sandboxSetup(_ script: String) -> SandboxSetupTrait { SandboxSetupTrait(script: script) }
}
