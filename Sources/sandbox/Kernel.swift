import ArgumentParser
import Sandbox
#if canImport(Glibc)
import Glibc
#endif

struct KernelCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kernel", abstract: "Build and locate guest kernels.",
        subcommands: [Build.self, Path.self])

    struct Build: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "build", abstract: "Build (or reuse) the cached guest kernel.")
        @Option(help: "standard (hardware KVM) or pvm (PVM hosts); default: this host's.")
        var flavor: KernelFlavor?
        func run() throws {
            do {
                let p = try KernelStore.defaultKernelPath(flavor: flavor ?? KernelFlavor.forThisHost, progress: { printError($0) })
                printError("sandbox: kernel ready: \(p)")
            } catch {
                printError("sandbox kernel build: \(error)")
                throw ExitCode(1)
            }
        }
    }

    struct Path: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "path", abstract: "Print the cached kernel's path, building it first if needed.")
        @Option(help: "standard (hardware KVM) or pvm (PVM hosts); default: this host's.")
        var flavor: KernelFlavor?
        func run() throws {
            do {
                print(try KernelStore.defaultKernelPath(flavor: flavor ?? KernelFlavor.forThisHost, progress: { printError($0) }))
            } catch {
                printError("sandbox kernel path: \(error)")
                throw ExitCode(1)
            }
        }
    }
}

extension KernelFlavor: ExpressibleByArgument {}
