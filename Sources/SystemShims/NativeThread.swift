#if canImport(Glibc)
import Glibc
#endif
import CSystem

/// A dedicated OS thread (vCPU threads must never run on the async cooperative pool,
/// because KVM_RUN blocks).
public final class NativeThread: @unchecked Sendable {
    // @unchecked: `handle` is written once before start returns; `tid` is published
    // through `started` (an eventfd write/read pair orders it).
    private var handle = pthread_t()
    private var tidValue: Int32 = 0
    private let started: EventFD

    private final class Context {
        let body: () -> Void
        let thread: NativeThread
        let name: String
        init(_ body: @escaping () -> Void, _ thread: NativeThread, _ name: String) { self.body = body; self.thread = thread; self.name = name }
    }

    /// Starts `body` on a new thread named `name` (at most 15 characters are kept).
    public init(name: String, _ body: @escaping @Sendable () -> Void) throws(SystemError) {
        started = try EventFD()
        let context = Unmanaged.passRetained(Context(body, self, name))
        let rc = pthread_create(&handle, nil, { raw in
            // SAFETY: `raw` is the retained Context passed below; we take the +1 here.
            let ctx = Unmanaged<Context>.fromOpaque(raw!).takeRetainedValue()
            ctx.thread.tidValue = csystem_gettid()
            csystem_set_thread_name(ctx.name)
            ctx.thread.started.signal()
            ctx.body()
            return nil
        }, context.toOpaque())
        if rc != 0 {
            context.release()
            throw SystemError("pthread_create(\(name))", errno: rc)
        }
        started.wait()
    }

    /// The kernel thread id (for tgkill).
    public var tid: Int32 { tidValue }

    /// Sends `signal` to this thread.
    public func kill(_ signal: Int32) {
        _ = csystem_tgkill(getpid(), tidValue, signal)
    }

    /// Waits for the thread to finish. Call once, and not after `detach()`.
    public func join() {
        _ = pthread_join(handle, nil)
    }

    /// Lets the thread's resources (its stack) go when it ends, for a thread nobody
    /// joins. Call once, and not after `join()`; a thread that is neither joined nor
    /// detached keeps its stack mapped forever.
    public func detach() {
        _ = pthread_detach(handle)
    }
}

/// Installs a no-op handler for `signal` (without SA_RESTART), so that sending it to a
/// thread blocked in a syscall such as KVM_RUN makes the call return EINTR.
public func installKickSignalHandler(_ signal: Int32) {
    var action = sigaction()
    action.__sigaction_handler.sa_handler = { _ in }
    sigemptyset(&action.sa_mask)
    action.sa_flags = 0
    sigaction(signal, &action, nil)
}

/// Waits until `fd` is readable or `timeoutMillis` passes (-1 = forever). Returns true if readable.
public func waitReadable(_ fd: Int32, timeoutMillis: Int32) -> Bool {
    var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    while true {
        let r = poll(&p, 1, timeoutMillis)
        if r < 0 && errno == EINTR { continue }
        return r > 0
    }
}

/// Unblocks `signal` for the calling thread (threads inherit the creator's mask, and
/// the async runtime's threads block most signals).
public func unblockSignalInCurrentThread(_ signal: Int32) {
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, signal)
    pthread_sigmask(SIG_UNBLOCK, &set, nil)
}

/// Starts `path` with `arguments` (argv[1...]) and `environment` (`NAME=value`). The child
/// gets exactly the descriptors in `descriptors` (`source` in this process becomes
/// `target` in the child; the numbers may overlap) and no other: nothing else this
/// process has open leaks into it.
/// With `namespaces` (a mask of ``SpawnNamespaces``) the child starts in those new
/// namespaces (clone(2) instead of posix_spawn; EPERM or EINVAL when the host refuses one).
public func spawnProcess(_ path: String, arguments: [String], environment: [String],
                         descriptors: [(source: Int32, target: Int32)], namespaces: SpawnNamespaces = []) throws(SystemError) -> pid_t {
    var cArgv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { strdup($0) } + [nil]
    var cEnv: [UnsafeMutablePointer<CChar>?] = environment.map { strdup($0) } + [nil]
    defer { for p in cArgv { free(p) }; for p in cEnv { free(p) } }
    let sources = descriptors.map(\.source), targets = descriptors.map(\.target)
    var pid: Int32 = 0
    if namespaces.isEmpty {
        let rc = csystem_spawn(path, &cArgv, &cEnv, sources, targets, Int32(descriptors.count), &pid)
        guard rc == 0 else { throw SystemError("posix_spawn(\(path))", errno: rc) }
    } else {
        let rc = csystem_spawn_isolated(path, &cArgv, &cEnv, sources, targets, Int32(descriptors.count), namespaces.rawValue, &pid)
        guard rc == 0 else { throw SystemError("clone(\(namespaces)) + execve(\(path))", errno: rc) }
    }
    return pid
}

/// New namespaces for a spawned process (clone(2) flags).
public struct SpawnNamespaces: OptionSet, Sendable, CustomStringConvertible {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }
    public static let mount = SpawnNamespaces(rawValue: Int32(CSYSTEM_NEWNS))
    public static let pid = SpawnNamespaces(rawValue: Int32(CSYSTEM_NEWPID))
    public static let network = SpawnNamespaces(rawValue: Int32(CSYSTEM_NEWNET))
    public static let ipc = SpawnNamespaces(rawValue: Int32(CSYSTEM_NEWIPC))
    public static let uts = SpawnNamespaces(rawValue: Int32(CSYSTEM_NEWUTS))
    public static let user = SpawnNamespaces(rawValue: Int32(CSYSTEM_NEWUSER))

    /// Short names, as in /proc/PID/ns: "mnt pid net ipc uts user".
    public var names: [String] {
        [(Self.mount, "mnt"), (.pid, "pid"), (.network, "net"), (.ipc, "ipc"), (.uts, "uts"), (.user, "user")]
            .filter { contains($0.0) }.map(\.1)
    }
    public var description: String { names.isEmpty ? "no namespaces" : names.joined(separator: "+") }
}

/// Waits up to `timeoutMillis` for child `pid` to exit and reaps it: its wait status, or
/// nil if it still runs at the deadline (or is not our child). Wakes the moment the child
/// exits (a pidfd polled for it; polling waitpid every millisecond where pidfds are
/// missing, before Linux 5.3).
public func reapChild(_ pid: pid_t, timeoutMillis: Int32) -> Int32? {
    var status: Int32 = 0
    let deadline = monotonicNanos() + UInt64(max(0, timeoutMillis)) * 1_000_000
    let pidfd = csystem_pidfd_open(pid)
    defer { if pidfd >= 0 { close(pidfd) } }
    while true {
        let r = waitpid(pid, &status, WNOHANG)
        if r == pid { return status }
        if r < 0 && errno != EINTR { return nil }
        let now = monotonicNanos()
        if now >= deadline { return nil }
        if pidfd >= 0 {
            _ = waitReadable(pidfd, timeoutMillis: Int32(min((deadline - now) / 1_000_000 + 1, UInt64(Int32.max))))
        } else {
            usleep(1000)
        }
    }
}
