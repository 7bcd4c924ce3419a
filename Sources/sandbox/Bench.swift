import ArgumentParser
import Foundation
import Sandbox
import SystemShims

/// `sandbox _bench-library`: N runs of one command through the library's async API and a
/// `SandboxPool`, from one process (Benchmarks/batch-throughput calls it). Hidden: a
/// measuring tool, not a user command.
struct BenchLibrary: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "_bench-library", abstract: "Benchmark: N runs through Sandbox.run and a SandboxPool.", shouldDisplay: false)
    @Option var jobs: Int = 200
    @Option var parallel: Int = 2
    @Option(help: "VMs kept restored and waiting (SandboxRunner.keepWarm); 0 = none.")
    var warm: Int = 2
    @Flag var cold = false
    @Option(help: "Milliseconds each run waits before it starts (a suite's own work between sandboxes).")
    var gap: Int = 0
    @Argument(parsing: .remaining) var command: [String] = ["true"]

    func run() async throws {
        var config = SandboxConfiguration()
        config.cold = cold
        config.timeout = .seconds(60)
        let argv = command.first == "--" ? Array(command.dropFirst()) : command
        if warm > 0 && !cold { _ = try SandboxRunner.keepWarm(config, count: warm, progress: { printError($0) }) }
        _ = try SandboxRunner.prepare(config, progress: { printError($0) })
        // Let the pool fill before timing, as a suite's set-up would.
        try await Task.sleep(for: .milliseconds(warm > 0 && !cold ? 500 : 0))
        let pool = SandboxPool(limit: parallel)
        let runConfig = config, runArgv = argv, pause = gap
        let t0 = monotonicNanos()
        // `parallel` workers, each running its share one after another (with the gap
        // before each), all through the pool.
        let results = await withTaskGroup(of: [ExecResult].self) { group in
            for w in 0 ..< parallel {
                let share = jobs / parallel + (w < jobs % parallel ? 1 : 0)
                group.addTask {
                    var mine: [ExecResult] = []
                    for _ in 0 ..< share {
                        if pause > 0 { try? await Task.sleep(for: .milliseconds(pause)) }
                        mine.append(await pool.run(runArgv, configuration: runConfig))
                    }
                    return mine
                }
            }
            var all: [ExecResult] = []
            for await r in group { all += r }
            return all
        }
        let seconds = Double(monotonicNanos() - t0) / 1e9
        SandboxRunner.drainWarm()
        let failed = results.filter { $0.outcome != .exited(0) }
        let warmRuns = results.filter { $0.timings.warm }.count
        let restored = results.filter { $0.timings.restored }.count
        let totals = results.map(\.timings.total).sorted()
        let warmTotals = results.filter(\.timings.warm).map(\.timings.total).sorted()
        print(String(format: "library: %d runs of %@ at parallel %d in %.2f s = %.1f runs/s (warm %d, restored %d, failed %d; per-run median %.1f ms)",
                     jobs, argv.joined(separator: " "), parallel, seconds, Double(jobs) / seconds, warmRuns, restored, failed.count,
                     totals.isEmpty ? 0 : totals[totals.count / 2]))
        if !warmTotals.isEmpty { print(String(format: "library: warm runs' median %.1f ms", warmTotals[warmTotals.count / 2])) }
        if let f = failed.first { printError("first failure: \(f.outcome)") }
        if !failed.isEmpty { throw ExitCode(1) }
    }
}

