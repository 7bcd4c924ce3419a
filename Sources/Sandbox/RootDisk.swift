import Foundation
import VirtIO

/// The guest's root disk: a copy-on-write view of a shared, read-only base image.
public enum RootDisk {
    /// Directory for per-sandbox overlay files (unlinked as soon as they are created).
    public static var overlayDirectory: String {
        let dir = SandboxPaths.cacheDirectory + "/overlays"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    /// Resolves an image argument: an existing file is validated as ext4; anything else is
    /// looked up by name in the image store.
    public static func resolveImage(_ nameOrPath: String, progress: (String) -> Void) throws -> String {
        if nameOrPath.contains("/") || FileManager.default.fileExists(atPath: nameOrPath) {
            try validateExt4(nameOrPath)
            return nameOrPath
        }
        return try ImageStoreResolver.resolve(nameOrPath, progress: progress)
    }

    /// Checks that `path` is a readable ext2/3/4 file system (superblock magic 0xEF53).
    public static func validateExt4(_ path: String) throws {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw SandboxError.invalidInput("image \(path): no such file")
        }
        guard !isDir.boolValue else { throw SandboxError.invalidInput("image \(path): is a directory, not an ext4 image") }
        guard let h = FileHandle(forReadingAtPath: path) else { throw SandboxError.invalidInput("image \(path): cannot be opened for reading") }
        defer { try? h.close() }
        let head = h.readData(ofLength: 2048)
        guard head.count >= 1082 else {
            throw SandboxError.invalidInput("image \(path): truncated (\(head.count) bytes; an ext4 superblock needs at least 2 KiB)")
        }
        let magic = UInt16(head[1080]) | UInt16(head[1081]) << 8
        guard magic == 0xEF53 else {
            throw SandboxError.invalidInput("image \(path): not an ext4 file system (superblock magic 0x\(String(magic, radix: 16)), expected 0xef53)")
        }
    }

    /// Opens a copy-on-write block device over `imagePath` (the base is opened read-only).
    public static func open(imagePath: String) throws -> BlockDevice {
        do {
            return try BlockDevice(baseImage: imagePath, overlayDirectory: overlayDirectory, serial: "sandbox-root")
        } catch {
            throw SandboxError.infrastructure("cannot open root disk \(imagePath): \(error)")
        }
    }

    /// Writes base + overlay as one image file (for --keep-disk).
    public static func export(_ device: BlockDevice, to path: String) throws {
        guard let cow = device.backend as? CopyOnWriteDisk else {
            throw SandboxError.infrastructure("the root disk is not a copy-on-write disk")
        }
        do { try cow.exportMerged(to: path) } catch { throw SandboxError.infrastructure("\(path): \(error)") }
    }
}
