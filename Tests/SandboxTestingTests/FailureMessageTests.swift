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

    @Test func consoleLinesEndingInCRLFAreLines() {
        // The guest console ends lines with "\r\n", one Character in Swift.
        let console = (1...30).map { "[ 0.\($0)] boot line" }.joined(separator: "\r\n") + "\r\nKernel panic - not syncing: VFS\r\n"
        #expect(SandboxFailureMessage.tail(console, lines: 5).total == 31)
        let m = SandboxFailureMessage.make(result(.guestCrashed(consoleTail: console)), expected: "exit status 0")
        #expect(m.contains("console (last 20 of 31 lines):"), "\(m)")
        #expect(m.hasSuffix("    | [ 0.30] boot line\n    | Kernel panic - not syncing: VFS"), "\(m)")
    }

    @Test func outputMismatchKeepsTheSandboxContext() {
        let m = SandboxFailureMessage.outputMismatch(result(.exited(0), stderr: "warning: x\n", stdout: "hello\nworld\n"),
                                                     stream: "stdout", expected: "hello\n")
        #expect(m == """
            sandbox: `sh -c 'echo oops >&2; exit 3'` exited with status 0; its stdout is not what was expected
              duration: 512 ms
              expected stdout:
                | hello
              actual stdout:
                | hello
                | world
              stderr:
                | warning: x
            """)
    }
}

@Suite struct TraitTests {
    @Test func fieldTraitsChangeOnlyTheirFields() {
        let suite = SandboxTrait.sandbox(image: "debian", memoryMiB: 512, environment: ["A": "1"])
        let test = SandboxTrait.sandbox(timeout: .seconds(30), environment: ["B": "2"],
                                        copyIn: [FileCopy(hostPath: "/tmp/x", guestPath: "/data/x")])
        let c = test.applied(to: suite.applied(to: SandboxConfiguration()))
        #expect(c.image == "debian" && c.memoryMiB == 512 && c.timeout == .seconds(30))
        #expect(c.environment == ["A": "1", "B": "2"])
        #expect(c.copyIn == [FileCopy(hostPath: "/tmp/x", guestPath: "/data/x")])
        // Alone, a field trait starts from the defaults.
        #expect(test.configuration.image == SandboxConfiguration().image && test.configuration.timeout == .seconds(30))
    }

    @Test func aWholeConfigurationReplaces() {
        var whole = SandboxConfiguration()
        whole.cpus = 2
        let c = SandboxTrait.sandbox(whole).applied(to: SandboxTrait.sandbox(image: "debian").applied(to: SandboxConfiguration()))
        #expect(c.image == SandboxConfiguration().image && c.cpus == 2)
    }
}

@Suite(.sandbox(image: "suite-image", memoryMiB: 384))
struct TraitScopeTests {
    @Test(.sandbox(timeout: .seconds(7)))
    func aTestTraitKeepsTheSuiteFields() {
        let c = SandboxTesting.currentConfiguration
        #expect(c.image == "suite-image" && c.memoryMiB == 384 && c.timeout == .seconds(7))
    }
}
