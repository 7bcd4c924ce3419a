import ArgumentParser
import Sandbox
#if canImport(Glibc)
import Glibc
#endif

struct Boot: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "boot",
        abstract: "Boot a kernel, stream its console, and exit when the guest stops.",
        discussion: """
        Exit status: 0 when the guest shuts down or resets itself (Linux guests without \
        ACPI end with `reboot -f`), 1 on a guest crash (kernel panic or triple fault \
        during boot), 2 on bad input, 3 on a KVM error, 124 on timeout.
        """)

    @Option(name: .long, help: "Kernel: an ELF vmlinux with a PVH note, or a bzImage (default: the cached kernel for this host).")
    var kernel: String?
    @Option(name: .long, help: "Initramfs (cpio, optionally compressed).")
    var initrd: String?
    @Option(name: .long, help: "Extra kernel command line parameters.")
    var append: String = ""
    @Option(name: .long, help: "Guest memory in MiB.")
    var memory: UInt64 = 256
    @Option(name: .long, help: "Number of vCPUs.")
    var cpus: Int = 1
    @Option(name: .long, help: "Wall-clock limit in seconds (0 = none).")
    var timeout: Double = 60
    @Flag(name: .long, help: "Do not stream the console; print only the result line.")
    var quietConsole = false
    @Option(name: .long, help: "Root disk: an image name from the image store, or the path of an ext4 image. The image is never modified; the guest writes to a private copy-on-write overlay.")
    var image: String?
    @Option(name: .long, help: "After the run, write the guest's view of the root disk (base + its writes) to this path.")
    var keepDisk: String?
    @Flag(name: .customLong("no-jail"), help: "Run the VMM without its jail. For debugging the VMM only.")
    var noJail = false

    func run() throws {
        var c = GuestBoot.Configuration()
        c.kernel = kernel
        c.initrd = initrd
        c.image = image
        c.extraCommandLine = append
        c.memoryMiB = memory
        c.cpus = cpus
        c.timeoutSeconds = timeout > 0 ? timeout : nil
        c.keepDiskPath = keepDisk
        if noJail {
            c.jail = false
            warnNoJail()
        }
        c.consoleFD = quietConsole ? nil : 1
        let result: GuestBoot.Result
        do { result = try GuestBoot.run(c, progress: { printError($0) }) } catch {
            printError("sandbox boot: \(error)")
            switch error.code {
            case .noKVM, .vmm: throw ExitCode(3)
            default: throw ExitCode(2)
            }
        }
        if let keepDisk { printError("sandbox boot: disk kept at \(keepDisk)") }
        var summary = "sandbox boot: \(result.reason) after \(String(format1: result.runMillis)) ms"
        if let initMs = result.initMillis { summary += ", init reached at \(String(format1: initMs)) ms" }
        switch result.ending {
        case .clean:
            printError(summary)
        case .crash:
            printError(summary + (result.crashLine.map { "\nsandbox boot: guest crashed: \($0)" } ?? ""))
            throw ExitCode(1)
        case .timeout:
            printError(summary)
            throw ExitCode(124)
        case .kvmError:
            printError(summary)
            throw ExitCode(3)
        case .stopped:
            printError(summary)
            throw ExitCode(1)
        }
    }
}

extension String {
    init(format1 value: Double) {
        let scaled = (value * 10).rounded() / 10
        self = "\(scaled)"
    }
}
