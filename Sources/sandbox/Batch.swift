import ArgumentParser
import Foundation
import Sandbox
import SandboxBatch
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

struct Batch: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "batch",
        abstract: "Run the jobs of a job file, each in its own throwaway micro-VM.",
        discussion: """
        The job file (YAML or JSON) is validated completely before anything runs; see \
        Docs/BatchJobs.md for the schema. Progress goes to stderr, the summary table to \
        stdout; --jsonl streams one record per finished job, --junit is written at the end.

        Exit status: 0 every job met its expectation; 1 some did not; 2 invalid job file \
        or options (nothing ran); 130 interrupted by SIGINT/SIGTERM (running VMs are \
        stopped, finished results are kept and written).
        """)

    @Argument(help: "The job file (YAML or JSON).")
    var file: String
    @Option(help: "Jobs to run at once (each is a VM).")
    var parallel: Int = max(1, ProcessInfo.processInfo.activeProcessorCount)
    @Option(help: "Write a JUnit XML report here (atomically, at the end).")
    var junit: String?
    @Option(help: "Stream one JSON object per finished job to this file.")
    var jsonl: String?
    @Option(name: .customLong("output-limit"), help: "Bytes of each output stream a job may send (the rest is dropped in the guest).")
    var outputLimit: UInt64 = 1 << 20
    @Option(name: .customLong("tail"), help: "Bytes of each output stream kept per job for the reports.")
    var tailBytes: Int = 4096
    @Option(help: "Kernel path for every job (default: the cached kernel for this host).")
    var kernel: String?
    @Flag(help: "Boot every job instead of restoring its start snapshot (slower).")
    var cold = false
    @Flag(name: .customLong("no-jail"), help: "Run every VMM without its jail. For debugging the VMM only.")
    var noJail = false
    @Option(help: "VMs of each start kept restored and waiting for the next job (default: --parallel; 0 = none).")
    var warm: Int?
    @Option(help: "Run only share K of N of the jobs (K/N, e.g. 2/4): the jobs at positions K-1, K-1+N, ... of the file, the same split on every machine. Merge the shards' --jsonl reports with `sandbox report merge`.")
    var shard: String?

    func run() throws {
        // Worker threads started from here inherit a mask without SIGINT/SIGTERM; the
        // signals are turned into events for the watcher thread (BatchSignals).
        BatchSignals.blockTermination()
        // A cancelled VM closes the agent socket under a writer: take EPIPE, not SIGPIPE.
        signal(SIGPIPE, SIG_IGN)

        var jobs: [BatchJob]
        let allJobs: Int
        var theShard: BatchShard?
        do {
            jobs = try BatchFile.load(path: file)
            allJobs = jobs.count
            if let shard {
                let s = try BatchShard(parsing: shard)
                jobs = s.select(jobs)
                theShard = s
                printError("sandbox batch: shard \(s) of \(file): \(jobs.count) of its \(allJobs) jobs")
            }
        } catch {
            for d in error.diagnostics { printError(d.description) }
            printError("sandbox batch: \(file) is invalid (\(error.diagnostics.count) problem\(error.diagnostics.count == 1 ? "" : "s")); nothing was run")
            throw ExitCode(2)
        }
        guard parallel >= 1 else {
            printError("sandbox batch: --parallel must be at least 1")
            throw ExitCode(2)
        }
        var jsonlFD: Int32 = -1
        if let jsonl {
            jsonlFD = open(jsonl, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard jsonlFD >= 0 else {
                printError("sandbox batch: cannot open \(jsonl): \(String(cString: strerror(errno)))")
                throw ExitCode(2)
            }
        }
        defer { if jsonlFD >= 0 { close(jsonlFD) } }

        var options = BatchRunner.Options()
        options.parallel = parallel
        options.outputLimit = outputLimit
        options.tailBytes = max(0, tailBytes)
        options.kernel = kernel
        options.cold = cold
        if noJail {
            options.jail = false
            warnNoJail()
        }
        options.warm = max(0, warm ?? parallel)
        let runner = BatchRunner(jobs: jobs, options: options)
        let progress = BatchProgress(total: jobs.count, tty: isatty(2) == 1, jsonlFD: jsonlFD,
                                     origin: BatchReport.Origin(shard: theShard, jobsInFile: allJobs))
        try BatchSignals.watch(onFirst: { sig in
            progress.interrupted(signal: sig)
            runner.stop()
        }, onRepeat: { _ in
            // A second signal: leave now (the VMM children die with this process).
            _exit(130)
        })

        runner.prepare(progress: { printError($0) })
        let start = Date()
        let results = try runner.run(tickInterval: progress.tty ? 0.2 : 1, onTick: { progress.tick() },
                                     onEvent: { progress.handle($0) })
        let seconds = Date().timeIntervalSince(start)
        SandboxRunner.drainWarm()
        progress.finish()

        if let junit {
            let suite = ((file as NSString).lastPathComponent as NSString).deletingPathExtension
            do {
                try BatchReport.writeAtomically(BatchReport.junit(results, suite: suite, totalSeconds: seconds), to: junit)
            } catch {
                printError("sandbox batch: \(error)")
            }
        }
        writeAll(1, BatchReport.summary(results, jobCount: jobs.count, seconds: seconds) + "\n")
        if runner.isStopping { throw ExitCode(130) }
        if results.count < jobs.count || results.contains(where: { !$0.passed }) { throw ExitCode(1) }
    }
}

