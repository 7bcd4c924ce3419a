import Foundation
import SandboxCore

/// `<cache>/images/index.json`: image names mapped to their content-addressed files.
///
/// Readers load it without a lock (it is only ever replaced by an atomic rename);
/// writers hold an flock on `index.lock` across read-modify-write.
struct ImageIndex: Codable {
    struct Entry: Codable, Equatable {
        /// SHA-256 of the image file; the file is `<images>/<hash>.ext4`.
        var hash: String
        /// The recipe name, or `import-dir:PATH` / `import-tar:PATH`.
        var recipe: String
        var created: Date
        /// The image file's size in bytes.
        var size: UInt64
        /// Hash over the recipe folder and the agent binary; empty for imports.
        var recipeKey: String
    }

    static let currentFormat = 1
    var format: Int = ImageIndex.currentFormat
    var images: [String: Entry] = [:]
    /// Image files no name refers to any more, with when they were replaced. They are
    /// deleted only after ``retirementSeconds``, so that a run which resolved the old
    /// file a moment before a rebuild (another process, another version of this
    /// library sharing the cache) still finds it when its VMM opens it.
    var retired: [String: Retired]? = nil
    struct Retired: Codable, Equatable {
        /// The name it was the image of, and when it stopped being that.
        var name: String
        var since: Date
        /// Its index entry then, so that a build for the same inputs can take it back
        /// (two library versions sharing one cache then do not rebuild in turn).
        var entry: Entry?
    }
    static let retirementSeconds: TimeInterval = 15 * 60

    static func encoder() -> JSONEncoder {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        e.dateEncodingStrategy = .iso8601
        return e
    }

    /// Loads the index at `path`; a missing file is an empty index.
    static func load(_ path: String) throws -> ImageIndex {
        guard let data = FileManager.default.contents(atPath: path) else {
            if FileManager.default.fileExists(atPath: path) {
                throw SandboxError.image("cannot read the image index \(path)")
            }
            return ImageIndex()
        }
        let d = JSONDecoder()
        d.dateDecodingStrategy = .iso8601
        do {
            let index = try d.decode(ImageIndex.self, from: data)
            guard index.format == currentFormat else {
                throw SandboxError.image("the image index \(path) has format \(index.format); this sandbox reads format \(currentFormat)")
            }
            return index
        } catch let e as SandboxError { throw e } catch {
            throw SandboxError.image("the image index \(path) is corrupt (\(error)); remove it and rebuild the images")
        }
    }

    func save(_ path: String) throws {
        try ImageFiles.writeAtomically(try ImageIndex.encoder().encode(self) + Data("\n".utf8), to: path)
    }
}
