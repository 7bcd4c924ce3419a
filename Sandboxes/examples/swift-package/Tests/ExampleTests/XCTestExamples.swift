import SandboxTesting
import XCTest

/// XCTest: the same through `runInSandbox` and the `XCTAssertSandbox...` assertions.
final class XCTestExamples: XCTestCase {
    func testUname() async {
        let r = await runInSandbox("uname", "-a")
        XCTAssertSandboxSuccess(r)
        XCTAssertTrue(r.stdoutText.hasPrefix("Linux "), r.stdoutText)
    }

    func testWriteAndReadAFile() async {
        let r = await runInSandbox("sh", "-c", "echo hello > /tmp/f && cat /tmp/f")
        XCTAssertSandboxSuccess(r)
        XCTAssertEqual(r.stdoutText, "hello\n")
    }

    func testExpectedFailureExitStatus() async {
        let r = await runInSandbox("sh", "-c", "exit 3")
        XCTAssertSandboxExit(r, 3)
    }

    func testTimeout() async {
        var config = SandboxConfiguration()
        config.timeout = .seconds(1)
        let r = await runInSandbox("sleep", "30", configuration: config)
        XCTAssertSandboxOutcome(r, .timedOut)
    }
}
