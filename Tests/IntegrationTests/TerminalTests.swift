import Foundation
import Testing

/// `sandbox shell` / `sandbox exec -it` driven as a user would, in tmux: a real terminal
/// in the guest, keys typed through, Ctrl-C to the guest's foreground command, window
/// size changes followed, the shell's exit status passed through.
@Suite("interactive terminal", .serialized)
struct TerminalTests {
    let socket = "sandbox-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"

    /// Runs tmux through system(3), which waits for exactly its child: a tmux client
    /// that starts a server leaves a process Foundation's Process does not see end.
    func tmux(_ args: [String]) throws -> String {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/tmux") else {
            throw FixtureError("tmux is not installed (Scripts/setup-host test installs it); the terminal tests drive sandbox shell in it")
        }
        let out = NSTemporaryDirectory() + "\(socket)-out"
        defer { try? FileManager.default.removeItem(atPath: out) }
        let quoted = (["/usr/bin/tmux", "-L", socket] + args).map { "'" + $0.replacingOccurrences(of: "'", with: "'\\''") + "'" }
        let status = system(quoted.joined(separator: " ") + " </dev/null >'\(out)' 2>&1")
        let text = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
        guard status == 0 else { throw FixtureError("tmux \(args.joined(separator: " ")): status \(status): \(text)") }
        return text
    }

    /// Waits until the pane shows `text` (a line of it), returning the pane.
    @discardableResult
    func waitForPane(_ text: String, seconds: Double = Fixture.inLab ? 600 : 60) throws -> String {
        let deadline = Date().addingTimeInterval(seconds)
        var pane = ""
        while Date() < deadline {
            pane = try tmux(["capture-pane", "-p", "-t", "t"])
            if pane.contains(text) { return pane }
            usleep(100_000)
        }
        throw FixtureError("the terminal never showed \(text.debugDescription); it shows:\n\(pane)")
    }

    @Test("sandbox shell: typed commands run on a guest terminal of the host's size, Ctrl-C interrupts the guest's command, a resize is followed, exit 7 comes back")
    func shellInTmux() throws {
        let status = NSTemporaryDirectory() + "sandbox-shell-status-\(getpid())"
        defer {
            _ = try? tmux(["kill-server"])
            try? FileManager.default.removeItem(atPath: status)
        }
        // The pane stays (dead) after the shell ends, so nothing has to outlive it; the
        // server then ends with kill-server even where SIGHUP is ignored.
        _ = try tmux(["start-server", ";", "set-option", "-g", "remain-on-exit", "on", ";",
                      "new-session", "-d", "-s", "t", "-x", "100", "-y", "30",
                      "\(Fixture.sandboxBinary) shell; echo $? > \(status)"])
        try waitForPane("/ #")
        _ = try tmux(["send-keys", "-t", "t", "stty size; tty; echo sum-$((40+2))", "Enter"])
        let first = try waitForPane("sum-42")
        #expect(first.contains("30 100"), "\(first)")
        #expect(first.contains("/dev/pts/"), "\(first)")
        // Ctrl-C reaches the guest's foreground command, not this host's sandbox process.
        _ = try tmux(["send-keys", "-t", "t", "sleep 300", "Enter"])
        usleep(500_000)
        _ = try tmux(["send-keys", "-t", "t", "C-c"])
        _ = try tmux(["send-keys", "-t", "t", "echo after-$?", "Enter"])
        try waitForPane("after-130")
        // The guest's terminal follows the window.
        _ = try tmux(["resize-window", "-t", "t", "-x", "120", "-y", "40"])
        usleep(300_000)
        _ = try tmux(["send-keys", "-t", "t", "stty size", "Enter"])
        try waitForPane("40 120")
        // The shell's status is sandbox shell's.
        _ = try tmux(["send-keys", "-t", "t", "exit 7", "Enter"])
        let deadline = Date().addingTimeInterval(Fixture.inLab ? 300 : 30)
        while !FileManager.default.fileExists(atPath: status) && Date() < deadline { usleep(100_000) }
        usleep(100_000)
        #expect((try? String(contentsOfFile: status, encoding: .utf8)) == "7\n")
    }

    @Test("exec -t without a terminal on the host: the command still gets a guest terminal, its output comes back with the terminal's line ends")
    func ttyWithoutHostTerminal() throws {
        let r = try Fixture.run(Fixture.sandboxBinary, ["exec", "-t", "--", "sh", "-c", "tty; stty size; echo done"], timeout: Fixture.inLab ? 900 : 120)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("/dev/pts/") && r.stdout.contains("24 80\r\n") && r.stdout.hasSuffix("done\r\n"), "\(r.stdout.debugDescription)")
    }
}
