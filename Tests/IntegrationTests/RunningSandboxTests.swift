import Foundation
import Sandbox
import Testing

/// `RunningSandbox`: one VM across many commands (Sandbox.start ... exec ... stop).
@Suite("a running sandbox")
struct RunningSandboxTests {
    static var configuration: SandboxConfiguration {
        var c = SandboxConfiguration()
        c.vmmExecutable = Fixture.productsDirectory + "/sandbox-vmm"
        c.timeout = .seconds(Fixture.inLab ? 600 : 60)
        return c
    }

    static func vmmAlive(_ pid: String) -> Bool { FileManager.default.fileExists(atPath: "/proc/\(pid)") }

    @Test("what one command leaves in the guest, the next sees: files, the working directory's contents, a daemon")
    func stateCarriesOver() async throws {
        let sandbox = try await Sandbox.start(Self.configuration)
        let a = await sandbox.sh("echo one > /root/state; mkdir -p /work/x; setsid sh -c 'while :; do echo beat >> /tmp/beats; sleep 0.1; done' </dev/null >/dev/null 2>&1 & while [ ! -s /tmp/beats ]; do sleep 0.05; done")
        #expect(a.outcome == .exited(0), "\(a.outcome) \(a.stderrText)")
        let b = await sandbox.sh("cat /root/state; ls -d /work/x")
        #expect(b.outcome == .exited(0) && b.stdoutText == "one\n/work/x\n", "\(b.outcome) \(b.stdoutText) \(b.stderrText)")
        // The daemon outlived the command that started it and still runs.
        let first = await sandbox.sh("wc -l < /tmp/beats")
        try await Task.sleep(for: .milliseconds(500))
        let second = await sandbox.sh("wc -l < /tmp/beats")
        let (n1, n2) = (Int(first.stdoutText.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1,
                        Int(second.stdoutText.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1)
        #expect(n1 > 0 && n2 > n1, "beats \(n1) then \(n2)")
        // Files both ways through the API, parents made.
        try await sandbox.writeFile("/data/in/blob", contents: Array(0...255), mode: 0o600)
        let c = await sandbox.sh("stat -c %a /data/in/blob; sha256sum < /data/in/blob | cut -c1-64")
        let sum = try Fixture.sha256(Data(Array(0...255)))
        #expect(c.stdoutText == "600\n\(sum)\n", "\(c.stdoutText) vs \(sum)")
        #expect(try await sandbox.readFile("/root/state") == Array("one\n".utf8))
        await #expect(throws: SandboxError.self) { try await sandbox.readFile("/no/such/file") }
        // A failed read is the guest's answer, not a broken sandbox.
        #expect(await sandbox.sh("echo still").stdoutText == "still\n")
        await sandbox.stop()
    }

    @Test("each exec has its own environment, working directory, stdin, timeout and output limit; a timeout leaves the sandbox usable")
    func perExecOptions() async throws {
        var config = Self.configuration
        config.environment = ["BASE": "b"]
        let sandbox = try await Sandbox.start(config)
        let r = await sandbox.exec(["sh", "-c", "echo $BASE $EXTRA; pwd; cat"],
                                   options: .init(environment: ["EXTRA": "e"], workingDirectory: "/tmp"), stdin: Array("in\n".utf8))
        #expect(r.outcome == .exited(0) && r.stdoutText == "b e\n/tmp\nin\n", "\(r.outcome) \(r.stdoutText) \(r.stderrText)")
        let slow = await sandbox.exec(["sleep", "30"], options: .init(timeout: .seconds(1)))
        #expect(slow.outcome == .timedOut, "\(slow.outcome)")
        let big = await sandbox.exec(["sh", "-c", "head -c 100000 /dev/zero"], options: .init(outputLimit: 1000))
        #expect(big.outcome == .exited(0) && big.stdout.count == 1000, "\(big.outcome) \(big.stdout.count)")
        let missing = await sandbox.exec(["no-such-command"])
        #expect(missing.outcome == .exited(127), "\(missing.outcome)")
        let after = await sandbox.sh("echo alive")
        #expect(after.outcome == .exited(0) && after.stdoutText == "alive\n", "\(after.outcome)")
        await sandbox.stop()
    }

    @Test("eight execs at once in one VM: each waits until all eight run (so none waited for another), then gets its own output and status")
    func concurrentCallers() async throws {
        let sandbox = try await Sandbox.start(Self.configuration)
        // A barrier in the guest: served one after another, the first would wait for the
        // others until its timeout.
        let barrier = "mkdir -p /tmp/barrier; touch /tmp/barrier/$ID; while [ $(ls /tmp/barrier | wc -l) -lt 8 ]; do sleep 0.02; done"
        let results = await withTaskGroup(of: (Int, ExecResult).self) { group in
            for i in 0 ..< 8 {
                group.addTask {
                    (i, await sandbox.sh("\(barrier); head -c \(1000 * (i + 1)) /dev/zero | tr '\\0' x; echo; echo task-\(i); exit \(i)",
                                         options: .init(environment: ["ID": "\(i)"], timeout: .seconds(Fixture.inLab ? 300 : 30))))
                }
            }
            var all: [Int: ExecResult] = [:]
            for await (i, r) in group { all[i] = r }
            return all
        }
        for i in 0 ..< 8 {
            let expected = String(repeating: "x", count: 1000 * (i + 1)) + "\ntask-\(i)\n"
            #expect(results[i]?.outcome == .exited(Int32(i)) && results[i]?.stdoutText == expected,
                    "\(i): \(String(describing: results[i]?.outcome)) \(results[i]?.stderrText ?? "")")
        }
        await sandbox.stop()
    }

    @Test("spawn: a background server answers a second exec, stdin and output stream both ways, signal and wait give typed outcomes")
    func spawnedProcesses() async throws {
        let sandbox = try await Sandbox.start(Self.configuration)
        defer { Task { await sandbox.stop() } }
        // A server in the foreground of its own spawn, and a client exec beside it.
        try await sandbox.writeFile("/www/index.html", contents: Array("served from the guest\n".utf8))
        let server = try await sandbox.spawn(["httpd", "-f", "-p", "8080", "-h", "/www"])
        let page = await sandbox.sh("for i in $(seq 100); do wget -qO- http://127.0.0.1:8080/index.html && exit 0; sleep 0.05; done; exit 1")
        #expect(page.outcome == .exited(0) && page.stdoutText == "served from the guest\n", "\(page.outcome) \(page.stderrText)")
        #expect(server.result == nil, "the server ended: \(String(describing: server.result?.outcome))")
        // While it runs there is no checkpoint (the agent is not quiet).
        do { try await sandbox.checkpoint(); Issue.record("a checkpoint was taken while a spawned process ran") } catch {
            #expect(error.code == .invalidInput && error.message.contains("still run"), "\(error)")
        }
        await server.signal(SIGTERM)
        let ended = await server.wait()
        #expect(ended.outcome == .signalled(SIGTERM), "\(ended.outcome) \(ended.stderrText)")

        // Stdin in, output out, as it happens: the reply to each line comes before the next is sent.
        let echo = try await sandbox.spawn(["sh", "-c", "echo ready; while read line; do echo \"got $line\"; echo \"err $line\" >&2; done; echo done; exit 3"])
        var iterator = echo.output.makeAsyncIterator()
        func nextStdout() async -> String? {
            while let event = await iterator.next() {
                if case .stdout(let b) = event { return String(decoding: b, as: UTF8.self) }
            }
            return nil
        }
        #expect(await nextStdout() == "ready\n")
        for word in ["one", "two"] {
            try await echo.write(Array("\(word)\n".utf8))
            #expect(await nextStdout() == "got \(word)\n")
        }
        await echo.closeStdin()
        #expect(await nextStdout() == "done\n")
        #expect(await nextStdout() == nil)  // the sequence ends with the command
        let r = await echo.wait()
        #expect(r.outcome == .exited(3), "\(r.outcome)")
        #expect(r.stdoutText == "ready\ngot one\ngot two\ndone\n" && r.stderrText == "err one\nerr two\n", "\(r.stdoutText) \(r.stderrText)")
        #expect(echo.droppedOutputBytes == 0)
        do { try await echo.write([1]); Issue.record("a write after the end was accepted") } catch {
            #expect(error.code == .invalidInput, "\(error)")
        }
        // Nothing runs now: a checkpoint works.
        _ = try await sandbox.checkpoint()

        // A spawned command whose output is never read: the result keeps each stream up
        // to the output limit, the unread buffer holds at most the limit (both streams).
        let flood = try await sandbox.spawn(["sh", "-c", "head -c 1000000 /dev/zero; head -c 1000000 /dev/zero >&2"],
                                            options: .init(outputLimit: 100_000))
        let fr = await flood.wait()
        #expect(fr.outcome == .exited(0) && fr.stdout.count == 100_000 && fr.stderr.count == 100_000, "\(fr.outcome) \(fr.stdout.count) \(fr.stderr.count)")
        #expect(flood.droppedOutputBytes > 0 && flood.droppedOutputBytes <= 100_000, "\(flood.droppedOutputBytes)")
        var unread = 0
        for await event in flood.output { if case .stdout(let b) = event { unread += b.count } else if case .stderr(let b) = event { unread += b.count } }
        #expect(unread + Int(flood.droppedOutputBytes) == 200_000, "\(unread) read, \(flood.droppedOutputBytes) dropped")

        // Releasing a handle kills its command.
        var dropped: SpawnedProcess? = try await sandbox.spawn(["sleep", "77"])
        #expect(await sandbox.sh("for i in $(seq 100); do ps | grep -q '[s]leep 77' && exit 0; sleep 0.05; done; exit 1").outcome == .exited(0))
        #expect(dropped?.result == nil)
        dropped = nil
        let gone = await sandbox.sh("for i in $(seq 200); do ps | grep -q '[s]leep 77' || exit 0; sleep 0.05; done; exit 1")
        #expect(gone.outcome == .exited(0), "the command of a released handle still runs")

        // Stopping the sandbox ends a spawned process with a typed outcome.
        let sleeper = try await sandbox.spawn(["sleep", "60"])
        await sandbox.stop()
        let s = await sleeper.wait()
        guard case .infrastructureError(let e) = s.outcome else { Issue.record("after stop: \(s.outcome)"); return }
        #expect(e.code == .cancelled && e.message.contains("stopped"), "\(e)")
    }

    @Test("rewind() while commands run in the old VM ends them as cancelled; the rewound sandbox answers")
    func rewindEndsRunningCommands() async throws {
        let sandbox = try await Sandbox.start(Self.configuration)
        defer { Task { await sandbox.stop() } }
        try await sandbox.checkpoint()
        let spawned = try await sandbox.spawn(["sleep", "60"])
        async let running = sandbox.exec(["sleep", "60"])
        // Both run in the old VM before the rewind.
        let both = await sandbox.sh("for i in $(seq 200); do [ $(ps | grep -c '[s]leep 60') = 2 ] && exit 0; sleep 0.05; done; exit 1")
        #expect(both.outcome == .exited(0), "the two sleeps did not both start")
        try await sandbox.rewind()
        for r in [await running, await spawned.wait()] {
            guard case .infrastructureError(let e) = r.outcome else { Issue.record("\(r.command): \(r.outcome)"); continue }
            #expect(e.code == .cancelled && e.message.contains("rewound"), "\(e)")
        }
        #expect(await sandbox.sh("echo after").stdoutText == "after\n")
    }

    @Test("stop() while a command runs ends it with a typed outcome; later calls say the sandbox was stopped; the VMM is gone")
    func stopWhileRunning() async throws {
        let sandbox = try await Sandbox.start(Self.configuration)
        let pid = "\(sandbox.vmmProcessID)"
        let roundTrip = try await sandbox.ping()
        #expect(roundTrip > .zero && roundTrip < .seconds(5), "ping: \(roundTrip)")
        async let running = sandbox.exec(["sleep", "60"])
        try await Task.sleep(for: .milliseconds(300))
        #expect(try await sandbox.ping() > .zero, "a ping while a command runs")
        await sandbox.stop()
        let r = await running
        guard case .infrastructureError = r.outcome else { Issue.record("the running command ended as \(r.outcome)"); return }
        let later = await sandbox.sh("true")
        guard case .infrastructureError(let e) = later.outcome else { Issue.record("after stop: \(later.outcome)"); return }
        #expect(e.message.contains("the sandbox was stopped"), "\(e)")
        do {
            try await sandbox.ping()
            Issue.record("a ping after stop() answered")
        } catch {
            #expect(error.message.contains("the sandbox was stopped"), "\(error)")
        }
        #expect(sandbox.endedBecause != nil)
        #expect(!Self.vmmAlive(pid), "VMM \(pid) still runs")
    }

    @Test("a guest that resets during an exec, and a killed VMM: the exec and every later call say which happened")
    func endsOnItsOwnSayWhich() async throws {
        let rebooted = try await Sandbox.start(Self.configuration)
        let r = await rebooted.sh("reboot -f; sleep 30")
        guard case .infrastructureError(let e) = r.outcome else { Issue.record("a rebooting guest's exec: \(r.outcome)"); return }
        #expect(e.message.contains("the VM stopped on its own (guest reset (shutdown); vCPU at the shutdown: RIP 0x"), "\(e)")
        let later = await rebooted.sh("true")
        guard case .infrastructureError(let l) = later.outcome else { Issue.record("after the reset: \(later.outcome)"); return }
        #expect(l.message == e.message, "\(l) vs \(e)")

        let killed = try await Sandbox.start(Self.configuration)
        async let running = killed.sh("sleep 60")
        try await Task.sleep(for: .milliseconds(300))
        #expect(kill(killed.vmmProcessID, SIGKILL) == 0)
        let tk = ContinuousClock.now
        let k = await running
        // Not a hang (the command would sleep 60 s). Alone it takes about 20 ms; under the
        // parallel suite's load it took 7 s once, so this is a bound, not a timing.
        #expect(ContinuousClock.now - tk < .seconds(40), "took \(ContinuousClock.now - tk)")
        guard case .infrastructureError(let ke) = k.outcome else { Issue.record("a killed VMM's exec: \(k.outcome)"); return }
        #expect(ke.message.contains("the VM stopped on its own (the VMM process was killed by signal 9)"), "\(ke)")
        do {
            _ = try await killed.readFile("/etc/passwd")
            Issue.record("a read after the VMM was killed answered")
        } catch {
            #expect(error.message == ke.message, "\(error)")
        }
    }

    @Test("cancelling an exec kills that command and returns cancelled; the sandbox goes on; a cancelled start throws cancelled")
    func cancellation() async throws {
        let sandbox = try await Sandbox.start(Self.configuration)
        let t0 = ContinuousClock.now
        let task = Task { await sandbox.exec(["sleep", "30"]) }
        try await Task.sleep(for: .milliseconds(300))
        task.cancel()
        let r = await task.value
        guard case .infrastructureError(let e) = r.outcome, e.code == .cancelled else { Issue.record("\(r.outcome)"); return }
        // Well before `sleep 30` would have ended by itself (a loaded host is slow).
        #expect(ContinuousClock.now - t0 < .seconds(25))
        // The command is gone from the guest; the sandbox answers.
        let left = await sandbox.sh("ps | grep -c '[s]leep 30' || true")
        #expect(left.stdoutText == "0\n", "\(left.stdoutText) \(left.stderrText)")
        await sandbox.stop()

        let start = Task { try await Sandbox.start(Self.configuration) }
        start.cancel()
        do { _ = try await start.value; Issue.record("a cancelled start returned a sandbox") } catch let e as SandboxError {
            #expect(e.code == .cancelled, "\(e)")
        }
    }

    @Test("a sandbox released without stop() stops its VM")
    func releaseStops() async throws {
        var sandbox: RunningSandbox? = try await Sandbox.start(Self.configuration)
        #expect(await sandbox?.sh("true").outcome == .exited(0))
        let pid = "\(sandbox?.vmmProcessID ?? 0)"
        sandbox = nil
        var alive = Self.vmmAlive(pid)
        for _ in 0 ..< 50 where alive {
            try await Task.sleep(for: .milliseconds(100))
            alive = Self.vmmAlive(pid)
        }
        #expect(!alive, "VMM \(pid) still runs after its sandbox was released")
    }

    @Test("checkpoint() after set-up, rewind() back to it: files, a daemon's memory and the disk are as they were; the sandbox works after each")
    func checkpointAndRewind() async throws {
        let sandbox = try await Sandbox.start(Self.configuration)
        defer { Task { await sandbox.stop() } }
        await #expect(throws: SandboxError.self) { try await sandbox.rewind() }  // nothing to go back to yet
        // Set-up: a file, and a daemon that counts in its own memory.
        let setup = await sandbox.sh("echo prepared > /root/setup; setsid sh -c 'n=0; while :; do n=$((n+1)); echo $n > /tmp/count; sleep 0.05; done' </dev/null >/dev/null 2>&1 & echo $! > /tmp/daemon.pid; while [ ! -s /tmp/count ]; do sleep 0.02; done")
        #expect(setup.outcome == .exited(0), "\(setup.stderrText)")
        let took = try await sandbox.checkpoint()
        print("RunningSandboxTests: checkpoint took \(took) ms")
        #expect(await sandbox.sh("cat /root/setup").stdoutText == "prepared\n")  // goes on after the checkpoint
        // A test messes the sandbox up...
        #expect(await sandbox.sh("rm /root/setup; echo dirty > /root/dirt; kill $(cat /tmp/daemon.pid)").outcome == .exited(0))
        // ...and rewind brings the checkpoint back, each time.
        for round in 0 ..< 2 {
            let back = try await sandbox.rewind()
            print("RunningSandboxTests: rewind \(round) took \(back) ms")
            let r = await sandbox.sh("cat /root/setup; test -e /root/dirt && echo dirt || echo clean")
            #expect(r.stdoutText == "prepared\nclean\n", "round \(round): \(r.outcome) \(r.stdoutText) \(r.stderrText)")
            // The daemon is back and counting on from where the checkpoint left it.
            let a = Int(await sandbox.sh("cat /tmp/count").stdoutText.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
            try await Task.sleep(for: .milliseconds(300))
            let b = Int(await sandbox.sh("cat /tmp/count").stdoutText.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
            #expect(a > 0 && b > a, "round \(round): the daemon counted \(a) then \(b)")
            _ = await sandbox.sh("echo dirty > /root/dirt")
        }
        // Entropy is renewed on every restore: two rewinds do not repeat random bytes.
        _ = try await sandbox.rewind()
        let r1 = await sandbox.sh("head -c 16 /dev/urandom | od -An -tx1")
        _ = try await sandbox.rewind()
        let r2 = await sandbox.sh("head -c 16 /dev/urandom | od -An -tx1")
        #expect(r1.outcome == .exited(0) && r1.stdoutText != r2.stdoutText, "\(r1.stdoutText) \(r2.stdoutText)")
    }

    @Test("fork(count:) gives independent sandboxes that start from the checkpoint and do not see each other")
    func forks() async throws {
        let sandbox = try await Sandbox.start(Self.configuration)
        #expect(await sandbox.sh("echo base > /root/base").outcome == .exited(0))
        try await sandbox.checkpoint()
        let forks = try await sandbox.fork(count: 3)
        #expect(forks.count == 3)
        for (i, f) in forks.enumerated() {
            #expect(await f.sh("echo fork-\(i) > /root/mine").outcome == .exited(0))
        }
        for (i, f) in forks.enumerated() {
            let r = await f.sh("cat /root/base /root/mine")
            #expect(r.stdoutText == "base\nfork-\(i)\n", "fork \(i): \(r.stdoutText) \(r.stderrText)")
        }
        // The original went on untouched.
        let r = await sandbox.sh("cat /root/base; test -e /root/mine && echo seen || echo unseen")
        #expect(r.stdoutText == "base\nunseen\n", "\(r.stdoutText)")
        let pids = Set(forks.map(\.vmmProcessID) + [sandbox.vmmProcessID])
        #expect(pids.count == 4)
        for f in forks { await f.stop() }
        await sandbox.stop()
        await #expect(throws: SandboxError.self) { _ = try await sandbox.fork(count: 1) }  // ended
    }

    @Test("a start that cannot work throws a specific error")
    func startFailures() async {
        var config = Self.configuration
        config.image = "/no/such/image.ext4"
        await #expect(throws: SandboxError.self) { _ = try await Sandbox.start(config) }
        config = Self.configuration
        config.keepDiskPath = "/tmp/x.ext4"
        do { _ = try await Sandbox.start(config); Issue.record("keepDiskPath was accepted") } catch {
            #expect(error.message.contains("one-shot"), "\(error)")
        }
    }
}
