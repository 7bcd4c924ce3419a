import Foundation
import SandboxCore
import SystemShims

/// A cheap stand-in for hashing a set of input files: their paths, sizes and
/// modification times. Used to remember what an expensive key (kernel or image
/// recipe hash) resolved to, so that a warm `sandbox exec` does not re-hash its inputs
/// on every run. Any change to an input changes the fingerprint, and then the full key
/// is computed again.
enum InputFingerprint {
    /// Fingerprint of `paths` (directories are walked; missing paths count as "missing").
    static func of(_ paths: [String]) -> String {
        var lines: [String] = []
        for p in paths {
            var top = stat()
            guard stat(p, &top) == 0 else { lines.append("\(p) missing"); continue }
            var files = [p]
            if (top.st_mode & S_IFMT) == S_IFDIR {
                files = entriesRecursively(under: p).sorted().map { p + "/" + $0 }
            }
            for f in files {
                var st = stat()
                guard stat(f, &st) == 0 else { lines.append("\(f) unreadable"); continue }
                lines.append("\(f) \(st.st_size) \(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec) \(st.st_ino)")
            }
        }
        return lines.joined(separator: "\n")
    }

    /// The value remembered in `memoFile` for `fingerprint`, if any.
    static func recall(_ memoFile: String, fingerprint: String) -> String? {
        guard let bytes = readToEnd(memoFile) else { return nil }
        let separator = Array("\n--\n".utf8)
        guard let at = bytes.indices.first(where: { bytes[$0...].starts(with: separator) }) else { return nil }
        guard bytes[..<at].elementsEqual(fingerprint.utf8) else { return nil }
        let value = textTrimmingBlanks(bytes[(at + separator.count)...])
        return value.isEmpty ? nil : value
    }

    /// Remembers `value` for `fingerprint` (atomically; failures are ignored: the memo is only a cache).
    static func remember(_ memoFile: String, fingerprint: String, value: String) {
        try? (fingerprint + "\n--\n" + value + "\n").write(toFile: memoFile, atomically: true, encoding: .utf8)
    }

    /// A path remembered relative to `directory` (the store the memo sits in), so that a
    /// cache moved or copied elsewhere never resolves into its old location; a memo that
    /// holds anything else counts as none.
    static func recallPath(_ memoFile: String, fingerprint: String, under directory: String) -> String? {
        guard let value = recall(memoFile, fingerprint: fingerprint), !value.hasPrefix("/"), !value.contains("..") else { return nil }
        return directory + "/" + value
    }

    /// Remembers `path` (inside `directory`) relative to `directory`.
    static func rememberPath(_ memoFile: String, fingerprint: String, path: String, under directory: String) {
        guard path.hasPrefix(directory + "/") else { return }
        remember(memoFile, fingerprint: fingerprint, value: String(path.dropFirst(directory.count + 1)))
    }
}
