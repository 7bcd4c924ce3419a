import Sandbox
import XCTest

// Helpers for XCTest cases. Runs go through `SandboxTesting.sharedPool`; failures are
// reported with `XCTFail` and the same message as the Swift Testing helpers.

extension XCTestCase {
    /// Runs `command` (argv) in a fresh sandbox.
    /// - Parameters:
    ///   - configuration: the sandbox (image, memory, timeout, ...).
    ///   - stdin: bytes for the command's standard input.
    ///   - pool: the pool the run waits in.
    public func runInSandbox(_ command: String..., configuration: SandboxConfiguration = SandboxConfiguration(),
                             stdin: [UInt8]? = nil, pool: SandboxPool = SandboxTesting.sharedPool) async -> ExecResult {
        await pool.run(command, configuration: configuration, stdin: stdin)
    }

    /// Fails the test unless `result` exited with status 0.
    public func XCTAssertSandboxSuccess(_ result: ExecResult, _ message: @autoclosure () -> String = "",
                                       file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertSandboxExit(result, 0, message(), file: file, line: line)
    }

    /// Fails the test unless `result` exited with status `code`.
    public func XCTAssertSandboxExit(_ result: ExecResult, _ code: Int32, _ message: @autoclosure () -> String = "",
                                     file: StaticString = #filePath, line: UInt = #line) {
        guard result.outcome != .exited(code) else { return }
        XCTFail(prefixed(message(), SandboxFailureMessage.make(result, expected: SandboxFailureMessage.expectedExit(code))),
                file: file, line: line)
    }

    /// Fails the test unless `result` ended with `outcome` (e.g. `.timedOut`; crash and
    /// infrastructure outcomes match whatever their text).
    public func XCTAssertSandboxOutcome(_ result: ExecResult, _ outcome: Outcome, _ message: @autoclosure () -> String = "",
                                        file: StaticString = #filePath, line: UInt = #line) {
        guard !sameKind(result.outcome, outcome) else { return }
        XCTFail(prefixed(message(), SandboxFailureMessage.make(result, expected: outcome.description)), file: file, line: line)
    }

    /// Fails the test unless the command's standard output is exactly `stdout`; the
    /// message keeps the sandbox's context (command, outcome, both outputs).
    public func XCTAssertSandboxOutput(_ result: ExecResult, stdout: String, _ message: @autoclosure () -> String = "",
                                       file: StaticString = #filePath, line: UInt = #line) {
        guard result.stdoutText != stdout else { return }
        XCTFail(prefixed(message(), SandboxFailureMessage.outputMismatch(result, stream: "stdout", expected: stdout)), file: file, line: line)
    }

    private func prefixed(_ message: String, _ text: String) -> String {
        message.isEmpty ? text : message + " - " + text
    }
}
