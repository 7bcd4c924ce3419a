import ArgumentParser
import Foundation
import Sandbox
import Synchronization
import SystemShims
#if canImport(Glibc)
import Glibc
#endif

/// `sandbox server`: a process of this user's that keeps VMs restored and waiting, so a
/// `sandbox exec` hands its run over instead of starting a VMM itself (Docs/Server.md).
/// It runs only when started (`sandbox server start`), ends after its idle timeout, and
/// its VMs end with it.
struct ServerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "server",
        abstract: "Keep restored VMs waiting for `sandbox exec` (start, stop, status).",
        discussion: """
        While a server runs, `sandbox exec` hands each run to it: the server starts the \
        command in a VM it restored ahead of time (a fresh one for every run, as always) and \
        writes its output straight to the caller's stdout and stderr. Runs it cannot take \
        (a terminal, --console, copies, --keep-disk, relative paths, another environment or \
        build) run as without it. SANDBOX_SERVER=0 turns it off for one command.
        """,
        subcommands: [Start.self, Stop.self, Status.self, Run.self])

    /// The socket's directory (the cache directory, on a machine that has none yet).
    static func makeParent(of socketPath: String) throws {
        let dir = (socketPath as NSString).deletingLastPathComponent
        guard !dir.isEmpty else { return }
        do { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) } catch {
            throw ValidationError("cannot make \(dir) for the server's socket: \(error.localizedDescription)")
        }
    }

    struct Start: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "start", abstract: "Start the server in the background (log: server.log next to its socket).")
        @OptionGroup var options: ServerOptions

        func run() throws {
            try options.check()
            let path = ServerWire.socketPath
            if let text = ServerClient.status(path) {
                print("sandbox server: already running (\(text))")
                return
            }
            try ServerCommand.makeParent(of: path)
            let log = path.hasSuffix(".sock") ? String(path.dropLast(5)) + ".log" : path + ".log"
            let exe = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
            let devnull = open("/dev/null", O_RDWR | O_CLOEXEC)
            let logFD = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
            guard devnull >= 0, logFD >= 0 else { throw ValidationError("cannot open \(log): \(String(cString: strerror(errno)))") }
            defer { close(devnull); close(logFD) }
            let pid = try spawnProcess(exe, arguments: ["server", "run"] + options.arguments, environment: ServerWire.processEnvironment,
                                       descriptors: [(devnull, 0), (logFD, 1), (logFD, 2)])
            // Ready when it answers; it says why it could not start in its log.
            for _ in 0..<200 {
                if let text = ServerClient.status(path) {
                    print("sandbox server: started (\(text)); log \(log)")
                    return
                }
                var status: Int32 = 0
                if waitpid(pid, &status, WNOHANG) == pid {
                    let tail = (try? String(contentsOfFile: log, encoding: .utf8))?.split(separator: "\n").suffix(3).joined(separator: "\n") ?? ""
                    printError("sandbox server: it exited at start (status \(status >> 8)); \(log) says:\n\(tail)")
                    throw ExitCode(1)
                }
                usleep(50_000)
            }
            printError("sandbox server: it did not answer on \(path) within 10 s (pid \(pid); see \(log))")
            throw ExitCode(1)
        }
    }

    struct Stop: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "stop", abstract: "Stop the server (runs it has started finish first).")
        func run() throws {
            let path = ServerWire.socketPath
            guard ServerClient.stop(path) else {
                print("sandbox server: not running (nothing answers on \(path))")
                return
            }
            // It ends once the runs it started have finished (each bounded by its timeout).
            var waited = 0
            while ServerLock.isHeld(path) {
                if waited % 200 == 199 { printError("sandbox server: still finishing its runs…") }
                usleep(50_000)
                waited += 1
            }
            print("sandbox server: stopped")
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "status", abstract: "Say whether the server runs, and what it has done.")
        func run() throws {
            let path = ServerWire.socketPath
            guard let text = ServerClient.status(path) else {
                print("sandbox server: not running (nothing answers on \(path))")
                throw ExitCode(3)
            }
            print("sandbox server: running (\(text))")
        }
    }

    struct Run: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "run", abstract: "Run the server in the foreground (what `start` runs).")
        @OptionGroup var options: ServerOptions
        func run() throws {
            try options.check()
            let server = try ExecServer(socketPath: ServerWire.socketPath, warm: options.warm, idleSeconds: options.idleTimeout)
            server.serve()
        }
    }
}

