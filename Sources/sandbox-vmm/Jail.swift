import CJail
import Foundation
import KVM
import SandboxCore
import SystemShims
import VMMProtocol
#if canImport(Glibc)
import Glibc
#endif

/// The VMM's jail (Docs/Jail.md), applied once the VM is built and before any guest code
/// runs (no vCPU has entered the guest, no thread exists yet): everything the VMM needs
/// is open by then, so what it can still reach is almost nothing.
///
/// 1. Namespaces: the library started this process in new mount, pid, net, ipc and uts
///    namespaces (and a user namespace when not root), `VMMConfig.namespaces`.
/// 2. File system: a 64 KiB read-only tmpfs as `/`, holding only the directories the VMM
///    still writes into (a snapshot being made, a kept disk's staging directory); the
///    host's tree is detached.
/// 3. Limits: open files, address space, file size, core size 0.
/// 4. No capabilities (bounding and ambient sets empty, securebits locked), no new privileges.
/// 5. A seccomp allow-list (`allowedSyscalls`, KVM ioctls of a running VM only): any other
///    call kills the VMM, and the library reports the call by name.
enum Jail {
    struct Bind {
        var path: String
        var writable: Bool
    }

    /// The system calls the VMM makes once jailed, by every thread kind (vCPU loops,
    /// device workers, the vsock relay, snapshot and kept-disk writing), as measured with
    /// `Scripts/trace-vmm-syscalls` (Docs/Jail.md), plus the few a rarer path needs
    /// (fdatasync, restart_syscall, clock_gettime without a vDSO). ioctl, clone, clone3,
    /// tgkill, mmap, mprotect and prctl are filtered by their arguments in
    /// `cjail_apply_seccomp`.
    static let allowedSyscalls = [
        // memory (mmap and mprotect are filtered: no PROT_EXEC)
        "brk", "munmap", "mremap", "madvise",
        // threads (clone is filtered: threads only), waiting, time
        "futex", "set_robust_list", "rseq", "gettid", "getpid", "exit", "exit_group", "restart_syscall",
        "clock_gettime", "clock_nanosleep",
        // signals: the vCPU kick (tgkill is filtered: this process only)
        "rt_sigaction", "rt_sigprocmask", "rt_sigreturn",
        // the descriptors it holds: sockets to the library, eventfds, the disk files, io_uring
        "read", "write", "pread64", "pwrite64", "close", "lseek", "fsync", "fdatasync", "ftruncate",
        "poll", "eventfd2", "io_uring_enter", "shutdown",
        // writing a snapshot into its directory (the only writable place in the jail)
        "openat", "rename", "newfstatat",
        "getrandom",
    ]

    /// What a VMM with `config` still writes into once jailed: the snapshot directory it
    /// is to fill, and the directory its kept disk goes to (a staging directory of its
    /// own, which the library creates and empties).
    static func binds(_ config: VMMConfig) -> [Bind] {
        var b: [Bind] = []
        if let dir = config.snapshotDirectory { b.append(Bind(path: dir, writable: true)) }
        if let keep = config.keepDiskPath { b.append(Bind(path: (keep as NSString).deletingLastPathComponent, writable: true)) }
        return b
    }

    /// Moves the VMM into the cgroup the library made for it (before any guest memory or
    /// thread exists, so that all of them are counted).
    static func joinCgroup(_ path: String) throws {
        let fd = open(path + "/cgroup.procs", O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SandboxError(.jail, "cannot open \(path)/cgroup.procs", underlying: SystemError("open", errno: errno)) }
        defer { close(fd) }
        let n = "0".withCString { Glibc.write(fd, $0, 1) }
        guard n == 1 else { throw SandboxError(.jail, "cannot join the cgroup \(path)", underlying: SystemError("write(cgroup.procs)", errno: errno)) }
    }

    /// No file the VMM writes is larger than the disk (its overlay, a kept disk, a
    /// snapshot's layer) or the guest's memory (a snapshot's memory file).
    static func fileSizeLimit(capacity: UInt64, memoryMiB: UInt64) -> UInt64 {
        max(capacity, memoryMiB << 20) + (64 << 20)
    }

