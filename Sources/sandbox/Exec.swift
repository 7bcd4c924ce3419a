import ArgumentParser
import Foundation
import Sandbox
#if canImport(Glibc)
import Glibc
#endif

struct Exec: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exec",
        abstract: "Run a command in a throwaway micro-VM.",
        discussion: """
        Starts a VM from the image (copy-on-write; the image is never changed), runs the \
        command through the guest agent, streams its stdout and stderr, and tears the VM down. \
        The VM is restored from the start snapshot of its image, kernel and shape (made on \
        first use, in the cache); --cold boots the kernel instead. --timings says which.

        Exit status: the command's own status; 128+N if it was killed by signal N; \
        124 timeout; 125 the sandbox could not run (bad input, KVM, image, kernel); \
        126 command not executable; 127 command not found; 250 guest kernel crashed; \
        251 out of memory. Each non-command status comes with a one-line reason on stderr.
        """)

    @OptionGroup var vm: VMOptions
    @Option(help: "Start from this snapshot (made by `sandbox snapshot create`) instead of the cached start snapshot; --memory and --cpus must be the snapshot's.")
    var snapshot: String?
    @Option(help: "Start from this template (made by `sandbox template create`): its image, memory, vCPUs and disk, as its setup command left them.")
    var template: String?
    @Flag(help: "Boot the kernel instead of restoring a snapshot (slower; SANDBOX_COLD=1 does this for every run).")
    var cold = false
    @Option(parsing: .unconditional, help: "Wall-clock limit for the command, in seconds (0 = none; at most 30 days).")
    var timeout: Double = 300
    @Option(name: .customLong("env"), help: "Set an environment variable (K=V); repeatable.")
    var env: [String] = []
    @Option(help: "Working directory in the guest.")
    var workdir: String = "/"
    @Flag(name: [.customShort("i"), .long], help: "Pass this process's stdin through to the command.")
    var stdin = false
    @Flag(name: [.customShort("t"), .customLong("tty")], help: "Run the command on a terminal in the guest (with -i: an interactive session; this terminal is put in raw mode, its size follows).")
    var tty = false
    @Option(name: .customLong("copy-in"), help: "Copy a host file, or a directory's tree, into the guest before the command (HOST:GUEST; parents are made); repeatable.")
    var copyIn: [String] = []
    @Option(name: .customLong("copy-out"), help: "Copy a guest file, or a directory's tree, to the host after the command (GUEST:HOST); repeatable.")
    var copyOut: [String] = []
    @Option(name: .customLong("keep-disk"), help: "Write the guest's final root disk to this path.")
    var keepDisk: String?
    @Flag(help: "Show the guest console on stderr (debugging).")
    var console = false
    @Flag(help: "Print the phase timings on stderr.")
    var timings = false
    @Argument(parsing: .remaining, help: "The command and its arguments (after --; options before it are sandbox's own).")
    var command: [String] = []

    func run() throws {
        let status = execute(io: .standard).status
        if status != 0 { throw ExitCode(status) }
    }

    /// The run's configuration from the options, or nil after saying why on `io`'s stderr.
    func configuration(io: ExecIO) -> SandboxConfiguration? {
        var config = SandboxConfiguration()
        config.workingDirectory = workdir
        config.keepDiskPath = keepDisk
        config.snapshot = snapshot
        config.template = template
        config.cold = cold
        config.consoleFD = console ? io.stderr : nil
        config.terminal = tty
        // Output streams straight to the terminal: no cap, nothing kept in memory.
        config.outputLimit = 0
        config.keepOutput = false
        do {
            config.environment = try parseEnvironment(env)
            config.copyIn = try copyIn.map { try FileCopy.parse($0, guestFirst: false) }
            config.copyOut = try copyOut.map { try FileCopy.parse($0, guestFirst: true) }
            config.timeout = try InputCheck.seconds(timeout, name: "--timeout")
            if template != nil {
                guard vm.given.isEmpty else {
                    throw SandboxError.invalidInput("--template brings its own image, kernel, memory, vCPUs and disk; \(vm.given.joined(separator: ", ")) cannot be set with it")
                }
                guard snapshot == nil, !cold else { throw SandboxError.invalidInput("--template cannot be combined with --snapshot or --cold") }
            }
            try vm.apply(to: &config, io: io)
        } catch {
            io.error("sandbox exec: \(error)")
            return nil
        }
        return config
    }

    /// Runs the command with `io` as its standard descriptors. Returns the exit status
    /// `sandbox exec` gives (the command's, or 124/125/250/251 with a line on stderr) and
    /// whether the run took a VM restored ahead of it. `cancel` stops the run (its VM) from
    /// another thread; `servedBy` names the server process that runs it, for --timings.
    func execute(io: ExecIO, cancel: CancelToken? = nil, servedBy: Int32? = nil) -> (status: Int32, ranWarm: Bool) {
        var argv = command
        if argv.first == "--" { argv.removeFirst() }
        guard !argv.isEmpty else {
            io.error("sandbox exec: no command given (usage: sandbox exec [options] -- CMD [ARGS...])")
            return (125, false)
        }
        guard let config = configuration(io: io) else { return (125, false) }
        // With -t on a terminal: raw mode (keys go to the guest as typed, Ctrl-C included),
        // restored however this ends; the guest's terminal follows this one's size.
        let local = tty ? LocalTerminal.take() : nil
        defer { local?.restore() }
        let size = tty ? (local?.size ?? TerminalSize(rows: 24, columns: 80)) : nil
        let result = SandboxRunner.run(argv, configuration: config, stdinFD: stdin ? io.stdin : nil, terminalSize: size,
                                       progress: { io.error($0) }, cancel: cancel) { event in
            switch event {
            case .stdout(let b): b.withUnsafeBytes { writeAll(io.stdout, $0) }
            case .stderr(let b): b.withUnsafeBytes { writeAll(io.stderr, $0) }
            }
        }
        if timings, let servedBy {
            io.error("sandbox: run by the sandbox server (pid \(servedBy)), \(result.timings.warm ? "on a VM restored ahead of it" : "on a VM restored for it (none was waiting)")")
        }
        if timings && result.timings.restored {
            let t = result.timings
            let prefault = t.prefaultNote.map { "working set not copied in ahead: \($0)" }
                ?? "\(t.prefaultPages) pages of its working set copied in ahead"
            io.error("sandbox: restored from the snapshot \(t.snapshot ?? "?") (\(prefault))")
            io.error(String(format: "sandbox: vmm %.1f ms, restore %.1f ms, agent %.1f ms, exec %.1f ms, teardown %.1f ms, total %.1f ms",
                              t.vmmStart, t.restore, t.agentReady, t.exec, t.teardown, t.total))
        } else if timings {
            let t = result.timings
            io.error("sandbox: booted (not restored: \(t.coldReason ?? "a start snapshot was not used"))")
            io.error(String(format: "sandbox: vmm %.1f ms, kernel boot %.1f ms, agent %.1f ms (guest startup %.1f ms), exec %.1f ms, teardown %.1f ms, total %.1f ms",
                              t.vmmStart, t.kernelBoot, t.agentReady, t.agentStartup, t.exec, t.teardown, t.total))
        }
        switch result.outcome {
        case .exited, .signalled: break
        default: io.error("sandbox exec: \(result.outcome)")
        }
        return (result.outcome.exitStatus, result.timings.warm)
    }
}

