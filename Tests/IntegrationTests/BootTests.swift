import Foundation
import Testing

/// Boots our kernel with a busybox initramfs under `sandbox boot`. Runs natively here
/// (pvm flavor on PVM hosts) and in the lab lane (standard flavor on hardware KVM).
@Suite("sandbox boot: our kernel to a busybox init", .serialized)
struct BootTests {
    static let initLine = "sandbox-it: init reached"

    func boot(cpus: Int) throws -> Fixture.Result {
        let kernel = try Fixture.kernel()
        let initrd = try Fixture.initramfs(named: "hello", script: """
            /bin/busybox echo "\(Self.initLine) with $(/bin/busybox grep -c ^processor /proc/cpuinfo 2>/dev/null || /bin/busybox nproc) cpus"
            """)
        let timeout = Fixture.inLab ? "240" : "30"
        let args = [
            "boot", "--kernel", kernel, "--initrd", initrd, "--cpus", "\(cpus)",
            "--memory", "256", "--append", "quiet", "--timeout", timeout,
        ]
        let r = try Fixture.run(Fixture.sandboxBinary, args)
        // The lab's known emulated-SVM fault (Docs/Testing.md, "The lab's known faults"):
        // a nested guest that resets before printing anything, its vCPU already at the
        // reset vector. Only there, and only for that signature, boot once more and say so.
        if Fixture.inLab, r.stdout.isEmpty, r.stderr.contains("vCPU at the shutdown: RIP 0xfff0,") {
            print("BootTests: the lab's early nested-guest reset (empty console, vCPU at the reset vector); booting once more. stderr: \(r.stderr)")
            return try Fixture.run(Fixture.sandboxBinary, args)
        }
        return r
    }

    @Test("boots to init and shuts down", arguments: [1, 2])
    func bootsToInit(cpus: Int) throws {
        let r = try boot(cpus: cpus)
        #expect(r.status == 0, "stderr: \(r.stderr)\nstdout tail: \(r.stdout.suffix(2000))")
        #expect(r.stdout.contains(Self.initLine), "console: \(r.stdout.suffix(2000))")
        #expect(r.stderr.contains("guest reset"), "stderr: \(r.stderr)")
    }

    @Test("the guest sees every vCPU")
    func seesTwoCPUs() throws {
        let r = try boot(cpus: 2)
        #expect(r.stdout.contains("\(Self.initLine) with 2 cpus"), "console: \(r.stdout.suffix(2000))")
    }
}

/// Bad input to `sandbox boot` gets a specific message and exit status 2, never a crash.
@Suite("sandbox boot: bad input")
struct BootBadInputTests {
    func boot(_ args: [String]) throws -> Fixture.Result {
        try Fixture.run(Fixture.sandboxBinary, ["boot"] + args, timeout: 60)
    }

    @Test func missingKernel() throws {
        let r = try boot(["--kernel", "/nonexistent/vmlinux"])
        #expect(r.status == 2)
        #expect(r.stderr.contains("/nonexistent/vmlinux: no such file"), "\(r.stderr)")
    }

    @Test func directoryAsKernel() throws {
        let r = try boot(["--kernel", "/tmp"])
        #expect(r.status == 2)
        #expect(r.stderr.contains("is a directory"), "\(r.stderr)")
    }

    @Test func notAKernel() throws {
        let path = NSTemporaryDirectory() + "not-a-kernel-\(getpid())"
        try Data("this is not a kernel, just text\n".utf8).write(to: URL(fileURLWithPath: path))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let r = try boot(["--kernel", path])
        #expect(r.status == 2)
        #expect(r.stderr.contains("not a kernel"), "\(r.stderr)")
    }

    @Test func truncatedKernel() throws {
        let kernel = try Fixture.kernel()
        let bytes = try Data(contentsOf: URL(fileURLWithPath: kernel)).prefix(100)
        let path = NSTemporaryDirectory() + "truncated-kernel-\(getpid())"
        try bytes.write(to: URL(fileURLWithPath: path))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let r = try boot(["--kernel", path])
        #expect(r.status == 2)
        #expect(r.stderr.contains("truncated"), "\(r.stderr)")
    }

    @Test func tooLittleMemory() throws {
        let r = try boot(["--kernel", try Fixture.kernel(), "--memory", "8"])
        #expect(r.status == 2)
        #expect(r.stderr.contains("too little"), "\(r.stderr)")
    }

    @Test("a guest kernel panic is reported as a crash with its panic line")
    func guestPanic() throws {
        // No initrd and no disk: the kernel cannot mount a root file system and panics.
        let r = try boot(["--kernel", try Fixture.kernel(), "--memory", "64", "--append", "quiet", "--timeout", Fixture.inLab ? "240" : "30"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("guest crashed: "), "\(r.stderr)")
        #expect(r.stderr.contains("Kernel panic - not syncing: VFS: Unable to mount root fs"), "\(r.stderr)")
        #expect(!r.stderr.contains("Call Trace"), "only the panic line is reported: \(r.stderr)")
    }

    @Test func invalidCommandLine() throws {
        let r = try boot(["--kernel", try Fixture.kernel(), "--append", "init=\"/bin/sh"])
        #expect(r.status == 2)
        #expect(r.stderr.contains("unbalanced double quote"), "\(r.stderr)")
        let r2 = try boot(["--kernel", try Fixture.kernel(), "--append", "foo=\u{7}"])
        #expect(r2.status == 2)
        #expect(r2.stderr.contains("not printable ASCII"), "\(r2.stderr)")
    }

    @Test func zeroCPUs() throws {
        let r = try boot(["--kernel", try Fixture.kernel(), "--cpus", "0"])
        #expect(r.status == 2)
        #expect(r.stderr.contains("--cpus must be at least 1"), "\(r.stderr)")
    }
}

@Suite("sandbox doctor")
struct DoctorTests {
    @Test("reports the host kind, KVM access, the block I/O engine and the kernel flavor")
    func report() throws {
        let r = try Fixture.run(Fixture.sandboxBinary, ["doctor"])
        #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
        let expectedKind = FileManager.default.fileExists(atPath: "/sys/module/kvm_pvm") ? "PVM (kvm_pvm)" : "hardware KVM"
        #expect(r.stdout.contains("host kind:      \(expectedKind)"), "\(r.stdout)")
        #expect(r.stdout.contains("/dev/kvm:       ok"), "\(r.stdout)")
        #expect(r.stdout.contains("block I/O:"), "\(r.stdout)")
        let flavor = expectedKind == "hardware KVM" ? "standard" : "pvm"
        #expect(r.stdout.contains("guest kernel:   \(flavor) flavor"), "\(r.stdout)")
    }
}
