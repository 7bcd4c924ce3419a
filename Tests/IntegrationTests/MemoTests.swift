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
}
