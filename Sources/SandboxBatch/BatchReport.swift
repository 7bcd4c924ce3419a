import Sandbox
import Foundation

/// Renders batch results: JSON Lines records, JUnit XML, and the summary table.
public enum BatchReport {
    // MARK: - JSON Lines

    struct Record: Codable {
        struct Timings: Codable {
            var vmm_start_ms, kernel_boot_ms, agent_ready_ms, exec_ms, teardown_ms, total_ms: Double
            /// Whether the job's VM was restored from a snapshot, and the restore's time.
            var restored: Bool
            var restore_ms: Double
            /// Restored: pages of the snapshot's working set copied in ahead of the guest.
            var prefault_pages: UInt64?
            /// When it booted instead: why.
            var cold_reason: String?
        }
        var name: String
        var index: Int
        var result: String
        var passed: Bool
        var outcome: String
        var exit_status: Int32
        var expected: String
        var attempts: Int
        var duration_s: Double
        var stdout_tail: String
        var stderr_tail: String
        var stdout_bytes: UInt64
        var stderr_bytes: UInt64
        var output_truncated: Bool
        var timings: Timings
        /// "exit", "signal", "timeout", "out-of-memory", "crash" or "sandbox" (JUnit's type).
        var outcome_kind: String?
        /// The guest console's tail, for errors (crashes, sandbox failures).
        var console_tail: String?
        /// With `--shard K/N`: "K/N", and how many jobs the whole file has (so that a merge
        /// can tell whether a shard is missing).
        var shard: String?
        var jobs_in_file: Int?
    }

    /// Where a batch ran from, for its records: the shard and the file's job count.
    public struct Origin: Sendable {
        public var shard: BatchShard?
        public var jobsInFile: Int
        public init(shard: BatchShard?, jobsInFile: Int) { self.shard = shard; self.jobsInFile = jobsInFile }
    }

    /// One JSON object (no newline) describing `result`.
    public static func jsonLine(_ r: BatchResult, origin: Origin? = nil) -> String {
        func round3(_ x: Double) -> Double { (x * 1000).rounded() / 1000 }
        let t = r.timings
        let record = Record(name: r.name, index: r.index, result: r.verdict.rawValue, passed: r.passed, outcome: r.outcome.description,
                            exit_status: r.exitStatus, expected: r.expectation.description, attempts: r.attempts,
                            duration_s: round3(r.duration), stdout_tail: r.stdoutTailText, stderr_tail: r.stderrTailText,
                            stdout_bytes: r.stdoutBytes, stderr_bytes: r.stderrBytes, output_truncated: r.outputTruncated,
                            timings: .init(vmm_start_ms: round3(t.vmmStart), kernel_boot_ms: round3(t.kernelBoot),
                                           agent_ready_ms: round3(t.agentReady), exec_ms: round3(t.exec),
                                           teardown_ms: round3(t.teardown), total_ms: round3(t.total),
                                           restored: t.restored, restore_ms: round3(t.restore),
                                           prefault_pages: t.restored ? t.prefaultPages : nil, cold_reason: t.coldReason),
                            outcome_kind: failureType(r.outcome), console_tail: r.consoleTail.isEmpty ? nil : r.consoleTail,
                            shard: origin?.shard?.description, jobs_in_file: origin?.shard == nil ? nil : origin?.jobsInFile)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return (try? encoder.encode(record)).map { String(decoding: $0, as: UTF8.self) } ?? "{\"name\":\"\(r.name)\",\"result\":\"encoding failed\"}"
    }

    // MARK: - JUnit XML

    /// One `<testcase>`: what JUnit needs of a result (from a run, or from a JSON Lines
    /// record when shards are merged).
    struct JUnitCase {
        var name: String
        var index: Int
        var seconds: Double
        var verdict: BatchVerdict
        var message: String
        var type: String
        var detail: String
        var stdoutTail: String
        var stderrTail: String

        init(_ r: BatchResult) {
            name = r.name
            index = r.index
            seconds = r.duration
            verdict = r.verdict
            message = "\(r.outcome) (expected \(r.expectation)); attempts: \(r.attempts)"
            type = failureType(r.outcome)
            detail = r.verdict == .error && !r.consoleTail.isEmpty ? r.consoleTail : r.stderrTailText
            stdoutTail = r.stdoutTailText
            stderrTail = r.stderrTailText
        }

        init(_ r: Record) {
            name = r.name
            index = r.index
            seconds = r.duration_s
            verdict = BatchVerdict(rawValue: r.result) ?? .error
            message = "\(r.outcome) (expected \(r.expected)); attempts: \(r.attempts)"
            type = r.outcome_kind ?? "exit"
            detail = verdict == .error ? (r.console_tail ?? r.stderr_tail) : r.stderr_tail
            stdoutTail = r.stdout_tail
            stderrTail = r.stderr_tail
        }
    }

    /// A JUnit XML document for `results`: one `<testsuite>` named `suite`. Unmet
    /// exits and signals are `<failure>`; timeouts, crashes and sandbox errors are
    /// `<error>`; interrupted jobs are `<skipped>`.
    public static func junit(_ results: [BatchResult], suite: String, totalSeconds: Double) -> String {
        junit(cases: results.map(JUnitCase.init), suite: suite, totalSeconds: totalSeconds)
    }

