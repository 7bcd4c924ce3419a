import AgentProtocol
import Glibc
import SystemShims

/// `--selftest`: one local exec without vsock, printing every message.
enum SelfTest {
    /// Runs `/bin/sh -c 'echo hi'`; returns 0 if it printed "hi" and exited 0.
    static func run(reaper: Reaper) -> Int32 {
        let exec = Exec(arguments: ["/bin/sh", "-c", "echo hi"],
                        environment: ["PATH=/usr/local/bin:/usr/bin:/bin"], workingDirectory: "/")
        var stdout: [UInt8] = []
        let runner = ExecRunner(exec: exec, id: 1, reaper: reaper, send: { message, _ in
            if case .output(let o) = message, o.stream == .stdout { stdout.append(contentsOf: o.data) }
            print("selftest: \(message)")
        })
        do {
            let final = try runner.runAlone()
            let text = String(decoding: stdout, as: UTF8.self)
            let ok = final == .exited(0) && text == "hi\n"
            print("selftest: \(ok ? "ok" : "FAILED"): stdout \(text.debugDescription), \(final)")
            return ok ? 0 : 1
        } catch {
            print("selftest: FAILED: \(error)")
            return 1
        }
    }
}
