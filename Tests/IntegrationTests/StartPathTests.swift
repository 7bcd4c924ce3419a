import Foundation
import Testing

/// The default start path: runs restore a cached start snapshot, made on first use.
@Suite("start path: the cached start snapshot is made once, used by default, and heals", .serialized)
struct StartPathTests {
    let t = ["--timeout", Fixture.inLab ? "600" : "60"]

    func exec(_ args: [String], environment: [String: String] = [:]) throws -> Fixture.Result {
        try Fixture.run(Fixture.sandboxBinary, ["exec"] + args, timeout: Fixture.inLab ? 900 : 120, environment: environment)
    }

    static var snapshots: String { Fixture.cacheDirectory + "/snapshots" }

    /// The cache entries of one label (image and shape), after removing them when asked.
    static func entries(_ label: String, clear: Bool = false) -> [String] {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: snapshots)) ?? []).filter { $0.hasPrefix(label + "-") }
        if clear { for n in names { try? FileManager.default.removeItem(atPath: snapshots + "/" + n) } }
        return clear ? [] : names.map { snapshots + "/" + $0 }
    }

    @Test("the first run of a shape makes its start snapshot, later runs restore it, a damaged one is made again")
    func madeOnceThenRestoredAndHealed() throws {
        // A shape no other test uses, so that this test sees its first run.
        let shape = ["--memory", "288"]
        _ = Self.entries("busybox-288m-1c", clear: true)
        let first = try exec(shape + ["--timings"] + t + ["--", "echo", "one"])
        #expect(first.status == 0 && first.stdout == "one\n", "\(first.stderr)")
        #expect(first.stderr.contains("making the start snapshot for busybox (288 MiB, 1 vCPU)"), "\(first.stderr)")
        #expect(first.stderr.contains("restored from the snapshot \(Self.snapshots)/busybox-288m-1c-"), "\(first.stderr)")
        let entry = try #require(Self.entries("busybox-288m-1c").first)
        let second = try exec(shape + ["--timings"] + t + ["--", "echo", "two"])
        #expect(second.status == 0 && second.stdout == "two\n", "\(second.stderr)")
        #expect(!second.stderr.contains("making the start snapshot") && second.stderr.contains("restored from the snapshot \(entry)"), "\(second.stderr)")

        // Damaged one way, then another: each time the run says so, makes it again, and works.
        let damages: [(String, (String) throws -> Void)] = [
            ("a short memory file", { dir in try Fixture.truncate(dir + "/memory", to: 1 << 20) }),
            ("a state file that is not JSON", { dir in
                try "garbage".write(toFile: dir + "/state.json", atomically: true, encoding: .utf8)
            }),
            ("a changed disk map", { dir in try Fixture.overwrite(dir + "/disk.map", with: [0x5a, 0x5a]) }),
        ]
        for (what, damage) in damages {
            let dir = try #require(Self.entries("busybox-288m-1c").first)
            try damage(dir)
            let r = try exec(shape + ["--timings"] + t + ["--", "echo", "healed"])
            #expect(r.status == 0 && r.stdout == "healed\n", "\(what): \(r.stderr)")
            #expect(r.stderr.contains("the cached start snapshot was refused") && r.stderr.contains("making it again"), "\(what): \(r.stderr)")
            #expect(r.stderr.contains("restored from the snapshot"), "\(what): \(r.stderr)")
        }
        // Damage no check sees: guest RAM zeroed in the memory file (as when a machine
        // crashed before writing its pages out). The restored guest dies at once; the run
        // says so, makes the snapshot again, and works.
        let dir = try #require(Self.entries("busybox-288m-1c").first)
        try Fixture.zeroFill(dir + "/memory", from: 1 << 20, count: 64 << 20)
        let r = try exec(shape + ["--timings"] + t + ["--", "echo", "healed"])
        #expect(r.status == 0 && r.stdout == "healed\n", "zeroed memory: \(r.stderr)")
        #expect(r.stderr.contains("the guest restored from the cached start snapshot ended before its agent answered") && r.stderr.contains("making it again"), "zeroed memory: \(r.stderr)")
        #expect(Self.entries("busybox-288m-1c").count == 1)
        _ = Self.entries("busybox-288m-1c", clear: true)
    }

    @Test("processes racing to make the same start snapshot: one makes it, all run from it")
    func racingMakersAgree() throws {
        _ = Self.entries("busybox-320m-1c", clear: true)
        let n = 3
        let results = try (0 ..< n).map { i -> (Process, Pipe, Pipe) in
            let p = Process()
            p.executableURL = URL(fileURLWithPath: Fixture.sandboxBinary)
            p.arguments = ["exec", "--memory", "320", "--timings"] + t + ["--", "echo", "racer\(i)"]
            let out = Pipe(), err = Pipe()
            p.standardOutput = out
            p.standardError = err
            try p.run()
            return (p, out, err)
        }.map { p, out, err -> (Int32, String, String) in
            let o = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            let e = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            p.waitUntilExit()
            return (p.terminationStatus, o, e)
        }
        for (i, r) in results.enumerated() {
            #expect(r.0 == 0 && r.1 == "racer\(i)\n", "\(r.2)")
            #expect(r.2.contains("restored from the snapshot"), "\(r.2)")
        }
        #expect(results.filter { $0.2.contains("sandbox: making the start snapshot") }.count == 1, "\(results.map(\.2))")
        #expect(Self.entries("busybox-320m-1c").count == 1)
        _ = Self.entries("busybox-320m-1c", clear: true)
    }

    @Test("--cold and SANDBOX_COLD boot, and --timings says why")
    func coldWhenAskedFor() throws {
        let cold = try exec(["--cold", "--timings"] + t + ["--", "echo", "cold"])
        #expect(cold.status == 0 && cold.stdout == "cold\n", "\(cold.stderr)")
        #expect(cold.stderr.contains("booted (not restored: asked for (cold))") && cold.stderr.contains("kernel boot"), "\(cold.stderr)")
        let env = try exec(["--timings"] + t + ["--", "echo", "env"], environment: ["SANDBOX_COLD": "1"])
        #expect(env.status == 0 && env.stdout == "env\n", "\(env.stderr)")
        #expect(env.stderr.contains("booted (not restored: SANDBOX_COLD=1 is set)"), "\(env.stderr)")
        let doctor = try Fixture.run(Fixture.sandboxBinary, ["doctor"], environment: ["SANDBOX_COLD": "1"])
        #expect(doctor.stdout.contains("start path:     cold boot for every run: SANDBOX_COLD=1 is set"), "\(doctor.stdout)")
    }

    @Test("shell and busybox workloads give the same results cold and restored")
    func coldAndRestoredAgree() throws {
        let script = """
            set -e
            seq 1 20000 | sort -r | head -3
            seq 1 50000 | awk '{ s += $1 * $1 } END { print s }'
            dd if=/dev/zero bs=1M count=8 2>/dev/null | sha256sum
            mkdir -p /tmp/tree/a/b && for i in $(seq 1 50); do echo "file $i" > /tmp/tree/a/b/f$i; done
            ln -s a/b/f1 /tmp/tree/link
            tar -C /tmp -cf /tmp/t.tar tree && tar -tf /tmp/t.tar | sort | md5sum
            mkdir /tmp/x && tar -C /tmp/x -xf /tmp/t.tar && cat /tmp/x/tree/link && readlink /tmp/x/tree/link
            echo hello | gzip -9 | gunzip
            sleep 0.2 && echo slept
            (for i in 1 2 3 4; do (echo "job $i" > /tmp/job$i) & done; wait) && cat /tmp/job*
            uname -sr | cut -d. -f1
            nproc; id -u; pwd; cat /proc/sys/kernel/hostname
            """
        let cold = try exec(["--cold"] + t + ["--", "sh", "-c", script])
        let restored = try exec(["--timings"] + t + ["--", "sh", "-c", script])
        #expect(cold.status == 0, "\(cold.stderr)")
        #expect(restored.status == 0, "\(restored.stderr)")
        #expect(restored.stderr.contains("restored from the snapshot"), "\(restored.stderr)")
        #expect(cold.stdout.split(separator: "\n").count == 19, "\(cold.stdout)")
        #expect(cold.stdout == restored.stdout, "cold:\n\(cold.stdout)\nrestored:\n\(restored.stdout)")
    }
}

