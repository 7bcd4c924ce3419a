import Foundation
import Testing

/// Root disks: a copy-on-write view per sandbox over the shared, read-only base image.
@Suite("root disks", .serialized)
struct DiskTests {
    let t = ["--timeout", Fixture.inLab ? "600" : "60"]

    func exec(_ args: [String]) throws -> Fixture.Result {
        try Fixture.run(Fixture.sandboxBinary, ["exec"] + args, timeout: Fixture.inLab ? 900 : 120)
    }

    func baseImage() throws -> String {
        let r = try Fixture.run(Fixture.sandboxBinary, ["image", "path", "busybox"])
        try #require(r.status == 0, "\(r.stderr)")
        return r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    @Test("a written file survives sync and a dropped page cache with the same checksum")
    func writeSyncReadBack() throws {
        let r = try exec(t + ["--", "sh", "-c", """
            dd if=/dev/urandom of=/root/f bs=4096 count=512 2>/dev/null && sha256sum /root/f | cut -d' ' -f1 \
            && sync && echo 3 > /proc/sys/vm/drop_caches && sha256sum /root/f | cut -d' ' -f1 \
            && grep ' / ' /proc/mounts
            """])
        #expect(r.status == 0, "\(r.stderr)")
        let lines = r.stdout.split(separator: "\n").map(String.init)
        try #require(lines.count >= 3, "\(r.stdout)")
        #expect(lines[0].count == 64)
        #expect(lines[0] == lines[1])
        #expect(lines[2].contains("ext4"), "root is not the ext4 disk: \(lines[2])")
    }

    @Test("two sandboxes from the same base do not see each other's writes")
    func isolation() throws {
        let a = try exec(t + ["--", "sh", "-c", "echo from-a > /root/marker && sync && cat /root/marker"])
        #expect(a.stdout == "from-a\n", "\(a.stderr)")
        let b = try exec(t + ["--", "sh", "-c", "test -e /root/marker && echo visible || echo absent"])
        #expect(b.stdout == "absent\n", "\(b.stderr)")
    }

    @Test("the base image is unchanged after 20 runs that write")
    func baseUnchanged() throws {
        let base = try baseImage()
        let before = try Fixture.sha256(try Data(contentsOf: URL(fileURLWithPath: base)))
        let runs = Fixture.inLab ? 3 : 20
        for i in 0..<runs {
            let r = try exec(t + ["--", "sh", "-c", "echo \(i) > /root/run-\(i) && rm -f /bin/true && sync"])
            #expect(r.status == 0, "run \(i): \(r.stderr)")
        }
        let after = try Fixture.sha256(try Data(contentsOf: URL(fileURLWithPath: base)))
        #expect(before == after)
    }

    @Test("--keep-disk writes an image that contains the guest's writes")
    func keepDisk() throws {
        let out = NSTemporaryDirectory() + "sandbox-kept-\(getpid()).ext4"
        defer { try? FileManager.default.removeItem(atPath: out) }
        let r = try exec(t + ["--keep-disk", out, "--", "sh", "-c", "echo kept-content > /root/kept.txt && sync"])
        #expect(r.status == 0, "\(r.stderr)")
        let cat = try Fixture.run("/sbin/debugfs", ["-R", "cat /root/kept.txt", out])
        #expect(cat.stdout.contains("kept-content"), "debugfs: \(cat.stdout) \(cat.stderr)")
    }
}
