import SandboxTesting
import Testing

/// These boot real VMs (≈0.5 s each on a warm cache).
@Suite(.enabled(if: kvmAvailable, "needs /dev/kvm"))
struct RealVMTests {
    @Test func echoThroughWithSandbox() async {
        await withSandbox { sandbox in
            let r = await sandbox.run("echo", "hi")
            expectSuccess(r)
            #expect(r.stdoutText == "hi\n")
        }
    }

    @Test func failingCommandRecordsADescriptiveIssue() async {
        await withKnownIssue {
            await withSandbox { sandbox in
                _ = await sandbox.expectSuccess("sh", "-c", "echo first >&2; echo oops >&2; exit 3")
            }
        } matching: { issue in
            let text = issue.comments.map(\.rawValue).joined(separator: "\n")
            return text.contains("`sh -c 'echo first >&2; echo oops >&2; exit 3'`")
                && text.contains("exited with status 3; expected exit status 0")
                && text.contains("    | first\n    | oops")
        }
    }

    @Test func expectExitAcceptsTheExpectedStatus() async {
        await withSandbox { sandbox in
            await sandbox.expectExit(7, "sh", "-c", "exit 7")
        }
    }

    @Test(.sandbox(timeout: .seconds(1)))
    func traitConfiguresTheSandbox() async {
        #expect(SandboxTesting.currentConfiguration.timeout == .seconds(1))
        await withSandbox { sandbox in
            let r = await sandbox.run("sleep", "10")
            expectOutcome(r, .timedOut)
        }
    }

    @Test func poolRunsFourSandboxesTwoAtATime() async {
        let tracker = ConcurrencyTracker()
        let pool = SandboxPool(limits: fixedLimits(2)) { command, configuration, stdin in
            await tracker.enter(command.joined(separator: " "))
            let r = await Sandbox.run(command, configuration: configuration, stdin: stdin)
            await tracker.leave()
            return r
        }
        let results = await withTaskGroup(of: ExecResult.self) { group in
            for i in 0..<4 { group.addTask { await pool.run(["sh", "-c", "sleep 0.3; echo \(i)"]) } }
            return await group.reduce(into: []) { $0.append($1) }
        }
        for r in results { expectSuccess(r) }
        #expect(Set(results.map(\.stdoutText)) == ["0\n", "1\n", "2\n", "3\n"])
        #expect(await tracker.maximum == 2)
    }
}