    /// Applies the jail (or, with `config.jail == false`, says loudly that it does not).
    static func apply(_ config: VMMConfig, binds: [Bind], fileSizeLimit: UInt64) throws -> JailReport {
        var report = JailReport()
        guard config.jail else {
            let warning = "sandbox-vmm: WARNING: the VMM runs without its jail (--no-jail): no namespaces, no seccomp filter, every privilege of its caller; a compromised VMM can reach this host. For debugging only.\n"
            warning.withCString { _ = Glibc.write(2, $0, strlen($0)) }
            report.missing.append("the whole jail: turned off (--no-jail / SandboxConfiguration.jail = false), for debugging only")
            return report
        }
        // Capabilities and namespaces are per thread: a thread started earlier would keep
        // what the jail takes away.
        let threads = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task").count) ?? -1
        guard threads == 1 else {
            throw SandboxError(.jail, "the jail must be applied while the VMM has one thread (it has \(threads))")
        }
        _ = SnapshotFiles.vmmBuild()  // read /proc/self/exe while /proc is there
        let openFiles = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? 64
        let addressSpace = Self.statusValue("VmSize") ?? 0

        let namespaces = config.namespaces
        if namespaces.isEmpty {
            report.missing.append("namespaces: the host refused new namespaces when the VMM was started: \(config.namespacesRefused ?? "no reason given")")
        } else {
            report.applied.append("namespaces: " + namespaces.joined(separator: " "))
        }
        if !namespaces.contains("user") && geteuid() != 0 {
            report.missing.append("user namespace: not available to this user")
        }
        if namespaces.contains("mnt") {
            var err = [CChar](repeating: 0, count: 512)
            let paths = binds.map(\.path)
            let writable = binds.map { Int32($0.writable ? 1 : 0) }
            let rc = withCStrings(paths) { cPaths in
                cjail_enter_root(config.overlayDirectory, cPaths, writable, Int32(binds.count), &err, err.count)
            }
            guard rc == 0 else { throw SandboxError(.jail, "the jail's root could not be built: \(String(cString: err))") }
            let kept = binds.map { "\($0.path) (\($0.writable ? "read-write" : "read-only"))" }
            report.applied.append("root: an empty read-only tmpfs (pivot_root; the host's tree detached)"
                + (kept.isEmpty ? "" : " holding only " + kept.joined(separator: ", ")))
        } else {
            report.missing.append("root: no mount namespace, so the VMM sees the host's file system")
        }

        // Limits. Processes: the filter below refuses every new process (clone without
        // CLONE_THREAD), which RLIMIT_NPROC (counted per user across the host) cannot do.
        let nofile = UInt64(max(openFiles + 64, 128))
        let asLimit = addressSpace + (2 << 30)
        let limits: [(String, Int32, UInt64)] = [
            ("nofile \(nofile)", Int32(RLIMIT_NOFILE.rawValue), nofile),
            ("core 0", Int32(RLIMIT_CORE.rawValue), 0),
            ("as \(asLimit >> 20) MiB", Int32(RLIMIT_AS.rawValue), asLimit),
            ("fsize \(fileSizeLimit >> 20) MiB", Int32(RLIMIT_FSIZE.rawValue), fileSizeLimit),
        ]
        for (name, resource, value) in limits {
            var rl = rlimit(rlim_cur: rlim_t(value), rlim_max: rlim_t(value))
            guard setrlimit(__rlimit_resource_t(UInt32(resource)), &rl) == 0 else {
                throw SandboxError(.jail, "setrlimit(\(name)) failed", underlying: SystemError("setrlimit", errno: errno))
            }
        }
        report.applied.append("rlimits: " + limits.map(\.0).joined(separator: ", ") + "; no new processes (seccomp)")

        var err = [CChar](repeating: 0, count: 512)
        let dropped = cjail_drop_privileges(&err, err.count)
        guard dropped >= 0 else {
            throw SandboxError(.jail, "the jail could not drop privileges: \(String(cString: err))")
        }
        if dropped == 0 {
            report.applied.append("capabilities: none (bounding and ambient sets empty, securebits locked); no_new_privs")
        } else {
            report.applied.append("capabilities: none; no_new_privs")
            report.missing.append("bounding set and securebits: unchanged (no CAP_SETPCAP without a user namespace; no_new_privs keeps capabilities from coming back)")
        }
        if let cgroup = config.cgroup {
            func value(_ file: String) -> String {
                ((try? String(contentsOfFile: cgroup + "/" + file, encoding: .utf8)) ?? "?").trimmingCharacters(in: .whitespacesAndNewlines)
            }
            report.applied.append("cgroup v2 \(cgroup): memory.max \(value("memory.max")), memory.swap.max \(value("memory.swap.max")), pids.max \(value("pids.max")), cpu.max \(value("cpu.max"))")
        } else {
            report.missing.append("cgroup limits: no delegated cgroup v2 (set SANDBOX_CGROUP to an empty cgroup v2 directory with the memory, pids and cpu controllers; the guest's memory and vCPUs are still bounded by the VM itself)")
        }

        let ioctls = KVMRuntimeIoctls.requests
        let rc = withCStrings(allowedSyscalls) { names in
            ioctls.map { UInt($0) }.withUnsafeBufferPointer { io in
                cjail_apply_seccomp(names, Int32(allowedSyscalls.count), io.baseAddress, Int32(io.count), getpid(),
                                    VMMFileDescriptors.control, 1, &err, err.count)
            }
        }
        guard rc == 0 else { throw SandboxError(.jail, "the seccomp filter could not be loaded: \(String(cString: err))") }
        report.applied.append("seccomp: \(allowedSyscalls.count + 7) system calls, \(ioctls.count) ioctl requests; anything else kills the VMM")
        #if DEBUG
        // Test builds only: prove that a call outside the list is caught and named.
        if ProcessInfo.processInfo.environment["SANDBOX_VMM_TEST_FORBIDDEN_SYSCALL"] == "socket" {
            _ = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        }
        #endif
        return report
    }

    /// A "Name:  value kB" line of /proc/self/status, in bytes.
    static func statusValue(_ name: String) -> UInt64? {
        guard let text = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix(name + ":") {
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            if fields.count >= 2, let v = UInt64(fields[1]) { return v * 1024 }
        }
        return nil
    }

    static func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafePointer<CChar>?>) -> R) -> R {
        let copies = strings.map { strdup($0) }
        defer { for c in copies { free(c) } }
        let pointers: [UnsafePointer<CChar>?] = copies.map { UnsafePointer($0) }
        return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
    }
}
