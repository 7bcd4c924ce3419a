extension ExecResult {
    /// A result built by hand, with zero timings (set `timings` afterwards if needed): for
    /// fake runners injected into a `SandboxPool` and for tests of code that reports
    /// results (failure messages, CI summaries).
    public init(command: [String], outcome: Outcome, stdout: [UInt8] = [], stderr: [UInt8] = [], consoleTail: String = "") {
        self.init(command: command, outcome: outcome, stdout: stdout, stderr: stderr, timings: PhaseTimings(), consoleTail: consoleTail)
    }
}
