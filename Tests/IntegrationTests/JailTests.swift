import Foundation
import Testing

/// The VMM's jail (Docs/Jail.md), seen from outside: what /proc says of a running VMM,
/// and what happens when it makes a call its filter does not allow.
@Suite("the VMM's jail", .serialized)
struct JailTests {
    let timeoutArgs = ["--timeout", Fixture.inLab ? "600" : "60"]

    /// Starts `sandbox exec ARGS -- sh -c 'echo started; sleep 60'`, waits for the command
    /// to run, hands `body` the VMM's pid, then stops it all.
    func whileRunning(_ args: [String] = [], _ body: (Int32) throws -> Void) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Fixture.sandboxBinary)
        p.arguments = ["exec"] + timeoutArgs + args + ["--", "sh", "-c", "echo started; sleep 60"]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        defer {
            p.terminate()
            p.waitUntilExit()
        }
        let first = String(decoding: out.fileHandleForReading.availableData, as: UTF8.self)
        #expect(first.contains("started"), "the command did not start: \(first)")
        let vmm = try Fixture.run("/usr/bin/pgrep", ["-P", "\(p.processIdentifier)", "-f", "sandbox-vmm run"])
        let pid = Int32(vmm.stdout.split(separator: "\n").first.map(String.init) ?? "") ?? 0
        try #require(pid > 0, "no VMM child: \(vmm.stdout) \(vmm.stderr)")
        try body(pid)
    }

    static func status(_ pid: Int32) throws -> [String: String] {
        let text = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        var fields: [String: String] = [:]
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            fields[String(line[..<colon])] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        return fields
    }

    static func namespace(_ pid: String, _ kind: String) throws -> String {
        try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/ns/\(kind)")
    }

    /// Every path under `root`, relative to it (not following links).
    static func tree(_ root: String) -> [String] {
        guard let e = FileManager.default.enumerator(atPath: root) else { return ["<unreadable>"] }
        var paths: [String] = []
        while let p = e.nextObject() as? String { paths.append(p) }
        return paths.sorted()
    }

    @Test("a running VMM has no capabilities, no new privileges, a seccomp filter, its own namespaces and an empty root")
    func runningVMMIsJailed() throws {
        try whileRunning { pid in
            let s = try Self.status(pid)
            #expect(s["Seccomp"] == "2", "\(s)")
            #expect(s["NoNewPrivs"] == "1", "\(s)")
            #expect(s["CapEff"] == "0000000000000000", "\(s)")
            #expect(s["CapPrm"] == "0000000000000000", "\(s)")
            #expect(s["CapBnd"] == "0000000000000000", "\(s)")
            #expect(s["CapAmb"] == "0000000000000000", "\(s)")
            for kind in ["mnt", "pid", "net", "ipc", "uts"] {
                let mine = try Self.namespace("self", kind), its = try Self.namespace("\(pid)", kind)
                #expect(mine != its, "the VMM shares the \(kind) namespace \(mine) with its caller")
            }
            // Inside its pid namespace the VMM is process 1.
            #expect(s["NSpid"]?.split(whereSeparator: { $0 == " " || $0 == "\t" }).last == "1", "\(s)")
            // Its root holds nothing: every file it needs was open before it entered.
            #expect(Self.tree("/proc/\(pid)/root") == [], "the jail's root holds \(Self.tree("/proc/\(pid)/root"))")
            // Nothing of the caller's descriptors beyond its five (stdio, agent, control)
            // plus what the VM itself opened; in particular no descriptor of a directory.
            let fds = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")
            for fd in fds {
                let target = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(fd)")) ?? "?"
                var isDir: ObjCBool = false
                let dir = target.hasPrefix("/") && FileManager.default.fileExists(atPath: target, isDirectory: &isDir) && isDir.boolValue
                #expect(!dir, "fd \(fd) of the VMM is a directory: \(target)")
            }
        }
    }

    @Test("--no-jail runs the VMM unconfined, and says so loudly")
    func noJailIsLoud() throws {
        let r = try Fixture.run(Fixture.sandboxBinary, ["exec", "--no-jail"] + timeoutArgs + ["--", "echo", "hi"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == "hi\n")
        #expect(r.stderr.contains("WARNING: --no-jail"), "\(r.stderr)")
        try whileRunning(["--no-jail"]) { pid in
            let s = try Self.status(pid)
            #expect(s["Seccomp"] == "0", "\(s)")
            #expect(try Self.namespace("self", "mnt") == Self.namespace("\(pid)", "mnt"))
        }
    }

    @Test("a system call outside the allow-list kills the VMM, and the outcome names it")
    func forbiddenCallIsNamed() throws {
        // Test builds of the VMM make the call named here right after entering the jail.
        let r = try Fixture.run(Fixture.sandboxBinary, ["exec"] + timeoutArgs + ["--cold", "--", "true"],
                                environment: ["SANDBOX_VMM_TEST_FORBIDDEN_SYSCALL": "socket"])
        #expect(r.status == 125, "\(r.stderr)")
        #expect(r.stderr.contains("seccomp filter does not allow: socket"), "\(r.stderr)")
        #expect(r.stderr.contains("jail"), "\(r.stderr)")
    }

    @Test("a kept disk is written from inside the jail (through a staging directory that is removed)")
    func jailedVMMWritesWhatItMust() throws {
        let dir = NSTemporaryDirectory() + "sandbox-jail-keep-\(getpid())"
        try? FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let keep = dir + "/kept.ext4"
        let r = try Fixture.run(Fixture.sandboxBinary, ["exec", "--keep-disk", keep] + timeoutArgs + ["--", "sh", "-c", "echo kept > /kept; sync"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(FileManager.default.fileExists(atPath: keep))
        // Only the disk is left next to it: the staging directory is gone.
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == ["kept.ext4"])
        let back = try Fixture.run(Fixture.sandboxBinary, ["exec", "--cold", "--image", keep] + timeoutArgs + ["--", "cat", "/kept"])
        #expect(back.stdout == "kept\n", "\(back.stderr)")
    }
}
