import Foundation
import Sandbox
import Testing

/// `sandbox exec` end to end: boots the busybox image, runs commands through the agent.
@Suite("sandbox exec end to end", .serialized)
struct ExecTests {
    let timeoutArgs = ["--timeout", Fixture.inLab ? "600" : "60"]

    func exec(_ args: [String], stdinFile: String? = nil) throws -> Fixture.Result {
        try Fixture.run(Fixture.sandboxBinary, ["exec"] + args, timeout: Fixture.inLab ? 900 : 120, stdinFile: stdinFile)
    }

    @Test("stdout, stderr and the exit status are the command's")
    func echoOutErrExit3() throws {
        let r = try exec(timeoutArgs + ["--", "sh", "-c", "echo out; echo err >&2; exit 3"])
        #expect(r.stdout == "out\n")
        #expect(Fixture.withoutStartProgress(r.stderr) == "err\n", "\(r.stderr)")
        #expect(r.status == 3)
    }

    @Test("a missing command exits 127 with a clear message")
    func missingCommand() throws {
        let r = try exec(timeoutArgs + ["--", "no-such-command-xyz"])
        #expect(r.status == 127)
        #expect(r.stderr.contains("no-such-command-xyz: command not found"), "\(r.stderr)")
    }

    @Test("a command killed by SIGKILL exits 137")
    func killedBySignal() throws {
        let r = try exec(timeoutArgs + ["--", "sh", "-c", "kill -9 $$"])
        #expect(r.status == 137)
    }

