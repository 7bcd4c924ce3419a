import Foundation
import Testing
import Sandbox

/// The VMM's jail (Docs/Jail.md), seen from outside: what /proc says of a running VMM,
/// and what happens when it makes a call its filter does not allow.
@Suite("the VMM's jail", .serialized)
struct JailTests {
    let timeoutArgs = ["--timeout", Fixture.inLab ? "600" : "60"]

    /// Starts `sandbox exec ARGS -- sh -c 'echo started; sleep 60'`, waits for the command
    /// to run, hands `body` the VMM's pid, then stops it all.
    func whileRunning(_ args: [String] = [], environment: [String: String] = [:], _ body: (Int32) throws -> Void) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Fixture.sandboxBinary)
        if !environment.isEmpty { p.environment = ProcessInfo.processInfo.environment.merging(environment) { _, new in new } }
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

    /// A cgroup v2 hierarchy with the memory, pids and cpu controllers to delegate from:
    /// one mounted already, or (as root: the lab, where nothing holds cgroup v1) one
    /// mounted for these tests. Nil where cgroup v1 holds the controllers (the PVM host).
    static let cgroupRoot: String? = {
        func usable(_ dir: String) -> Bool {
            let c = ((try? String(contentsOfFile: dir + "/cgroup.controllers", encoding: .utf8)) ?? "").split(whereSeparator: \.isWhitespace)
            return ["memory", "pids", "cpu"].allSatisfy { c.contains(Substring($0)) }
        }
        let mounts = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
        for line in mounts.split(separator: "\n") where line.contains(" - cgroup2 ") {
            let fields = line.split(separator: " ")
            if fields.count > 4, usable(String(fields[4])) { return String(fields[4]) }
        }
        guard geteuid() == 0 else { return nil }
        let dir = NSTemporaryDirectory() + "sandbox-cgroup2-\(getpid())"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        guard (try? Fixture.run("/bin/mount", ["-t", "cgroup2", "none", dir]))?.status == 0 else { return nil }
        if usable(dir) { return dir }
        _ = try? Fixture.run("/bin/umount", [dir])
        try? FileManager.default.removeItem(atPath: dir)
        return nil
    }()

    static func read(_ path: String) -> String {
        ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "<unreadable>").trimmingCharacters(in: .whitespacesAndNewlines)
    }

    @Test("with a delegated cgroup v2 (SANDBOX_CGROUP) each VMM runs in a cgroup of its own with memory, pids and cpu limits, removed after the run",
          .enabled(if: JailTests.cgroupRoot != nil, "no cgroup v2 hierarchy with the memory, pids and cpu controllers on this host (cgroup v1 holds them); the lab lane runs this test"))
    func cgroupLimits() throws {
        let root = try #require(Self.cgroupRoot)
        // Hand the controllers down to a parent that holds no process, as a delegation does.
        try "+memory +pids +cpu".write(toFile: root + "/cgroup.subtree_control", atomically: false, encoding: .utf8)
        let parent = root + "/sandbox-test-\(getpid())"
        try? FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: false)
        defer { rmdir(parent) }
        func children() -> [String] {
            ((try? FileManager.default.contentsOfDirectory(atPath: parent)) ?? []).filter { $0.hasPrefix("sandbox-vmm-") }
        }
        try whileRunning(["--memory", "256", "--cpus", "1"], environment: ["SANDBOX_CGROUP": parent]) { pid in
            let mine = children()
            try #require(mine.count == 1, "cgroups under \(parent): \(mine)")
            let cg = parent + "/" + mine[0]
            #expect(Self.read(cg + "/memory.max") == "\((256 + 256) << 20)")
            if FileManager.default.fileExists(atPath: cg + "/memory.swap.max") { #expect(Self.read(cg + "/memory.swap.max") == "0") }
            #expect(Self.read(cg + "/pids.max") == "66")
            #expect(Self.read(cg + "/cpu.max") == "200000 100000")
            #expect(Self.read(cg + "/cgroup.procs").split(separator: "\n").contains(Substring("\(pid)")), "cgroup.procs: \(Self.read(cg + "/cgroup.procs"))")
            #expect(Self.read("/proc/\(pid)/cgroup").contains(mine[0]), "\(Self.read("/proc/\(pid)/cgroup"))")
        }
        // The run was ended from outside (SIGTERM to the CLI): the next run sweeps what
        // that left; a run that ends by itself removes its own (at the latest when its
        // process exits: the CLI returns before its VM is torn down).
        let r = try Fixture.run(Fixture.sandboxBinary, ["exec"] + timeoutArgs + ["--", "echo", "limited"], environment: ["SANDBOX_CGROUP": parent])
        #expect(r.status == 0 && r.stdout == "limited\n", "\(r.stderr)")
        var left = children()
        for _ in 0 ..< 100 where !left.isEmpty {
            usleep(100_000)
            left = children()
        }
        #expect(left.isEmpty, "cgroups left under \(parent): \(left)")
        let doctor = try Fixture.run(Fixture.sandboxBinary, ["doctor"], environment: ["SANDBOX_CGROUP": parent])
        #expect(doctor.stdout.contains("cgroup v2 \(parent)/sandbox-vmm-"), "\(doctor.stdout)")
    }

    @Test("a SANDBOX_CGROUP that is no usable cgroup v2 directory stops the run with a sentence saying why")
    func unusableCgroupIsRefused() throws {
        let dir = NSTemporaryDirectory() + "sandbox-not-a-cgroup-\(getpid())"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = try Fixture.run(Fixture.sandboxBinary, ["exec"] + timeoutArgs + ["--", "true"], environment: ["SANDBOX_CGROUP": dir])
        #expect(r.status == 125, "\(r.stderr)")
        #expect(r.stderr.contains("SANDBOX_CGROUP=\(dir): is not a cgroup v2 directory"), "\(r.stderr)")
    }

    /// Root with `setpriv`, natively, and the built CLI reachable by other users (every
    /// directory above it searchable by others: a checkout under a 0700 directory, as
    /// `mktemp -d` makes, is not): the test can become an unprivileged user and run it.
    static var canBecomeNobody: Bool {
        guard geteuid() == 0 && !Fixture.inLab && FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv") else { return false }
        var path = URL(fileURLWithPath: Fixture.sandboxBinary).resolvingSymlinksInPath().path
        while !path.isEmpty && path != "/" {
            var st = stat()
            guard stat(path, &st) == 0, st.st_mode & S_IXOTH != 0 else { return false }
            path = (path as NSString).deletingLastPathComponent
        }
        return true
    }

    @Test("as an unprivileged user (nobody, with access to /dev/kvm only) the VMM runs in a user namespace too and the run works",
          .enabled(if: JailTests.canBecomeNobody, "needs root, setpriv, and a checkout other users can reach, to become nobody (not in the lab)"))
    func unprivilegedUser() throws {
        // nobody gets /dev/kvm through a supplementary group made for the test (restored
        // after), the kernel and image through hard links in a directory it can read, and
        // a cache of its own.
        let dir = NSTemporaryDirectory() + "sandbox-nobody-\(getpid())"
        try? FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: dir + "/cache", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        chmod(dir, 0o755)
        chown(dir + "/cache", 65534, 65534)
        let kernel = try KernelStore.path(flavor: .forThisHost, progress: { _ in })
        let image = try ImageStore().path(ImageStore.defaultImageName)
        try #require(link(kernel, dir + "/vmlinux") == 0, "link \(kernel): errno \(errno)")
        try #require(link(image, dir + "/busybox.ext4") == 0, "link \(image): errno \(errno)")
        var kvm = stat()
        try #require(stat("/dev/kvm", &kvm) == 0)
        let group: gid_t = 65533
        chown("/dev/kvm", kvm.st_uid, group)
        chmod("/dev/kvm", (kvm.st_mode & 0o7777) | 0o060)
        defer {
            chown("/dev/kvm", kvm.st_uid, kvm.st_gid)
            chmod("/dev/kvm", kvm.st_mode & 0o7777)
        }
        func asNobody(_ args: [String]) throws -> Fixture.Result {
            try Fixture.run("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--groups", "\(group)", "--",
                                                 Fixture.sandboxBinary] + args,
                            environment: ["HOME": dir, "SANDBOX_CACHE": dir + "/cache", "SANDBOX_KERNEL": dir + "/vmlinux"])
        }
        let doctor = try asNobody(["doctor"])
        #expect(doctor.stdout.contains("namespaces: user mnt pid net ipc uts") || doctor.stdout.contains("namespaces: mnt pid net ipc uts user"),
                "\(doctor.stdout)\n\(doctor.stderr)")
        // Cold, then restored from the start snapshot nobody's first run made.
        for mode in [["--cold"], []] {
            let r = try asNobody(["exec", "--image", dir + "/busybox.ext4"] + mode + timeoutArgs + ["--", "sh", "-c", "id -u; echo hello > /f; cat /f"])
            #expect(r.status == 0 && r.stdout == "0\nhello\n", "\(mode): \(r.status) \(r.stdout) \(r.stderr)")
        }
    }
}
