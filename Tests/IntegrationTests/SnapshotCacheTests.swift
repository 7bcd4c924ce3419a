import Foundation
@testable import Sandbox
import Testing

/// The start-snapshot cache's pruning, on a hand-made cache directory (no VM).
@Suite("start snapshot cache")
struct SnapshotCacheTests {
    @Test("pruning keeps the entries of another VMM build that still exists, and removes the same VMM's older ones")
    func pruneKeepsOtherBuilds() throws {
        let fm = FileManager.default
        let root = NSTemporaryDirectory() + "sandbox-cache-prune-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? fm.removeItem(atPath: root) }
        let cache = root + "/snapshots"
        try fm.createDirectory(atPath: cache, withIntermediateDirectories: true)
        // Two VMM "builds" that exist (executable files) and one that is gone.
        let mine = root + "/debug/sandbox-vmm", other = root + "/release/sandbox-vmm", gone = root + "/gone/sandbox-vmm"
        for vmm in [mine, other] {
            try fm.createDirectory(atPath: (vmm as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            fm.createFile(atPath: vmm, contents: Data("#!/bin/sh\n".utf8), attributes: [.posixPermissions: 0o755])
        }
        let label = "busybox-256m-1c-pvm"
        func entry(_ hash: String, madeBy vmm: String?, daysOld: Double = 0) throws -> String {
            let name = label + "-" + hash
            let dir = cache + "/" + name
            try fm.createDirectory(atPath: dir, withIntermediateDirectories: true)
            fm.createFile(atPath: dir + "/state.json", contents: Data("{}".utf8))
            if let vmm { try (vmm + "\n").write(toFile: dir + "/" + SnapshotCache.vmmFileName, atomically: true, encoding: .utf8) }
            if daysOld > 0 {
                try fm.setAttributes([.modificationDate: Date().addingTimeInterval(-daysOld * 86400)], ofItemAtPath: dir)
            }
            return name
        }
        let current = try entry("00000000000000a0", madeBy: mine)
        let olderMine = try entry("00000000000000a1", madeBy: mine)
        let otherBuild = try entry("00000000000000b0", madeBy: other)
        let otherBuildOld = try entry("00000000000000b1", madeBy: other, daysOld: 8)
        let goneBuild = try entry("00000000000000c0", madeBy: gone)
        let unrecorded = try entry("00000000000000d0", madeBy: nil)
        let otherLabel = try { () throws -> String in
            let n = "busybox-512m-1c-pvm-00000000000000e0"
            try fm.createDirectory(atPath: cache + "/" + n, withIntermediateDirectories: true)
            return n
        }()

        SnapshotCache.prune(label: label, keeping: current, vmm: mine, in: cache)

        let left = Set(try fm.contentsOfDirectory(atPath: cache))
        #expect(left.contains(current))
        #expect(left.contains(otherBuild), "another existing VMM build's entry must stay: \(left.sorted())")
        #expect(left.contains(otherLabel), "another shape's entry must stay: \(left.sorted())")
        for removed in [olderMine, otherBuildOld, goneBuild, unrecorded] {
            #expect(!left.contains(removed), "\(removed) should have been pruned: \(left.sorted())")
        }
        #expect(!left.contains { $0.hasPrefix(".trash-") }, "renamed-away entries are removed: \(left.sorted())")
    }
}
