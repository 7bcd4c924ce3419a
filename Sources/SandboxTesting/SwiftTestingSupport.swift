import Sandbox
import Testing

// Helpers for Swift Testing suites. Every `run` boots a fresh VM through the shared
// pool (`SandboxTesting.sharedPool`), so tests may run in parallel without
// overcommitting the host.

/// A handle on "sandboxes configured like this" inside `withSandbox`. Each `run`
/// starts a fresh, throwaway VM: nothing carries over from one run to the next (use
/// `sh -c '...'` to run several steps in one VM).
public struct TestSandbox: Sendable {
    /// The configuration of every run.
    public var configuration: SandboxConfiguration
    /// The pool runs wait in.
    public let pool: SandboxPool

    public init(configuration: SandboxConfiguration = SandboxTesting.currentConfiguration,
                pool: SandboxPool = SandboxTesting.sharedPool) {
        self.configuration = configuration
        self.pool = pool
    }

    /// Runs `command` (argv) in a fresh sandbox.
    public func run(_ command: String..., stdin: [UInt8]? = nil) async -> ExecResult {
        await run(command, stdin: stdin)
    }

    /// Runs `command` (argv) in a fresh sandbox.
    public func run(_ command: [String], stdin: [UInt8]? = nil) async -> ExecResult {
        await pool.run(command, configuration: configuration, stdin: stdin)
    }

    /// Runs `script` with `sh -c` in a fresh sandbox.
    public func sh(_ script: String, stdin: [UInt8]? = nil) async -> ExecResult {
        await run(["sh", "-c", script], stdin: stdin)
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

/// Runs `body` with a `TestSandbox`.
/// - Parameters:
///   - configuration: nil = the `.sandbox(...)` trait's configuration, else the default.
///   - pool: the pool runs wait in.
@discardableResult
public func withSandbox<R>(_ configuration: SandboxConfiguration? = nil, pool: SandboxPool = SandboxTesting.sharedPool,
                           isolation: isolated (any Actor)? = #isolation,
                           _ body: (TestSandbox) async throws -> R) async rethrows -> R {
    try await body(TestSandbox(configuration: configuration ?? SandboxTesting.currentConfiguration, pool: pool))
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
/// `TestSandbox()` and `SandboxTesting.currentConfiguration` use it.
///
///     @Test(.sandbox(image: "debian", memoryMiB: 512)) func builds() async { ... }
///     @Suite(.sandbox(timeout: .seconds(30))) struct Fast { ... }
public struct SandboxTrait: TestTrait, SuiteTrait, TestScoping {
    public var configuration: SandboxConfiguration
    public var isRecursive: Bool { true }

    public init(configuration: SandboxConfiguration) { self.configuration = configuration }

    public func provideScope(for test: Test, testCase: Test.Case?,
                             performing function: @Sendable () async throws -> Void) async throws {
        try await SandboxTesting.$scopedConfiguration.withValue(configuration) { try await function() }
    }
}

extension Trait where Self == SandboxTrait {
    /// A configuration for the tests: `SandboxConfiguration()` with the given changes.
    public static func sandbox(image: String? = nil, memoryMiB: UInt64? = nil, cpus: Int? = nil,
                               timeout: Duration? = nil, environment: [String: String] = [:]) -> SandboxTrait {
        var c = SandboxConfiguration()
        if let image { c.image = image }
        if let memoryMiB { c.memoryMiB = memoryMiB }
        if let cpus { c.cpus = cpus }
        if let timeout { c.timeout = timeout }
        c.environment.merge(environment) { _, new in new }
        return SandboxTrait(configuration: c)
    }

    /// A configuration for the tests.
    public static func sandbox(_ configuration: SandboxConfiguration) -> SandboxTrait {
        SandboxTrait(configuration: configuration)
    }
}
