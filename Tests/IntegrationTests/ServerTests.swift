import Foundation
import Sandbox
import Synchronization
import SystemShims
import Testing

/// `sandbox server`: runs handed over by `sandbox exec`, what it hands back, and how it
/// ends. Each test has a server of its own on a private socket (SANDBOX_SERVER_SOCKET).
@Suite("sandbox server", .serialized)
struct ServerTests {
    /// A private socket directory, the environment that points the CLI at it, and the
    /// server's stop at the end.
    final class Server: Sendable {
        let dir: String
        let socket: String
        let env: [String: String]
        init(start args: [String] = ["--warm", "1", "--idle-timeout", "300"]) throws {
            dir = NSTemporaryDirectory() + "sandbox-server-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            socket = dir + "/s.sock"
            env = ["SANDBOX_SERVER_SOCKET": socket]
            let r = try cli(["server", "start"] + args)
            guard r.status == 0, r.stdout.contains("sandbox server: started") else {
                throw FixtureError("server start: status \(r.status): \(r.stdout)\(r.stderr)")
            }
        }
        func cli(_ args: [String], stdinFile: String? = nil, extraEnv: [String: String] = [:]) throws -> Fixture.Result {
            try Fixture.run(Fixture.sandboxBinary, args, timeout: 120, stdinFile: stdinFile, environment: env.merging(extraEnv) { _, b in b })
        }
        func exec(_ args: [String], stdinFile: String? = nil, extraEnv: [String: String] = [:]) throws -> Fixture.Result {
            try cli(["exec", "--timings", "--timeout", "60"] + args, stdinFile: stdinFile, extraEnv: extraEnv)
        }
        /// `server status`'s line, nil when it is not running.
        func status() throws -> String? {
            let r = try cli(["server", "status"])
            return r.status == 0 ? r.stdout : nil
        }
        /// Waits until `ok(status)` holds (up to `seconds`).
        func waitFor(_ seconds: Double, _ ok: (String?) -> Bool) throws -> Bool {
            let end = Date().addingTimeInterval(seconds)
            while Date() < end {
                if ok(try status()) { return true }
                usleep(200_000)
            }
            return ok(try status())
        }
        deinit {
            _ = try? Fixture.run(Fixture.sandboxBinary, ["server", "stop"], timeout: 120, environment: env)
            try? FileManager.default.removeItem(atPath: dir)
        }
    }

    static let served = "run by the sandbox server"