struct ServerOptions: ParsableArguments {
    @Option(help: "VMs to keep restored and waiting for each start the server has run (0 to 8).")
    var warm = 2
    @Option(name: .customLong("idle-timeout"), help: "Seconds without a run after which the server ends (at least 1).")
    var idleTimeout: Double = 900

    func check() throws {
        guard (0...8).contains(warm) else { throw ValidationError("--warm must be 0 to 8 (got \(warm))") }
        guard idleTimeout.isFinite, idleTimeout >= 1, idleTimeout <= 30 * 86_400 else {
            throw ValidationError("--idle-timeout must be 1 s to 30 days (got \(idleTimeout))")
        }
    }
    var arguments: [String] { ["--warm", String(warm), "--idle-timeout", String(idleTimeout)] }
}

/// The lock a live server holds (flock on SOCKET.lock): one server per socket, and a
/// socket file nobody holds the lock of is stale.
enum ServerLock {
    static func take(_ socketPath: String) -> Int32? {
        let fd = open(socketPath + ".lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return nil }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 { close(fd); return nil }
        return fd
    }
    static func isHeld(_ socketPath: String) -> Bool {
        guard let fd = take(socketPath) else { return true }
        close(fd)
        return false
    }
}

/// The server: accepts connections on its socket (this user's only), one thread each.
final class ExecServer: Sendable {
    private let socketPath: String
    private let listener: FileDescriptor
    private let lockFD: Int32
    private let wake: EventFD
    private let warm: Int
    private let idleNanos: UInt64
    private let identity = ServerWire.executableIdentity
    private let environment = ServerWire.relevantEnvironment
    private let started = DispatchTime.now().uptimeNanoseconds

    private struct State {
        var active = 0
        var served = 0
        var servedWarm = 0
        var declined = 0
        var lastActivity = DispatchTime.now().uptimeNanoseconds
        var stopping: String?
        var warmStarts: Set<String> = []
        var running: [ObjectIdentifier: CancelToken] = [:]
    }
    private let state = Mutex(State())
    private let parseLock = Mutex(())
    /// At most this many starts are kept warm at once (each keeps `warm` VMs).
    static let maxWarmStarts = 4
    /// At most this many connections at once; more are refused (their clients run alone).
    static let maxConnections = 64

    init(socketPath: String, warm: Int, idleSeconds: Double) throws {
        self.socketPath = socketPath
        self.warm = warm
        idleNanos = UInt64(idleSeconds * 1e9)
        try ServerCommand.makeParent(of: socketPath)
        guard let lock = ServerLock.take(socketPath) else {
            throw ValidationError("another sandbox server holds \(socketPath).lock")
        }
        lockFD = lock
        // Holding the lock, any socket file there is a dead server's.
        unlink(socketPath)
        do { listener = try UnixSocket.listen(socketPath) } catch {
            close(lock)
            throw ValidationError("cannot listen on \(socketPath): \(error)")
        }
        wake = try EventFD(nonBlocking: true)
    }

