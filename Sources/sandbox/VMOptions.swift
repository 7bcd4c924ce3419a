import ArgumentParser
import Sandbox

/// The options that shape the VM, shared by `exec` and `snapshot create`.
struct VMOptions: ParsableArguments {
    @Option(help: "Image name from the image store, or the path of an ext4 image (default: busybox).")
    var image: String?
    @Option(help: "Kernel path (default: the cached kernel for this host).")
    var kernel: String?
    @Option(parsing: .unconditional, help: "Guest memory in MiB (at least 32, at most what the host has available; default: 256).")
    var memory: UInt64?
    @Option(parsing: .unconditional, help: "Number of vCPUs (1 to 32; default: 1).")
    var cpus: Int?
    @Option(name: .customLong("disk-size"), parsing: .unconditional, help: "Grow the root disk and its file system to this size (MiB, or 512M, 4G, 1T); sparse on the host.")
    var diskSize: String?
    @Flag(name: .customLong("no-jail"), help: "Run the VMM without its jail (namespaces, empty root, no privileges, seccomp). For debugging the VMM only: a compromised VMM could then reach this host.")
    var noJail = false

    /// The options given on the command line (as flags), for refusing them where the
    /// VM's shape comes from elsewhere (a template).
    var given: [String] {
        [image.map { _ in "--image" }, kernel.map { _ in "--kernel" }, memory.map { _ in "--memory" },
         cpus.map { _ in "--cpus" }, diskSize.map { _ in "--disk-size" }].compactMap { $0 }
    }

    /// Checks the numbers (each message names its flag) and sets them in `config`.
    func apply(to config: inout SandboxConfiguration, io: ExecIO = .standard) throws {
        if let memory {
            try InputCheck.memory(memory, name: "--memory")
            config.memoryMiB = memory
        }
        if let cpus {
            try InputCheck.cpus(cpus, name: "--cpus")
            config.cpus = cpus
        }
        if let image { config.image = image }
        if noJail {
            config.jail = false
            warnNoJail(io: io)
        }
        config.kernel = kernel
        if let diskSize {
            let mib = try InputCheck.parseSizeMiB(diskSize, name: "--disk-size")
            try InputCheck.diskSize(mib, name: "--disk-size")
            config.diskSizeMiB = mib
        }
    }
}

/// `--env K=V` values as an environment (a later K wins); each malformed one is an error
/// naming it.
func parseEnvironment(_ pairs: [String]) throws -> [String: String] {
    var env: [String: String] = [:]
    for kv in pairs {
        guard let eq = kv.firstIndex(of: "="), eq != kv.startIndex else {
            throw SandboxError.invalidInput("--env '\(kv)' is not of the form K=V")
        }
        env[String(kv[..<eq])] = String(kv[kv.index(after: eq)...])
    }
    return env
}

/// What `--no-jail` prints, every time.
func warnNoJail(io: ExecIO = .standard) {
    io.error("sandbox: WARNING: --no-jail: the VMM runs with every privilege of this process, in this host's namespaces, with no seccomp filter; a guest that compromises it reaches this host. Use it for debugging only.")
}
