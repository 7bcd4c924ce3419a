import Crypto
import Foundation
import MicroVM
import SandboxCore
import SystemShims
import VMMProtocol
import VirtIO
#if canImport(Glibc)
import Glibc
#endif

/// The files of one snapshot directory (Docs/SnapshotFormat.md):
///
///     DIR/state.json    Manifest: format, build, the disk stack, checksums
///     DIR/machine.json  the machine state (MachineSnapshot)
///     DIR/memory        guest RAM, byte for byte (sparse where RAM was zero)
///     DIR/disk.layer    the root disk's blocks above its base image (sparse, at their offsets)
///     DIR/disk.map      which blocks disk.layer holds (one bit per 4 KiB block)
///
/// `state.json` is written last (through a rename), so its presence means the rest is
/// complete.
enum SnapshotFiles {
    static let stateFile = "state.json"
    static let machineFile = "machine.json"
    static let memoryFile = "memory"
    static let layerFile = "disk.layer"
    static let mapFile = "disk.map"
    /// The directory layout; `MachineSnapshot.currentFormat` is the machine state's.
    /// 4: the machine state in its own file, checksummed as written.
    static let currentFormat = 4

    /// What state.json holds.
    struct Manifest: Codable {
        var format: Int
        /// The sandbox-vmm build that wrote it (`vmmBuild()`); another build refuses it.
        var vmmBuild: String
        /// The root disk: a read-only base image plus this snapshot's layer.
        var disk: Disk
        /// Hex SHA-256 of machine.json's bytes.
        var machineSHA256: String
    }

    /// The root disk's stack: the base image (by path, with the size and modification
    /// time it had, so a changed or replaced base is refused) and the layer files.
    struct Disk: Codable, Equatable {
        var baseImage: String
        var baseBytes: UInt64
        var baseModified: String
        /// The disk's size as the guest sees it.
        var capacity: UInt64
        /// Blocks held by the layer.
        var layerBlocks: Int
        /// Hex SHA-256 of disk.map.
        var mapSHA256: String
    }

