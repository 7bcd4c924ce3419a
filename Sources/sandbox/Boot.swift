import ArgumentParser
import MicroVM
import Sandbox
import VirtIO
#if canImport(Glibc)
import Glibc
#endif

struct Boot: ParsableCommand {
    static let configuration = CommandConfiguration(
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

    func run() throws {
        let kernelPath: String
        if let kernel {
            kernelPath = kernel
        } else {
            do { kernelPath = try KernelStore.defaultKernelPath(progress: { printError($0) }) } catch {
                printError("sandbox boot: \(error)")
                throw ExitCode(2)
            }
        }
        var config = MachineConfiguration(kernelPath: kernelPath)
        config.initrdPath = initrd
        config.extraCommandLine = append
        var rootDisk: BlockDevice?
        if let image {
            let imagePath: String
            do { imagePath = try RootDisk.resolveImage(image, progress: { printError($0) }) } catch {
                printError("sandbox boot: \(error)")
                throw ExitCode(2)
            }
            do {
                let disk = try RootDisk.open(imagePath: imagePath)
                rootDisk = disk
                config.virtioDevices.append(disk)
                config.extraCommandLine = "root=/dev/vda rw " + append
            } catch {
                printError("sandbox boot: \(error)")
                throw ExitCode(2)
            }
        }
        defer { rootDisk?.close() }
        config.memoryMiB = memory
        config.cpus = cpus
        config.timeoutSeconds = timeout > 0 ? timeout : nil
        if !quietConsole {
            config.consoleSink = { bytes in writeAll(1, bytes) }
        }
        let machine: Machine
        do { machine = try Machine(config) } catch {
            printError("sandbox boot: \(error)")
            if case MachineError.kvm = error { throw ExitCode(3) }
            throw ExitCode(2)
        }
        let result = try machine.run()
        if let keepDisk, let rootDisk {
            do { try RootDisk.export(rootDisk, to: keepDisk) } catch {
                printError("sandbox boot: could not keep the disk: \(error)")
                throw ExitCode(1)
            }
            printError("sandbox boot: disk kept at \(keepDisk)")
        }
        let elapsed = Double(result.stopNanos - result.startNanos) / 1e6
        var summary = "sandbox boot: \(result.reason) after \(String(format1: elapsed)) ms"
        if let initMs = result.millis(toMark: 1) { summary += ", init reached at \(String(format1: initMs)) ms" }
        let crashed = GuestCrashDetector.crashReason(consoleTail: result.console.tail(16384))
        switch result.reason {
        case .guestReset, .powerOff, .halted:
            if let crashed {
                printError("\(summary)\nsandbox boot: guest crashed: \(crashed)")
                throw ExitCode(1)
            }
            printError(summary)
        case .timeout:
            printError(summary)
            throw ExitCode(124)
        case .guestCrash:
            printError(summary)
            throw ExitCode(1)
        case .kvmError:
            printError(summary)
            throw ExitCode(3)
        case .stopRequested:
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
