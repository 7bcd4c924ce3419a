import Foundation
import SandboxCore
import VirtIO

/// The guest's root disk inside the VMM: a copy-on-write view of a shared, read-only
/// base image, with a private overlay that is unlinked as soon as it is created.
enum RootDisk {
    /// Opens a copy-on-write block device over `imagePath` (the base is opened read-only),
    /// its overlay in `overlayDirectory`, grown to `sizeBytes` when that is larger, with
    /// a snapshot's read-only `layer` between them when there is one.
    static func open(imagePath: String, overlayDirectory: String, sizeBytes: UInt64? = nil, layer: DiskLayer? = nil) throws -> BlockDevice {
        do {
            try FileManager.default.createDirectory(atPath: overlayDirectory, withIntermediateDirectories: true)
            return try BlockDevice(baseImage: imagePath, overlayDirectory: overlayDirectory, minimumCapacity: sizeBytes,
                                   layer: layer, serial: "sandbox-root")
        } catch {
            throw SandboxError(.image, "cannot open the root disk \(imagePath)", underlying: error)
        }
    }

    /// Writes base + overlay as one image file (for --keep-disk).
    static func export(_ device: BlockDevice, to path: String) throws {
        guard let cow = device.backend as? CopyOnWriteDisk else {
            throw SandboxError.internal("the root disk is not a copy-on-write disk")
        }
        do { try cow.exportMerged(to: path) } catch { throw SandboxError(.host, "cannot keep the disk at \(path)", underlying: error) }
    }
}
