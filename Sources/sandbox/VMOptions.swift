import ArgumentParser
import Sandbox

/// The options that shape the VM, shared by `exec` and `snapshot create`.
struct VMOptions: ParsableArguments {
    @Option(help: "Image name from the image store, or the path of an ext4 image.")
    var image: String = "busybox"
    @Option(help: "Kernel path (default: the cached kernel for this host).")
    var kernel: String?
    @Option(parsing: .unconditional, help: "Guest memory in MiB (at least 32, at most what the host has available).")
    var memory: UInt64 = 256
    @Option(parsing: .unconditional, help: "Number of vCPUs (1 to 32).")
    var cpus: Int = 1
    @Option(name: .customLong("disk-size"), parsing: .unconditional, help: "Grow the root disk and its file system to this size (MiB, or 512M, 4G, 1T); sparse on the host.")
    var diskSize: String?

    /// Checks the numbers (each message names its flag) and sets them in `config`.
    func apply(to config: inout SandboxConfiguration) throws {
        try InputCheck.memory(memory, name: "--memory")
        try InputCheck.cpus(cpus, name: "--cpus")
        config.image = image
        config.kernel = kernel
        config.memoryMiB = memory
        config.cpus = cpus
        if let diskSize {
            let mib = try InputCheck.parseSizeMiB(diskSize, name: "--disk-size")
            try InputCheck.diskSize(mib, name: "--disk-size")
            config.diskSizeMiB = mib
        }
    }
}