    /// A file's size and modification time, as a `Disk` records them.
    static func identity(of path: String) -> (bytes: UInt64, modified: String)? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return (UInt64(st.st_size), "\(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec)")
    }

    static func hex<D: Sequence>(_ digest: D) -> String where D.Element == UInt8 { hexString(digest) }

    /// This executable's identity: its size and modification time. A rebuilt VMM (and
    /// with it, as the build scripts go, the guest agent in new images) writes and
    /// expects other states, so snapshots are tied to the build that made them.
    static func vmmBuild() -> String { build }
    /// Read once, at the first use (the jail touches it before /proc is gone).
    static let build: String = identity(of: "/proc/self/exe").map { "\($0.bytes)-\($0.modified)" } ?? "unknown"

    static func encoder() -> JSONEncoder {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return e
    }


    /// Writes the root disk's layer (every block above the base: the snapshot's writes and
    /// those of the layer it was itself restored over) and returns its record.
    /// `base` is the base image's identity, read when the disk was opened (inside the jail
    /// its path does not exist).
    static func writeDisk(_ disk: CopyOnWriteDisk, base: (bytes: UInt64, modified: String)?, to dir: String) throws -> Disk {
        guard let base else {
            throw SandboxError(.host, "\(disk.baseImagePath): the root disk's base image is gone")
        }
        let layer: DiskLayer
        do { layer = try disk.exportLayer(dataPath: dir + "/" + layerFile, mapPath: dir + "/" + mapFile) } catch {
            throw SandboxError(.host, "cannot write the snapshot's disk layer in \(dir)", underlying: error)
        }
        return Disk(baseImage: disk.baseImagePath, baseBytes: base.bytes, baseModified: base.modified, capacity: disk.capacity,
                    layerBlocks: layer.blockCount, mapSHA256: hex(SHA256.hash(data: DiskLayer.encodeMap(layer.map))))
    }

    /// Checks the disk stack of a snapshot in `dir` and returns its base image and layer:
    /// the base unchanged since the snapshot, the map matching its checksum, the files
    /// their sizes.
    static func readDisk(_ disk: Disk, in dir: String) throws -> (base: String, layer: DiskLayer) {
        guard let base = identity(of: disk.baseImage) else {
            throw SandboxError(.snapshot, "\(dir): the snapshot's base image \(disk.baseImage) is gone (removed from the image store?); take the snapshot again")
        }
        guard base.bytes == disk.baseBytes, base.modified == disk.baseModified else {
            throw SandboxError(.snapshot, "\(dir): the snapshot's base image \(disk.baseImage) changed since the snapshot (\(base.bytes) bytes, modified \(base.modified); was \(disk.baseBytes), \(disk.baseModified)); take the snapshot again")
        }
        let mapPath = dir + "/" + mapFile
        guard let map = FileManager.default.contents(atPath: mapPath), map.count <= 64 << 20 else {
            throw SandboxError(.snapshot, "\(mapPath): the snapshot's disk map is missing or too large")
        }
        guard hex(SHA256.hash(data: map)) == disk.mapSHA256 else {
            throw SandboxError(.snapshot, "\(mapPath): the disk map's checksum does not match the state (the file was changed or damaged)")
        }
        do {
            let layer = try DiskLayer(dataPath: dir + "/" + layerFile, capacity: disk.capacity, mapBytes: [UInt8](map))
            return (disk.baseImage, layer)
        } catch {
            throw SandboxError(.snapshot, "the snapshot's disk layer is damaged: \(error.description)")
        }
    }

    /// Writes `machine` (machine.json), then the state file naming its checksum and
    /// `disk` into `dir` (each atomically; the state file last).
    static func writeState(_ machine: MachineSnapshot, disk: Disk, to dir: String) throws {
        let machineData = try encoder().encode(machine)
        let manifest = Manifest(format: currentFormat, vmmBuild: vmmBuild(), disk: disk, machineSHA256: hex(SHA256.hash(data: machineData)))
        let data = try encoder().encode(manifest)
        for (name, bytes) in [(machineFile, machineData), (stateFile, data)] {
            let path = dir + "/" + name
            do { try bytes.write(to: URL(fileURLWithPath: path), options: .atomic) } catch {
                throw SandboxError(.host, "cannot write the snapshot state \(path)", underlying: error)
            }
        }
    }

    /// Reads and checks `dir`'s state file: present, decodable, of this format, and its
    /// checksum matching. Every failure names the file and what is wrong with it.
    static func readState(from dir: String) throws -> (manifest: Manifest, machine: MachineSnapshot) {
        let path = dir + "/" + stateFile
        guard let data = FileManager.default.contents(atPath: path) else {
            throw SandboxError(.snapshot, "\(path): no such snapshot state file (an incomplete or missing snapshot)")
        }
        guard data.count < 64 << 20 else { throw SandboxError(.snapshot, "\(path): \(data.count) bytes is too large for a snapshot state") }
        struct FormatOnly: Decodable { var format: Int }
        guard let f = try? JSONDecoder().decode(FormatOnly.self, from: data) else {
            throw SandboxError(.snapshot, "\(path): not a snapshot state file (not JSON with a format number)")
        }
        guard f.format == currentFormat else {
            throw SandboxError(.snapshot, "\(path): snapshot format \(f.format); this sandbox-vmm reads format \(currentFormat) (take the snapshot again)")
        }
        let manifest: Manifest
        do { manifest = try JSONDecoder().decode(Manifest.self, from: data) } catch {
            throw SandboxError(.snapshot, "\(path): the snapshot state does not decode", underlying: ErrorText(error))
        }
        guard manifest.vmmBuild == vmmBuild() else {
            throw SandboxError(.snapshot, "\(path): made by another sandbox-vmm build (\(manifest.vmmBuild); this one is \(vmmBuild())); take the snapshot again")
        }
        let machinePath = dir + "/" + machineFile
        guard let machineData = FileManager.default.contents(atPath: machinePath), machineData.count < 64 << 20 else {
            throw SandboxError(.snapshot, "\(machinePath): the snapshot's machine state is missing or too large")
        }
        guard hex(SHA256.hash(data: machineData)) == manifest.machineSHA256 else {
            throw SandboxError(.snapshot, "\(machinePath): the machine state's checksum does not match (the file was changed or damaged)")
        }
        let machine: MachineSnapshot
        do { machine = try JSONDecoder().decode(MachineSnapshot.self, from: machineData) } catch {
            throw SandboxError(.snapshot, "\(machinePath): the machine state does not decode", underlying: ErrorText(error))
        }
        return (manifest, machine)
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

    /// The snapshot's working set (``WorkingSet``), checked against its RAM: nil and no
    /// note when it has none (an older or a checkpoint snapshot), nil and why when the
    /// file is unusable (the restore goes on without it: it only saves time).
    static func readWorkingSet(in dir: String, memoryBytes: UInt64) -> (set: WorkingSet?, note: String?) {
        let path = dir + "/" + WorkingSet.fileName
        let bytes: [UInt8]
        do { bytes = try readWholeFile(path, limit: 16 + UInt64(WorkingSet.maxRanges) * 8) } catch {
            if case .notFound = error { return (nil, nil) }
            return (nil, "\(error)")
        }
        do { return (try WorkingSet.decode(bytes, memoryBytes: memoryBytes), nil) } catch {
            return (nil, "\(path): \(error)")
        }
    }

    /// Creates (or truncates) the memory file for writing.
    static func createMemory(in dir: String) throws -> FileDescriptor {
        let path = dir + "/" + memoryFile
        do { return try FileDescriptor.open(path, O_WRONLY | O_CREAT | O_TRUNC, mode: 0o444) } catch {
            throw SandboxError(.host, "cannot create the snapshot memory file \(path)", underlying: error)
        }
    }
}
