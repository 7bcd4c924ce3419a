import Foundation
import Testing

/// Snapshots: `sandbox snapshot create`, then sandboxes that start from it.
@Suite("snapshots: make one, start sandboxes from it", .serialized)
struct SnapshotTests {
    let t = ["--timeout", Fixture.inLab ? "600" : "60"]

    func sandbox(_ args: [String]) throws -> Fixture.Result {
        try Fixture.run(Fixture.sandboxBinary, args, timeout: Fixture.inLab ? 900 : 120)
    }

    /// A fresh snapshot in a scratch directory (removed by the caller).
    func makeSnapshot(_ extra: [String] = []) throws -> (dir: String, path: String) {
        let dir = NSTemporaryDirectory() + "sandbox-snap-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let r = try sandbox(["snapshot", "create", dir + "/s"] + extra)
        try #require(r.status == 0, "snapshot create: \(r.stderr)")
        #expect(r.stderr.contains("snapshot written to \(dir)/s"), "\(r.stderr)")
        return (dir, dir + "/s")
    }

    @Test("a sandbox started from a snapshot runs commands, and each one starts from the snapshot, not from the last run")
    func restoreRunsCommands() throws {
        let (scratch, snap) = try makeSnapshot()
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        for f in ["state.json", "machine.json", "memory", "disk.layer", "disk.map"] {
            #expect(FileManager.default.fileExists(atPath: snap + "/" + f), "no \(f) in the snapshot")
        }
        let a = try sandbox(["exec", "--snapshot", snap, "--timings"] + t + ["--", "sh", "-c", "echo restored; test -e /root/mark && echo seen; echo x > /root/mark; sync; cat /root/mark; sleep 0.2; exit 3"])
        #expect(a.status == 3, "\(a.stderr)")
        #expect(a.stdout == "restored\nx\n", "\(a.stdout) \(a.stderr)")
        #expect(a.stderr.contains("restored from the snapshot"), "\(a.stderr)")
        // The next sandbox sees neither the file nor anything else of the first.
        let b = try sandbox(["exec", "--snapshot", snap] + t + ["--", "sh", "-c", "test -e /root/mark && echo seen || echo clean; echo out; echo err >&2"])
        #expect(b.status == 0, "\(b.stderr)")
        #expect(b.stdout == "clean\nout\n")
        #expect(b.stderr == "err\n", "\(b.stderr)")
        // Memory writes of one restored guest are its own (the memory file is never written).
        let sum = try Fixture.sha256(file: snap + "/memory")
        let c = try sandbox(["exec", "--snapshot", snap] + t + ["--", "sh", "-c", "dd if=/dev/zero of=/dev/shm/fill bs=1M count=32 2>/dev/null; echo ok"])
        #expect(c.stdout == "ok\n", "\(c.stderr)")
        #expect(try Fixture.sha256(file: snap + "/memory") == sum)
    }

