import Foundation
import Testing

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