/// Templates: a sandbox prepared by a setup command, started from many times.
@Suite("templates: made by a setup command, started from, listed, removed", .serialized)
struct TemplateTests {
    let t = ["--timeout", Fixture.inLab ? "600" : "60"]

    func sandbox(_ args: [String]) throws -> Fixture.Result {
        try Fixture.run(Fixture.sandboxBinary, args, timeout: Fixture.inLab ? 900 : 120)
    }

    @Test("a template keeps the setup's files, environment and running processes; sandboxes of it are isolated")
    func setupStateIsKept() throws {
        let name = "it-\(getpid())-setup"
        defer { _ = try? sandbox(["template", "rm", name]) }
        // A daemon (its own session, as servers start) outlives the setup command and is
        // in the template; the command's own process group ends with it.
        let setup = "mkdir -p /opt/app && echo \"v1 $GREETING\" > /opt/app/version && (setsid sleep 100000 > /dev/null 2>&1 &) && until ps | grep -q [s]leep.100000; do sleep 0.05; done && echo set up"
        let made = try sandbox(["template", "create", name, "--env", "GREETING=hi", "--run", setup])
        #expect(made.status == 0, "\(made.stderr)")
        #expect(made.stderr.contains("set up") && made.stderr.contains("sandbox: template \(name) made in"), "\(made.stderr)")
        let list = try sandbox(["template", "list"])
        #expect(list.status == 0 && list.stdout.contains("\(name)\tbusybox\t256 MiB\t1\t"), "\(list.stdout)")

        let a = try sandbox(["exec", "--template", name, "--timings"] + t + ["--", "sh", "-c", "cat /opt/app/version; ps | grep -q [s]leep.100000 && echo running; echo mine > /opt/app/mark; sync"])
        #expect(a.status == 0 && a.stdout == "v1 hi\nrunning\n", "\(a.stdout) \(a.stderr)")
        #expect(a.stderr.contains("restored from the snapshot \(Fixture.cacheDirectory)/templates/\(name)"), "\(a.stderr)")
        let b = try sandbox(["exec", "--template", name] + t + ["--", "sh", "-c", "cat /opt/app/version; test -e /opt/app/mark && echo seen || echo clean"])
        #expect(b.status == 0 && b.stdout == "v1 hi\nclean\n", "\(b.stdout) \(b.stderr)")

        // The shape is the template's: setting it again is refused, naming the flag.
        let shape = try sandbox(["exec", "--template", name, "--memory", "512"] + t + ["--", "true"])
        #expect(shape.status == 125 && shape.stderr.contains("--memory cannot be set with it"), "\(shape.stderr)")
        // An existing name is refused without --replace, and replaced with it.
        let again = try sandbox(["template", "create", name, "--run", "true"])
        #expect(again.status == 1 && again.stderr.contains("already exists"), "\(again.stderr)")
        let replaced = try sandbox(["template", "create", name, "--replace", "--run", "mkdir -p /opt/app && echo v2 > /opt/app/version"])
        #expect(replaced.status == 0, "\(replaced.stderr)")
        let c = try sandbox(["exec", "--template", name] + t + ["--", "cat", "/opt/app/version"])
        #expect(c.stdout == "v2\n", "\(c.stdout) \(c.stderr)")
    }

