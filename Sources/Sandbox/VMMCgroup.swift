import Foundation
import SandboxCore
import Synchronization
import SystemShims
#if canImport(Glibc)
import Glibc
#endif

/// A cgroup v2 of one VMM process, under the delegated parent named by `$SANDBOX_CGROUP`
/// (Docs/Jail.md, "Cgroup limits"): memory (the guest's RAM plus the VMM's own
/// allowance, no swap), pids and cpu (the VM's vCPUs plus one for the device threads).
/// The library makes it before the VMM starts, the VMM joins it before it builds the VM,
/// and the library removes it once the VMM is reaped.
struct VMMCgroup: Sendable {
    /// The environment variable naming the delegated parent cgroup.
    static let environmentKey = "SANDBOX_CGROUP"
    /// What the VMM may use beyond the guest's RAM (its own heap, bounce buffers of up to
    /// 64 MiB per notify round, io_uring rings, thread stacks).
    static let vmmAllowanceMiB: UInt64 = 256
    /// Threads of one VMM: vCPUs, device workers, relay, timers, io_uring workers.
    static func pidsLimit(cpus: Int) -> Int { 64 + 2 * cpus }
    static let controllers = ["memory", "pids", "cpu"]

    let path: String
    let memoryMax: UInt64
    let pidsMax: Int
    let cpuMax: String

    /// The delegated parent, if one is configured.
    static var parent: String? {
        guard let p = ProcessInfo.processInfo.environment[environmentKey], !p.isEmpty else { return nil }
        return p
    }

    private static let counter = Mutex<UInt64>(0)

    /// Makes the cgroup of a VMM with `memoryMiB` of guest RAM and `cpus` vCPUs under
    /// `parent`. Fails with a sentence saying what the parent lacks.
    static func create(parent: String, memoryMiB: UInt64, cpus: Int) throws(SandboxError) -> VMMCgroup {
        func fail(_ why: String, _ underlying: (any Error)? = nil) -> SandboxError {
            SandboxError(.jail, "\(environmentKey)=\(parent): \(why)", underlying: underlying)
        }
        guard FileManager.default.fileExists(atPath: parent) else { throw fail("does not exist") }
        // Only cgroup v2 directories have cgroup.controllers.
        guard FileManager.default.fileExists(atPath: parent + "/cgroup.controllers") else {
            throw fail("is not a cgroup v2 directory (cgroup v1 hierarchies are not supported)")
        }
        let available = Set(read(parent + "/cgroup.controllers").split(separator: " ").map(String.init))
        let missing = controllers.filter { !available.contains($0) }
        guard missing.isEmpty else {
            throw fail("the controllers \(missing.joined(separator: ", ")) are not available there (cgroup.controllers: \"\(available.sorted().joined(separator: " "))\"); delegate them to it (systemd: Delegate=yes)")
        }
        var enabled = Set(read(parent + "/cgroup.subtree_control").split(separator: " ").map(String.init))
        let toEnable = controllers.filter { !enabled.contains($0) }
        if !toEnable.isEmpty {
            do { try write(parent + "/cgroup.subtree_control", toEnable.map { "+" + $0 }.joined(separator: " ")) } catch {
                throw fail("cannot enable \(toEnable.joined(separator: ", ")) in its cgroup.subtree_control (a cgroup that holds processes cannot give controllers to children: use an empty one)", error)
            }
            enabled = Set(read(parent + "/cgroup.subtree_control").split(separator: " ").map(String.init))
            let still = controllers.filter { !enabled.contains($0) }
            guard still.isEmpty else { throw fail("\(still.joined(separator: ", ")) did not stay enabled in its cgroup.subtree_control") }
        }
        sweep(parent)
        let n = counter.withLock { c in c += 1; return c }
        let path = parent + "/sandbox-vmm-\(getpid())-\(n)"
        guard mkdir(path, 0o755) == 0 else { throw fail("cannot create \(path)", SystemError("mkdir", errno: errno)) }
        let group = VMMCgroup(path: path, memoryMax: (memoryMiB + vmmAllowanceMiB) << 20, pidsMax: pidsLimit(cpus: cpus),
                              cpuMax: "\((cpus + 1) * 100_000) 100000")
        do {
            try write(path + "/memory.max", "\(group.memoryMax)")
            if FileManager.default.fileExists(atPath: path + "/memory.swap.max") { try write(path + "/memory.swap.max", "0") }
            try write(path + "/pids.max", "\(group.pidsMax)")
            try write(path + "/cpu.max", group.cpuMax)
        } catch {
            group.remove()
            throw fail("cannot set the limits of \(path)", error)
        }
        return group
    }

    /// The cgroups of this process's VMMs that are not removed yet, by VMM pid: a run
    /// whose VM is torn down off the caller's path may still have one when the process
    /// exits (the CLI exits as soon as a result is in), so an exit handler finishes them.
    private static let live = Mutex<[Int32: String]>([:])
    private static let exitHandler: Void = { atexit(vmmCgroupsAtExit) }()

    /// Remembers that `pid` runs in this cgroup, until `remove()`.
    func register(pid: Int32) {
        _ = Self.exitHandler
        Self.live.withLock { $0[pid] = path }
    }

    /// At exit: kills and reaps the VMMs still registered and removes their cgroups.
    static func finishAtExit() {
        let left = live.withLock { l in defer { l = [:] }; return l }
        for (pid, path) in left {
            _ = kill(pid, SIGKILL)
            var status: Int32 = 0
            _ = waitpid(pid, &status, 0)
            for _ in 0..<100 where rmdir(path) != 0 && errno == EBUSY { usleep(1000) }
        }
    }

    /// Removes cgroups left by processes that died before they could remove them (a
    /// caller killed with SIGKILL): `sandbox-vmm-PID-N` whose PID no longer exists.
    /// rmdir refuses one that still holds a process, so nothing running is touched.
    static func sweep(_ parent: String) {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: parent) else { return }
        for name in names where name.hasPrefix("sandbox-vmm-") {
            let parts = name.split(separator: "-")
            guard parts.count == 4, let owner = Int32(parts[2]), owner != getpid(), kill(owner, 0) != 0, errno == ESRCH else { continue }
            _ = rmdir(parent + "/" + name)
        }
    }

    /// How often the kernel killed a process of this cgroup for memory (memory.events).
    var oomKills: Int {
        for line in Self.read(path + "/memory.events").split(separator: "\n") where line.hasPrefix("oom_kill ") {
            return Int(line.dropFirst("oom_kill ".count)) ?? 0
        }
        return 0
    }

    /// Removes the cgroup (its process must have been reaped; the kernel may take a moment
    /// to let go of it).
    func remove() {
        Self.live.withLock { l in l = l.filter { $0.value != path } }
        for _ in 0..<100 {
            if rmdir(path) == 0 || errno == ENOENT { return }
            guard errno == EBUSY else { return }
            usleep(10_000)
        }
    }

    private static func read(_ path: String) -> String {
        ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
    }

    private static func write(_ path: String, _ value: String) throws(SystemError) {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open(\(path))", errno: errno) }
        defer { close(fd) }
        let bytes = Array(value.utf8)
        let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        guard n == bytes.count else { throw SystemError("write(\(path), \(value))", errno: errno) }
    }
}

/// `atexit` handler (a C function pointer cannot capture; the registry is static).
private func vmmCgroupsAtExit() { VMMCgroup.finishAtExit() }