/// Counters, the progress display and the JSON Lines stream (all under one lock).
final class BatchProgress: Sendable {
    let total: Int
    let tty: Bool
    private let jsonlFD: Int32
    private let origin: BatchReport.Origin
    private let display: Mutex<Display>

    init(total: Int, tty: Bool, jsonlFD: Int32, origin: BatchReport.Origin) {
        self.total = total
        self.tty = tty
        self.jsonlFD = jsonlFD
        self.origin = origin
        display = Mutex(Display(total: total))
    }

    func handle(_ event: BatchEvent) {
        display.withLock { d in
            switch event {
            case .started(let name, _):
                d.running.insert(name)
            case .finished(let r):
                d.running.remove(r.name)
                d.done += 1
                if r.passed { d.passed += 1 } else if r.verdict != .interrupted { d.failed += 1 }
                if jsonlFD >= 0 { writeAll(jsonlFD, BatchReport.jsonLine(r, origin: origin) + "\n") }
                if !tty && !r.passed && r.verdict != .interrupted {
                    printError("sandbox batch: \(r.verdict.rawValue.uppercased()) \(r.name): \(r.outcome) (expected \(r.expectation))")
                }
                if tty { d.draw() }
            }
        }
    }

    func interrupted(signal: Int32) {
        display.withLock { d in
            d.stopped = true
            if d.drawn { writeAll(2, "\n"); d.drawn = false }
            printError("sandbox batch: \(signal == SIGINT ? "SIGINT" : "SIGTERM"): stopping \(d.running.count) running job\(d.running.count == 1 ? "" : "s"); no new jobs start")
        }
    }

    func tick() {
        display.withLock { d in
            if tty {
                d.draw()
            } else if Date().timeIntervalSince(d.lastLine) >= 5 {
                d.printStatusLine()
            }
        }
    }

    func finish() {
        display.withLock { d in
            if tty && d.drawn { d.draw(); writeAll(2, "\n"); d.drawn = false } else if !tty && d.status() != d.lastStatus { d.printStatusLine() }
        }
    }

    /// The counters and what the progress line last showed.
    private struct Display {
        let total: Int
        var done = 0, passed = 0, failed = 0
        var running: Set<String> = []
        var lastLine = Date()
        var lastStatus = ""
        var drawn = false
        var lastDrawn = ""
        var stopped = false

        init(total: Int) { self.total = total }

        mutating func printStatusLine() {
            lastLine = Date()
            lastStatus = status()
            printError("sandbox batch: \(lastStatus)")
        }

        func status() -> String {
            "\(done)/\(total) passed \(passed) failed \(failed) running \(running.count)"
        }

        mutating func draw() {
            let width = 30
            let filled = total > 0 ? done * width / total : width
            let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
            let line = "[\(bar)] \(status())\(stopped ? " (stopping)" : "")"
            if drawn && line == lastDrawn { return }
            writeAll(2, "\r\u{1B}[K" + line)
            lastDrawn = line
            drawn = true
        }
    }
}

/// `sandbox report merge`: one JSON Lines and one JUnit report from the shards' JSON Lines.
struct ReportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "report", abstract: "Work with batch reports.", subcommands: [Merge.self])

    struct Merge: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "merge",
            abstract: "Merge the --jsonl reports of a job file's shards into one JSON Lines and one JUnit report.",
            discussion: """
            Records are put back in job-file order. A job reported twice, reports of different \
            files or splits, and jobs with no record (a missing shard) are errors: nothing is \
            written. Exit status: 0 every job passed; 1 some did not; 2 invalid or incomplete \
            reports.
            """)
        @Argument(help: "The shards' JSON Lines reports.")
        var reports: [String]
        @Option(help: "Write the merged JSON Lines here.")
        var jsonl: String?
        @Option(help: "Write a JUnit XML report here.")
        var junit: String?
        @Option(help: "The JUnit suite name (default: the first report's name without extension).")
        var suite: String?

        func run() throws {
            guard !reports.isEmpty else {
                printError("sandbox report merge: give the shards' JSON Lines reports")
                throw ExitCode(2)
            }
            var files: [(name: String, text: String)] = []
            for path in reports {
                guard let data = FileManager.default.contents(atPath: path) else {
                    printError("sandbox report merge: cannot read \(path)")
                    throw ExitCode(2)
                }
                files.append((path, String(decoding: data, as: UTF8.self)))
            }
            let name = suite ?? ((reports[0] as NSString).lastPathComponent as NSString).deletingPathExtension
            let merged: BatchMerge.Merged
            do { merged = try BatchMerge.merge(files, suite: name) } catch {
                for d in error.diagnostics { printError(d.description) }
                printError("sandbox report merge: nothing was written")
                throw ExitCode(2)
            }
            do {
                if let jsonl { try BatchReport.writeAtomically(merged.jsonl, to: jsonl) }
                if let junit { try BatchReport.writeAtomically(merged.junit, to: junit) }
            } catch {
                printError("sandbox report merge: \(error)")
                throw ExitCode(2)
            }
            let failed = merged.notPassed
            writeAll(1, "\(merged.jobs) jobs from \(reports.count) report\(reports.count == 1 ? "" : "s"): \(merged.passed) passed, \(failed.count) not"
                + (failed.isEmpty ? "" : " (" + failed.prefix(10).joined(separator: ", ") + (failed.count > 10 ? ", ..." : "") + ")") + "\n")
            if !failed.isEmpty { throw ExitCode(1) }
        }
    }
}