    @Test("a snapshot records the pages a first run writes; restores copy them in ahead, and an unusable record is ignored, saying why")
    func workingSet() throws {
        let (scratch, snap) = try makeSnapshot()
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let file = snap + "/working-set"
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: file)))
        try #require(bytes.count > 16 && Array(bytes.prefix(8)) == Array("SBXWSET1".utf8), "working-set: \(bytes.prefix(16))")
        func pagesCopied(_ r: Fixture.Result) -> Int? {
            guard let m = r.stderr.firstMatch(of: /\((\d+) pages of its working set copied in ahead\)/) else { return nil }
            return Int(m.1)
        }
        let a = try sandbox(["exec", "--snapshot", snap, "--timings"] + t + ["--", "echo", "ok"])
        #expect(a.status == 0 && a.stdout == "ok\n", "\(a.stderr)")
        let copied = try #require(pagesCopied(a), "\(a.stderr)")
        // 256 MiB of RAM: a first run writes a few hundred pages, never a quarter of RAM.
        #expect(copied > 20 && copied <= 16_384, "\(copied) pages")
        func expectIgnored(_ reason: String) throws {
            let r = try sandbox(["exec", "--snapshot", snap, "--timings"] + t + ["--", "echo", "ok"])
            #expect(r.status == 0 && r.stdout == "ok\n", "\(r.stderr)")
            #expect(pagesCopied(r) == nil, "\(r.stderr)")
            #expect(r.stderr.contains("working set not copied in ahead: ") && r.stderr.contains(reason), "\(r.stderr)")
        }
        try FileManager.default.removeItem(atPath: file)
        try Data("not a working set, but long enough".utf8).write(to: URL(fileURLWithPath: file))
        try expectIgnored("does not start with SBXWSET1")
        // A range past the end of RAM: refused whole, nothing copied.
        var outside = Array(bytes.prefix(12))
        for v: UInt32 in [1, 65_535, 2] { withUnsafeBytes(of: v.littleEndian) { outside += $0 } }
        try Data(outside).write(to: URL(fileURLWithPath: file))
        try expectIgnored("outside RAM")
        try FileManager.default.removeItem(atPath: file)
        try expectIgnored("the snapshot has no working set")
    }

    @Test("two sandboxes restored from one snapshot differ in entropy and have the host's clock")
    func restoredSandboxesAreUnique() throws {
        let (scratch, snap) = try makeSnapshot()
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        // The guest's hardware RNG is the VMM's virtio-rng; what its driver had read ahead
        // before the snapshot is dropped by the agent's reseed.
        let script = "cat /proc/sys/kernel/random/uuid; head -c 64 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; "
            + "cat /sys/class/misc/hw_random/rng_current; head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \\n'; echo"
        var seen: [[String]] = []
        for _ in 0..<2 {
            let r = try sandbox(["exec", "--snapshot", snap] + t + ["--", "sh", "-c", script])
            #expect(r.status == 0, "\(r.stderr)")
            let lines = r.stdout.split(separator: "\n").map(String.init)
            try #require(lines.count == 5, "\(r.stdout)")
            #expect(lines[3] == "virtio_rng.0", "hwrng: \(lines[3])")
            let guestTime = Double(lines[2]) ?? 0
            #expect(abs(guestTime - Date().timeIntervalSince1970) <= (Fixture.inLab ? 5 : 2), "guest clock \(lines[2]), host \(Date().timeIntervalSince1970)")
            seen.append(lines)
        }
        #expect(seen[0][0] != seen[1][0], "both restored sandboxes read uuid \(seen[0][0])")
        #expect(seen[0][1] != seen[1][1] && seen[0][1].count == 128, "urandom: \(seen[0][1]) / \(seen[1][1])")
        #expect(seen[0][4] != seen[1][4] && seen[0][4].count == 64, "hwrng: \(seen[0][4]) / \(seen[1][4])")
    }

    @Test("a snapshot older than the guest's RCU stall timeout restores without a stall report (the guest is told it was paused)")
    func oldSnapshotRestoresQuietly() throws {
        let (scratch, snap) = try makeSnapshot()
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        // Past the 21 s RCU stall timeout: on a host where the guest's clock reads the
        // host's TSC (PVM), this much time passes for the restored guest at once.
        Thread.sleep(forTimeInterval: 25)
        let r = try sandbox(["exec", "--snapshot", snap] + t + ["--", "sh", "-c", "dmesg | grep -i -E 'rcu.*stall|soft lockup' || echo quiet"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == "quiet\n", "the restored guest reported: \(r.stdout)")
    }

    /// Scripts/test makes a snapshot on the host before the lab lane and names it here;
    /// in the lab (another host kind, or at least another CPU) it must be refused.
    static let foreignSnapshot = ProcessInfo.processInfo.environment["SANDBOX_FOREIGN_SNAPSHOT"]

    @Test("a snapshot taken on another host kind or CPU is refused, saying both",
          .enabled(if: foreignSnapshot != nil, "needs SANDBOX_FOREIGN_SNAPSHOT: a snapshot made on another host (Scripts/test sets it for the lab lane)"))
    func foreignHostIsRefused() throws {
        let r = try sandbox(["exec", "--snapshot", try #require(Self.foreignSnapshot)] + t + ["--", "true"])
        #expect(r.status == 125, "\(r.stderr)")
        #expect(r.stderr.contains("snapshot: taken on ") && r.stderr.contains("; this host is "), "\(r.stderr)")
    }

    @Test("bad snapshots and mismatched settings are refused with a specific error")
    func badSnapshots() throws {
        let (scratch, snap) = try makeSnapshot()
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        func run(_ path: String, _ extra: [String] = []) throws -> Fixture.Result {
            try sandbox(["exec", "--snapshot", path] + extra + t + ["--", "true"])
        }
        let missing = try run(scratch + "/nope")
        #expect(missing.status == 125 && missing.stderr.contains("no such snapshot directory"), "\(missing.stderr)")

        let memory = try run(snap, ["--memory", "512"])
        #expect(memory.status == 125 && memory.stderr.contains("taken with 256 MiB of guest memory, this VM has 512 MiB"), "\(memory.stderr)")
        let cpus = try run(snap, ["--cpus", "2"])
        #expect(cpus.status == 125 && cpus.stderr.contains("taken with 1 vCPUs"), "\(cpus.stderr)")
        let disk = try run(snap, ["--disk-size", "4G"])
        #expect(disk.status == 125 && disk.stderr.contains("the disk is the snapshot's"), "\(disk.stderr)")

        // A copy of the snapshot to damage, one way at a time.
        func damaged(_ name: String, _ damage: (String) throws -> Void) throws -> Fixture.Result {
            // Copy it (sparsely: the memory file and the disk layer are mostly holes).
            let copy = scratch + "/" + name
            try FileManager.default.createDirectory(atPath: copy, withIntermediateDirectories: false)
            for f in ["state.json", "machine.json", "disk.map", "memory", "disk.layer"] {
                let cp = try Fixture.run("/bin/cp", ["--sparse=always", snap + "/" + f, copy + "/" + f])
                try #require(cp.status == 0, "\(cp.stderr)")
            }
            try damage(copy)
            return try run(copy)
        }
        let edited = try damaged("edited") { dir in
            try Fixture.edit(dir + "/machine.json") { text in
                #expect(text.contains("\"memoryBytes\":268435456"))
                text = text.replacingOccurrences(of: "\"memoryBytes\":268435456", with: "\"memoryBytes\":268439552")
            }
        }
        #expect(edited.status == 125 && edited.stderr.contains("machine state's checksum does not match"), "\(edited.stderr)")
        let truncated = try damaged("truncated") { dir in try Fixture.truncate(dir + "/state.json", to: 100) }
        #expect(truncated.status == 125 && truncated.stderr.contains("state.json: not a snapshot state file"), "\(truncated.stderr)")
        let format = try damaged("format") { dir in
            try Fixture.edit(dir + "/state.json") { text in
                #expect(text.contains("\"format\":4,"))
                text = text.replacingOccurrences(of: "\"format\":4,", with: "\"format\":99,")
            }
        }
        #expect(format.status == 125 && format.stderr.contains("snapshot format 99; this sandbox-vmm reads format 4"), "\(format.stderr)")
        let shortMemory = try damaged("short-memory") { dir in try Fixture.truncate(dir + "/memory", to: 1 << 20) }
        #expect(shortMemory.status == 125 && shortMemory.stderr.contains("the memory file is 1048576 bytes, the snapshot's guest has 268435456"), "\(shortMemory.stderr)")
        let otherBuild = try damaged("other-build") { dir in
            try Fixture.edit(dir + "/state.json") { text in
                let range = try #require(text.range(of: "\"vmmBuild\":\"[^\"]*\"", options: .regularExpression))
                text.replaceSubrange(range, with: "\"vmmBuild\":\"1-2.3\"")
            }
        }
        #expect(otherBuild.status == 125 && otherBuild.stderr.contains("made by another sandbox-vmm build (1-2.3"), "\(otherBuild.stderr)")
        let map = try damaged("map") { dir in try Fixture.overwrite(dir + "/disk.map", with: [0xff]) }
        #expect(map.status == 125 && map.stderr.contains("disk map's checksum does not match"), "\(map.stderr)")
        let layer = try damaged("layer") { dir in try Fixture.truncate(dir + "/disk.layer", to: 1 << 20) }
        #expect(layer.status == 125 && layer.stderr.contains("disk layer is damaged") && layer.stderr.contains("data file is 1048576 bytes"), "\(layer.stderr)")
        let noState = try damaged("incomplete") { dir in try FileManager.default.removeItem(atPath: dir + "/state.json") }
        #expect(noState.status == 125 && noState.stderr.contains("no such snapshot state file"), "\(noState.stderr)")

        // Making one over an existing directory is refused; nothing is written there.
        let again = try sandbox(["snapshot", "create", snap])
        #expect(again.status == 1 && again.stderr.contains("already exists"), "\(again.stderr)")
    }
}