    @Test("a template whose setup read /dev/hwrng (leaving bytes buffered in the guest): its sandboxes still read different bytes")
    func hardwareRNGAfterATemplate() throws {
        let name = "it-\(getpid())-hwrng"
        defer { _ = try? sandbox(["template", "rm", name]) }
        let made = try sandbox(["template", "create", name, "--run", "head -c 10 /dev/hwrng > /dev/null"])
        #expect(made.status == 0, "\(made.stderr)")
        var seen: [String] = []
        for _ in 0..<2 {
            let r = try sandbox(["exec", "--template", name] + t + ["--", "sh", "-c", "head -c 128 /dev/hwrng | od -An -tx1 | tr -d ' \\n'"])
            #expect(r.status == 0 && r.stdout.count == 256, "\(r.stdout) \(r.stderr)")
            seen.append(r.stdout)
        }
        // No stretch of 8 bytes in common: nothing the template buffered is served twice.
        let a = Array(seen[0].utf8), b = seen[1]
        let shared = stride(from: 0, to: a.count - 16, by: 2).filter { b.contains(String(decoding: a[$0..<$0 + 16], as: UTF8.self)) }
        #expect(shared.isEmpty, "both sandboxes read \(shared.count) common 8-byte runs: \(seen[0]) / \(seen[1])")
    }

