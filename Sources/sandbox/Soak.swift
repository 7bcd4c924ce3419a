import ArgumentParser
import Foundation
import Sandbox
import SystemShims
#if canImport(Glibc)
import Glibc
#endif

/// `sandbox _soak`: many runs through the library from one process, in rounds, each run's
/// result checked against what its command must give, and this process's and the host's
/// resources counted before and after (Benchmarks/soak calls it). Hidden: a measuring
/// tool, not a user command.
struct Soak: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "_soak", abstract: "Soak: N checked runs, counting leaks.", shouldDisplay: false)
    @Option var runs: Int = 10_000
    @Option(help: "Runs per round; resources are counted after every round.")
    var round: Int = 1000
    @Option var parallel: Int = 2
    @Option var warm: Int = 2

    /// One kind of run: its command, timeout, and the check of its result.
    struct Kind: Sendable {
        var name: String
        var argv: [String]
        var timeoutSeconds: Int = 60
        var check: @Sendable (ExecResult) -> String?
    }

    static let kinds: [Kind] = [
        Kind(name: "true", argv: ["true"]) { $0.outcome == .exited(0) ? nil : "\($0.outcome)" },
        Kind(name: "out-err-exit", argv: ["sh", "-c", "echo out; echo err >&2; exit 3"]) { r in
            r.outcome == .exited(3) && r.stdoutText == "out\n" && r.stderrText == "err\n" ? nil : "\(r.outcome), stdout \(r.stdoutText.debugDescription), stderr \(r.stderrText.debugDescription)"
        },
        Kind(name: "100 KB", argv: ["sh", "-c", "head -c 100000 /dev/zero"]) { r in
            r.outcome == .exited(0) && r.stdout.count == 100_000 ? nil : "\(r.outcome), \(r.stdout.count) bytes"
        },
        Kind(name: "killed", argv: ["sh", "-c", "kill -9 $$"]) { $0.outcome == .signalled(9) ? nil : "\($0.outcome)" },
        Kind(name: "timeout", argv: ["sleep", "30"], timeoutSeconds: 1) { $0.outcome == .timedOut ? nil : "\($0.outcome)" },
    ]

    /// Which kind run `i` is: mostly `true`; every 10th prints, exits 3 or is killed, every 200th times out.
    static func kind(_ i: Int) -> Kind {
        if i % 200 == 199 { return kinds[4] }
        switch i % 10 {
        case 3: return kinds[1]
        case 6: return kinds[2]
        case 9: return kinds[3]
        default: return kinds[0]
        }
    }

    /// A sandbox started, used the ways a test suite uses one, and stopped; each result
    /// is one check, and what is wrong is said.
    static func longLived(_ config: SandboxConfiguration) async -> (checks: Int, problems: [String]) {
        var checks = 0
        var problems: [String] = []
        func expect(_ ok: Bool, _ what: @autoclosure () -> String) {
            checks += 1
            if !ok { problems.append(what()) }
        }
        let sandbox: RunningSandbox
        do { sandbox = try await Sandbox.start(config) } catch {
            return (1, ["start: \(error)"])
        }
        for i in 0 ..< 40 {
            let r = await sandbox.sh("echo \(i) > /tmp/n; cat /tmp/n")
            expect(r.outcome == .exited(0) && r.stdoutText == "\(i)\n", "exec \(i): \(r.outcome), \(r.stdoutText.debugDescription)")
        }
        let together = await withTaskGroup(of: (Int, ExecResult).self) { group in
            for i in 0 ..< 8 { group.addTask { (i, await sandbox.sh("sleep 0.05; echo c\(i)")) } }
            var all: [(Int, ExecResult)] = []
            for await r in group { all.append(r) }
            return all
        }
        for (i, r) in together { expect(r.outcome == .exited(0) && r.stdoutText == "c\(i)\n", "concurrent exec \(i): \(r.outcome)") }
        do {
            let p = try await sandbox.spawn(["cat"])
            try await p.write(Array("through cat\n".utf8))
            await p.closeStdin()
            var out: [UInt8] = []
            for await event in p.output { if case .stdout(let b) = event { out += b } }
            let r = await p.wait()
            expect(r.outcome == .exited(0) && out == Array("through cat\n".utf8), "spawned cat: \(r.outcome), \(String(decoding: out, as: UTF8.self).debugDescription)")
        } catch {
            expect(false, "spawn: \(error)")
        }
        let tree = NSTemporaryDirectory() + "sandbox-soak-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: tree) }
        do {
            try? FileManager.default.removeItem(atPath: tree)
            try FileManager.default.createDirectory(atPath: tree + "/in/d", withIntermediateDirectories: true)
            try Data("a file\n".utf8).write(to: URL(fileURLWithPath: tree + "/in/d/f"))
            try FileManager.default.createSymbolicLink(atPath: tree + "/in/l", withDestinationPath: "d/f")
            try await sandbox.copyIn(tree + "/in", to: "/soak/tree")
            try await sandbox.copyOut("/soak/tree", to: tree + "/out")
            let back = try String(contentsOfFile: tree + "/out/d/f", encoding: .utf8)
            let link = try FileManager.default.destinationOfSymbolicLink(atPath: tree + "/out/l")
            expect(back == "a file\n" && link == "d/f", "tree round trip: \(back.debugDescription), link \(link)")
        } catch {
            expect(false, "tree round trip: \(error)")
        }
        let cancelled = Task { await sandbox.exec(["sleep", "30"]) }
        try? await Task.sleep(for: .milliseconds(100))
        cancelled.cancel()
        let c = await cancelled.value
        var wasCancelled = false
        if case .infrastructureError(let e) = c.outcome, e.code == .cancelled { wasCancelled = true }
        expect(wasCancelled, "cancelled exec: \(c.outcome)")
        let after = await sandbox.sh("cat /tmp/n")
        expect(after.outcome == .exited(0) && after.stdoutText == "39\n", "after the cancel: \(after.outcome)")
        await sandbox.stop()
        return (checks, problems)
    }

    struct Counts: Equatable, CustomStringConvertible {
        var fds = 0, threads = 0, mappings = 0, children = 0, vmms = 0, overlays = 0, mounts = 0
        var description: String {
            "fds \(fds), threads \(threads), mappings \(mappings), child processes \(children), sandbox-vmm processes \(vmms), overlay files \(overlays), mounts \(mounts)"
        }

        static func now() -> Counts {
            let fm = FileManager.default
            var c = Counts()
            c.fds = (try? fm.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1
            c.threads = (try? fm.contentsOfDirectory(atPath: "/proc/self/task").count) ?? -1
            c.mappings = ((try? String(contentsOfFile: "/proc/self/maps", encoding: .utf8)) ?? "").split(separator: "\n").count
            c.mounts = ((try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? "").split(separator: "\n").count
            c.overlays = (try? fm.contentsOfDirectory(atPath: SandboxPaths.overlayDirectory).count) ?? 0
            let me = "\(getpid())"
            for p in (try? fm.contentsOfDirectory(atPath: "/proc")) ?? [] where p.first?.isNumber == true {
                guard let stat = try? String(contentsOfFile: "/proc/\(p)/stat", encoding: .utf8),
                      let close = stat.lastIndex(of: ")") else { continue }
                let fields = stat[stat.index(after: close)...].split(separator: " ")
                if fields.count > 1, fields[1] == me { c.children += 1 }
                if stat.contains("(sandbox-vmm)") { c.vmms += 1 }
            }
            return c
        }
    }

    /// One line on stdout, written at once (a round's line shows as it happens).
    static func say(_ line: String) { FileHandle.standardOutput.write(Data((line + "\n").utf8)) }

    func run() async throws {
        var config = SandboxConfiguration()
        config.timeout = .seconds(60)
        // The warm pool's VMs are resources this process holds on purpose: count without them.
        _ = try SandboxRunner.prepare(config, progress: { printError($0) })
        // A warm-up round (not counted) through the same paths, so that everything made
        // once (the start snapshot, the warm pool's thread, the allocator's per-thread
        // arenas, lazily opened files, and the thread that spawns every long-lived
        // sandbox's VMM for the life of the process) exists before the baseline is taken.
        let pool = SandboxPool(limit: parallel)
        if warm > 0 { _ = try SandboxRunner.keepWarm(config, count: warm) }
        let warmUp = config
        await withTaskGroup(of: Void.self) { group in
            for _ in 0 ..< parallel {
                group.addTask { for _ in 0 ..< 10 { _ = await pool.run(["true"], configuration: warmUp) } }
            }
        }
        let warmLong = await Self.longLived(config)
        if !warmLong.problems.isEmpty {
            for p in warmLong.problems { printError("soak: the warm-up's long-lived sandbox: " + p) }
            throw ExitCode(1)
        }
        SandboxRunner.drainWarm()
        try await Task.sleep(for: .seconds(2))
        let before = Counts.now()
        Self.say("soak: before: \(before)")
        var problems: [String] = []
        var checked = 0, wrongCount = 0, longChecks = 0
        var roundCounts: [Counts] = []
        let t0 = monotonicNanos()
        var done = 0
        while done < runs {
            let count = min(round, runs - done)
            if warm > 0 { _ = try SandboxRunner.keepWarm(config, count: warm) }
            let start = done, lanes = parallel, base = config
            let results = await withTaskGroup(of: [(Int, ExecResult)].self) { group in
                for w in 0 ..< lanes {
                    group.addTask {
                        var mine: [(Int, ExecResult)] = []
                        var i = start + w
                        while i < start + count {
                            var c = base
                            let k = Soak.kind(i)
                            c.timeout = .seconds(k.timeoutSeconds)
                            mine.append((i, await pool.run(k.argv, configuration: c)))
                            i += lanes
                        }
                        return mine
                    }
                }
                var all: [(Int, ExecResult)] = []
                for await r in group { all += r }
                return all
            }
            // Every run of the round answered, once, with what its command gives.
            let seen = Set(results.map(\.0))
            if seen.count != count || results.count != count {
                problems.append("round at \(start): \(results.count) results for \(count) runs (\(seen.count) distinct)")
            }
            for (i, r) in results {
                checked += 1
                let k = Soak.kind(i)
                if let why = k.check(r) {
                    wrongCount += 1
                    if problems.count < 10 { problems.append("run \(i) (\(k.name)): \(why)") }
                }
            }
            // One long-lived sandbox per round: the running-sandbox paths (sequential and
            // concurrent execs, a spawned process, trees both ways, a cancelled exec).
            let long = await Self.longLived(config)
            checked += long.checks
            longChecks += long.checks
            for p in long.problems {
                wrongCount += 1
                if problems.count < 10 { problems.append("long-lived sandbox: " + p) }
            }
            done += count
            SandboxRunner.drainWarm()
            // Teardown of the last VMs runs on threads of their own: let it end.
            try await Task.sleep(for: .seconds(2))
            let c = Counts.now()
            roundCounts.append(c)
            let seconds = Double(monotonicNanos() - t0) / 1e9
            Self.say(String(format: "soak: %d/%d runs, %.1f runs/s, %d wrong; %@", done, runs, Double(done) / seconds, wrongCount, c.description))
        }
        let after = Counts.now()
        Self.say("soak: after:  \(after)")
        let lost = runs + longChecks - checked
        // A leak: more descriptors, processes, overlay files or mounts than before, or
        // threads or mappings that grow from round to round (the allocator and the
        // runtime settle their thread stacks and arenas by the end of the first round,
        // so those two are compared with it; both may also shrink).
        let firstRound = roundCounts.first ?? before
        let leaked = after.fds > before.fds || after.children > before.children || after.vmms > before.vmms
            || after.overlays > before.overlays || after.mounts > before.mounts
            || after.threads > max(before.threads, firstRound.threads) || after.mappings > max(before.mappings, firstRound.mappings)
        Self.say("soak: \(runs) runs and \(longChecks) checks in long-lived sandboxes, \(lost) results lost, \(wrongCount) wrong, \(leaked ? "LEAKED (before \(before); after \(after))" : "nothing leaked")")
        for p in problems { printError("soak: " + p) }
        if lost > 0 || wrongCount > 0 || leaked || !problems.isEmpty { throw ExitCode(1) }
    }
}
