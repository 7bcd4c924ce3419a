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

    /// Checks that `path` is a whole ext2/3/4 image: a regular file with the superblock
    /// magic 0xEF53 and at least as many bytes as the superblock's block count says (a
    /// truncated image would otherwise boot and fail as "Unable to mount root fs").
    public static func validateExt4(_ path: String) throws {
        switch ImageFiles.ext4Problem(path) {
        case nil: return
        case .missing?: throw SandboxError(.image, "image \(path): no such file")
        case .notAFile?:
            var isDir: ObjCBool = false
            _ = FileManager.default.fileExists(atPath: path, isDirectory: &isDir)
            throw SandboxError(.image, isDir.boolValue ? "image \(path): is a directory, not an ext4 image" : "image \(path): not a regular file")
        case let problem?: throw SandboxError(.image, ImageStore.describe(problem, path: path))
        }
    }
}
