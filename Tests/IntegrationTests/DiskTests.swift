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
        let before = try Fixture.sha256(file: base)
        let runs = Fixture.inLab ? 3 : 20
        for i in 0..<runs {
            let r = try exec(t + ["--", "sh", "-c", "echo \(i) > /root/run-\(i) && rm -f /bin/true && sync"])
            #expect(r.status == 0, "run \(i): \(r.stderr)")
        }
        let after = try Fixture.sha256(file: base)
        #expect(before == after)
    }

    /// `df -k /` in the guest: (total KiB, available KiB).
    func guestDF(_ extra: [String] = [], then script: String = "true") throws -> (total: UInt64, available: UInt64, result: Fixture.Result) {
        let r = try exec(t + extra + ["--", "sh", "-c", "df -k / | tail -1 && \(script)"])
        let f = r.stdout.split(separator: "\n").first?.split(separator: " ") ?? []
        return (f.count > 3 ? UInt64(f[1]) ?? 0 : 0, f.count > 3 ? UInt64(f[3]) ?? 0 : 0, r)
    }

    @Test("an image has about 1 GiB free, and a 600 MiB file fits")
    func imageHeadroom() throws {
        let (_, available, r) = try guestDF(then: "dd if=/dev/zero of=/root/big bs=1M count=600 2>&1 | tail -1 && sync && ls -l /root/big")
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        #expect(available > 1000 * 1024, "only \(available / 1024) MiB free on /")
        #expect(r.stdout.contains(" 629145600 "), "\(r.stdout)")
    }

    @Test("--disk-size grows the root disk and its file system; the base image and the host stay as they were")
    func diskSizeGrows() throws {
        let base = try baseImage()
        let baseSize = (try FileManager.default.attributesOfItem(atPath: base)[.size] as? NSNumber)?.uint64Value ?? 0
        let (total, available, r) = try guestDF(["--disk-size", "4G"],
                                                 then: "dd if=/dev/zero of=/root/big bs=1M count=1500 2>&1 | tail -1 && sync && ls -l /root/big")
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        #expect(total > 3900 * 1024 && total <= 4096 * 1024, "/ is \(total / 1024) MiB")
        #expect(available > 3500 * 1024, "only \(available / 1024) MiB free on /")
        #expect(r.stdout.contains(" 1572864000 "), "a 1500 MiB file did not fit: \(r.stdout)")
        let after = (try FileManager.default.attributesOfItem(atPath: base)[.size] as? NSNumber)?.uint64Value ?? 0
        #expect(after == baseSize)
        // The same size as the image is accepted (nothing to grow), smaller is not.
        let baseMiB = (baseSize + (1 << 20) - 1) >> 20
        let small = try exec(t + ["--disk-size", "\(baseMiB - 1)", "--", "true"])
        #expect(small.status == 125 && small.stderr.contains("is smaller than the image busybox (\(baseMiB) MiB)"), "\(small.stderr)")
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
