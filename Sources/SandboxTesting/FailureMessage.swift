import Foundation
import Sandbox

/// Builds the text reported when a sandboxed command did not end as expected. Pure, so
/// the Swift Testing and XCTest helpers report the same thing and tests can check it.
///
///     sandbox: `sh -c 'exit 3'` exited with status 3; expected exit status 0
///       duration: 512 ms
///       stderr (last 20 of 45 lines):
///         | ...
///       console (last 20 lines):          (guest crashes, OOM, sandbox failures)
///         | ...
public enum SandboxFailureMessage {
    /// Lines of stderr (and of stdout, when stderr is empty) shown.
    public static let outputLines = 20
    /// Lines of the guest console shown.
    public static let consoleLines = 20

    /// - Parameters:
    ///   - result: the run.
    ///   - expected: what the caller wanted, e.g. "exit status 0" or "timed out".
    public static func make(_ result: ExecResult, expected: String) -> String {
        var out = "sandbox: `\(displayCommand(result.command))` \(result.outcome.description); expected \(expected)"
        if result.timings.total > 0 { out += "\n  duration: \(Int(result.timings.total.rounded())) ms" }
        out += section("stderr", result.stderrText, limit: outputLines, emptyNote: "(empty)")
        if result.stderr.isEmpty && !result.stdout.isEmpty {
            out += section("stdout", result.stdoutText, limit: outputLines, emptyNote: nil)
        }
        return out + consoleSection(result)
    }

    /// The text reported when a stream's output is not what was expected: the command
    /// and outcome, what was expected and what came (each as a tail), and the other
    /// stream's tail (the console too, after a crash or a sandbox failure).
    public static func outputMismatch(_ result: ExecResult, stream: String, expected: String) -> String {
        let got = stream == "stdout" ? result.stdoutText : result.stderrText
        var out = "sandbox: `\(displayCommand(result.command))` \(result.outcome.description); its \(stream) is not what was expected"
        if result.timings.total > 0 { out += "\n  duration: \(Int(result.timings.total.rounded())) ms" }
        out += section("expected \(stream)", expected, limit: outputLines, emptyNote: "(empty)")
        out += section("actual \(stream)", got, limit: outputLines, emptyNote: "(empty)")
        let other = stream == "stdout" ? "stderr" : "stdout"
        out += section(other, stream == "stdout" ? result.stderrText : result.stdoutText, limit: outputLines, emptyNote: nil)
        return out + consoleSection(result)
    }

    /// The expectation text for an exit status.
    public static func expectedExit(_ code: Int32) -> String { "exit status \(code)" }

    /// The last `count` lines of `text` (a trailing newline does not count as a line)
    /// and the total number of lines. Lines end at any newline: the guest console's
    /// "\r\n" is one `Character` in Swift, so splitting on "\n" alone would not see it.
    public static func tail(_ text: String, lines count: Int) -> (lines: [Substring], total: Int) {
        var all = text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline)
        if all.last == "" { all.removeLast() }
        return (Array(all.suffix(count)), all.count)
    }

    /// `command` as a shell would take it back: words with spaces or quotes are quoted.
    public static func displayCommand(_ command: [String]) -> String {
        command.map { word in
            let safe = !word.isEmpty && word.allSatisfy { $0.isLetter || $0.isNumber || "-_./=:,+@%".contains($0) }
            return safe ? word : "'" + word.replacingOccurrences(of: "'", with: "'\\''") + "'"
        }.joined(separator: " ")
    }

    /// The console's tail, for outcomes it explains (a crash, OOM, a sandbox failure).
    private static func consoleSection(_ result: ExecResult) -> String {
        switch result.outcome {
        case .guestCrashed(let tail):
            return section("console", tail.isEmpty ? result.consoleTail : tail, limit: consoleLines, emptyNote: "(no console output)")
        case .outOfMemory, .infrastructureError:
            return section("console", result.consoleTail, limit: consoleLines, emptyNote: nil)
        case .exited, .signalled, .timedOut:
            return ""
        }
    }

    private static func section(_ name: String, _ text: String, limit: Int, emptyNote: String?) -> String {
        let (lines, total) = tail(text, lines: limit)
        if lines.isEmpty { return emptyNote.map { "\n  \(name): \($0)" } ?? "" }
        let header = total > lines.count ? "\(name) (last \(lines.count) of \(total) lines)" : "\(name):"
        return "\n  \(header.hasSuffix(":") ? header : header + ":")" + lines.map { "\n    | \($0)" }.joined()
    }
}