    /// Serves until stopped (`stop`, SIGTERM/SIGINT, a client of another build, or the idle
    /// timeout), then waits for the runs it started and ends its warm VMs.
    func serve() {
        setsid()
        signal(SIGPIPE, SIG_IGN)
        let signals = [SIGTERM, SIGINT, SIGHUP].map { sig -> DispatchSourceSignal in
            signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler { [self] in stop("signal \(sig)", cancelRuns: true) }
            s.resume()
            return s
        }
        log("listening on \(socketPath) (pid \(getpid()), \(warm) warm VMs per start, idle timeout \(Double(idleNanos) / 1e9) s)")
        var fds = [pollfd(fd: listener.rawValue, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: wake.fd.rawValue, events: Int16(POLLIN), revents: 0)]
        while state.withLock({ $0.stopping == nil }) {
            let r = poll(&fds, 2, 1000)
            if r < 0 && errno != EINTR { stop("poll: \(String(cString: strerror(errno)))", cancelRuns: true); break }
            if fds[1].revents != 0 { _ = wake.wait() }
            if fds[0].revents & Int16(POLLIN) != 0 { acceptOne() }
            let idle: Bool = state.withLock { s in
                s.running.isEmpty && DispatchTime.now().uptimeNanoseconds &- s.lastActivity > idleNanos
            }
            if idle { stop("idle for \(Double(idleNanos) / 1e9) s", cancelRuns: false) }
        }
        // No new clients: they find no socket and run alone.
        unlink(socketPath)
        listener.close()
        while state.withLock({ $0.active }) > 0 { usleep(20_000) }
        SandboxRunner.drainWarm()
        let s = state.withLock { $0 }
        log("stopped (\(s.stopping ?? "?")): \(s.served) runs served (\(s.servedWarm) on a waiting VM), \(s.declined) handed back")
        _ = signals
        close(lockFD)
    }

    private func stop(_ why: String, cancelRuns: Bool) {
        let tokens: [CancelToken] = state.withLock { s in
            if s.stopping == nil { s.stopping = why }
            return cancelRuns ? Array(s.running.values) : []
        }
        for t in tokens { t.cancel() }
        wake.signal()
    }

    private func log(_ line: String) { printError("sandbox server: \(line)") }

    private func acceptOne() {
        guard let conn = try? UnixSocket.accept(listener.rawValue) else { return }
        let raw = conn.rawValue
        // This user's processes only (the socket is 0600 too; this holds if it is not).
        guard (try? UnixSocket.peerUID(raw)) == getuid() else { return }
        let admitted: Bool = state.withLock { s in
            guard s.active < Self.maxConnections else { return false }
            s.active += 1
            return true
        }
        guard admitted else {
            try? UnixSocket.send(raw, ServerWire.encode(["refused", "the server has \(Self.maxConnections) connections already"]))
            return
        }
        do {
            let t = try NativeThread(name: "server-conn") { [self] in
                handle(conn)
                state.withLock { $0.active -= 1 }
                wake.signal()
            }
            t.detach()
        } catch {
            state.withLock { $0.active -= 1 }
        }
    }

    private func reply(_ conn: FileDescriptor, _ strings: [String]) {
        try? UnixSocket.send(conn.rawValue, ServerWire.encode(strings))
    }

    private func handle(_ conn: FileDescriptor) {
        // A client that connects and says nothing does not hold a thread for ever.
        UnixSocket.setTimeouts(conn.rawValue, seconds: 10)
        let message: [String]
        let fds: [FileDescriptor]
        do {
            guard let m = try ServerWire.read(conn.rawValue, maxDescriptors: 3) else { return }
            (message, fds) = m
        } catch {
            log("a client sent \(error); closed")
            reply(conn, ["refused", "\(error)"])
            return
        }
        switch message.first {
        case "status":
            reply(conn, ["status", statusText()])
        case "stop":
            reply(conn, ["stopping"])
            stop("asked to stop", cancelRuns: false)
        case "exec":
            // Only runs count as activity for the idle timeout (a status poll does not).
            state.withLock { $0.lastActivity = DispatchTime.now().uptimeNanoseconds }
            exec(conn, message, fds)
            state.withLock { $0.lastActivity = DispatchTime.now().uptimeNanoseconds }
        default:
            reply(conn, ["refused", "unknown request \(message.first.map { "'\($0.prefix(40))'" } ?? "(empty)")"])
        }
    }

    private func statusText() -> String {
        let s = state.withLock { $0 }
        let up = Double(DispatchTime.now().uptimeNanoseconds &- started) / 1e9
        return "pid \(getpid()), up \(Int(up)) s, \(s.served) runs served (\(s.servedWarm) on a waiting VM), \(s.declined) handed back, \(s.running.count) running, \(s.warmStarts.count) starts kept warm (\(warm) VMs each), idle timeout \(Int(Double(idleNanos) / 1e9)) s"
    }

