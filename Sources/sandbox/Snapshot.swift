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
            abstract: "Boot a sandbox once and write a snapshot of it, agent ready, to a new directory.")
        @Argument(help: "The directory to create (must not exist).")
        var directory: String
        @Option(help: "Image name from the image store, or the path of an ext4 image.")
        var image: String = "busybox"
        @Option(help: "Kernel path (default: the cached kernel for this host).")
        var kernel: String?
        @Option(parsing: .unconditional, help: "Guest memory in MiB; sandboxes started from the snapshot have the same.")
        var memory: UInt64 = 256
        @Option(parsing: .unconditional, help: "Number of vCPUs; sandboxes started from the snapshot have the same.")
        var cpus: Int = 1
        @Option(name: .customLong("disk-size"), parsing: .unconditional, help: "Grow the root disk first (MiB, or 512M, 4G, 1T).")
        var diskSize: String?
        @Flag(help: "Show the guest console on stderr (debugging).")
        var console = false

        func run() throws {
            var config = SandboxConfiguration()
            config.image = image
            config.kernel = kernel
            config.memoryMiB = memory
            config.cpus = cpus
            config.consoleFD = console ? 2 : nil
            do {
                try InputCheck.memory(memory, name: "--memory")
                try InputCheck.cpus(cpus, name: "--cpus")
                if let diskSize {
                    let mib = try InputCheck.parseSizeMiB(diskSize, name: "--disk-size")
                    try InputCheck.diskSize(mib, name: "--disk-size")
                    config.diskSizeMiB = mib
                }
                let r = try SnapshotMaker.create(directory: directory, configuration: config, progress: { printError($0) })
                printError(String(format: "sandbox: snapshot written to %@ (boot %.0f ms, snapshot %.0f ms)", r.directory, r.bootMillis, r.snapshotMillis))
            } catch {
                printError("sandbox snapshot create: \(error)")
                throw ExitCode(1)
            }
        }
    }
}
