import Crypto
import Foundation
import MicroVM
import SandboxCore
import SystemShims
#if canImport(Glibc)
import Glibc
#endif

/// The files of one snapshot directory (Docs/SnapshotFormat.md):
///
///     DIR/state.json    SnapshotManifest: format, the machine state, its SHA-256
///     DIR/memory        guest RAM, byte for byte (sparse where RAM was zero)
///     DIR/disk.ext4     the root disk as the snapshotted guest saw it (base + writes)
///
/// `state.json` is written last (through a rename), so its presence means the rest is
/// complete.
enum SnapshotFiles {
    static let stateFile = "state.json"
    static let memoryFile = "memory"
    static let diskFile = "disk.ext4"

    /// What state.json holds.
    struct Manifest: Codable {
        var format: Int
        /// The sandbox-vmm build that wrote it (`vmmBuild()`); another build refuses it.
        var vmmBuild: String
        /// Hex SHA-256 of `machine` encoded as JSON with sorted keys.
        var machineSHA256: String
        var machine: MachineSnapshot
    }

    /// This executable's identity: its size and modification time. A rebuilt VMM (and
    /// with it, as the build scripts go, the guest agent in new images) writes and
    /// expects other states, so snapshots are tied to the build that made them.
    static func vmmBuild() -> String {
        var st = stat()
        guard stat("/proc/self/exe", &st) == 0 else { return "unknown" }
        return "\(st.st_size)-\(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec)"
    }

    static func encoder() -> JSONEncoder {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return e
    }

    static func digest(_ machine: MachineSnapshot) throws -> String {
        let data = try encoder().encode(machine)
        return SHA256.hash(data: data).map { String(format: "%02x", $0) }.joined()
    }

    /// Writes the state file for `machine` into `dir` (atomically).
    static func writeState(_ machine: MachineSnapshot, to dir: String) throws {
        let manifest = Manifest(format: MachineSnapshot.currentFormat, vmmBuild: vmmBuild(), machineSHA256: try digest(machine), machine: machine)
        let data = try encoder().encode(manifest)
        let path = dir + "/" + stateFile
        do { try data.write(to: URL(fileURLWithPath: path), options: .atomic) } catch {
            throw SandboxError(.host, "cannot write the snapshot state \(path)", underlying: error)
        }
    }

    /// Reads and checks `dir`'s state file: present, decodable, of this format, and its
    /// checksum matching. Every failure names the file and what is wrong with it.
    static func readState(from dir: String) throws -> MachineSnapshot {
        let path = dir + "/" + stateFile
        guard let data = FileManager.default.contents(atPath: path) else {
            throw SandboxError(.snapshot, "\(path): no such snapshot state file (an incomplete or missing snapshot)")
        }
        guard data.count < 64 << 20 else { throw SandboxError(.snapshot, "\(path): \(data.count) bytes is too large for a snapshot state") }
        struct FormatOnly: Decodable { var format: Int }
        guard let f = try? JSONDecoder().decode(FormatOnly.self, from: data) else {
            throw SandboxError(.snapshot, "\(path): not a snapshot state file (not JSON with a format number)")
        }
        guard f.format == MachineSnapshot.currentFormat else {
            throw SandboxError(.snapshot, "\(path): snapshot format \(f.format); this sandbox-vmm reads format \(MachineSnapshot.currentFormat) (take the snapshot again)")
        }
        let manifest: Manifest
        do { manifest = try JSONDecoder().decode(Manifest.self, from: data) } catch {
            throw SandboxError(.snapshot, "\(path): the snapshot state does not decode", underlying: ErrorText(error))
        }
        guard try digest(manifest.machine) == manifest.machineSHA256 else {
            throw SandboxError(.snapshot, "\(path): the snapshot state's checksum does not match (the file was changed or damaged)")
        }
        guard manifest.vmmBuild == vmmBuild() else {
            throw SandboxError(.snapshot, "\(path): made by another sandbox-vmm build (\(manifest.vmmBuild); this one is \(vmmBuild())); take the snapshot again")
        }
        return manifest.machine
    }

    /// Opens the memory file read-only, checking its size against the state.
    static func openMemory(in dir: String, expected bytes: UInt64) throws -> FileDescriptor {
        let path = dir + "/" + memoryFile
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(path, O_RDONLY) } catch {
            throw SandboxError(.snapshot, "\(path): cannot open the snapshot memory file", underlying: error)
        }
        let size = (try? fd.size()) ?? 0
        guard size == bytes else {
            throw SandboxError(.snapshot, "\(path): the memory file is \(size) bytes, the snapshot's guest has \(bytes)")
        }
        return fd
    }

    /// Creates (or truncates) the memory file for writing.
    static func createMemory(in dir: String) throws -> FileDescriptor {
        let path = dir + "/" + memoryFile
        do { return try FileDescriptor.open(path, O_WRONLY | O_CREAT | O_TRUNC, mode: 0o444) } catch {
            throw SandboxError(.host, "cannot create the snapshot memory file \(path)", underlying: error)
        }
    }
}