    private func decline(_ conn: FileDescriptor, _ why: String) {
        state.withLock { $0.declined += 1 }
        reply(conn, ["decline", why])
    }

    private func exec(_ conn: FileDescriptor, _ m: [String], _ fds: [FileDescriptor]) {
        guard m.count >= 5, m[1] == ServerWire.version else {
            return reply(conn, ["refused", "an exec request of another protocol version or shape"])
        }
        guard m[2] == identity else {
            // A rebuilt sandbox: this server is out of date. Its clients run alone from now.
            reply(conn, ["stale"])
            return stop("a client of another build connected", cancelRuns: false)
        }
        guard m[3] == environment else { return decline(conn, "the client's SANDBOX_*/HOME/XDG_CACHE_HOME differ from the server's") }
        guard fds.count == 3 else { return reply(conn, ["refused", "an exec request carries stdin, stdout and stderr (got \(fds.count) descriptors)"]) }
        let exec: Exec
        // One parse at a time: ArgumentParser does not promise that parsing is thread-safe.
        do { exec = try parseLock.withLock { _ in try Exec.parse(Array(m[4...])) } } catch { return decline(conn, "the arguments do not parse here") }
        if let why = Self.whyNot(exec) { return decline(conn, why) }
        let io = ExecIO(stdin: fds[0].rawValue, stdout: fds[1].rawValue, stderr: fds[2].rawValue)
        guard let config = exec.configuration(io: io) else {
            // The options were refused, with the reason on the client's stderr.
            reply(conn, ["accepted"])
            return reply(conn, ["exit", "125"])
        }
        reply(conn, ["accepted"])
        // A client that gave up waiting (this server was stopped or stuck) has closed its
        // end and runs the command itself: do not start it here too.
        var end = pollfd(fd: conn.rawValue, events: Int16(POLLIN) | UnixSocket.peerHangUpEvent, revents: 0)
        if poll(&end, 1, 0) > 0 { return }
        let cancel = CancelToken()
        let key = ObjectIdentifier(cancel)
        state.withLock { $0.running[key] = cancel }
        // The client going away (killed, Ctrl-C) stops its run.
        let done = try? EventFD(nonBlocking: true)
        let watcher = try? NativeThread(name: "server-watch") { [conn] in
            var p = [pollfd(fd: conn.rawValue, events: Int16(POLLIN) | UnixSocket.peerHangUpEvent, revents: 0),
                     pollfd(fd: done?.fd.rawValue ?? -1, events: Int16(POLLIN), revents: 0)]
            while poll(&p, 2, -1) < 0 && errno == EINTR {}
            if p[0].revents != 0 { cancel.cancel() }
        }
        let (status, warmRun) = withExtendedLifetime(fds) {
            exec.execute(io: io, cancel: cancel, servedBy: getpid())
        }
        done?.signal()
        watcher?.join()
        let stopping: Bool = state.withLock { s in
            s.running[key] = nil
            s.served += 1
            if warmRun { s.servedWarm += 1 }
            return s.stopping != nil
        }
        reply(conn, ["exit", String(status)])
        // Keep VMs of this start waiting for the next run (on the first run of it, or when
        // its warm VMs were of an older snapshot).
        guard warm > 0, !stopping, !warmRun else { return }
        let startKey = "\(config.image)|\(config.kernel ?? "")|\(config.memoryMiB)|\(config.cpus)|\(config.diskSizeMiB.map(String.init) ?? "")|\(config.snapshot ?? "")|\(config.template ?? "")|\(config.jail)"
        let admit: Bool = state.withLock { s in
            if s.warmStarts.contains(startKey) { return true }
            guard s.warmStarts.count < Self.maxWarmStarts else { return false }
            s.warmStarts.insert(startKey)
            return true
        }
        if admit { _ = try? SandboxRunner.keepWarm(config, count: warm) }
    }

