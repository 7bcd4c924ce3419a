import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import Synchronization
import Testing

/// `sandbox batch` end to end: job-file validation, reports, determinism, SIGINT.
@Suite("sandbox batch end to end", .serialized)
struct BatchTests {
    static let jobsDirectory = Fixture.repoRoot + "/Sandboxes/examples/jobs"

    /// A fresh scratch directory for one test.
    func scratch() throws -> String {
        let dir = NSTemporaryDirectory() + "sandbox-batch-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    func batch(_ args: [String], timeout: Double = 600) throws -> Fixture.Result {
        try Fixture.run(Fixture.sandboxBinary, ["batch"] + args, timeout: Fixture.inLab ? 3600 : timeout)
    }

    /// The JSON Lines records of a run, by job name.
    func records(_ path: String) throws -> [String: [String: Any]] {
        let text = try String(contentsOfFile: path, encoding: .utf8)
        var byName: [String: [String: Any]] = [:]
        for line in text.split(separator: "\n") {
            let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
            let name = try #require(object?["name"] as? String)
            #expect(byName[name] == nil, "job \(name) reported twice")
            byName[name] = object
        }
        return byName
    }

    struct JUnitReport {
        var tests = 0, failures = 0, errors = 0, skipped = 0
        var cases: [String] = []
        var failed: [String] = []
        var errored: [String] = []
    }

    /// Parses a JUnit file with the XML parser (so it must be well-formed).
    func junit(_ path: String) throws -> JUnitReport {
        let doc = try XMLDocument(contentsOf: URL(fileURLWithPath: path), options: [])
        let suite = try #require(try doc.nodes(forXPath: "/testsuites/testsuite").first as? XMLElement)
        func int(_ name: String) -> Int { Int(suite.attribute(forName: name)?.stringValue ?? "") ?? -1 }
        var r = JUnitReport(tests: int("tests"), failures: int("failures"), errors: int("errors"), skipped: int("skipped"))
        for case let c as XMLElement in suite.elements(forName: "testcase") {
            let name = c.attribute(forName: "name")?.stringValue ?? "?"
            r.cases.append(name)
            if !c.elements(forName: "failure").isEmpty { r.failed.append(name) }
            if !c.elements(forName: "error").isEmpty { r.errored.append(name) }
        }
        return r
    }

    // MARK: - Validation