    @Test("--timeout stops a long command with status 124 within a few seconds")
    func timeout() throws {
        let r = try exec(["--timeout", "2", "--", "sleep", "100"])
        #expect(r.status == 124)
        #expect(r.stderr.contains("timed out"), "\(r.stderr)")
        if !Fixture.inLab { #expect(r.seconds < 10, "took \(r.seconds) s") }
    }

    @Test("a guest still booting at the boot limit is reported as slow (125), not as a crash")
    func slowBootIsNotACrash() throws {
        let r = try Fixture.run(Fixture.sandboxBinary, ["exec", "--cold"] + timeoutArgs + ["--", "true"],
                                timeout: Fixture.inLab ? 900 : 120, environment: ["SANDBOX_BOOT_TIMEOUT": "0.001"])
        #expect(r.status == 125, "\(r.stderr)")
        #expect(r.stderr.contains("did not finish booting"), "\(r.stderr)")
        #expect(r.stderr.contains("boot limit of 0.001 s"), "\(r.stderr)")
        #expect(!r.stderr.contains("guest crashed") && !r.stderr.contains("kernel crash"), "\(r.stderr)")
    }

    @Test("a malformed SANDBOX_BOOT_TIMEOUT is refused with its value")
    func badBootTimeout() throws {
        let r = try Fixture.run(Fixture.sandboxBinary, ["exec", "--", "true"], timeout: 60,
                                environment: ["SANDBOX_BOOT_TIMEOUT": "soon"])
        #expect(r.status == 125, "\(r.stderr)")
        #expect(r.stderr.contains("SANDBOX_BOOT_TIMEOUT=soon"), "\(r.stderr)")
    }

    @Test("numbers out of range are refused before a VM starts, naming the flag", arguments: [
        (["--timeout=inf"], "--timeout must be a number of seconds from 0 to 2592000 (got inf)"),
        (["--timeout=1e300"], "--timeout must be a number of seconds from 0 to 2592000 (got 1e+300)"),
        (["--timeout", "-1"], "--timeout must be a number of seconds from 0 to 2592000 (got -1)"),
        (["--timeout=nan"], "--timeout must be a number of seconds from 0 to 2592000 (got nan)"),
        (["--cpus", "0"], "--cpus must be from 1 to 32 (got 0)"),
        (["--cpus", "1000"], "--cpus must be from 1 to 32 (got 1000)"),
        (["--memory", "16"], "--memory 16 MiB is too little"),
        (["--memory", "100000000"], "--memory 100000000 MiB is more than this host can give a guest: MemAvailable is"),
    ])
    func numbersOutOfRange(args: [String], message: String) throws {
        let r = try Fixture.run(Fixture.sandboxBinary, ["exec"] + args + ["--", "true"], timeout: 30)
        #expect(r.status == 125, "\(r.stderr)")
        #expect(r.stderr.contains(message), "\(r.stderr)")
        #expect(r.seconds < 5, "took \(r.seconds) s: did it boot a VM?")
    }

    @Test("an unknown option is a usage error with a suggestion, and exec --help prints help")
    func unknownOptionAndHelp() throws {
        let typo = try Fixture.run(Fixture.sandboxBinary, ["exec", "--memroy", "512", "--", "true"], timeout: 30)
        #expect(typo.status == 2, "\(typo.stderr)")
        #expect(typo.stderr.contains("Unknown option '--memroy'") && typo.stderr.contains("Did you mean '--memory'?"), "\(typo.stderr)")
        let help = try Fixture.run(Fixture.sandboxBinary, ["exec", "--help"], timeout: 30)
        #expect(help.status == 0, "\(help.stderr)")
        #expect(help.stdout.contains("OVERVIEW: Run a command in a throwaway micro-VM."), "\(help.stdout)")
        // After `--`, option-looking words belong to the guest command.
        let passthrough = try exec(timeoutArgs + ["--", "sh", "-c", "echo \"$0 $1\"", "--memroy", "--help"])
        #expect(passthrough.status == 0 && passthrough.stdout == "--memroy --help\n", "\(passthrough.stdout) \(passthrough.stderr)")
    }

    @Test("without --stdin the command's fd 0 is /dev/null (open, at end of file), not closed")
    func stdinIsDevNull() throws {
        let r = try exec(timeoutArgs + ["--", "sh", "-c", "readlink /proc/self/fd/0; cat; echo end"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == "/dev/null\nend\n", "\(r.stdout)")
    }

    @Test("a copy-out that fails is an error with its reason, not a silent success", arguments: [
        ("/no/such/file", "/x", "copy-out /no/such/file -> HOST/x: the guest file could not be read", "No such file or directory"),
        ("/etc/passwd/x", "/x", "copy-out /etc/passwd/x -> HOST/x: the guest file could not be read", "Not a directory"),
        ("/etc/passwd", "/no/dir/x", "copy-out /etc/passwd -> HOST/no/dir/x: the host file could not be written", "No such file or directory"),
    ])
    func copyOutFailures(guest: String, host: String, message: String, reason: String) throws {
        let dir = NSTemporaryDirectory() + "sandbox-copyout-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = try exec(timeoutArgs + ["--copy-out", "\(guest):\(dir)\(host)", "--", "true"])
        #expect(r.status == 125, "\(r.stderr)")
        #expect(r.stderr.contains(message.replacingOccurrences(of: "HOST", with: dir)), "\(r.stderr)")
        #expect(r.stderr.contains(reason) && r.stderr.contains("the command itself exited with status 0"), "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dir + host))
        if !Fixture.inLab { #expect(r.seconds < 3, "took \(r.seconds) s") }
    }

    @Test("--timeout holds on the host when the VMM stops answering (SIGSTOP): 124 within timeout + 2 s")
    func timeoutHoldsWhenTheVMMIsStopped() throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Fixture.sandboxBinary)
        p.arguments = ["exec", "--timeout", "3", "--", "sh", "-c", "echo started; sleep 100"]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        // Once the command runs, stop its VMM (a child of the CLI).
        _ = out.fileHandleForReading.availableData
        let started = Date()
        let vmm = try Fixture.run("/usr/bin/pgrep", ["-P", "\(p.processIdentifier)", "-f", "sandbox-vmm run"])
        let pid = Int32(vmm.stdout.split(separator: "\n").first.map(String.init) ?? "") ?? 0
        #expect(pid > 0, "no VMM child found: \(vmm.stdout) \(vmm.stderr)")
        if pid > 0 { kill(pid, SIGSTOP) }
        // Should the host deadline not hold, do not hang the suite: end it all in 60 s.
        let rescue = DispatchWorkItem { if p.isRunning { p.terminate() }; if pid > 0 { kill(pid, SIGKILL) } }
        DispatchQueue.global().asyncAfter(deadline: .now() + 60, execute: rescue)
        p.waitUntilExit()
        rescue.cancel()
        let seconds = Date().timeIntervalSince(started)
        #expect(p.terminationStatus == 124)
        if !Fixture.inLab { #expect(seconds < 3 + 2 + 1.5, "took \(seconds) s") }
    }

    @Test("a fork bomb cannot stretch --timeout past timeout + 2 s")
    func forkBombIsBoundedByTheTimeout() throws {
        let r = try exec(["--timeout", "5", "--", "sh", "-c", "f(){ f|f& };f; sleep 30"])
        #expect(r.status == 124, "\(r.stderr.suffix(500))")
        if !Fixture.inLab { #expect(r.seconds < 5 + 2 + 3, "took \(r.seconds) s") }
    }

    @Test("the guest has what a Linux userland expects: /dev/fd and the stdio links, /dev/pts, /dev/shm, /run, /tmp, a hostname")
    func guestEnvironment() throws {
        let script = """
            echo to-stderr > /dev/stderr; echo to-stdout > /dev/stdout
            test "$(readlink /dev/fd)" = /proc/self/fd && echo fd-ok
            test -c /dev/pts/ptmx && echo pts-ok
            for m in /proc /sys /dev/shm /run /tmp; do grep -q " $m " /proc/mounts && echo "mounted $m"; done
            hostname
            """
        let r = try exec(timeoutArgs + ["--", "sh", "-c", script])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(Fixture.withoutStartProgress(r.stderr) == "to-stderr\n", "\(r.stderr)")
        #expect(r.stdout == "to-stdout\nfd-ok\npts-ok\nmounted /proc\nmounted /sys\nmounted /dev/shm\nmounted /run\nmounted /tmp\nsandbox\n", "\(r.stdout)")
    }

    @Test("a guest that reboots mid-command and a killed VMM say which happened")
    func earlyEndsSayWhatHappened() throws {
        let reboot = try exec(timeoutArgs + ["--", "sh", "-c", "reboot -f; sleep 5"])
        #expect(reboot.status == 125, "\(reboot.stderr)")
        #expect(reboot.stderr.contains("the VM stopped before the command finished (guest reset"), "\(reboot.stderr)")

        let p = Process()
        p.executableURL = URL(fileURLWithPath: Fixture.sandboxBinary)
        p.arguments = ["exec"] + timeoutArgs + ["--", "sh", "-c", "echo started; sleep 60"]
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        _ = out.fileHandleForReading.availableData  // the command runs
        let vmm = try Fixture.run("/usr/bin/pgrep", ["-P", "\(p.processIdentifier)", "-f", "sandbox-vmm run"])
        let pid = Int32(vmm.stdout.split(separator: "\n").first.map(String.init) ?? "") ?? 0
        #expect(pid > 0, "no VMM child: \(vmm.stdout)")
        if pid > 0 { kill(pid, SIGKILL) }
        let rescue = DispatchWorkItem { if p.isRunning { p.terminate() } }
        DispatchQueue.global().asyncAfter(deadline: .now() + 60, execute: rescue)
        p.waitUntilExit()
        rescue.cancel()
        let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(p.terminationStatus == 125, "\(stderr)")
        #expect(stderr.contains("the VMM process was killed by signal 9 before the command finished"), "\(stderr)")
    }

    @Test("the guest kernel has what test suites use: io_uring, user namespaces, fuse, loop, tun, AF_PACKET, userfaultfd, fanotify, core dumps")
    func guestKernelFeatures() throws {
        let script = """
            test -e /proc/sys/kernel/io_uring_disabled && echo io_uring
            test "$(unshare -U -r id -u)" = 0 && echo userns
            test -c /dev/fuse && grep -qw fuse /proc/filesystems && echo fuse
            dd if=/dev/zero of=/tmp/disk bs=1024 count=1024 2>/dev/null && dev=$(losetup -f) && losetup "$dev" /tmp/disk && losetup -d "$dev" && echo loop
            test -c /dev/net/tun && exec 3<>/dev/net/tun && echo tun
            test -e /proc/net/packet && echo packet
            test -e /proc/sys/vm/unprivileged_userfaultfd && echo userfaultfd
            test -d /proc/sys/fs/fanotify && echo fanotify
            test -e /proc/sys/kernel/core_pattern && echo coredump
            """
        let r = try exec(timeoutArgs + ["--", "sh", "-c", script])
        #expect(r.stdout == "io_uring\nuserns\nfuse\nloop\ntun\npacket\nuserfaultfd\nfanotify\ncoredump\n", "stdout: \(r.stdout) stderr: \(r.stderr)")
    }

    @Test("a guest that resets before its agent answers says where its vCPU was")
    func earlyResetSaysWhere() throws {
        // A root image whose init resets the VM at once (busybox `reboot -f`, and the
        // kernel's reboot=t makes that a triple fault).
        let dir = NSTemporaryDirectory() + "sandbox-reset-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for d in ["root/sbin", "root/bin", "root/proc", "root/dev"] {
            try FileManager.default.createDirectory(atPath: dir + "/" + d, withIntermediateDirectories: true)
        }
        try FileManager.default.copyItem(atPath: "/bin/busybox", toPath: dir + "/root/bin/busybox")
        try "#!/bin/busybox sh\n/bin/busybox reboot -f\n".write(toFile: dir + "/root/sbin/sandbox-init", atomically: true, encoding: .utf8)
        chmod(dir + "/root/sbin/sandbox-init", 0o755)
        let image = dir + "/reset.ext4"
        #expect(FileManager.default.createFile(atPath: image, contents: nil) && truncate(image, 16 << 20) == 0)
        let mkfs = try Fixture.run("/sbin/mkfs.ext4", ["-q", "-d", dir + "/root", image])
        #expect(mkfs.status == 0, "\(mkfs.stderr)")
        // The start snapshot cannot be made (no agent ever answers): the run says so,
        // boots, and reports the reset.
        let r = try exec(timeoutArgs + ["--timings", "--image", image, "--", "true"])
        #expect(r.status == 250, "\(r.stderr)")
        #expect(r.stderr.contains("the VM stopped before the agent answered: guest reset (shutdown); vCPU at the shutdown: RIP 0x"), "\(r.stderr)")
        #expect(r.stderr.contains("sandbox: booting instead of restoring: no start snapshot could be made"), "\(r.stderr)")
        // The next run does not try again (for a while) and says why it boots.
        let again = try exec(timeoutArgs + ["--timings", "--image", image, "--", "true"])
        #expect(again.status == 250, "\(again.stderr)")
        #expect(again.stderr.contains("making it failed") && !again.stderr.contains("making the start snapshot"), "\(again.stderr)")
    }

    @Test("50 MB of output arrives intact")
    func largeOutput() throws {
        let r = try exec(timeoutArgs + ["--", "sh", "-c",
            "dd if=/dev/urandom of=/tmp/big bs=1048576 count=50 2>/dev/null && sha256sum /tmp/big >&2 && cat /tmp/big"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdoutData.count == 50 * 1048576)
        // The guest's digest is the 64-hex-digit word of its stderr line (the run's own
        // progress lines, such as a start snapshot being made, may come first).
        let expected = r.stderr.components(separatedBy: .whitespacesAndNewlines)
            .first { $0.count == 64 && $0.allSatisfy(\.isHexDigit) }
        let got = try Fixture.sha256(r.stdoutData)
        #expect(expected != nil, "no digest on stderr: \(r.stderr)")
        #expect(got == expected, "stdout's digest \(got) is not the guest's; stderr: \(r.stderr)")
    }

    @Test("binary stdin round-trips through --stdin")
    func stdinRoundTrip() throws {
        var bytes = [UInt8](repeating: 0, count: 3 * 1048576 + 17)
        for i in bytes.indices { bytes[i] = UInt8.random(in: 0...255) }
        let path = NSTemporaryDirectory() + "sandbox-stdin-\(getpid())"
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let r = try exec(timeoutArgs + ["--stdin", "--", "cat"], stdinFile: path)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdoutData == Data(bytes))
    }

    @Test("--copy-in makes the missing parent directories of its destination")
    func copyInMakesParents() throws {
        let path = NSTemporaryDirectory() + "sandbox-parents-\(getpid())"
        try "deep\n".write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let r = try exec(timeoutArgs + ["--copy-in", "\(path):/data/a/b/x.txt", "--", "sh", "-c", "cat /data/a/b/x.txt; stat -c %a /data/a"])
        #expect(r.status == 0 && r.stdout == "deep\n755\n", "\(r.stdout) \(r.stderr)")
    }

    @Test("--copy-in and --copy-out move files byte-exact")
    func copyInOut() throws {
        var bytes = [UInt8](repeating: 0, count: 700_001)
        for i in bytes.indices { bytes[i] = UInt8.random(in: 0...255) }
        let dir = NSTemporaryDirectory() + "sandbox-copy-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Data(bytes).write(to: URL(fileURLWithPath: dir + "/in.bin"))
        let r = try exec(timeoutArgs + ["--copy-in", "\(dir)/in.bin:/tmp/in.bin", "--copy-out", "/tmp/out.bin:\(dir)/out.bin",
                                        "--", "sh", "-c", "cp /tmp/in.bin /tmp/out.bin && sha256sum /tmp/in.bin"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.hasPrefix(try Fixture.sha256(Data(bytes))))
        #expect(FileManager.default.contents(atPath: dir + "/out.bin") == Data(bytes))
    }

    @Test("nothing is left behind: no VMM process, no overlay file")
    func noLeftovers() throws {
        let r = try exec(timeoutArgs + ["--", "true"])
        #expect(r.status == 0, "\(r.stderr)")
        // Other suites run sandboxes concurrently, so look for what a leak looks like: a
        // VMM process whose parent is gone (re-parented to PID 1).
        // The CLI exits as soon as the command's result is in; its VMM dies with it
        // (PR_SET_PDEATHSIG), which takes a moment: a leak is one still there after 2 s.
        var orphans = ""
        for _ in 0 ..< 20 {
            let ps = try Fixture.run("/bin/sh", ["-c", "ps -eo ppid=,pid=,args= | awk '$1 == 1 && /[s]andbox-vmm run/'"])
            orphans = ps.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            if orphans.isEmpty { break }
            usleep(100_000)
        }
        #expect(orphans.isEmpty, "orphaned VMM processes: \(orphans)")
        // An overlay exists for an instant between creation and unlink; a leaked one stays.
        func overlays() -> Set<String> {
            Set((try? FileManager.default.contentsOfDirectory(atPath: Fixture.cacheDirectory + "/overlays")) ?? [])
        }
        let first = overlays()
        usleep(500_000)
        let left = first.intersection(overlays())
        #expect(left.isEmpty, "overlay files left: \(left)")
    }

    @Test("bad input gets status 125 and a specific message")
    func badInput() throws {
        let r1 = try exec(["--image", "/nonexistent.ext4", "--", "true"])
        #expect(r1.status == 125)
        #expect(r1.stderr.contains("/nonexistent.ext4: no such file"), "\(r1.stderr)")
        let r2 = try exec(["--copy-in", "nocolon", "--", "true"])
        #expect(r2.status == 125)
        #expect(r2.stderr.contains("is not of the form HOST:GUEST"), "\(r2.stderr)")
        let r3 = try exec(["--env", "=x", "--", "true"])
        #expect(r3.status == 125)
        let r4 = try exec([])
        #expect(r4.status == 125)
        #expect(r4.stderr.contains("no command given"))
        let r5 = try exec(["--copy-in", "/no/such/dir:/x", "--", "true"])
        #expect(r5.status == 125 && r5.stderr.contains("copy-in /no/such/dir: no such file or directory"), "\(r5.stderr)")
        #expect(!r5.stderr.contains("NSCocoaErrorDomain"))
        // A directory is copied as a tree; one holding what cannot be copied (a FIFO) is the caller's error.
        let fifoTree = "/dev/shm/sandbox-fifo-tree-\(getpid())"
        try FileManager.default.createDirectory(atPath: fifoTree + "/sub", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: fifoTree) }
        #expect(mkfifo(fifoTree + "/sub/pipe", 0o600) == 0)
        let r6 = try exec(timeoutArgs + ["--copy-in", "\(fifoTree):/x", "--", "true"])
        #expect(r6.status == 125 && r6.stderr.contains("copy-in \(fifoTree): sub/pipe: is a FIFO"), "\(r6.stderr)")
        for (size, message) in [("4X", "'4X' is not a size"), ("-1", "'-1' is not a size"), ("0", "must be from 1 MiB"),
                                ("99999T", "'99999T' is not a size from 1 MiB to 16 TiB"), ("17T", "is not a size from 1 MiB to 16 TiB")] {
            let r = try exec(["--disk-size", size, "--", "true"])
            #expect(r.status == 125 && r.stderr.contains("--disk-size") && r.stderr.contains(message), "--disk-size \(size): \(r.stderr)")
        }
    }

    @Test("a missing --workdir is the caller's error (125, naming the directory), not 'command not found'")
    func missingWorkdir() throws {
        let r = try exec(timeoutArgs + ["--workdir", "/no/such/dir", "--", "true"])
        #expect(r.status == 125, "\(r.stderr)")
        #expect(r.stderr.contains("chdir /no/such/dir: No such file or directory"), "\(r.stderr)")
        #expect(!r.stderr.contains("command not found"))
    }

    @Test("a truncated image is refused as a bad image (125, naming the file), not booted into a crash")
    func truncatedImage() throws {
        let image = try RootImage.resolve("busybox", progress: { _ in })
        let cut = NSTemporaryDirectory() + "sandbox-cut-\(getpid()).ext4"
        defer { try? FileManager.default.removeItem(atPath: cut) }
        let data = try #require(FileManager.default.contents(atPath: image))
        try data.prefix(8 << 20).write(to: URL(fileURLWithPath: cut))
        let r = try exec(["--image", cut, "--", "true"])
        #expect(r.status == 125, "\(r.stderr)")
        #expect(r.stderr.contains("image \(cut) is truncated"), "\(r.stderr)")
    }
}