    /// Why a run stays with its client, or nil when the server can take it.
    static func whyNot(_ e: Exec) -> String? {
        if e.tty { return "a terminal (-t) stays with its own process" }
        if e.console { return "--console boots, and shows the guest's console" }
        if e.cold { return "--cold boots" }
        if e.keepDisk != nil { return "--keep-disk writes into the client's directories" }
        if !e.copyIn.isEmpty || !e.copyOut.isEmpty { return "copies name the client's files" }
        for (name, path) in [("--image", e.vm.image), ("--kernel", e.vm.kernel), ("--snapshot", e.snapshot)] {
            if let path, path.contains("/"), !path.hasPrefix("/") { return "\(name) is a relative path" }
        }
        if e.vm.kernel != nil { return "--kernel boots" }
        return nil
    }
}

/// The client side, in `sandbox exec` before anything else: hands the run to a server of
/// this build if one answers, else says so by returning nil (the run then goes on here).
enum ServerClient {
    /// The exit status of `arguments` (what follows `exec`) run by the server, or nil when
    /// there is no server, or it hands the run back (before starting anything).
    static func exec(_ arguments: [String]) -> Int32? {
        if let off = getenv("SANDBOX_SERVER"), String(cString: off) == "0" { return nil }
        let path = ServerWire.socketPath
        guard access(path, F_OK) == 0, let conn = connect(path) else { return nil }
        let request = ["exec", ServerWire.version, ServerWire.executableIdentity, ServerWire.relevantEnvironment] + arguments
        let first: [String]?
        do {
            try UnixSocket.send(conn.rawValue, ServerWire.encode(request), descriptors: [0, 1, 2])
            first = try ServerWire.read(conn.rawValue)?.strings
        } catch let e as SystemError where e.errno == EAGAIN || e.errno == EWOULDBLOCK {
            // A server that is stopped (SIGSTOP, Ctrl-Z) or stuck: the kernel took the
            // connection, nobody answers. Nothing was started; the run goes on here (if the
            // server wakes up later, it sees this end closed and does not start it).
            printError("sandbox exec: the sandbox server on \(path) did not answer within \(Int(answerSeconds)) s; running without it")
            return nil
        } catch {
            return nil
        }
        guard first?.first == "accepted" else { return nil }
        // From here the server runs the command: whatever happens, it is not run again
        // here, and however long it takes, this waits for it.
        UnixSocket.setTimeouts(conn.rawValue, seconds: 0)
        do {
            if let m = try ServerWire.read(conn.rawValue), m.strings.count == 2, m.strings[0] == "exit", let status = Int32(m.strings[1]) {
                return status
            }
            printError("sandbox exec: the sandbox server ended the run without its exit status")
        } catch {
            printError("sandbox exec: the connection to the sandbox server broke during the run: \(error)")
        }
        return 125
    }

    /// How long a client waits for a server to take its request (or answer a status).
    static let answerSeconds = 5.0

    /// A connection to the server at `path` whose sends and receives give up after
    /// `answerSeconds` (EAGAIN), or nil when nothing listens there.
    static func connect(_ path: String) -> FileDescriptor? {
        guard let conn = try? UnixSocket.connect(path) else { return nil }
        UnixSocket.setTimeouts(conn.rawValue, seconds: answerSeconds)
        return conn
    }

    /// The server's status line, or nil when nothing answers at `path`.
    static func status(_ path: String) -> String? {
        guard let conn = connect(path),
              (try? UnixSocket.send(conn.rawValue, ServerWire.encode(["status"]))) != nil,
              let m = try? ServerWire.read(conn.rawValue), m.strings.count == 2, m.strings[0] == "status" else { return nil }
        return m.strings[1]
    }

    /// Asks the server at `path` to stop; false when nothing answers.
    static func stop(_ path: String) -> Bool {
        guard let conn = connect(path),
              (try? UnixSocket.send(conn.rawValue, ServerWire.encode(["stop"]))) != nil,
              let m = try? ServerWire.read(conn.rawValue) else { return false }
        return m.strings.first == "stopping"
    }
}
