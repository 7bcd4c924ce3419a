import ArgumentParser
import SystemShims
import Sandbox

@main
struct SandboxCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sandbox",
        abstract: "Boot throwaway KVM micro-VMs and run commands in them.",
        subcommands: [Exec.self, Batch.self, Boot.self, Doctor.self, KernelCommand.self, ImageCommand.self])
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
