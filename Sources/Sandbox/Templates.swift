import Foundation
import SandboxCore
import SandboxImages
#if canImport(Glibc)
import Glibc
#endif

/// Named templates: a sandbox started, prepared by a setup command (installing packages,
/// building a project, starting a server), and snapshotted as the command left it.
/// Every later sandbox of the template starts there in milliseconds
/// (`SandboxConfiguration.template`, `sandbox exec --template NAME`).
///
/// ```
///   $cache/templates/NAME/
///     template.json   Templates.Info: name, image, shape, setup command, when
///     state.json, memory, disk.layer, disk.map    the snapshot (Docs/SnapshotFormat.md)
/// ```
///
/// The template's disk is a stack: the image (read-only, shared), the template's layer
/// (read-only, shared: the start snapshot's and the setup's writes), and each sandbox's
/// private overlay.
public enum Templates {
    /// `$SANDBOX_CACHE/templates` (see `SandboxPaths.cacheDirectory`).
    public static var directory: String { SandboxPaths.cacheDirectory + "/templates" }

    /// What a template was made from.
    public struct Info: Codable, Sendable, Equatable {
        public var name: String
        public var image: String
        public var memoryMiB: UInt64
        public var cpus: Int
        public var diskSizeMiB: UInt64?
        public var setup: [String]
        public var created: Date
        /// Milliseconds the setup command and snapshot took, all told.
        public var makeMillis: Double
    }

    /// A template name: 1 to 64 letters, digits, `-`, `_` or `.`, not starting with `.`.
    public static func checkName(_ name: String) throws(SandboxError) {
        let ok = !name.isEmpty && name.count <= 64 && !name.hasPrefix(".")
            && name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == ".") }
        guard ok else {
            throw SandboxError.invalidInput("template name '\(name)': use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'")
        }
    }

    /// The directory of template `name`, which must exist.
    public static func path(_ name: String) throws(SandboxError) -> String {
        try checkName(name)
        let dir = directory + "/" + name
        guard FileManager.default.fileExists(atPath: dir + "/state.json") else {
            let known = list().map(\.name)
            throw SandboxError(.snapshot, "no template named '\(name)' (\(known.isEmpty ? "there are none; make one with `sandbox template create \(name) --run CMD`" : "there are: \(known.joined(separator: ", "))"))")
        }
        return dir
    }

    /// Template `name`'s description.
    public static func info(_ name: String) throws(SandboxError) -> Info {
        let dir = try path(name)
        guard let data = FileManager.default.contents(atPath: dir + "/template.json"),
              let info = try? JSONDecoder.templates.decode(Info.self, from: data) else {
            throw SandboxError(.snapshot, "\(dir)/template.json is missing or damaged; remove the template (`sandbox template rm \(name)`) and make it again")
        }
        return info
    }

    /// Every template, by name (damaged ones are left out; `info` says what is wrong).
    public static func list() -> [Info] {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).filter { !$0.hasPrefix(".") }.sorted()
        return names.compactMap { try? info($0) }
    }

    /// Bytes the template's files use on the host (its layer and memory are sparse).
    public static func bytesOnDisk(_ name: String) -> UInt64 {
        let dir = directory + "/" + name
        var total: UInt64 = 0
        for f in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] {
            var st = stat()
            if stat(dir + "/" + f, &st) == 0 { total += UInt64(st.st_blocks) * 512 }
        }
        return total
    }

    /// Makes template `name`: starts a sandbox from `configuration` (from its cached
    /// start snapshot unless `cold`), runs `setup`, and snapshots it if the command exits
    /// 0. The setup's output goes to `onOutput`. With `replace`, an existing template of
    /// that name is replaced once the new one is whole; without it, an existing one is an
    /// error. Nothing is left behind when the setup fails.
    public static func create(name: String, configuration config: SandboxConfiguration, setup: [String], replace: Bool = false,
                              onOutput: (OutputEvent) -> Void = { _ in },
                              progress: (String) -> Void = { _ in }) throws(SandboxError) -> Info {
        try checkName(name)
        guard config.template == nil else { throw SandboxError.invalidInput("a template is made from an image, not from another template") }
        let fm = FileManager.default
        let final = directory + "/" + name
        if !replace && fm.fileExists(atPath: final) {
            throw SandboxError.invalidInput("template '\(name)' already exists (replace it with --replace, or remove it with `sandbox template rm \(name)`)")
        }
        do { try fm.createDirectory(atPath: directory, withIntermediateDirectories: true) } catch {
            throw SandboxError(.host, "cannot create the template directory \(directory)", underlying: error)
        }
        let staging = directory + "/.\(name).new-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? fm.removeItem(atPath: staging) }
        let made = try SnapshotMaker.create(directory: staging, configuration: config, setup: setup, onOutput: onOutput, progress: progress)
        let info = Info(name: name, image: config.image, memoryMiB: config.memoryMiB, cpus: config.cpus, diskSizeMiB: config.diskSizeMiB,
                        setup: setup, created: Date(), makeMillis: made.totalMillis)
        do {
            let data = try JSONEncoder.templates.encode(info)
            try data.write(to: URL(fileURLWithPath: staging + "/template.json"), options: .atomic)
        } catch {
            throw SandboxError(.host, "cannot write \(staging)/template.json", underlying: error)
        }
        // Into place: the old one (if replaced) is renamed away first, then removed.
        let old = directory + "/.\(name).old-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let hadOld = replace && rename(final, old) == 0
        guard rename(staging, final) == 0 else {
            let e = errno
            if hadOld { rename(old, final) }
            throw SandboxError(.host, "cannot move the template into place at \(final): \(String(cString: strerror(e)))")
        }
        if hadOld { try? fm.removeItem(atPath: old) }
        return info
    }

    /// Removes template `name`. Sandboxes already started from it keep running (their
    /// files stay open).
    public static func remove(_ name: String) throws(SandboxError) {
        let dir = try path(name)
        let trash = directory + "/.\(name).rm-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        guard rename(dir, trash) == 0 else {
            throw SandboxError(.host, "cannot remove the template \(dir): \(String(cString: strerror(errno)))")
        }
        do { try FileManager.default.removeItem(atPath: trash) } catch {
            throw SandboxError(.host, "cannot remove the template's files in \(trash)", underlying: error)
        }
    }
}

extension JSONEncoder {
    static var templates: JSONEncoder {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .prettyPrinted]
        e.dateEncodingStrategy = .iso8601
        return e
    }
}

extension JSONDecoder {
    static var templates: JSONDecoder {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .iso8601
        return d
    }
}
