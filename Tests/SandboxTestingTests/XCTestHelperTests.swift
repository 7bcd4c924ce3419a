import Foundation
import SandboxTesting
import XCTest

/// The XCTest helpers against real VMs (skipped without /dev/kvm).
final class XCTestHelperTests: XCTestCase {
    override func setUp() async throws {
        try XCTSkipUnless(FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm")
    }

    func testRunInSandboxAndAssertSuccess() async {
        let r = await runInSandbox("sh", "-c", "echo hi")
        XCTAssertSandboxSuccess(r)
        XCTAssertEqual(r.stdoutText, "hi\n")
    }

    func testAssertExitAndOutcome() async {
        let r = await runInSandbox("sh", "-c", "exit 5")
        XCTAssertSandboxExit(r, 5)
        XCTAssertSandboxOutcome(r, .exited(5))
    }
}
