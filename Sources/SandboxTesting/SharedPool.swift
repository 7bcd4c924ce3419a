import Foundation
import Sandbox

/// Process-wide state shared by the Swift Testing and XCTest helpers.
public enum SandboxTesting {
    /// The pool every helper uses unless given another: sized for this host
    /// (`SandboxPoolLimits.host()`), capped by `$SANDBOX_TEST_CONCURRENCY` if set
    /// (e.g. `SANDBOX_TEST_CONCURRENCY=1` to run a suite's sandboxes one at a time).
    public static let sharedPool: SandboxPool = {
        let env = ProcessInfo.processInfo.environment["SANDBOX_TEST_CONCURRENCY"]
        return SandboxPool(limit: env.flatMap { Int($0) }.flatMap { $0 > 0 ? $0 : nil })
    }()

    /// The configuration the helpers use when none is passed: the one a `.sandbox(...)`
    /// trait set for the running test, else `SandboxConfiguration()`.
    public static var currentConfiguration: SandboxConfiguration {
        scopedConfiguration ?? SandboxConfiguration()
    }

    /// Set by `SandboxTrait` for the duration of a test (or suite).
    @TaskLocal public static var scopedConfiguration: SandboxConfiguration?

    /// Set by `SandboxSetupTrait` for the duration of a suite: the sandbox its set-up ran
    /// in, checkpointed; `withSandbox` forks each test's sandbox from it.
    @TaskLocal static var preparedSandbox: PreparedSandbox?
}
