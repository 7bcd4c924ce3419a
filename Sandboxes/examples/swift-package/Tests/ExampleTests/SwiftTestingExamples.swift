import SandboxTesting
import Testing

/// Swift Testing: each `run` boots a fresh VM (about half a second); tests run in
/// parallel and the shared pool keeps the host from being overcommitted.
@Suite(.sandbox(image: "busybox", timeout: .seconds(60)))
struct SwiftTestingExamples {
    @Test func unameReportsLinux() async {
        await withSandbox { sandbox in
            let r = await sandbox.run("uname", "-a")
            expectSuccess(r)
            #expect(r.stdoutText.hasPrefix("Linux "))
        }
    }

    @Test func filesWrittenInTheSandboxCanBeReadBack() async {
        await withSandbox { sandbox in
            let r = await sandbox.sh("echo hello > /tmp/f && cat /tmp/f")
            expectSuccess(r)
            #expect(r.stdoutText == "hello\n")
        }
    }

    @Test func expectedFailureExitStatus() async {
        await withSandbox { sandbox in
            // `false` must fail: expect its status, not success.
            await sandbox.expectExit(1, "false")
            let r = await sandbox.sh("echo 'no such thing' >&2; exit 42")
            expectExit(r, 42)
            #expect(r.stderrText.contains("no such thing"))
        }
    }

    @Test(.sandbox(timeout: .seconds(1)))
    func runawayCommandTimesOut() async {
        await withSandbox { sandbox in
            let r = await sandbox.run("sleep", "30")
            expectOutcome(r, .timedOut)
        }
    }

    /// What a failure looks like: the issue names the command, its status and the
    /// last lines of its stderr. (Marked as a known issue so the suite stays green.)
    @Test func whatAFailureReports() async {
        await withKnownIssue("demonstrates the failure message") {
            await withSandbox { sandbox in
                _ = await sandbox.expectSuccess("sh", "-c", "echo 'assertion failed: x == 2' >&2; exit 1")
            }
        }
    }
}
