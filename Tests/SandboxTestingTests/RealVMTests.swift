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

    @Test func withSandboxIsOneVMForItsScope() async throws {
        try await withSandbox { sandbox in
            expectSuccess(await sandbox.sh("echo kept > /root/f"))
            expectOutput(await sandbox.run("cat", "/root/f"), stdout: "kept\n")
            let vm = try await sandbox.running()
            try await vm.writeFile("/data/deep/in.txt", contents: Array("in\n".utf8))
            expectOutput(await sandbox.run("cat", "/data/deep/in.txt"), stdout: "in\n")
        }
        // A new scope is a new VM.
        await withSandbox { sandbox in
            expectExit(await sandbox.sh("test -e /root/f"), 1)
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

/// Runs through the async API must not leave a thread behind each: a joinable thread
/// that nobody joins keeps its stack mapped, so thousands of runs in one test process
/// would grow its mappings without bound. (Serialized: it counts this process's maps.)
@Suite(.enabled(if: kvmAvailable, "needs /dev/kvm"), .serialized)
struct RunLeakTests {
    static func mappingCount() -> Int {
        ((try? String(contentsOfFile: "/proc/self/maps", encoding: .utf8)) ?? "").split(separator: "\n").count
    }

    @Test func twentyRunsDoNotGrowTheMappings() async {
        _ = await Sandbox.run(["true"])  // warm up: caches, first thread stacks
        let before = Self.mappingCount()
        for _ in 0..<20 {
            let r = await Sandbox.run(["true"])
            #expect(r.outcome == .exited(0), "\(r.outcome)")
        }
        for await event in Sandbox.stream(["true"]) { if case .finished(let r) = event { #expect(r.outcome == .exited(0)) } }
        let after = Self.mappingCount()
        // A leaked thread costs at least its stack and guard page (2 mappings): 21 runs
        // would add 42 or more. Allow some noise from the allocator, the runtime and the
        // threads of other suites running at the same time (their sandboxes' requests).
        print("RunLeakTests: mappings \(before) -> \(after) over 21 runs")
        #expect(after - before < 20, "mappings grew from \(before) to \(after) over 21 runs")
    }
}

/// `.sandboxSetup`: the set-up runs once; every test gets its own fork of it.
@Suite(.enabled(if: kvmAvailable, "needs /dev/kvm"), .sandbox(timeout: .seconds(60)),
       .sandboxSetup("echo prepared > /root/ready && mkdir -p /work"))
struct SetupTraitTests {
    @Test(arguments: 0 ..< 3)
    func eachTestStartsFromTheSetUpAlone(i: Int) async {
        await withSandbox { sandbox in
            // The set-up's file, and nothing another test wrote.
            expectOutput(await sandbox.sh("cat /root/ready; ls /work"), stdout: "prepared\n")
            expectSuccess(await sandbox.sh("touch /work/test-\(i)"))
            expectOutput(await sandbox.sh("ls /work"), stdout: "test-\(i)\n")
        }
    }
}

@Suite(.enabled(if: kvmAvailable, "needs /dev/kvm"), .sandbox(timeout: .seconds(60)),
       .sandboxSetup("echo 'cannot prepare' >&2; exit 3"))
struct FailedSetupTraitTests {
    @Test func runsSayTheSetUpFailed() async {
        await withSandbox { sandbox in
            let r = await sandbox.run("true")
            guard case .infrastructureError(let e) = r.outcome else { Issue.record("\(r.outcome)"); return }
            #expect(e.message.contains("the suite's set-up `echo 'cannot prepare' >&2; exit 3` exited with status 3; stderr ends: cannot prepare"), "\(e)")
        }
    }
}
