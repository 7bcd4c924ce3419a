import Foundation
import Sandbox
import Testing

/// Directory trees in and out of the guest: `--copy-in DIR` / `--copy-out DIR`, and
/// `RunningSandbox.copyIn` / `copyOut`, with what a hostile guest may send back refused.
@Suite("directory copy in and out", .serialized)
struct DirectoryCopyTests {
    let scratch: String

    init() throws {
        scratch = NSTemporaryDirectory() + "sandbox-dircopy-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
    }

    func sh(_ script: String) throws -> String {
        let r = try Fixture.run("/bin/sh", ["-c", "cd '\(scratch)' && " + script])
        guard r.status == 0 else { throw FixtureError("`\(script)` failed (\(r.status)): \(r.stderr)") }
        return r.stdout
    }

    /// Every entry's type, mode, link target and size, then every file's digest.
    func listing(_ dir: String) throws -> String {
        try sh("cd '\(dir)' && find . -mindepth 1 -printf '%P %y %m %l %s\\n' | LC_ALL=C sort && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum")
    }

    /// A running busybox sandbox of this build's VMM, with a timeout that suits the lane.
    func startSandbox(transferTimeout: Duration? = nil) async throws(SandboxError) -> RunningSandbox {
        var config = SandboxConfiguration()
        config.vmmExecutable = Fixture.productsDirectory + "/sandbox-vmm"
        config.timeout = .seconds(Fixture.inLab ? 600 : 60)
        config.transferTimeout = transferTimeout
        return try await Sandbox.start(config)
    }

    /// Files in the trees: 2,000 natively; 200 in the lab, whose emulated CPU makes each
    /// file cost about a hundred times more (the path through KVM is the same).
    static let treeFiles = Fixture.inLab ? 200 : 2000

    /// `treeFiles` files in 20 or 10 nested directories, symbolic links, modes, an empty
    /// directory and one big file.
    func makeTree(_ dir: String, bigMiB: Int) throws {
        let dirs = Self.treeFiles >= 2000 ? 20 : 10
        _ = try sh("""
            mkdir -p '\(dir)/empty' && cd '\(dir)' &&
            for d in $(seq -f %02g 0 \(dirs - 1)); do mkdir -p "d$d/sub"; for f in $(seq -f %02g 0 \(Self.treeFiles / dirs / 2 - 1)); do echo "file $d $f" > "d$d/f$f.txt"; echo "$d$f" > "d$d/sub/g$f"; done; done &&
            chmod 600 d00/f00.txt && chmod 755 d01/f01.txt && chmod 700 d02 && chmod 750 d03 &&
            ln -s f00.txt d05/link && ln -s ../d06/sub d07/up-link && ln -s nowhere d08/dangling &&
            head -c \(bigMiB)M /dev/urandom > big.bin
            """)
    }