    @Test("a run handed to the server: output, stderr, status and stdin are the command's; later runs take a waiting VM")
    func runsThroughTheServer() throws {
        let server = try Server()
        let r = try server.exec(["--", "sh", "-c", "echo out; echo err >&2; exit 3"])
        #expect(r.status == 3, "\(r.stderr)")
        #expect(r.stdout == "out\n")
        #expect(r.stderr.contains("err\n"), "\(r.stderr)")
        #expect(r.stderr.contains(Self.served), "\(r.stderr)")
        // The server keeps a VM of this start waiting from now on.
        var warmRun = false
        for _ in 0..<20 where !warmRun {
            usleep(300_000)
            let again = try server.exec(["--", "echo", "again"])
            #expect(again.status == 0 && again.stdout == "again\n", "\(again.stderr)")
            warmRun = again.stderr.contains("on a VM restored ahead of it")
        }
        #expect(warmRun, "no run took a waiting VM")
        let input = NSTemporaryDirectory() + "sandbox-server-stdin-\(getpid())"
        try "line 1\nline 2\n".write(toFile: input, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: input) }
        let cat = try server.exec(["--stdin", "--", "cat"], stdinFile: input)
        #expect(cat.status == 0 && cat.stdout == "line 1\nline 2\n", "\(cat.stderr)")
        #expect(cat.stderr.contains(Self.served))
        // Outcomes other than an exit keep their status and their line.
        let killed = try server.exec(["--", "sh", "-c", "kill -9 $$"])
        #expect(killed.status == 137)
        let slow = try server.cli(["exec", "--timeout", "1", "--", "sleep", "30"])
        #expect(slow.status == 124 && slow.stderr.contains("timed out"), "\(slow.stderr)")
        let missing = try server.exec(["--", "no-such-command-xyz"])
        #expect(missing.status == 127 && missing.stderr.contains("command not found"), "\(missing.stderr)")
        // Each run is a fresh VM: nothing of one run is seen by the next.
        _ = try server.exec(["--", "sh", "-c", "echo left > /tmp/left"])
        let next = try server.exec(["--", "sh", "-c", "cat /tmp/left 2>&1 || echo absent"])
        #expect(next.stdout.contains("absent"), "\(next.stdout)")
        let status = try #require(try server.status())
        #expect(status.contains("runs served"), "\(status)")
        let doctor = try server.cli(["doctor"])
        #expect(doctor.stdout.contains("sandbox server: running on \(server.socket)"), "\(doctor.stdout)")
    }

    @Test("runs the server cannot take run in the client as before, and say nothing of the server")
    func handsBackWhatItCannotTake() throws {
        let server = try Server()
        let file = "sandbox-server-copy-\(getpid()).txt"   // relative: the client's directory
        try "copied\n".write(toFile: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: file) }
        let copy = try server.exec(["--copy-in", "\(file):/tmp/in.txt", "--", "cat", "/tmp/in.txt"])
        #expect(copy.status == 0 && copy.stdout == "copied\n", "\(copy.stderr)")
        #expect(!copy.stderr.contains(Self.served), "\(copy.stderr)")
        // Another environment than the server's (the library reads SANDBOX_* itself).
        let other = try server.exec(["--", "echo", "direct"], extraEnv: ["SANDBOX_BOOT_TIMEOUT": "45"])
        #expect(other.status == 0 && other.stdout == "direct\n", "\(other.stderr)")
        #expect(!other.stderr.contains(Self.served), "\(other.stderr)")
        // Bad options are the client's own errors, as without a server.
        let bad = try server.cli(["exec", "--memory", "1", "--", "true"])
        #expect(bad.status == 125, "\(bad.stderr)")
        #expect(bad.stderr.contains("--memory"), "\(bad.stderr)")
        let status = try #require(try server.status())
        #expect(status.contains("2 handed back"), "\(status)")
        // SANDBOX_SERVER=0 keeps a run away from it.
        let off = try server.exec(["--", "true"], extraEnv: ["SANDBOX_SERVER": "0"])
        #expect(off.status == 0 && !off.stderr.contains(Self.served), "\(off.stderr)")
    }

    @Test("clients at once each get their own run, output and status")
    func clientsAtOnce() throws {
        let server = try Server(start: ["--warm", "2", "--idle-timeout", "300"])
        let results = Mutex<[Int: Fixture.Result]>([:])
        let failures = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 4) { i in
            do {
                let r = try server.exec(["--", "sh", "-c", "echo client \(i); exit \(10 + i)"])
                results.withLock { $0[i] = r }
            } catch {
                failures.withLock { $0.append("\(i): \(error)") }
            }
        }
        #expect(failures.withLock { $0 }.isEmpty)
        for i in 0..<4 {
            let r = try #require(results.withLock { $0[i] })
            #expect(r.status == Int32(10 + i) && r.stdout == "client \(i)\n", "\(r.stderr)")
            #expect(r.stderr.contains(Self.served), "\(r.stderr)")
        }
    }

    @Test("a client killed during its run stops the run's VM")
    func killedClientStopsItsRun() throws {
        let server = try Server()
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Fixture.sandboxBinary)
        p.arguments = ["exec", "--", "sleep", "300"]
        p.environment = ProcessInfo.processInfo.environment.merging(server.env) { _, b in b }
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        #expect(try server.waitFor(60) { $0?.contains(", 1 running") == true }, "the run never started")
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        let ended = try server.waitFor(20) { $0?.contains(", 0 running") == true }
        let status = try server.status() ?? "not running"
        #expect(ended, "the run outlived its client: \(status)")
    }

    @Test("a stopped server (SIGSTOP): a client runs alone after waiting 5 s; woken, the server does not run it too")
    func stoppedServerIsWaitedForBriefly() throws {
        let server = try Server(start: ["--warm", "0", "--idle-timeout", "300"])
        let status = try #require(try server.status())
        let pid = try #require(status.split(separator: " ").drop(while: { $0 != "(pid" }).dropFirst().first.flatMap { Int32($0.trimmingCharacters(in: .punctuationCharacters)) })
        kill(pid, SIGSTOP)
        let r: Fixture.Result
        do {
            defer { kill(pid, SIGCONT) }
            r = try server.exec(["--", "echo", "alone"])
        }
        #expect(r.status == 0 && r.stdout == "alone\n", "\(r.stderr)")
        #expect(r.stderr.contains("did not answer within 5 s; running without it") && !r.stderr.contains(Self.served), "\(r.stderr)")
        #expect(r.seconds >= 4.5 && r.seconds < 60, "took \(r.seconds) s")
        // Woken, the server finds that client gone: it serves nothing for it.
        let after = try #require(try server.status())
        #expect(after.contains("0 runs served"), "\(after)")
        let next = try server.exec(["--", "echo", "served"])
        #expect(next.status == 0 && next.stdout == "served\n" && next.stderr.contains(Self.served), "\(next.stderr)")
        let last = try #require(try server.status())
        #expect(last.contains("1 runs served"), "the abandoned request was run too: \(last)")
    }

    @Test("garbage on the socket is refused; the server goes on")
    func garbageIsRefused() throws {
        let server = try Server()
        for junk: [UInt8] in [[0xff, 0xff, 0xff, 0xff, 1], [8, 0, 0, 0, 9, 9, 9, 9, 0, 0, 0, 0], Array("hello\n".utf8)] {
            let conn = try UnixSocket.connect(server.socket)
            try UnixSocket.send(conn.rawValue, junk)
            shutdown(conn.rawValue, Int32(SHUT_WR))
            var answer: [UInt8] = []
            // The server closes with the rest of the junk unread: after its answer, the
            // stream ends or is reset.
            while let got = try? UnixSocket.receive(conn.rawValue, max: 4096, maxDescriptors: 0), !got.bytes.isEmpty {
                answer += got.bytes
            }
            #expect(String(decoding: answer, as: UTF8.self).contains("refused"), "\(answer)")
        }
        let r = try server.exec(["--", "echo", "still"])
        #expect(r.status == 0 && r.stdout == "still\n" && r.stderr.contains(Self.served), "\(r.stderr)")
    }

    @Test("a client of another build runs alone and the out-of-date server ends")
    func anotherBuildEndsTheServer() throws {
        let server = try Server()
        let copyDir = server.dir + "/bin"
        try FileManager.default.createDirectory(atPath: copyDir, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: Fixture.sandboxBinary, toPath: copyDir + "/sandbox")
        try FileManager.default.createSymbolicLink(atPath: copyDir + "/sandbox-vmm", withDestinationPath: Fixture.productsDirectory + "/sandbox-vmm")
        let r = try Fixture.run(copyDir + "/sandbox", ["exec", "--timings", "--", "echo", "copy"], timeout: 120, environment: server.env)
        #expect(r.status == 0 && r.stdout == "copy\n", "\(r.stderr)")
        #expect(!r.stderr.contains(Self.served), "\(r.stderr)")
        #expect(try server.waitFor(20) { $0 == nil }, "the server of the older build is still running")
    }

    @Test("stop, the idle timeout, and a second start")
    func stopAndIdle() throws {
        let server = try Server(start: ["--warm", "0", "--idle-timeout", "2"])
        let again = try server.cli(["server", "start"])
        #expect(again.status == 0 && again.stdout.contains("already running"), "\(again.stdout)")
        #expect(try server.waitFor(20) { $0 == nil }, "still running after its idle timeout")
        #expect(!FileManager.default.fileExists(atPath: server.socket))
        let off = try server.exec(["--", "echo", "alone"])
        #expect(off.status == 0 && off.stdout == "alone\n" && !off.stderr.contains(Self.served), "\(off.stderr)")
        let bad = try server.cli(["server", "start", "--warm", "99"])
        #expect(bad.status == 2 && bad.stderr.contains("--warm"), "\(bad.stderr)")
        let second = try Server(start: ["--warm", "0"])
        let stop = try second.cli(["server", "stop"])
        #expect(stop.status == 0 && stop.stdout.contains("stopped"), "\(stop.stdout)")
        #expect(try second.status() == nil)
    }
}
