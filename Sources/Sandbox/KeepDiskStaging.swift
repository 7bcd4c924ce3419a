import Foundation
import SandboxCore
import SystemShims
#if canImport(Glibc)
import Glibc
#endif

/// Where a jailed VMM writes a disk the caller keeps (`keepDiskPath`): a fresh directory
/// next to the destination, the only directory of the caller's the VMM's jail holds. Once
/// the VMM has stopped, `finish()` moves the disk to its destination; `remove()` deletes
/// what is left.
struct KeepDiskStaging: Sendable {
    let directory: String
    let destination: String
    var stagedPath: String { directory + "/disk" }

    init(for destination: String) throws(SandboxError) {
        let parent = (destination as NSString).deletingLastPathComponent
        var template = Array(((parent.isEmpty ? "." : parent) + "/.sandbox-keep-XXXXXX").utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw SandboxError(.host, "cannot create a staging directory for the kept disk next to \(destination)",
                               underlying: SystemError("mkdtemp", errno: errno))
        }
        directory = String(cString: made)
        self.destination = destination
    }

    /// Moves the written disk to its destination (replacing what was there).
    func finish() throws(SandboxError) {
        guard Glibc.rename(stagedPath, destination) == 0 else {
            throw SandboxError(.host, "the kept disk could not be moved to \(destination)", underlying: SystemError("rename", errno: errno))
        }
    }

    func remove() { try? FileManager.default.removeItem(atPath: directory) }
}