    static let invalidFiles: [(String, String, String)] = [
        ("unknown key", "jobs:\n  - name: a\n    command: \"true\"\n    timout: 5\n",
         "bad.yaml:4:5: job 'a': unknown key 'timout' (did you mean 'timeout'?)"),
        ("timeout of the wrong type", "jobs:\n  - name: x\n    command: [echo, hi]\n    timeout: soon\n",
         "bad.yaml:4:14: job 'x': 'timeout' must be a number of seconds"),
        ("negative timeout", "defaults:\n  timeout: -1\njobs:\n  - {name: a, command: \"true\"}\n",
         "bad.yaml:2:12: defaults: 'timeout' must be a number of seconds from 0 to 2592000 (got -1)"),
        ("huge timeout", "jobs:\n  - name: a\n    command: \"true\"\n    timeout: 1e300\n",
         "bad.yaml:4:14: job 'a': 'timeout' must be a number of seconds from 0 to 2592000 (got 1e+300)"),
        ("too many cpus", "jobs:\n  - name: a\n    command: \"true\"\n    cpus: 64\n",
         "bad.yaml:4:11: job 'a': 'cpus' must be a whole number from 1 to 32"),
        ("missing command", "jobs:\n  - name: a\n    image: busybox\n",
         "bad.yaml:2:5: job 'a': missing 'command'"),
        ("missing name", "jobs:\n  - command: \"true\"\n",
         "bad.yaml:2:5: job #1: missing 'name'"),
        ("duplicate names", "jobs:\n  - name: a\n    command: \"true\"\n  - name: a\n    command: \"false\"\n",
         "bad.yaml:4:11: job 'a': duplicate name (first defined at 2:11)"),
        ("missing copy-in file", "jobs:\n  - name: a\n    command: cat /tmp/f\n    files:\n      - {from: no-such-file, to: /tmp/f}\n",
         "bad.yaml:5:16: job 'a': copy-in file 'no-such-file' does not exist"),
        ("bad expectation", "jobs:\n  - name: a\n    command: \"true\"\n    expect: sometimes\n",
         "bad.yaml:4:13: job 'a': 'expect' must be an exit code, 'timeout', {exit: N} or {signal: N}"),
        ("YAML syntax error", "jobs:\n  - name: a\n    command: [echo\n",
         "bad.yaml:4:1: not valid YAML or JSON"),
        ("JSON with a wrong type", "{\"jobs\": [{\"name\": \"a\", \"command\": \"true\",\n  \"retries\": \"twice\"}]}\n",
         "bad.yaml:2:14: job 'a': 'retries' must be a whole number >= 0"),
        ("jobs not a list", "jobs: {name: a}\n",
         "bad.yaml:1:7: 'jobs' must be a list"),
        ("disk size without a number", "jobs:\n  - name: a\n    command: \"true\"\n    disk_size: lots\n",
         "bad.yaml:4:16: job 'a': 'disk_size' 'lots' is not a size: use MiB (2048) or a unit (512M, 4G, 1T)"),
        ("disk size of zero", "defaults:\n  disk_size: 0\njobs:\n  - {name: a, command: \"true\"}\n",
         "bad.yaml:2:14: defaults: 'disk_size' must be from 1 MiB to 16777216 MiB (16 TiB) (got 0 MiB)"),
    ]

