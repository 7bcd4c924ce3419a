import Foundation
import Sandbox

/// Merges the JSON Lines reports of a job file's shards (`sandbox batch --shard K/N
/// --jsonl ...` on N machines) into one JSON Lines and one JUnit report, in file order
/// (`sandbox report merge`).
public enum BatchMerge {
    public struct Merged: Sendable {
        /// Every record, one per line, in file order (each line as its shard wrote it).
        public var jsonl: String
        public var junit: String
        public var jobs: Int
        public var passed: Int
        /// Jobs that did not pass, by name.
        public var notPassed: [String]
    }

    /// - Parameters:
    ///   - files: each report's display name and text.
    ///   - suite: the JUnit suite name.
    /// - Throws: a diagnostic per problem: a line that is no record, a job reported twice,
    ///   shards that disagree on the file, or jobs of the file with no record (naming the
    ///   shards that are missing).
    public static func merge(_ files: [(name: String, text: String)], suite: String) throws(BatchFileError) -> Merged {
        var problems: [BatchFileDiagnostic] = []
        var rows: [(record: BatchReport.Record, line: Substring, file: String)] = []
        let decoder = JSONDecoder()
        for (name, text) in files {
            for (n, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() where !line.trimmingCharacters(in: .whitespaces).isEmpty {
                do { rows.append((try decoder.decode(BatchReport.Record.self, from: Data(line.utf8)), line, name)) } catch {
                    problems.append(BatchFileDiagnostic(file: name, line: n + 1, column: 0, message: "not a sandbox batch record (\(Self.reason(error)))"))
                }
            }
        }
        var byIndex: [Int: (name: String, file: String)] = [:]
        for r in rows {
            if let seen = byIndex[r.record.index] {
                problems.append(BatchFileDiagnostic(file: r.file, line: 0, column: 0,
                    message: "job #\(r.record.index + 1) (\(r.record.name)) is also in \(seen.file): the same shard merged twice, or reports of different job files"))
            }
            byIndex[r.record.index] = (r.record.name, r.file)
        }
        // Shards say how many jobs the file has and how it was split: every job must be there.
        let shapes = Set(rows.compactMap { r in r.record.jobs_in_file.map { "\($0) " + (r.record.shard?.split(separator: "/").last.map(String.init) ?? "?") } })
        if shapes.count > 1 {
            problems.append(BatchFileDiagnostic(file: "merge", line: 0, column: 0,
                message: "the reports disagree on the job file (jobs in file / shard count: \(shapes.sorted().joined(separator: ", "))): reports of different files or splits"))
        } else if let total = rows.compactMap(\.record.jobs_in_file).first,
                  let count = rows.compactMap({ $0.record.shard?.split(separator: "/").last.flatMap { Int($0) } }).first {
            let missing = (0 ..< total).filter { byIndex[$0] == nil }
            if !missing.isEmpty {
                let shards = Set(missing.map { $0 % count + 1 }).sorted().map { "\($0)/\(count)" }
                problems.append(BatchFileDiagnostic(file: "merge", line: 0, column: 0,
                    message: "\(missing.count) of \(total) jobs have no record: shard\(shards.count == 1 ? "" : "s") \(shards.joined(separator: ", ")) missing or unfinished"))
            }
        }
        guard problems.isEmpty else { throw BatchFileError(diagnostics: problems) }
        let sorted = rows.sorted { $0.record.index < $1.record.index }
        let cases = sorted.map { BatchReport.JUnitCase($0.record) }
        let seconds = sorted.reduce(0) { $0 + $1.record.duration_s }
        return Merged(jsonl: sorted.map { $0.line + "\n" }.joined(),
                      junit: BatchReport.junit(cases: cases, suite: suite, totalSeconds: seconds),
                      jobs: sorted.count, passed: sorted.filter(\.record.passed).count,
                      notPassed: sorted.filter { !$0.record.passed }.map(\.record.name))
    }

    private static func reason(_ error: any Error) -> String {
        if case DecodingError.keyNotFound(let key, _)? = error as? DecodingError { return "no \"\(key.stringValue)\"" }
        if case DecodingError.typeMismatch(_, let c)? = error as? DecodingError { return "\(c.codingPath.map(\.stringValue).joined(separator: ".")) has the wrong type" }
        return "not JSON"
    }
}
