import Foundation
import Testing
@testable import SandboxImages

/// The stores remember what their inputs resolved to in memo files; a cache moved or
/// copied elsewhere must resolve inside its new location, never into its old one.
@Suite struct MemoTests {
    @Test("memos hold paths relative to their store; an absolute or escaping one counts as none")
    func relativePaths() throws {
        let dir = NSTemporaryDirectory() + "sandbox-memo-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let memo = dir + "/k.memo"
        InputFingerprint.rememberPath(memo, fingerprint: "f", path: dir + "/pvm-1234/vmlinux", under: dir)
        #expect(try String(contentsOfFile: memo, encoding: .utf8).hasSuffix("\n--\npvm-1234/vmlinux\n"))
        #expect(InputFingerprint.recallPath(memo, fingerprint: "f", under: dir) == dir + "/pvm-1234/vmlinux")
        // The same memo file in a moved store resolves inside the new one.
        let moved = dir + "/moved"
        #expect(InputFingerprint.recallPath(memo, fingerprint: "f", under: moved) == moved + "/pvm-1234/vmlinux")
        #expect(InputFingerprint.recallPath(memo, fingerprint: "other", under: dir) == nil)
        // What older builds wrote (absolute paths), or a path that leaves the store: none.
        for stale in ["/root/.cache/sandbox/kernels/pvm-1234/vmlinux", "../elsewhere/vmlinux"] {
            InputFingerprint.remember(memo, fingerprint: "f", value: stale)
            #expect(InputFingerprint.recallPath(memo, fingerprint: "f", under: dir) == nil, "\(stale)")
        }
        // A path outside the store is not remembered.
        InputFingerprint.rememberPath(memo, fingerprint: "g", path: "/tmp/x", under: dir)
        #expect(InputFingerprint.recallPath(memo, fingerprint: "g", under: dir) == nil)
    }

    @Test("a fingerprint covers every entry of a directory tree, nested and hidden ones too, and changes when any does")
    func fingerprintWalksTrees() throws {
        let dir = NSTemporaryDirectory() + "sandbox-fp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fm = FileManager.default
        try fm.createDirectory(atPath: dir + "/a/b/.hidden", withIntermediateDirectories: true)
        defer { try? fm.removeItem(atPath: dir) }
        try Data("1".utf8).write(to: URL(fileURLWithPath: dir + "/a/b/.hidden/f"))
        try Data("2".utf8).write(to: URL(fileURLWithPath: dir + "/top"))
        try fm.createSymbolicLink(atPath: dir + "/link", withDestinationPath: "/")  // listed, not followed
        let first = InputFingerprint.of([dir, dir + "/nothing-here"])
        let lines = first.split(separator: "\n").map { String($0.split(separator: " ")[0]) }
        #expect(lines == [dir + "/a", dir + "/a/b", dir + "/a/b/.hidden", dir + "/a/b/.hidden/f", dir + "/link", dir + "/top", dir + "/nothing-here"],
                "\(first)")
        #expect(first.hasSuffix("\(dir)/nothing-here missing"))
        #expect(InputFingerprint.of([dir, dir + "/nothing-here"]) == first)
        try Data("22".utf8).write(to: URL(fileURLWithPath: dir + "/a/b/.hidden/f"))
        #expect(InputFingerprint.of([dir, dir + "/nothing-here"]) != first)
        // A memo's value comes back with the whitespace around it trimmed.
        let memo = dir + "/m.memo"
        try Data("fp\n--\n  value \n\n".utf8).write(to: URL(fileURLWithPath: memo))
        #expect(InputFingerprint.recall(memo, fingerprint: "fp") == "value")
        #expect(InputFingerprint.recall(memo, fingerprint: "f") == nil)
        try Data("no separator".utf8).write(to: URL(fileURLWithPath: memo))
        #expect(InputFingerprint.recall(memo, fingerprint: "no separator") == nil)
    }
}