    @Test("--copy-in DIR and --copy-out DIR: a tree of 2,000 files (200 in the lab) with links, modes, an empty directory and a 100 MB file (8 MB in the lab) comes back identical")
    func cliRoundTrip() throws {
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let big = Fixture.inLab ? 8 : 100
        try makeTree(scratch + "/src", bigMiB: big)
        let r = try Fixture.run(Fixture.sandboxBinary, ["exec", "--timeout", Fixture.inLab ? "900" : "120", "--memory", "512",
                                                         "--copy-in", "\(scratch)/src:/data/tree",
                                                         "--copy-out", "/data/tree:\(scratch)/out/made/here", "--",
                                                         "sh", "-c", "find /data/tree -type f | wc -l; stat -c %a /data/tree/d00/f00.txt; readlink /data/tree/d07/up-link"],
                                timeout: Fixture.inLab ? 1200 : 300)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == "\(Self.treeFiles + 1)\n600\n../d06/sub\n", "\(r.stdout)")
        #expect(try listing(scratch + "/out/made/here") == listing(scratch + "/src"))
    }

    @Test("a running sandbox copies trees both ways; a guest's escaping links, a tree over the limit and special files are refused, nothing lands outside, the sandbox goes on")
    func runningSandboxTreesAndHostileGuest() async throws {
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let sandbox = try await startSandbox()
        defer { Task { await sandbox.stop() } }
        try makeTree(scratch + "/src", bigMiB: 1)
        try await sandbox.copyIn(scratch + "/src", to: "/work/in")
        let changed = await sandbox.sh("cp -a /work/in /work/out && echo added > /work/out/d00/new.txt && rm /work/out/d01/f02.txt")
        #expect(changed.outcome == .exited(0), "\(changed.stderrText)")
        try await sandbox.copyOut("/work/out", to: scratch + "/back")
        _ = try sh("echo added > src/d00/new.txt && rm src/d01/f02.txt")
        #expect(try listing(scratch + "/back") == listing(scratch + "/src"))
        // A single file goes through the same calls.
        try await sandbox.copyOut("/work/out/d00/new.txt", to: scratch + "/one.txt")
        #expect(try String(contentsOfFile: scratch + "/one.txt", encoding: .utf8) == "added\n")

        // What a hostile guest may send back.
        let outside = scratch + "/outside"
        try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
        for (setup, mentioning) in [
            ("ln -s /etc /h/abs", "absolute path"),
            ("mkdir -p /h/a && ln -s ../../outside /h/a/up", "leaves the destination"),
            ("head -c 3000000 /dev/zero > /h/bomb", "limit of 2000000 bytes"),
            ("mkfifo /h/fifo", "is a FIFO"),
        ] {
            #expect(await sandbox.sh("rm -rf /h && mkdir /h && echo ok > /h/first && \(setup)").outcome == .exited(0))
            do {
                try await sandbox.copyOut("/h", to: scratch + "/hostile/x", limit: 2_000_000)
                Issue.record("copied a tree that should be refused (\(setup))")
            } catch {
                #expect(error.message.contains(mentioning), "\(setup): \(error)")
                #expect(error.code == .agent, "\(setup): \(error)")
            }
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: outside).isEmpty)
        #expect(try sh("find hostile -type l -o -type p | wc -l") == "0\n")
        // The sandbox goes on after every refusal.
        #expect(await sandbox.sh("echo alive").stdoutText == "alive\n")

        // A host tree with a FIFO is refused with its name; a missing one too. (The FIFO
        // goes on tmpfs: the lab's shared temporary directory cannot hold one.)
        let fifoTree = "/dev/shm/sandbox-fifo-tree-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: fifoTree) }
        _ = try sh("mkdir -p '\(fifoTree)' && mkfifo '\(fifoTree)/p'")
        do { try await sandbox.copyIn(fifoTree, to: "/x"); Issue.record("copied a FIFO in") } catch {
            #expect(error.code == .invalidInput && error.message.contains("p: is a FIFO"), "\(error)")
        }
        do { try await sandbox.copyIn(scratch + "/missing", to: "/x"); Issue.record("copied a missing tree in") } catch {
            #expect(error.code == .invalidInput && error.message.contains("no such file or directory"), "\(error)")
        }
        #expect(await sandbox.sh("echo still").stdoutText == "still\n")
    }

    @Test("a FIFO in the guest never blocks a transfer: reading one, copying one out, or a copy-in with one in the way is refused at once; the sandbox goes on")
    func guestFIFOsDoNotBlock() async throws {
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let sandbox = try await startSandbox()
        defer { Task { await sandbox.stop() } }
        #expect(await sandbox.sh("mkfifo /tmp/p && mkdir -p /in && mkfifo /in/f").outcome == .exited(0))
        let t0 = ContinuousClock.now
        do { _ = try await sandbox.readFile("/tmp/p"); Issue.record("read a FIFO") } catch {
            #expect(error.message.contains("/tmp/p"), "\(error)")
        }
        do { try await sandbox.copyOut("/tmp/p", to: scratch + "/p"); Issue.record("copied a FIFO out") } catch {
            #expect(error.message.contains("/tmp/p"), "\(error)")
        }
        do { try await sandbox.writeFile("/tmp/p", contents: Array("x".utf8)); Issue.record("wrote into a FIFO nobody reads") } catch {
            #expect(error.message.contains("/tmp/p"), "\(error)")
        }
        _ = try sh("mkdir -p src2 && echo data > src2/f")
        do { try await sandbox.copyIn(scratch + "/src2", to: "/in"); Issue.record("unpacked a file over a FIFO") } catch {
            #expect(error.message.contains("is in the way"), "\(error)")
        }
        #expect(ContinuousClock.now - t0 < .seconds(Fixture.inLab ? 300 : 20), "the refusals took \(ContinuousClock.now - t0)")
        #expect(await sandbox.sh("test -p /in/f && echo still").stdoutText == "still\n")
    }

    @Test("a transfer past its transferTimeout stops the sandbox and says so; the host process goes on")
    func transferTimeoutStopsTheSandbox() async throws {
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let sandbox = try await startSandbox(transferTimeout: .seconds(2))
        defer { Task { await sandbox.stop() } }
        // 64 GiB of a sparse file: far more than 2 s of copying.
        #expect(await sandbox.sh("truncate -s 64G /huge").outcome == .exited(0))
        try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
        let t0 = ContinuousClock.now
        do {
            try await sandbox.copyOut("/huge", to: scratch + "/huge", limit: 100 << 30)
            Issue.record("a 64 GiB copy-out finished within 2 s")
        } catch {
            #expect(error.message.contains("copying /huge out did not finish within 2 s; the host stopped the sandbox"), "\(error)")
        }
        #expect(ContinuousClock.now - t0 < .seconds(30), "the bound took \(ContinuousClock.now - t0)")
        #expect(sandbox.endedBecause != nil)
        let later = await sandbox.sh("true")
        guard case .infrastructureError(let e) = later.outcome else { Issue.record("after the bound: \(later.outcome)"); return }
        #expect(e.message.contains("did not finish within 2 s"), "\(e)")
    }
}