    @Test("a failing setup makes no template; bad names and missing templates are refused; rm removes")
    func failuresAndRemoval() throws {
        let name = "it-\(getpid())-fail"
        let failed = try sandbox(["template", "create", name, "--run", "echo trying; exit 3"])
        #expect(failed.status == 1, "\(failed.stderr)")
        #expect(failed.stderr.contains("trying") && failed.stderr.contains("the setup command sh -c echo trying; exit 3 exited with status 3; nothing was snapshotted"), "\(failed.stderr)")
        let leftovers = ((try? FileManager.default.contentsOfDirectory(atPath: Fixture.cacheDirectory + "/templates")) ?? []).filter { $0.contains(name) }
        #expect(leftovers.isEmpty, "\(leftovers)")
        let missing = try sandbox(["exec", "--template", name] + t + ["--", "true"])
        #expect(missing.status == 125 && missing.stderr.contains("no template named '\(name)'"), "\(missing.stderr)")
        let badName = try sandbox(["template", "create", "../escape", "--run", "true"])
        #expect(badName.status == 1 && badName.stderr.contains("template name '../escape'"), "\(badName.stderr)")

        let made = try sandbox(["template", "create", name, "--run", "true"])
        #expect(made.status == 0, "\(made.stderr)")
        let rm = try sandbox(["template", "rm", name])
        #expect(rm.status == 0, "\(rm.stderr)")
        #expect(!FileManager.default.fileExists(atPath: Fixture.cacheDirectory + "/templates/" + name))
        let rmAgain = try sandbox(["template", "rm", name])
        #expect(rmAgain.status == 1 && rmAgain.stderr.contains("no template named"), "\(rmAgain.stderr)")
    }

    @Test("batch jobs start from a template with the template key; shape keys beside it are refused")
    func batchTemplateKey() throws {
        let name = "it-\(getpid())-batch"
        defer { _ = try? sandbox(["template", "rm", name]) }
        let made = try sandbox(["template", "create", name, "--run", "echo ready > /etc/state"])
        #expect(made.status == 0, "\(made.stderr)")
        let dir = NSTemporaryDirectory() + "sandbox-tpl-batch-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let jobs = """
            defaults:
              image: busybox
            jobs:
              - name: from-template
                template: \(name)
                command: cat /etc/state
              - name: plain
                command: test ! -e /etc/state
            """
        try jobs.write(toFile: dir + "/jobs.yaml", atomically: true, encoding: .utf8)
        let r = try sandbox(["batch", dir + "/jobs.yaml", "--jsonl", dir + "/out.jsonl", "--parallel", "2"])
        #expect(r.status == 0, "\(r.stdout) \(r.stderr)")
        // Both starts, the template's too, are prepared and kept warm without complaint.
        #expect(!r.stderr.contains("could not prepare"), "\(r.stderr)")
        let lines = try String(contentsOfFile: dir + "/out.jsonl", encoding: .utf8).split(separator: "\n")
        #expect(lines.count == 2)
        #expect(lines.allSatisfy { $0.contains("\"restored\":true") }, "\(lines)")
        #expect(lines.contains { $0.contains("\"name\":\"from-template\"") && $0.contains("ready") }, "\(lines)")

        let bad = """
            jobs:
              - name: clash
                template: \(name)
                memory: 512
                command: "true"
              - name: unknown
                template: no-such-template-\(getpid())
                command: "true"
            """
        try bad.write(toFile: dir + "/bad.yaml", atomically: true, encoding: .utf8)
        let refused = try sandbox(["batch", dir + "/bad.yaml"])
        #expect(refused.status == 2, "\(refused.stderr)")
        #expect(refused.stderr.contains("'memory' cannot be combined with 'template'"), "\(refused.stderr)")
        #expect(refused.stderr.contains("no template named 'no-such-template-\(getpid())'"), "\(refused.stderr)")
    }
}
