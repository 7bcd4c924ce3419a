import SandboxTesting
import Testing

@Suite struct FailureMessageTests {
    func result(_ outcome: Outcome, stderr: String = "", stdout: String = "", console: String = "",
                command: [String] = ["sh", "-c", "echo oops >&2; exit 3"]) -> ExecResult {
        var r = ExecResult(command: command, outcome: outcome, stdout: Array(stdout.utf8), stderr: Array(stderr.utf8),
                           consoleTail: console)
        r.timings.total = 512.4
        return r
    }

    @Test func namesCommandOutcomeAndExpectation() {
        let m = SandboxFailureMessage.make(result(.exited(3), stderr: "oops\n"), expected: "exit status 0")
        #expect(m == """
            sandbox: `sh -c 'echo oops >&2; exit 3'` exited with status 3; expected exit status 0
              duration: 512 ms
              stderr:
                | oops
            """)
    }

    @Test func keepsTheLastTwentyStderrLines() {
        let stderr = (1...45).map { "err \($0)" }.joined(separator: "\n") + "\n"
        let m = SandboxFailureMessage.make(result(.exited(1), stderr: stderr), expected: "exit status 0")
        #expect(m.contains("stderr (last 20 of 45 lines):"))
        let shown = m.split(separator: "\n").filter { $0.hasPrefix("    | ") }
        #expect(shown.count == 20)
        #expect(shown.first == "    | err 26")
        #expect(shown.last == "    | err 45")
    }

    @Test func showsStdoutWhenStderrIsEmpty() {
        let m = SandboxFailureMessage.make(result(.exited(1), stdout: "FAIL: test_x\n"), expected: "exit status 0")
        #expect(m.contains("stderr: (empty)"))
        #expect(m.contains("stdout:\n    | FAIL: test_x"))
    }

    @Test func guestCrashShowsTheConsoleTail() {
        let console = (1...30).map { "[ 0.\($0)] boot line" }.joined(separator: "\n") + "\nKernel panic - not syncing: VFS\n"
        let m = SandboxFailureMessage.make(result(.guestCrashed(consoleTail: console)), expected: "exit status 0")
        #expect(m.contains("guest crashed: Kernel panic - not syncing: VFS; expected exit status 0"))
        #expect(m.contains("console (last 20 of 31 lines):"))
        #expect(m.hasSuffix("    | Kernel panic - not syncing: VFS"))
    }

    @Test func timeoutHasNoConsoleSection() {
        let m = SandboxFailureMessage.make(result(.timedOut, console: "noise"), expected: "exit status 0")
        #expect(m.contains("timed out; expected exit status 0"))
        #expect(!m.contains("console"))
    }

    @Test(arguments: [
        (["echo", "hi"], "echo hi"),
        (["sh", "-c", "a b"], "sh -c 'a b'"),
        (["printf", "it's"], "printf 'it'\\''s'"),
        (["x", ""], "x ''"),
        (["ls", "/tmp/a.b=c"], "ls /tmp/a.b=c"),
    ])
    func displayCommandQuotesLikeAShell(command: [String], shown: String) {
        #expect(SandboxFailureMessage.displayCommand(command) == shown)
    }

    @Test func tailIgnoresTheTrailingNewline() {
        #expect(SandboxFailureMessage.tail("a\nb\n", lines: 5).total == 2)
        #expect(SandboxFailureMessage.tail("", lines: 5).total == 0)
        #expect(SandboxFailureMessage.tail("a\nb\nc", lines: 2).lines == ["b", "c"])
    }
}
