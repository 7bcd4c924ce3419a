extension ExecResult {
    /// A result built by hand: for fake runners injected into a `SandboxPool` and for
    /// tests of code that reports results (failure messages, CI summaries).
    public init(command: [String], outcome: Outcome, stdout: [UInt8] = [], stderr: [UInt8] = [],
                timings: PhaseTimings = PhaseTimings(), consoleTail: String = "") {
        self.command = command
        self.outcome = outcome
        self.stdout = stdout
        self.stderr = stderr
        self.timings = timings
        self.consoleTail = consoleTail
    }
}
