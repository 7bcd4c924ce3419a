import ArgumentParser
import Foundation
import Sandbox

/// `sandbox image ...`: build, import, list, inspect, locate and remove root file
/// system images. Progress goes to stderr; results (paths, tables) to stdout.
struct ImageCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "image", abstract: "Build and manage root file system images.",
        discussion: "Images are cached read-only ext4 files in $SANDBOX_CACHE/images (see Docs/Images.md). Recipes live in Sandboxes/images/<name>/.",
        subcommands: [Build.self, List.self, Inspect.self, Path.self, Remove.self, Import.self])

    /// Runs `body`, printing a failure as "sandbox image VERB: message" and exiting 1.
    static func run<T>(_ verb: String, _ body: () throws -> T) throws -> T {
        do { return try body() } catch {
            printError("sandbox image \(verb): \(error)")
            throw ExitCode(1)
        }
    }

    struct Build: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "build", abstract: "Build an image from its recipe (or reuse the cached one) and print its path.")
        @Argument(help: "A recipe in Sandboxes/images/ (default: busybox).")
        var name: String = ImageStore.defaultImageName
        func run() throws {
            let r = try ImageCommand.run("build") { try ImageStore().build(name: name, progress: { printError($0) }) }
            print(r.image.path)
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List the cached images.")
        func run() throws {
            let images = try ImageCommand.run("list") { try ImageStore().list() }
            if images.isEmpty { printError("no images yet; `sandbox image build` makes the default busybox image"); return }
            let rows = [["NAME", "HASH", "SIZE", "CREATED", "RECIPE"]] + images.map {
                [$0.name, String($0.hash.prefix(12)), formatSize($0.size), formatDate($0.created), $0.recipe]
            }
            let widths = (0..<5).map { c in rows.map { $0[c].count }.max() ?? 0 }
            for row in rows {
                print(zip(row, widths).enumerated().map { i, cell in
                    i == 4 ? cell.0 : cell.0.padding(toLength: cell.1, withPad: " ", startingAt: 0)
                }.joined(separator: "  "))
            }
        }
    }

    struct Inspect: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "inspect", abstract: "Show an image's hash, size, recipe, path and whether it has the agent.")
        @Argument(help: "The image name.")
        var name: String
        func run() throws {
            let d = try ImageCommand.run("inspect") { try ImageStore().inspect(name) }
            print("""
                name:        \(d.image.name)
                hash:        \(d.image.hash)
                path:        \(d.image.path)
                size:        \(d.image.size) bytes (\(formatSize(d.image.size)); \(formatSize(d.allocatedBytes)) on disk)
                created:     \(formatDate(d.image.created))
                recipe:      \(d.image.recipe)
                recipe key:  \(d.image.recipeKey.isEmpty ? "-" : d.image.recipeKey)
                agent:       \(d.containsAgent ? "/sbin/sandbox-init present" : "MISSING (/sbin/sandbox-init not found)")
                """)
        }
    }

    struct Path: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "path", abstract: "Print the image file for a name (building a recipe if needed) or validate an image path.")
        @Argument(help: "An image name, or the path of an ext4 image file.")
        var nameOrPath: String = ImageStore.defaultImageName
        func run() throws {
            print(try ImageCommand.run("path") { try ImageStore().path(nameOrPath, progress: { printError($0) }) })
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "rm", abstract: "Remove an image from the cache.")
        @Argument(help: "The image name.")
        var name: String
        func run() throws {
            try ImageCommand.run("rm") { try ImageStore().remove(name) }
            printError("[image] removed \(name)")
        }
    }

    struct Import: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "import", abstract: "Make an image from a root file system directory or tarball.")
        @Option(help: "A directory holding a root file system (copied, not changed).")
        var dir: String?
        @Option(help: "A root file system tarball (extracted with tar -xpf).")
        var tar: String?
        @Option(help: "The name to give the image.")
        var name: String

        func validate() throws {
            guard (dir == nil) != (tar == nil) else { throw ValidationError("give exactly one of --dir DIR or --tar FILE") }
        }

        func run() throws {
            let r = try ImageCommand.run("import") {
                let store = ImageStore()
                if let dir { return try store.importDirectory(path: dir, name: name, progress: { printError($0) }) }
                return try store.importTarball(path: tar!, name: name, progress: { printError($0) })
            }
            print(r.image.path)
        }
    }
}

private func formatSize(_ bytes: UInt64) -> String {
    bytes >= 1 << 20 ? String(format: "%.1f MiB", Double(bytes) / 1048576) : String(format: "%.0f KiB", Double(bytes) / 1024)
}

private func formatDate(_ date: Date) -> String {
    let f = DateFormatter()
    f.locale = Locale(identifier: "en_US_POSIX")
    f.dateFormat = "yyyy-MM-dd HH:mm:ss"
    return f.string(from: date)
}