/// The standard descriptors of one `sandbox exec`: this process's own, or a client's
/// (received by the sandbox server).
struct ExecIO: Sendable {
    var stdin: Int32
    var stdout: Int32
    var stderr: Int32
    static let standard = ExecIO(stdin: 0, stdout: 1, stderr: 2)

    /// Writes a line to this run's standard error.
    func error(_ message: String) { writeAll(stderr, message + "\n") }
}

/// This process's terminal in raw mode for `exec -t`: the original settings come back at
/// the end, on SIGTERM/SIGHUP/SIGQUIT, and its size is followed (SIGWINCH).
final class LocalTerminal: @unchecked Sendable {
    // @unchecked: `saved` is written once before the signal sources start; `restore`
    // may race with a signal's restore, and tcsetattr twice with the same settings is harmless.
    private var saved = termios()
    let size: TerminalSize
    private var sources: [DispatchSourceSignal] = []

    /// Raw mode on stdin, if stdin is a terminal; nil otherwise.
    static func take() -> LocalTerminal? {
        guard isatty(0) == 1 else { return nil }
        var ws = winsize()
        let rows = ioctl(0, UInt(TIOCGWINSZ), &ws) == 0 && ws.ws_row > 0 ? ws.ws_row : 24
        let cols = ws.ws_col > 0 ? ws.ws_col : 80
        let t = LocalTerminal(size: TerminalSize(rows: rows, columns: cols))
        guard tcgetattr(0, &t.saved) == 0 else { return nil }
        var raw = t.saved
        cfmakeraw(&raw)
        guard tcsetattr(0, TCSADRAIN, &raw) == 0 else { return nil }
        t.watch()
        return t
    }

    private init(size: TerminalSize) { self.size = size }

    private func watch() {
        let winch = DispatchSource.makeSignalSource(signal: SIGWINCH, queue: .global())
        signal(SIGWINCH, SIG_IGN)
        winch.setEventHandler { [size] in
            var ws = winsize()
            if ioctl(0, UInt(TIOCGWINSZ), &ws) == 0 && ws.ws_row > 0 { size.update(rows: ws.ws_row, columns: ws.ws_col) }
        }
        winch.resume()
        sources.append(winch)
        for sig in [SIGTERM, SIGHUP, SIGQUIT] {
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            signal(sig, SIG_IGN)
            s.setEventHandler { [self] in
                restore()
                exit(128 + sig)
            }
            s.resume()
            sources.append(s)
        }
    }

    func restore() {
        var s = saved
        tcsetattr(0, TCSADRAIN, &s)
    }
}

/// `sandbox shell`: an interactive shell in a throwaway VM (`exec -i -t --timeout 0 -- sh`).
struct Shell: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "shell",
        abstract: "An interactive shell in a throwaway micro-VM (sandbox exec -it -- sh).",
        discussion: """
        Takes the options of `sandbox exec` (image, memory, copy-in, ...); without a command after --, runs sh. There is no time limit unless --timeout is given. The exit status is the shell's.
        """)
    @Argument(parsing: .captureForPassthrough, help: "Options of sandbox exec, then optionally -- CMD [ARGS...].")
    var arguments: [String] = []

    func run() throws {
        var args = ["-i", "-t", "--timeout", "0"] + arguments
        if !arguments.contains("--") { args += ["--", "sh"] }
        let exec: Exec
        do { exec = try Exec.parse(args) } catch {
            printError(Exec.fullMessage(for: error))
            throw ExitCode(125)
        }
        try exec.run()
    }
}
