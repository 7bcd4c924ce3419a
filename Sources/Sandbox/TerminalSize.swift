import Synchronization

/// The window size of a run's terminal (`SandboxConfiguration.terminal`): set it when
/// the host's terminal changes size (on SIGWINCH) and the guest's terminal follows (its
/// foreground process group gets SIGWINCH).
public final class TerminalSize: Sendable {
    private struct State {
        var rows: UInt16
        var columns: UInt16
        var onChange: (@Sendable (UInt16, UInt16) -> Void)?
    }
    private let state: Mutex<State>

    public init(rows: UInt16, columns: UInt16) {
        state = Mutex(State(rows: rows, columns: columns))
    }

    public var rows: UInt16 { state.withLock { $0.rows } }
    public var columns: UInt16 { state.withLock { $0.columns } }

    /// A new size; passed on to the guest's terminal.
    public func update(rows: UInt16, columns: UInt16) {
        let handler = state.withLock { s -> (@Sendable (UInt16, UInt16) -> Void)? in
            s.rows = rows
            s.columns = columns
            return s.onChange
        }
        handler?(rows, columns)
    }

    /// Calls `handler` with the size now, and on every later change until replaced.
    func follow(_ handler: (@Sendable (UInt16, UInt16) -> Void)?) {
        let now = state.withLock { s -> (UInt16, UInt16) in
            s.onChange = handler
            return (s.rows, s.columns)
        }
        handler?(now.0, now.1)
    }
}
