import Foundation
import Testing
import Sandbox

/// A guest that tries to hurt its host through the resources it is given: each attempt
/// ends with a typed outcome, and the host (its disk, its processes) and the next sandbox
/// are as before. (Other hostile-guest cases live with the feature they attack:
/// ExecTests has the fork bomb, the busy loop past --timeout, a reboot mid-command, a
/// guest reset before its agent answers, a VMM that stops answering; BootTests a kernel
/// panic; JailTests a VMM that makes a forbidden call; Scripts/fuzz the devices and the
/// agent protocol.)
@Suite("a hostile guest", .serialized)
struct HostileGuestTests {
    let timeoutArgs = ["--timeout", Fixture.inLab ? "600" : "60"]

    func exec(_ args: [String]) throws -> Fixture.Result {
        try Fixture.run(Fixture.sandboxBinary, ["exec"] + args, timeout: Fixture.inLab ? 900 : 120)
    }

    static func freeBytes(_ path: String) -> UInt64 {
        var s = statvfs()
        guard statvfs(path, &s) == 0 else { return 0 }
        return UInt64(s.f_bavail) * UInt64(s.f_frsize)
    }

    @Test("a command that eats all guest memory is killed by the guest's OOM killer: 251, 'out of memory'; the next sandbox is fine")
    func memoryExhaustion() throws {
        let r = try exec(timeoutArgs + ["--", "sh", "-c", "x=0123456789abcdef; while :; do x=\"$x$x\"; done"])
        #expect(r.status == 251, "\(r.stderr)")
        #expect(r.stderr.contains("out of memory"), "\(r.stderr)")
        let next = try exec(timeoutArgs + ["--", "echo", "fine"])
        #expect(next.status == 0 && next.stdout == "fine\n", "\(next.stderr)")
    }

    @Test("filling the root disk is the guest's ENOSPC, not the host's: the host's free space comes back, the next sandbox sees none of it")
    func diskFill() throws {
        let cache = Fixture.cacheDirectory
        let before = Self.freeBytes(cache)
        let r = try exec(timeoutArgs + ["--", "sh", "-c",
            "dd if=/dev/zero of=/fill bs=1M 2>/tmp/dd.err; echo dd=$?; grep -o 'No space left on device' /tmp/dd.err | head -1; sync; df -k / | tail -1"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("dd=1"), "\(r.stdout)")
        #expect(r.stdout.contains("No space left on device"), "\(r.stdout)")
        // df's "available" column is (nearly) zero: the guest's own disk is full.
        let available = r.stdout.split(separator: "\n").last?.split(separator: " ").dropFirst(3).first.flatMap { UInt64($0) }
        #expect(available.map { $0 < 64 * 1024 } == true, "\(r.stdout)")
        // The overlay that held ~1 GiB is gone with the sandbox (its VMM is torn down just
        // after the result: give it a few seconds).
        var after = Self.freeBytes(cache)
        for _ in 0 ..< 100 where after + (256 << 20) < before {
            usleep(100_000)
            after = Self.freeBytes(cache)
        }
        #expect(after + (256 << 20) >= before, "the host lost \((Int64(before) - Int64(after)) >> 20) MiB")
        let next = try exec(timeoutArgs + ["--", "sh", "-c", "test -e /fill && echo leaked || echo clean"])
        #expect(next.stdout == "clean\n", "\(next.stderr)")
    }
}

/// `Tests/HostileGuest/hostile.c`, run as root inside real guests: it unbinds a guest
/// driver and drives the virtio device itself through /dev/mem (every malformed ring the
/// spec forbids), floods vsock, pulls the vsock device away, and writes lying agent
/// frames on the agent's own host connection. The device must refuse each (a typed
/// DEVICE_NEEDS_RESET or request status) and recover after a reset; the host must end
/// each run with a typed outcome, keep only its limits of what the guest sends, and go
/// on serving other sandboxes.
@Suite("a hostile guest program", .serialized)
struct HostileGuestProgramTests {
    static let built: Swift.Result<String, FixtureError> = {
        let source = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("HostileGuest/hostile.c").path
        let dir = NSTemporaryDirectory() + "sandbox-hostile-\(getpid())"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let out = dir + "/hostile"
        guard let r = try? Fixture.run("/usr/bin/cc", ["-static", "-O2", "-Wall", "-o", out, source, "-lpthread"]), r.status == 0 else {
            return .failure(FixtureError("cannot build \(source) with `cc -static` (is libc6-dev installed?)"))
        }
        return .success(out)
    }()

    var timeout: [String] { ["--timeout", Fixture.inLab ? "900" : "120"] }

    func hostile(_ mode: String, _ args: [String] = []) throws -> Fixture.Result {
        let program = try Self.built.get()
        return try Fixture.run(Fixture.sandboxBinary, ["exec", "--copy-in", "\(program):/hostile"] + args + ["--", "/hostile", mode],
                               timeout: Fixture.inLab ? 1200 : 180)
    }

    func nextSandboxIsFine() throws {
        let next = try Fixture.run(Fixture.sandboxBinary, ["exec"] + timeout + ["--", "echo", "fine"], timeout: Fixture.inLab ? 900 : 120)
        #expect(next.status == 0 && next.stdout == "fine\n", "the next sandbox: \(next.status) \(next.stderr)")
    }

