import ArgumentParser
import Foundation
import Sandbox
#if canImport(Glibc)
import Glibc
#endif

struct Exec: ParsableCommand {
    static let configuration = CommandConfiguration(
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
    @Flag(help: "Pass this process's stdin through to the command.")
    var stdin = false
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
        var argv = command
        if argv.first == "--" { argv.removeFirst() }
        guard !argv.isEmpty else {
            printError("sandbox exec: no command given (usage: sandbox exec [options] -- CMD [ARGS...])")
            throw ExitCode(125)
        }
        var config = SandboxConfiguration()
        config.workingDirectory = workdir
        config.keepDiskPath = keepDisk
        config.snapshot = snapshot
        config.template = template
        config.cold = cold
        config.consoleFD = console ? 2 : nil
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
            try vm.apply(to: &config)
        } catch {
            printError("sandbox exec: \(error)")
            throw ExitCode(125)
        }
        let result = SandboxRunner.run(argv, configuration: config, stdinFD: stdin ? 0 : nil,
                                       progress: { printError($0) }) { event in
            switch event {
            case .stdout(let b): b.withUnsafeBytes { writeAll(1, $0) }
            case .stderr(let b): b.withUnsafeBytes { writeAll(2, $0) }
            }
        }
        if timings && result.timings.restored {
            let t = result.timings
            printError("sandbox: restored from the snapshot \(t.snapshot ?? "?")")
            printError(String(format: "sandbox: vmm %.1f ms, restore %.1f ms, agent %.1f ms, exec %.1f ms, teardown %.1f ms, total %.1f ms",
                              t.vmmStart, t.restore, t.agentReady, t.exec, t.teardown, t.total))
        } else if timings {
            let t = result.timings
            printError("sandbox: booted (not restored: \(t.coldReason ?? "a start snapshot was not used"))")
            printError(String(format: "sandbox: vmm %.1f ms, kernel boot %.1f ms, agent %.1f ms (guest startup %.1f ms), exec %.1f ms, teardown %.1f ms, total %.1f ms",
                              t.vmmStart, t.kernelBoot, t.agentReady, t.agentStartup, t.exec, t.teardown, t.total))
        }
        switch result.outcome {
        case .exited, .signalled: break
        default: printError("sandbox exec: \(result.outcome)")
        }
        let status = result.outcome.exitStatus
        if status != 0 { throw ExitCode(status) }
    }
}
