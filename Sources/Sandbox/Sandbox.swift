import Foundation
import SandboxCore
import SystemShims

/// The public async entry points. Each run boots its own VM in its own VMM process;
/// the blocking work happens on a dedicated thread, never on the cooperative pool.
public enum Sandbox {
    /// Runs `command` in a fresh sandbox and returns its typed result. Cancelling the
    /// calling task stops the VM (the outcome is then `.infrastructureError(.cancelled)`).
    public static func run(_ command: [String], configuration: SandboxConfiguration = SandboxConfiguration(),
                           stdin: [UInt8]? = nil) async -> ExecResult {
        let token = CancelToken()
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (cont: CheckedContinuation<ExecResult, Never>) in
                do {
                    try NativeThread(name: "sandbox-run") {
                        cont.resume(returning: SandboxRunner.run(command, configuration: configuration, stdin: stdin, cancel: token))
                    }.detach()
                } catch {
                    cont.resume(returning: ExecResult(command: command, outcome: .infrastructureError(SandboxError(.host, "cannot start a thread for the run", underlying: error)), stdout: [], stderr: [],
                                                      timings: PhaseTimings(), consoleTail: ""))
                }
            }
        } onCancel: {
            token.cancel()
        }
    }

    /// An event of a streaming run.
    public enum StreamEvent: Sendable {
        case output(OutputEvent)
        case finished(ExecResult)
    }

    /// Runs `command`, delivering its output as it is produced and the result last.
    /// Ending the iteration early (or cancelling the consuming task) stops the VM.
    public static func stream(_ command: [String], configuration: SandboxConfiguration = SandboxConfiguration(),
                              stdin: [UInt8]? = nil) -> AsyncStream<StreamEvent> {
        AsyncStream { continuation in
            let token = CancelToken()
            continuation.onTermination = { reason in
                if case .cancelled = reason { token.cancel() }
            }
            do {
                try NativeThread(name: "sandbox-stream") {
                    let r = SandboxRunner.run(command, configuration: configuration, stdin: stdin, cancel: token) { ev in
                        continuation.yield(.output(ev))
                    }
                    continuation.yield(.finished(r))
                    continuation.finish()
                }.detach()
            } catch {
                continuation.yield(.finished(ExecResult(command: command, outcome: .infrastructureError(SandboxError(.host, "cannot start a thread for the run", underlying: error)), stdout: [], stderr: [],
                                                        timings: PhaseTimings(), consoleTail: "")))
                continuation.finish()
            }
        }
    }
}