/// `sandbox _bench-exec`: N commands, one after another, in one running sandbox
/// (`Sandbox.start` + `exec`), timed one by one (Benchmarks/exec-in-running calls it).
/// Hidden: a measuring tool.
struct BenchExec: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "_bench-exec", abstract: "Benchmark: N execs in one RunningSandbox.", shouldDisplay: false)
    @Option var runs: Int = 200
    @Option(help: "Then: one checkpoint, and this many rewinds to it, each timed.")
    var rewinds: Int = 0
    @Argument(parsing: .remaining) var command: [String] = ["true"]

    func run() async throws {
        var config = SandboxConfiguration()
        config.timeout = .seconds(60)
        let argv = command.first == "--" ? Array(command.dropFirst()) : command
        let t0 = monotonicNanos()
        let sandbox = try await Sandbox.start(config, progress: { printError($0) })
        let started = Double(monotonicNanos() - t0) / 1e6
        for _ in 0 ..< 5 { _ = await sandbox.exec(argv) }  // warm-up
        var times: [Double] = []
        var failed = 0
        for _ in 0 ..< runs {
            let t = monotonicNanos()
            let r = await sandbox.exec(argv)
            times.append(Double(monotonicNanos() - t) / 1e6)
            if r.outcome != .exited(0) { failed += 1; if failed == 1 { printError("first failure: \(r.outcome)") } }
        }
        var pings: [Double] = []
        for _ in 0 ..< runs {
            let d = try await sandbox.ping()
            pings.append(Double(d.components.attoseconds) / 1e15 + Double(d.components.seconds) * 1e3)
        }
        var rewindTimes: [Double] = []
        var checkpointMillis = 0.0
        if rewinds > 0 {
            checkpointMillis = try await sandbox.checkpoint()
            for _ in 0 ..< rewinds {
                rewindTimes.append(try await sandbox.rewind())
                let r = await sandbox.exec(argv)
                if r.outcome != .exited(0) { failed += 1; if failed == 1 { printError("first failure after a rewind: \(r.outcome)") } }
            }
        }
        await sandbox.stop()
        func pct(_ values: [Double], _ p: Double) -> Double {
            let v = values.sorted()
            return v[min(v.count - 1, Int(Double(v.count) * p))]
        }
        print(String(format: "exec in a running sandbox: %d × %@: median %.2f ms, p90 %.2f ms, p99 %.2f ms (start %.1f ms, failed %d)",
                     runs, argv.joined(separator: " "), pct(times, 0.5), pct(times, 0.9), pct(times, 0.99), started, failed))
        print(String(format: "agent round trip (ping, no command): median %.2f ms, p90 %.2f ms", pct(pings, 0.5), pct(pings, 0.9)))
        if !rewindTimes.isEmpty {
            print(String(format: "rewind to a checkpoint: %d rewinds: median %.1f ms, p90 %.1f ms (checkpoint %.1f ms)",
                         rewindTimes.count, pct(rewindTimes, 0.5), pct(rewindTimes, 0.9), checkpointMillis))
        }
        if failed > 0 { throw ExitCode(1) }
    }
}

/// `sandbox _bench-copy DIR`: the tree at DIR copied into one running sandbox N times
/// (`RunningSandbox.copyIn`, each into a fresh guest directory, removed after), and out
/// again, each timed (Benchmarks/dir-copy calls it). Hidden: a measuring tool.
struct BenchCopy: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "_bench-copy", abstract: "Benchmark: copy a directory tree in and out of one RunningSandbox.", shouldDisplay: false)
    @Option var runs: Int = 5
    @Option(help: "Guest memory in MiB (the guest's page cache holds the tree).")
    var memory: UInt64 = 1024
    @Argument var directory: String

    func run() async throws {
        var config = SandboxConfiguration()
        config.timeout = .seconds(300)
        config.memoryMiB = memory
        let bytes = UInt64(try Self.treeBytes(directory))
        let sandbox = try await Sandbox.start(config, progress: { printError($0) })
        let out = NSTemporaryDirectory() + "sandbox-bench-copy-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: out) }
        var inTimes: [Double] = [], outTimes: [Double] = []
        for i in 0 ..< runs {
            let t = monotonicNanos()
            try await sandbox.copyIn(directory, to: "/bench/\(i)")
            inTimes.append(Double(monotonicNanos() - t) / 1e9)
            try? FileManager.default.removeItem(atPath: out)
            let u = monotonicNanos()
            try await sandbox.copyOut("/bench/\(i)", to: out)
            outTimes.append(Double(monotonicNanos() - u) / 1e9)
            let rm = await sandbox.sh("rm -rf /bench/\(i)")
            guard rm.outcome == .exited(0) else { printError("rm in the guest: \(rm.outcome)"); throw ExitCode(1) }
        }
        await sandbox.stop()
        let mb = Double(bytes) / 1e6
        func median(_ v: [Double]) -> Double { v.sorted()[v.count / 2] }
        print(String(format: "copy-in of %.1f MB: %d runs: median %.3f s = %.0f MB/s", mb, runs, median(inTimes), mb / median(inTimes)))
        print(String(format: "copy-out of %.1f MB: %d runs: median %.3f s = %.0f MB/s", mb, runs, median(outTimes), mb / median(outTimes)))
    }

    static func treeBytes(_ dir: String) throws -> Int {
        guard let e = FileManager.default.enumerator(atPath: dir) else { throw ValidationError("\(dir): not a directory") }
        var total = 0
        while let p = e.nextObject() as? String {
            let a = try FileManager.default.attributesOfItem(atPath: dir + "/" + p)
            if a[.type] as? FileAttributeType == .typeRegular { total += (a[.size] as? Int) ?? 0 }
        }
        return total
    }
}
