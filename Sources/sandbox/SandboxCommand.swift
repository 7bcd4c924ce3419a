import ArgumentParser
import SystemShims
import Sandbox

@main
struct SandboxCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sandbox",
        abstract: "Boot throwaway KVM micro-VMs and run commands in them.",
        subcommands: [Exec.self, Shell.self, ServerCommand.self, Batch.self, Boot.self, Doctor.self, KernelCommand.self, ImageCommand.self, SnapshotCommand.self, TemplateCommand.self, ReportCommand.self, BenchLibrary.self, BenchExec.self, BenchCopy.self, Soak.self])

    /// As ArgumentParser's, except that a usage error (unknown option, bad value)
    /// exits 2, the conventional status for it, rather than 64. Parsing is awaited as
    /// ArgumentParser's own main does: the command then runs off the main thread, which
    /// libdispatch parks with an empty signal mask (BatchSignals relies on that).
    static func main() async {
        // `sandbox exec` first offers its run to a sandbox server, if one is running: the
        // cheapest start there is (no VMM to spawn, a VM already restored and waiting).
        let args = CommandLine.arguments
        if args.count > 2, args[1] == "exec", let status = ServerClient.exec(Array(args.dropFirst(2))) {
            Glibc.exit(status)
        }
        do {
            var command = try await asyncParseAsRoot(nil)
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch {
            if exitCode(for: error) == .validationFailure {
                printError(fullMessage(for: error))
                exit(withError: ExitCode(2))
            }
            exit(withError: error)
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif

/// Writes a line to standard error (unbuffered).
func printError(_ message: String) {
    writeAll(2, message + "\n")
}

/// Writes all of `text` to `fd`.
func writeAll(_ fd: Int32, _ text: String) {
    var s = text
    s.withUTF8 { try? SystemShims.writeAll(fd, UnsafeRawBufferPointer($0)) }
}

/// Writes all of `bytes` to `fd`; a closed terminal or pipe ends the output quietly.
func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) {
    try? SystemShims.writeAll(fd, bytes)
}
