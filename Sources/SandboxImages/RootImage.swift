import Foundation
import SandboxCore

/// Root images as the library hands them to a VMM: a path, validated as ext4.
public enum RootImage {
    /// Resolves an image argument: an existing file (or anything with a `/`) is validated
    /// as ext4; anything else is looked up by name in the default image store, building
    /// its recipe first if needed.
    public static func resolve(_ nameOrPath: String, progress: (String) -> Void) throws -> String {
        if nameOrPath.contains("/") || FileManager.default.fileExists(atPath: nameOrPath) {
            try validateExt4(nameOrPath)
            return nameOrPath
        }
        return try ImageStore().path(nameOrPath, progress: progress)
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
}