    static let blockExpected = """
        device: virtio-blk version 2, queue max 256
        valid read: ok
        valid write: ok
        valid flush: ok
        read past the end: ioerr
        read at sector 2^64-1: ioerr
        unknown request type: unsupp
        data not a multiple of 512: ioerr
        a 64 MiB write: ioerr
        a read into a read-only buffer: ioerr
        still working: ok
        descriptor loop: needs-reset, then ok
        descriptor pointing at itself: needs-reset, then ok
        next out of range: needs-reset, then ok
        buffer outside guest RAM: needs-reset, then ok
        buffer in the MMIO hole: needs-reset, then ok
        buffer address wrapping 2^64: needs-reset, then ok
        readable after writable: needs-reset, then ok
        no status byte: needs-reset, then ok
        nested indirect table: needs-reset, then ok
        indirect table of 20 bytes: needs-reset, then ok
        empty indirect table: needs-reset, then ok
        indirect with next: needs-reset, then ok
        indirect chain longer than the queue: needs-reset, then ok
        indirect table outside guest RAM: needs-reset, then ok
        chain longer than 4 GiB: needs-reset, then ok
        head index out of range: needs-reset, then ok
        available index jumping by 1000: needs-reset, then ok
        queue size 3: needs-reset, then ok
        queue size 0: needs-reset, then ok
        queue size 512: needs-reset, then ok
        descriptor table misaligned: needs-reset, then ok
        used ring misaligned: needs-reset, then ok
        descriptor table outside guest RAM: needs-reset, then ok
        used ring in the MMIO hole: needs-reset, then ok
        a feature never offered: FEATURES_OK refused, then ok
        no VERSION_1: FEATURES_OK refused, then ok
        DRIVER_OK before FEATURES_OK: ignored, then ok
        11,000 doorbells, then a read: ok
        junk in every register: survived, then ok
        junk in the queue registers: needs-reset, then ok
        descriptors rewritten while the device walks them: every request answered or refused, then ok
        blk: done

        """

    @Test("malformed rings from a raw driver in the guest: the block device refuses each, recovers after a reset; a sandbox beside it is unaffected")
    func blockDevice() throws {
        // Another sandbox runs at the same time and must see nothing of it.
        let neighbour = DispatchGroup()
        nonisolated(unsafe) var beside: Fixture.Result?
        DispatchQueue.global().async(group: neighbour) {
            beside = try? Fixture.run(Fixture.sandboxBinary, ["exec"] + timeout + ["--", "sh", "-c", "for i in $(seq 1 40); do echo $i; sleep 0.05; done | md5sum"],
                                      timeout: Fixture.inLab ? 900 : 120)
        }
        let r = try hostile("blk", timeout)
        neighbour.wait()
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == Self.blockExpected, "\(r.stdout)\n\(r.stderr)")
        let expectedSum = try Fixture.run("/bin/sh", ["-c", "for i in $(seq 1 40); do echo $i; done | md5sum"]).stdout
        #expect(beside?.status == 0 && beside?.stdout == expectedSum, "the sandbox beside it: \(beside?.status ?? -1) \(beside?.stderr ?? "did not run")")
        try nextSandboxIsFine()
    }

    @Test("a vsock connection flood to host ports nobody listens on: every attempt is refused at once; the agent's own stream is untouched")
    func vsockFlood() throws {
        let r = try hostile("vsock-flood", timeout)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == """
            connections to host ports nobody listens on: 2000 refused, 0 connected, 0 unanswered, 0 other
            connections to other CIDs: 0 connected
            vsock-flood: done

            """, "\(r.stdout)\n\(r.stderr)")
        try nextSandboxIsFine()
    }

    @Test("the guest pulls the vsock device away mid-command: a typed error at once, not a hang")
    func vsockReset() throws {
        let r = try hostile("vsock-reset", timeout)
        #expect(r.status == 125, "\(r.status) \(r.stderr)")
        #expect(r.stderr.contains("agent"), "\(r.stderr)")
        #expect(r.seconds < (Fixture.inLab ? 600 : 30), "took \(r.seconds) s")
        try nextSandboxIsFine()
    }

    @Test("lying agent frames on the agent's own connection end the run with a protocol error naming the lie",
          arguments: [("garbage", "magic"), ("huge", "payload"), ("unknown", "type")])
    func agentLies(mode: String, named: String) throws {
        let r = try hostile("agent-\(mode)", timeout)
        #expect(r.status == 125, "\(r.status) \(r.stderr)")
        #expect(r.stderr.contains(named), "\(r.stderr)")
        #expect(r.seconds < (Fixture.inLab ? 600 : 30), "took \(r.seconds) s")
        try nextSandboxIsFine()
    }

    @Test("a frame that never ends: the host's own deadline ends the run as timed out")
    func agentStall() throws {
        let r = try hostile("agent-stall", ["--timeout", Fixture.inLab ? "20" : "3"])
        #expect(r.status == 124, "\(r.status) \(r.stderr)")
        #expect(r.seconds < (Fixture.inLab ? 600 : 30), "took \(r.seconds) s")
        try nextSandboxIsFine()
    }

    @Test("64 MiB of forged output frames: the caller keeps only its output limit of them")
    func agentFlood() async throws {
        var config = SandboxConfiguration()
        config.copyIn = [FileCopy(hostPath: try Self.built.get(), guestPath: "/hostile")]
        config.outputLimit = 1 << 20
        config.timeout = .seconds(Fixture.inLab ? 900 : 120)
        config.vmmExecutable = Fixture.productsDirectory + "/sandbox-vmm"
        let r = await Sandbox.run(["/hostile", "agent-flood"], configuration: config)
        #expect(r.outcome == .exited(0), "\(r.outcome) \(r.stderrText)")
        #expect(r.stdout.count == 1 << 20, "kept \(r.stdout.count) bytes")
        #expect(r.stdout.allSatisfy { $0 == UInt8(ascii: "A") })
        try nextSandboxIsFine()
    }
}