    static func junit(cases: [JUnitCase], suite: String, totalSeconds: Double) -> String {
        let failures = cases.filter { $0.verdict == .failed }.count
        let errors = cases.filter { $0.verdict == .error }.count
        let skipped = cases.filter { $0.verdict == .interrupted }.count
        let time = String(format: "%.3f", totalSeconds)
        let counts = "tests=\"\(cases.count)\" failures=\"\(failures)\" errors=\"\(errors)\" skipped=\"\(skipped)\" time=\"\(time)\""
        var x = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
        x += "<testsuites name=\"\(xmlEscape(suite))\" \(counts)>\n"
        x += "  <testsuite name=\"\(xmlEscape(suite))\" \(counts)>\n"
        for c in cases.sorted(by: { $0.index < $1.index }) {
            x += "    <testcase name=\"\(xmlEscape(c.name))\" classname=\"\(xmlEscape(suite))\" time=\"\(String(format: "%.3f", c.seconds))\">\n"
            let message = xmlEscape(c.message)
            switch c.verdict {
            case .passed: break
            case .failed:
                x += "      <failure message=\"\(message)\" type=\"\(c.type)\">\(xmlEscape(c.detail))</failure>\n"
            case .error:
                x += "      <error message=\"\(message)\" type=\"\(c.type)\">\(xmlEscape(c.detail))</error>\n"
            case .interrupted:
                x += "      <skipped message=\"interrupted\"/>\n"
            }
            if !c.stdoutTail.isEmpty { x += "      <system-out>\(xmlEscape(c.stdoutTail))</system-out>\n" }
            if !c.stderrTail.isEmpty { x += "      <system-err>\(xmlEscape(c.stderrTail))</system-err>\n" }
            x += "    </testcase>\n"
        }
        x += "  </testsuite>\n</testsuites>\n"
        return x
    }

    static func failureType(_ o: Outcome) -> String {
        switch o {
        case .exited: return "exit"
        case .signalled: return "signal"
        case .timedOut: return "timeout"
        case .outOfMemory: return "out-of-memory"
        case .guestCrashed: return "crash"
        case .infrastructureError: return "sandbox"
        }
    }

    /// Escapes text for XML attributes and content; drops characters XML 1.0 cannot carry.
    public static func xmlEscape(_ s: String) -> String {
        var out = ""
        out.reserveCapacity(s.utf8.count)
        for u in s.unicodeScalars {
            switch u {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&apos;"
            case "\t", "\n", "\r": out.unicodeScalars.append(u)
            default:
                let v = u.value
                if v < 0x20 || (0xD800...0xDFFF).contains(v) || v == 0xFFFE || v == 0xFFFF { out += "\u{FFFD}" } else { out.unicodeScalars.append(u) }
            }
        }
        return out
    }

    /// Writes `text` to `path` atomically (temporary file in the same directory, then rename).
    public static func writeAtomically(_ text: String, to path: String) throws {
        let tmp = path + ".tmp-\(getpid())"
        guard FileManager.default.createFile(atPath: tmp, contents: Data(text.utf8)) else {
            throw SandboxError.invalidInput("cannot write \(tmp)")
        }
        guard rename(tmp, path) == 0 else {
            let e = String(cString: strerror(errno))
            unlink(tmp)
            throw SandboxError.invalidInput("cannot rename \(tmp) to \(path): \(e)")
        }
    }

    // MARK: - Summary

    /// The summary table: every job when there are at most `fullTableLimit`, else only
    /// the jobs that did not pass; then the totals.
    public static func summary(_ results: [BatchResult], jobCount: Int, seconds: Double, fullTableLimit: Int = 40) -> String {
        let sorted = results.sorted { $0.index < $1.index }
        let shown = sorted.count <= fullTableLimit ? sorted : sorted.filter { !$0.passed }
        var lines: [String] = []
        if !shown.isEmpty {
            let nameWidth = min(max(4, shown.map(\.name.count).max() ?? 4), 48)
            func pad(_ s: String, _ w: Int) -> String { s.count >= w ? s : s + String(repeating: " ", count: w - s.count) }
            func cut(_ s: String) -> String { s.count <= nameWidth ? s : String(s.prefix(nameWidth - 1)) + "~" }
            lines.append("\(pad("NAME", nameWidth))  \(pad("RESULT", 11))  \(pad("EXIT", 4))  \(pad("ATTEMPTS", 8))  TIME")
            for r in shown {
                var line = "\(pad(cut(r.name), nameWidth))  \(pad(r.verdict.rawValue, 11))  \(pad(String(r.exitStatus), 4))  "
                line += "\(pad(String(r.attempts), 8))  \(String(format: "%.2fs", r.duration))"
                if !r.passed && r.verdict != .interrupted { line += "  \(r.outcome) (expected \(r.expectation))" }
                lines.append(line)
            }
            if shown.count < sorted.count { lines.append("(\(sorted.count - shown.count) passed jobs not listed)") }
        }
        lines.append(totals(results, jobCount: jobCount, seconds: seconds))
        return lines.joined(separator: "\n")
    }

    /// `200 jobs: 180 passed, 15 failed, 5 errors in 95.2 s (2.10 jobs/s)`.
    public static func totals(_ results: [BatchResult], jobCount: Int, seconds: Double) -> String {
        func n(_ v: BatchVerdict) -> Int { results.filter { $0.verdict == v }.count }
        var parts = ["\(n(.passed)) passed", "\(n(.failed)) failed", "\(n(.error)) errors"]
        if n(.interrupted) > 0 { parts.append("\(n(.interrupted)) interrupted") }
        if results.count < jobCount { parts.append("\(jobCount - results.count) not run") }
        let finished = results.filter { $0.verdict != .interrupted }.count
        let rate = seconds > 0 ? Double(finished) / seconds : 0
        return "\(jobCount) jobs: \(parts.joined(separator: ", ")) in \(String(format: "%.1f", seconds)) s (\(String(format: "%.2f", rate)) jobs/s)"
    }
}
