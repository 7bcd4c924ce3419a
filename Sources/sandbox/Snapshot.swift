import ArgumentParser
import Sandbox
#if canImport(Glibc)
import Glibc
#endif

struct SnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot", abstract: "Make snapshots that sandboxes start from (`sandbox exec --snapshot DIR`).",
        subcommands: [Create.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "create",
            abstract: "Boot a sandbox once and write a snapshot of it, agent ready, to a new directory.")
        @Argument(help: "The directory to create (must not exist).")
        var directory: String
        @OptionGroup var vm: VMOptions
        @Flag(help: "Show the guest console on stderr (debugging).")
        var console = false

        func run() throws {
            var config = SandboxConfiguration()
            config.consoleFD = console ? 2 : nil
            do {
                try vm.apply(to: &config)
                let r = try SnapshotMaker.create(directory: directory, configuration: config, progress: { printError($0) })
                printError(String(format: "sandbox: snapshot written to %@ (boot %.0f ms, snapshot %.0f ms)", r.directory, r.bootMillis, r.snapshotMillis))
            } catch {
                printError("sandbox snapshot create: \(error)")
                throw ExitCode(1)
            }
        }
    }
}