    @Test("snapshot: jobs start from a snapshot; a missing one is refused before anything runs")
    func snapshotKey() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let made = try Fixture.run(Fixture.sandboxBinary, ["snapshot", "create", dir + "/snap"], timeout: Fixture.inLab ? 900 : 120)
        try #require(made.status == 0, "\(made.stderr)")
        var yaml = "defaults: {snapshot: snap}\njobs:\n"
        for i in 1...6 { yaml += "  - {name: j\(i), command: \"echo \(i) > /root/f && cat /root/f\"}\n" }
        try yaml.write(toFile: dir + "/s.yaml", atomically: true, encoding: .utf8)
        let r = try batch([dir + "/s.yaml", "--parallel", "2", "--jsonl", dir + "/s.jsonl"], timeout: Fixture.inLab ? 900 : 120)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        let recs = try records(dir + "/s.jsonl")
        #expect(recs.count == 6 && recs.values.allSatisfy { $0["result"] as? String == "passed" }, "\(recs)")
        try "jobs:\n  - {name: a, snapshot: nowhere, command: \"true\"}\n".write(toFile: dir + "/bad.yaml", atomically: true, encoding: .utf8)
        let bad = try batch([dir + "/bad.yaml"], timeout: 60)
        #expect(bad.status == 2 && bad.stderr.contains("bad.yaml:2:25: job 'a': 'snapshot' \(dir)/nowhere is not a snapshot directory"), "\(bad.stderr)")
    }

    @Test("disk_size grows a job's root file system")
    func diskSizeKey() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let check = "test $(df -k / | tail -1 | awk '{print $2}') -gt 1900000"
        try "jobs:\n  - {name: grown, disk_size: \"2G\", command: \"\(check)\"}\n  - {name: plain, expected_exit: 1, command: \"\(check)\"}\n"
            .write(toFile: dir + "/d.yaml", atomically: true, encoding: .utf8)
        let r = try batch([dir + "/d.yaml", "--jsonl", dir + "/d.jsonl"], timeout: Fixture.inLab ? 900 : 120)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        let recs = try records(dir + "/d.jsonl")
        #expect(recs["grown"]?["result"] as? String == "passed", "\(recs)")
        #expect(recs["plain"]?["result"] as? String == "passed", "\(recs)")
    }

    @Test("an invalid job file is rejected with file:line:column before anything runs", arguments: 0..<invalidFiles.count)
    func invalidFile(_ index: Int) throws {
        let (_, text, expected) = Self.invalidFiles[index]
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try text.write(toFile: dir + "/bad.yaml", atomically: true, encoding: .utf8)
        let r = try batch([dir + "/bad.yaml", "--jsonl", dir + "/out.jsonl", "--junit", dir + "/out.xml"], timeout: 60)
        #expect(r.status == 2, "\(r.stderr)")
        #expect(r.stderr.contains(expected), "wanted \(expected) in:\n\(r.stderr)")
        #expect(r.stderr.contains("nothing was run"))
        #expect(!FileManager.default.fileExists(atPath: dir + "/out.jsonl"), "output opened although the file is invalid")
        #expect(!FileManager.default.fileExists(atPath: dir + "/out.xml"))
        #expect(r.seconds < 10)
    }

    @Test("every problem of a job file is reported at once")
    func severalProblems() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "jobs:\n  - name: a\n    command: \"true\"\n    cpus: 0\n  - name: b\n    memory: lots\n".write(toFile: dir + "/bad.yaml", atomically: true, encoding: .utf8)
        let r = try batch([dir + "/bad.yaml"], timeout: 60)
        #expect(r.status == 2)
        #expect(r.stderr.contains("bad.yaml:4:11: job 'a': 'cpus' must be a whole number from 1 to 32"), "\(r.stderr)")
        #expect(r.stderr.contains("bad.yaml:6:13: job 'b': 'memory' must be a whole number of MiB >= 32"), "\(r.stderr)")
        #expect(r.stderr.contains("bad.yaml:5:5: job 'b': missing 'command'"), "\(r.stderr)")
        #expect(r.stderr.contains("(3 problems)"), "\(r.stderr)")
    }

    // MARK: - Reports

    @Test("small.yaml: every job meets its expectation; JUnit and JSON Lines match", arguments: [1, 2])
    func small(parallel: Int) throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = try batch([Self.jobsDirectory + "/small.yaml", "--parallel", "\(parallel)",
                           "--junit", dir + "/small.xml", "--jsonl", dir + "/small.jsonl"])
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        let names = ["hello", "exit-3-expected", "timeout-expected", "env-var", "copy-in", "killed-by-signal"]
        let report = try junit(dir + "/small.xml")
        #expect(report.tests == names.count)
        #expect(report.failures == 0 && report.errors == 0 && report.skipped == 0)
        #expect(report.cases == names)
        let recs = try records(dir + "/small.jsonl")
        #expect(Set(recs.keys) == Set(names))
        for (name, rec) in recs {
            #expect(rec["result"] as? String == "passed", "\(name): \(rec)")
            #expect(rec["passed"] as? Bool == true)
            #expect(rec["attempts"] as? Int == 1)
            #expect((rec["duration_s"] as? Double ?? 0) > 0)
            #expect((rec["timings"] as? [String: Any])?["total_ms"] != nil)
        }
        #expect(recs["hello"]?["stdout_tail"] as? String == "hello from a micro-VM\n")
        #expect(recs["exit-3-expected"]?["exit_status"] as? Int == 3)
        #expect(recs["exit-3-expected"]?["stderr_tail"] as? String == "about to fail\n")
        #expect(recs["timeout-expected"]?["exit_status"] as? Int == 124)
        #expect(recs["killed-by-signal"]?["exit_status"] as? Int == 137)
        #expect(recs["copy-in"]?["stdout_tail"] as? String == "hello from the host\n")
        #expect(r.stdout.contains("6 jobs: 6 passed, 0 failed, 0 errors"), "\(r.stdout)")
    }

    @Test("--shard K/N in N processes at once splits a job file the same way everywhere; report merge puts the shards back together")
    func shardsMerge() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let names = ["hello", "exit-3-expected", "timeout-expected", "env-var", "copy-in", "killed-by-signal"]
        // Three shards as three processes, at the same time (three CI machines).
        let shards = Mutex<[Int: Fixture.Result]>([:])
        DispatchQueue.concurrentPerform(iterations: 3) { i in
            let r = try? batch([Self.jobsDirectory + "/small.yaml", "--shard", "\(i + 1)/3", "--parallel", "1", "--jsonl", dir + "/s\(i + 1).jsonl"])
            shards.withLock { $0[i + 1] = r }
        }
        for k in 1 ... 3 {
            let r = try #require(shards.withLock { $0[k] }, "shard \(k) did not run")
            #expect(r.status == 0, "shard \(k): \(r.stdout)\n\(r.stderr)")
            #expect(r.stderr.contains("shard \(k)/3 of \(Self.jobsDirectory)/small.yaml: 2 of its 6 jobs"), "\(r.stderr)")
            // Positions k-1 and k-1+3 of the file, keeping their positions.
            let recs = try records(dir + "/s\(k).jsonl")
            #expect(Set(recs.keys) == [names[k - 1], names[k + 2]], "shard \(k): \(recs.keys.sorted())")
            #expect(recs[names[k - 1]]?["index"] as? Int == k - 1)
            #expect(recs[names[k - 1]]?["shard"] as? String == "\(k)/3" && recs[names[k - 1]]?["jobs_in_file"] as? Int == 6)
        }
        let merge = try Fixture.run(Fixture.sandboxBinary, ["report", "merge", dir + "/s2.jsonl", dir + "/s1.jsonl", dir + "/s3.jsonl",
                                                            "--jsonl", dir + "/all.jsonl", "--junit", dir + "/all.xml", "--suite", "small"])
        #expect(merge.status == 0, "\(merge.stdout)\n\(merge.stderr)")
        #expect(merge.stdout == "6 jobs from 3 reports: 6 passed, 0 not\n", "\(merge.stdout)")
        let report = try junit(dir + "/all.xml")
        #expect(report.tests == 6 && report.failures == 0 && report.errors == 0)
        #expect(report.cases == names)
        let order = try String(contentsOfFile: dir + "/all.jsonl", encoding: .utf8).split(separator: "\n").map { line in
            (try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])?["name"] as? String ?? "?"
        }
        #expect(order == names)

        // Incomplete, doubled or foreign reports are refused, and nothing is written.
        func refused(_ reports: [String], _ message: String) throws {
            let r = try Fixture.run(Fixture.sandboxBinary, ["report", "merge"] + reports.map { dir + "/" + $0 } + ["--junit", dir + "/bad.xml"])
            #expect(r.status == 2, "\(reports): \(r.status) \(r.stdout) \(r.stderr)")
            #expect(r.stderr.contains(message), "\(reports): \(r.stderr)")
            #expect(!FileManager.default.fileExists(atPath: dir + "/bad.xml"))
        }
        try refused(["s1.jsonl", "s3.jsonl"], "2 of 6 jobs have no record: shard 2/3 missing or unfinished")
        try refused(["s1.jsonl", "s1.jsonl", "s2.jsonl", "s3.jsonl"], "is also in \(dir)/s1.jsonl")
        try "{\"name\": 1}\nnot json\n".write(toFile: dir + "/junk.jsonl", atomically: true, encoding: .utf8)
        try refused(["junk.jsonl"], "junk.jsonl:2: not a sandbox batch record (not JSON)")
        let badShard = try batch([Self.jobsDirectory + "/small.yaml", "--shard", "4/3"])
        #expect(badShard.status == 2 && badShard.stderr.contains("want K/N with 1 <= K <= N"), "\(badShard.stderr)")
    }

    @Test("failures, errors and retries are reported; XML special characters are escaped")
    func failuresAndRetries() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try """
        jobs:
          - name: "fails <&> \\"quoted\\""
            command: [sh, -c, "printf '<b>&amp;\\\\001</b>' >&2; exit 1"]
            retries: 1
          - name: flaky
            command: "if [ -e /tmp/x ]; then exit 0; fi; exit 1"
            retries: 2
          - name: bad-image
            command: "true"
            image: /no/such/image.ext4
          - name: slow
            command: [sleep, "30"]
            timeout: 1
        """.write(toFile: dir + "/f.yaml", atomically: true, encoding: .utf8)
        let r = try batch([dir + "/f.yaml", "--parallel", "2", "--junit", dir + "/f.xml", "--jsonl", dir + "/f.jsonl"])
        #expect(r.status == 1, "\(r.stdout)\n\(r.stderr)")
        let report = try junit(dir + "/f.xml")
        #expect(report.tests == 4)
        #expect(report.failed.sorted() == ["fails <&> \"quoted\"", "flaky"])
        #expect(report.errored.sorted() == ["bad-image", "slow"])
        let recs = try records(dir + "/f.jsonl")
        #expect(recs["fails <&> \"quoted\""]?["attempts"] as? Int == 2)
        #expect(recs["flaky"]?["attempts"] as? Int == 3)
        #expect(recs["bad-image"]?["exit_status"] as? Int == 125)
        #expect(recs["slow"]?["result"] as? String == "error")
        #expect(recs["slow"]?["exit_status"] as? Int == 124)
    }

    // MARK: - Determinism

    @Test("a 20-job mixed batch gives the same verdict per job at --parallel 1 and 2")
    func determinism() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let gen = try Fixture.run("/bin/sh", [Self.jobsDirectory + "/generate-mixed.sh", "20"])
        #expect(gen.status == 0)
        try gen.stdoutData.write(to: URL(fileURLWithPath: dir + "/mixed-20.yaml"))
        func expected(_ name: String) -> String {
            if name.hasPrefix("fail-") { return "failed" }
            if name.hasPrefix("timeout-unexpected-") { return "error" }
            return "passed"
        }
        var verdicts: [[String: String]] = []
        for parallel in [1, 2] {
            let jsonl = dir + "/p\(parallel).jsonl"
            let r = try batch([dir + "/mixed-20.yaml", "--parallel", "\(parallel)", "--jsonl", jsonl, "--junit", dir + "/p\(parallel).xml"])
            #expect(r.status == 1, "\(r.stdout)\n\(r.stderr)")
            let recs = try records(jsonl)
            #expect(recs.count == 20)
            let v = recs.mapValues { $0["result"] as? String ?? "?" }
            for (name, result) in v { #expect(result == expected(name), "\(name) at --parallel \(parallel): \(recs[name] ?? [:])") }
            for (name, rec) in recs where name.hasPrefix("big-output-") {
                // 5 MB of output, cut at the 1 MiB output limit; only the 4 KiB tail is kept.
                #expect(rec["stdout_bytes"] as? Int == 1 << 20)
                #expect(rec["output_truncated"] as? Bool == true)
                #expect(rec["stdout_tail"] as? String == String(repeating: "x", count: 4096))
            }
            let report = try junit(dir + "/p\(parallel).xml")
            #expect(report.tests == 20 && report.failures == 2 && report.errors == 2, "\(report)")
            verdicts.append(v)
        }
        #expect(verdicts[0] == verdicts[1])
    }

    // MARK: - Signals

    @Test("SIGINT stops the batch: exit 130, finished results kept, no VMM left behind")
    func sigint() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var yaml = "jobs:\n  - {name: quick-1, command: \"true\"}\n  - {name: quick-2, command: \"true\"}\n"
        for i in 1...4 { yaml += "  - {name: sleep-\(i), command: [sleep, \"20\"]}\n" }
        try yaml.write(toFile: dir + "/s.yaml", atomically: true, encoding: .utf8)
        let overlays = Fixture.cacheDirectory + "/overlays"
        let overlaysBefore = Set((try? FileManager.default.contentsOfDirectory(atPath: overlays)) ?? [])
        // Other suites run sandboxes at the same time, from the same build. This batch's
        // VMMs are told apart by a path only they use: a link to the real VMM in the
        // scratch directory, passed as $SANDBOX_VMM (argv[0] of each VMM is that path).
        let realVMM = URL(fileURLWithPath: Fixture.sandboxBinary).resolvingSymlinksInPath().deletingLastPathComponent().path + "/sandbox-vmm"
        let vmmPath = dir + "/sandbox-vmm"
        try FileManager.default.createSymbolicLink(atPath: vmmPath, withDestinationPath: realVMM)
        let vmmPattern = "^" + NSRegularExpression.escapedPattern(for: vmmPath) + " run"

        let p = Process()
        p.executableURL = URL(fileURLWithPath: Fixture.sandboxBinary)
        p.arguments = ["batch", dir + "/s.yaml", "--parallel", "2", "--jsonl", dir + "/s.jsonl", "--junit", dir + "/s.xml"]
        p.environment = ProcessInfo.processInfo.environment.merging(["SANDBOX_VMM": vmmPath]) { $1 }
        p.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        p.standardError = FileHandle(forWritingAtPath: "/dev/null")
        try p.run()
        // Wait for the two quick jobs, then give the sleepers time to boot.
        let deadline = Date().addingTimeInterval(Fixture.inLab ? 600 : 120)
        while Date() < deadline && p.isRunning {
            let lines = (try? String(contentsOfFile: dir + "/s.jsonl", encoding: .utf8))?.split(separator: "\n").count ?? 0
            if lines >= 2 { break }
            usleep(100_000)
        }
        Thread.sleep(forTimeInterval: 2)
        #expect(p.isRunning)
        // The pattern does find this batch's VMMs while they run (else the check below proves nothing).
        let running = try Fixture.run("/usr/bin/pgrep", ["-f", vmmPattern])
        #expect(!running.stdout.isEmpty, "no VMM of this batch found by \(vmmPattern)")
        let signalled = Date()
        p.interrupt()
        p.waitUntilExit()
        let stopSeconds = Date().timeIntervalSince(signalled)

        #expect(p.terminationReason == .exit)
        #expect(p.terminationStatus == 130)
        if !Fixture.inLab { #expect(stopSeconds < 10, "took \(stopSeconds) s to stop") }
        let recs = try records(dir + "/s.jsonl")
        #expect(recs["quick-1"]?["result"] as? String == "passed")
        #expect(recs["quick-2"]?["result"] as? String == "passed")
        let interrupted = recs.values.filter { $0["result"] as? String == "interrupted" }.count
        #expect(interrupted == 2, "\(recs)")
        #expect(recs.count == 4, "jobs started after SIGINT: \(recs.keys.sorted())")
        let report = try junit(dir + "/s.xml")
        #expect(report.tests == 4 && report.skipped == 2 && report.failures == 0 && report.errors == 0, "\(report)")

        Thread.sleep(forTimeInterval: 0.5)
        let left = try Fixture.run("/usr/bin/pgrep", ["-f", vmmPattern])
        #expect(left.stdout.isEmpty, "VMM processes left: \(left.stdout)")
        // Other suites' overlays exist for an instant (each is unlinked once open); a leaked one stays.
        let seen = Set((try? FileManager.default.contentsOfDirectory(atPath: overlays)) ?? [])
        usleep(500_000)
        let overlaysAfter = seen.intersection((try? FileManager.default.contentsOfDirectory(atPath: overlays)) ?? [])
        #expect(overlaysAfter.subtracting(overlaysBefore).isEmpty, "overlay files left: \(overlaysAfter.subtracting(overlaysBefore))")
    }
}
