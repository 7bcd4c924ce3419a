import Foundation
import Testing
import Sandbox
import SandboxImages

/// The image store against real recipes, mkfs.ext4 and debugfs, each test in its own
/// temporary cache. The guest agent is built once (Scripts/build-init) into a shared
/// cache that survives runs, and handed to the per-test stores as a prebuilt binary.
@Suite(.serialized)
struct ImageStoreTests {
    static let resources = Fixture.repoRoot + "/Sandboxes"

    /// The agent, built through the store's own build path (keyed by its sources).
    static let agent: Result<String, any Error> = Result {
        // The agent the test suite's set-up already built into the user cache (Scripts/test).
        let shared = SandboxPaths.cacheDirectory
        return try ImageStore(root: shared, resourcesDirectory: resources, agentBinary: nil)
            .agentBinary(progress: { print($0) })
    }

    /// A store rooted in a fresh temporary directory.
    static func makeStore(_ label: String = #function) throws -> (ImageStore, String) {
        let dir = NSTemporaryDirectory() + "sandbox-imagestore-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return (ImageStore(root: dir, resourcesDirectory: resources, agentBinary: try agent.get()), dir)
    }

    static func debugfs(_ image: String, _ request: String) throws -> Fixture.Result {
        try Fixture.run("/usr/sbin/debugfs", ["-R", request, image])
    }

    /// The message of the SandboxError that `body` throws.
    static func errorMessage(_ body: () throws -> Void) -> String {
        do { try body() } catch { return "\(error)" }
        return "(no error)"
    }

    @Test func busyboxColdThenWarm() throws {
        let (store, dir) = try Self.makeStore()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var lines: [String] = []
        let cold = try store.build(name: "busybox", progress: { lines.append($0) })
        #expect(!cold.reused)
        #expect(lines.contains { $0.hasPrefix("[image] running recipe busybox") })
        #expect(lines.contains { $0.hasPrefix("[image] mkfs.ext4") })
        #expect(lines.contains { $0.hasPrefix("[image] installed busybox as \(cold.image.hash.prefix(12))") })
        #expect(cold.image.path == dir + "/images/\(cold.image.hash).ext4")
        #expect(cold.image.hash.count == 64)

        let warm = try store.build(name: "busybox")
        #expect(warm.reused)
        #expect(warm.image.hash == cold.image.hash)
        #expect(warm.seconds < cold.seconds / 2)
        print("busybox image: cold \(String(format: "%.2f", cold.seconds)) s, warm \(String(format: "%.3f", warm.seconds)) s, \(cold.image.size >> 20) MiB")

        // The content hash is the file's SHA-256.
        let sum = try Fixture.run("/usr/bin/sha256sum", [cold.image.path])
        #expect(sum.stdout.hasPrefix(cold.image.hash))

        // The image holds busybox, its applet links, the agent and the etc files.
        let agent = try Self.debugfs(cold.image.path, "stat /sbin/sandbox-init")
        #expect(agent.stdout.contains("Type: regular"))
        #expect(agent.stdout.contains("Mode:  0755"))
        #expect(try Self.debugfs(cold.image.path, "stat /bin/busybox").stdout.contains("Type: regular"))
        #expect(try Self.debugfs(cold.image.path, "stat /bin/sh").stdout.contains("Type: symlink"))
        let passwd = try Self.debugfs(cold.image.path, "cat /etc/passwd").stdout
        #expect(passwd.contains("root:x:0:0:") && passwd.contains("nobody:x:65534:"))
        #expect(try Self.debugfs(cold.image.path, "stat /tmp").stdout.contains("Mode:  01777"))

        // path(name) returns the cached image without rebuilding.
        #expect(try store.path("busybox") == cold.image.path)
    }

    @Test func listInspectRemove() throws {
        let (store, dir) = try Self.makeStore()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(try store.list().isEmpty)
        // path() of the default name builds it on first use.
        let path = try store.path(ImageStore.defaultImageName)
        let images = try store.list()
        #expect(images.map(\.name) == ["busybox"])
        #expect(images[0].path == path && images[0].recipe == "busybox" && !images[0].recipeKey.isEmpty)

        let details = try store.inspect("busybox")
        #expect(details.containsAgent)
        #expect(details.image.size > 64 << 20)
        #expect(details.allocatedBytes > 0 && details.allocatedBytes < details.image.size)

        try store.remove("busybox")
        #expect(try store.list().isEmpty)
        #expect(!FileManager.default.fileExists(atPath: path))
        #expect(Self.errorMessage { try store.remove("busybox") }.contains("unknown image \"busybox\""))
        let unknown = Self.errorMessage { _ = try store.inspect("nosuch") }
        #expect(unknown.contains("unknown image \"nosuch\"") && unknown.contains("recipes: busybox, debian"))
        #expect(Self.errorMessage { _ = try store.path("nosuch") }.contains("unknown image \"nosuch\""))
        #expect(Self.errorMessage { try store.build(name: "../etc") }.contains("invalid image name"))
    }

    @Test func importDirectoryAndTarball() throws {
        let (store, dir) = try Self.makeStore()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // A small root file system: busybox, a shell link, a marker file.
        let src = dir + "/src"
        for d in ["bin", "etc", "usr/sbin"] { try FileManager.default.createDirectory(atPath: src + "/" + d, withIntermediateDirectories: true) }
        try FileManager.default.copyItem(atPath: "/bin/busybox", toPath: src + "/bin/busybox")
        try FileManager.default.createSymbolicLink(atPath: src + "/bin/sh", withDestinationPath: "busybox")
        try FileManager.default.createSymbolicLink(atPath: src + "/sbin", withDestinationPath: "usr/sbin")  // merged /usr
        try "imported\n".write(toFile: src + "/etc/marker", atomically: true, encoding: .utf8)

        var importLines: [String] = []
        let fromDir = try store.importDirectory(path: src, name: "mine", progress: { importLines.append($0) })
        // The tree had no /etc/hosts: the image gets one for localhost, and says so.
        #expect(importLines.contains("[image] the root file system had no /etc/hosts; added one for localhost"))
        #expect(try Self.debugfs(fromDir.image.path, "cat /etc/hosts").stdout.contains("127.0.0.1\tlocalhost"))
        #expect(fromDir.image.recipe == "import-dir:" + src)
        #expect(try Self.debugfs(fromDir.image.path, "cat /etc/marker").stdout.contains("imported"))
        // The agent went through the /sbin -> usr/sbin link, inside the image.
        #expect(try Self.debugfs(fromDir.image.path, "stat /usr/sbin/sandbox-init").stdout.contains("Type: regular"))
        #expect(try store.inspect("mine").containsAgent)
        #expect(!FileManager.default.fileExists(atPath: src + "/usr/sbin/sandbox-init"))  // source untouched

        let tarball = dir + "/rootfs.tar.gz"
        let tar = try Fixture.run("/usr/bin/tar", ["-czf", tarball, "-C", src, "."])
        #expect(tar.status == 0)
        let fromTar = try store.importTarball(path: tarball, name: "mine-tar")
        #expect(fromTar.image.recipe == "import-tar:" + tarball)
        #expect(try Self.debugfs(fromTar.image.path, "cat /etc/marker").stdout.contains("imported"))
        #expect(try store.inspect("mine-tar").containsAgent)
        #expect(try store.path("mine-tar") == fromTar.image.path)
        #expect(try store.list().map(\.name) == ["mine", "mine-tar"])

        // Bad input.
        #expect(Self.errorMessage { try store.importDirectory(path: dir + "/nope", name: "x") }.contains("is not a directory"))
        #expect(Self.errorMessage { try store.importTarball(path: dir + "/nope.tar", name: "x") }.contains("no such tarball"))
        try "not a tarball".write(toFile: dir + "/junk.tar", atomically: true, encoding: .utf8)
        #expect(Self.errorMessage { try store.importTarball(path: dir + "/junk.tar", name: "x") }.contains("tar -xpf failed with exit status"))
    }

    /// A rebuild under the same name must not pull the file from under a run that
    /// resolved the old one a moment earlier (another process, or another version of the
    /// library sharing the cache): the old file is retired, not deleted; `rm` deletes.
    @Test func replacedImageIsRetiredNotDeleted() throws {
        let (store, dir) = try Self.makeStore()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let src = dir + "/src"
        try FileManager.default.createDirectory(atPath: src + "/bin", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: "/bin/busybox", toPath: src + "/bin/busybox")
        try "one\n".write(toFile: src + "/marker", atomically: true, encoding: .utf8)
        let first = try store.importDirectory(path: src, name: "x").image.path
        try "two\n".write(toFile: src + "/marker", atomically: true, encoding: .utf8)
        let second = try store.importDirectory(path: src, name: "x").image.path
        #expect(first != second)
        #expect(try store.path("x") == second)
        #expect(FileManager.default.fileExists(atPath: first), "the replaced image was deleted at once")
        try store.remove("x")
        #expect(!FileManager.default.fileExists(atPath: first) && !FileManager.default.fileExists(atPath: second))
    }

    /// Two versions of the library sharing one cache (different agents, so different
    /// recipe keys) must not rebuild the image in turn: each takes its own back.
    @Test func twoVersionsSharingACacheDoNotRebuildInTurn() throws {
        let (storeA, dir) = try Self.makeStore()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let otherAgent = dir + "/other-agent"
        var bytes = try #require(FileManager.default.contents(atPath: try Self.agent.get()))
        bytes.append(0)
        try bytes.write(to: URL(fileURLWithPath: otherAgent))
        chmod(otherAgent, 0o755)
        let storeB = ImageStore(root: dir, resourcesDirectory: Self.resources, agentBinary: otherAgent)
        let a1 = try storeA.build(name: "busybox")
        let b1 = try storeB.build(name: "busybox")
        #expect(!a1.reused && !b1.reused && a1.image.hash != b1.image.hash)
        let a2 = try storeA.build(name: "busybox")
        #expect(a2.reused && a2.image.hash == a1.image.hash)
        let b2 = try storeB.build(name: "busybox")
        #expect(b2.reused && b2.image.hash == b1.image.hash)
        #expect(FileManager.default.fileExists(atPath: a1.image.path) && FileManager.default.fileExists(atPath: b1.image.path))
    }

    @Test func badImageFiles() throws {
        let (store, dir) = try Self.makeStore()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let missing = Self.errorMessage { _ = try store.path(dir + "/missing.ext4") }
        #expect(missing == "image file \(dir)/missing.ext4 does not exist")

        let tiny = dir + "/tiny.ext4"
        #expect(FileManager.default.createFile(atPath: tiny, contents: Data(repeating: 0, count: 1000)))
        #expect(Self.errorMessage { _ = try store.path(tiny) }.contains("image \(tiny) is truncated: it has 1000 bytes"))

        let random = dir + "/random.img"
        #expect(FileManager.default.createFile(atPath: random, contents: Data((0..<65536).map { _ in UInt8.random(in: 0...255) })))
        let bad = Self.errorMessage { _ = try store.path(random) }
        #expect(bad.contains("is not an ext4 file system") && bad.contains("0xEF53"))

        // A real ext4 image cut in half: the magic is there, the blocks are not.
        let good = try store.build(name: "busybox").image.path
        let cut = dir + "/cut.ext4"
        let data = try Data(contentsOf: URL(fileURLWithPath: good), options: .alwaysMapped)
        try data.prefix(data.count / 2).write(to: URL(fileURLWithPath: cut))
        #expect(Self.errorMessage { _ = try store.path(cut) }.contains("is truncated: it has \(data.count / 2) bytes but its superblock describes \(data.count)"))
        #expect(try store.path(good) == good)

        // The indexed file vanished: the error says which image and how to repair it.
        let imported = try store.importTarball(path: try makeTinyTarball(dir), name: "gone")
        try FileManager.default.removeItem(atPath: imported.image.path)
        let gone = Self.errorMessage { _ = try store.path("gone") }
        #expect(gone.contains("image \"gone\" is in the index but its file \(imported.image.path) is missing"))
    }

    func makeTinyTarball(_ dir: String) throws -> String {
        let src = dir + "/tiny-src"
        try FileManager.default.createDirectory(atPath: src + "/etc", withIntermediateDirectories: true)
        try "x\n".write(toFile: src + "/etc/x", atomically: true, encoding: .utf8)
        let out = dir + "/tiny.tar"
        #expect(try Fixture.run("/usr/bin/tar", ["-cf", out, "-C", src, "."]).status == 0)
        return out
    }

    /// Whether `unshare -m` works here (root in a container may lack it).
    static let privateMountNamespace: Bool = (try? Fixture.run("/usr/bin/unshare", ["-m", "/bin/true"], timeout: 30).status) == 0

    @Test(.enabled(if: getuid() != 0 || Self.privateMountNamespace,
                   "as root, the read-only cache checks need a private mount namespace (unshare -m), which this host refuses"))
    func unwritableCache() throws {
        let (_, dir) = try Self.makeStore()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let agent = try Self.agent.get()
        // The cache root is a regular file: fails for root too.
        let file = dir + "/cache-is-a-file"
        #expect(FileManager.default.createFile(atPath: file, contents: Data("x".utf8)))
        let store = ImageStore(root: file, resourcesDirectory: Self.resources, agentBinary: agent)
        let msg = Self.errorMessage { try store.build(name: "busybox") }
        #expect(msg == "cannot create the image cache directory \(file)/images: \(file) is a file, not a directory; set SANDBOX_CACHE to a writable directory")

        if getuid() != 0 {
            // chmod stops writes for ordinary users.
            let ro = dir + "/ro"
            try FileManager.default.createDirectory(atPath: ro + "/images", withIntermediateDirectories: true)
            chmod(ro + "/images", 0o555)
            defer { chmod(ro + "/images", 0o755) }
            let roStore = ImageStore(root: ro, resourcesDirectory: Self.resources, agentBinary: agent)
            #expect(Self.errorMessage { try roStore.build(name: "busybox") }.contains("the image cache directory \(ro)/images is not writable"))
        } else {
            // Root ignores file modes: use a read-only bind mount in a private mount
            // namespace (gone with the process), and the CLI, end to end.
            let ro = dir + "/ro"
            try FileManager.default.createDirectory(atPath: ro, withIntermediateDirectories: true)
            let script = "mount --bind \(ro) \(ro) && mount -o remount,bind,ro \(ro) && exec \(Fixture.sandboxBinary) image build busybox"
            var env = ProcessInfo.processInfo.environment
            env["SANDBOX_CACHE"] = ro
            env["SANDBOX_INIT"] = agent
            env["SANDBOX_RESOURCES"] = Self.resources
            let r = try Self.runWithEnvironment("/usr/bin/unshare", ["-m", "/bin/sh", "-c", script], env)
            do {  // the suite's trait made sure a private mount namespace is available
                #expect(r.status == 1)
                #expect(r.stderr.contains("sandbox image build: cannot create the image cache directory \(ro)/images: \(ro) is not writable (Read-only file system)"),
                        "stderr: \(r.stderr)")

                // A read-only cache that already has the image still serves it to `path`,
                // and `build` names the read-only directory.
                let filled = dir + "/filled"
                let built = try ImageStore(root: filled, resourcesDirectory: Self.resources, agentBinary: agent).build(name: "busybox")
                env["SANDBOX_CACHE"] = filled
                let mount = "mount --bind \(filled) \(filled) && mount -o remount,bind,ro \(filled)"
                let p = try Self.runWithEnvironment("/usr/bin/unshare", ["-m", "/bin/sh", "-c", mount + " && exec \(Fixture.sandboxBinary) image path busybox"], env)
                #expect(p.status == 0 && p.stdout == built.image.path + "\n", "stderr: \(p.stderr)")
                let b = try Self.runWithEnvironment("/usr/bin/unshare", ["-m", "/bin/sh", "-c", mount + " && exec \(Fixture.sandboxBinary) image build busybox"], env)
                #expect(b.status == 1 && b.stderr.contains("the image cache directory \(filled)/images is not writable (Read-only file system)"), "stderr: \(b.stderr)")
            }
        }
    }

    static func runWithEnvironment(_ tool: String, _ args: [String], _ env: [String: String]) throws -> Fixture.Result {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tool)
        p.arguments = args
        p.environment = env
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        let start = Date()
        try p.run()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return Fixture.Result(status: p.terminationStatus, stdoutData: o,
                              stderr: String(decoding: e, as: UTF8.self), seconds: Date().timeIntervalSince(start))
    }

    @Test func failingRecipeReportsItsStatus() throws {
        let (_, dir) = try Self.makeStore()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // A private Sandboxes/ folder with a recipe that fails.
        let res = dir + "/Sandboxes"
        try FileManager.default.createDirectory(atPath: res + "/images/broken", withIntermediateDirectories: true)
        try "#!/bin/sh\necho 'recipe broken: giving up' >&2\nexit 7\n".write(toFile: res + "/images/broken/recipe", atomically: true, encoding: .utf8)
        chmod(res + "/images/broken/recipe", 0o755)
        let store = ImageStore(root: dir + "/cache", resourcesDirectory: res, agentBinary: try Self.agent.get())
        let msg = Self.errorMessage { try store.build(name: "broken") }
        #expect(msg.contains("recipe broken failed with exit status 7"))
        #expect(try store.list().isEmpty)
        // Nothing left behind in the work area.
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/cache/tmp").isEmpty)

        let noAgent = ImageStore(root: dir + "/cache", resourcesDirectory: res, agentBinary: dir + "/no-such-agent")
        #expect(Self.errorMessage { try noAgent.build(name: "broken") } == "the guest agent \(dir)/no-such-agent (SANDBOX_INIT) does not exist or is not executable")
    }

    @Test func concurrentBuildsShareOneImage() async throws {
        let (store, dir) = try Self.makeStore()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        async let a = Task.detached { try store.build(name: "busybox") }.value
        async let b = Task.detached { try store.build(name: "busybox") }.value
        let (ra, rb) = try await (a, b)
        #expect(ra.image.hash == rb.image.hash)
        #expect(ra.reused != rb.reused)  // the second waited on the build lock, then reused
        #expect(try store.list().count == 1)
        let files = try FileManager.default.contentsOfDirectory(atPath: dir + "/images").filter { $0.hasSuffix(".ext4") }
        #expect(files == ["\(ra.image.hash).ext4"])
    }
}

/// The agent's cache key covers every module sandbox-init is built from: a change in any
/// of them (TreeArchive once was missing) must make a new agent, or images keep the old one.
@Suite("the guest agent's cache key")
struct AgentSourceKeyTests {
    @Test("it covers every module sandbox-init imports, and theirs")
    func coversEveryImportedModule() throws {
        let listed = Set(ImageStore.agentSourceDirectories)
        var seen: Set<String> = []
        var queue = ["sandbox-init"]
        while let module = queue.popLast() {
            let dir = Fixture.repoRoot + "/Sources/" + module
            guard FileManager.default.fileExists(atPath: dir), seen.insert(module).inserted else { continue }
            #expect(listed.contains("Sources/" + module), "Sources/\(module) (imported on the way from sandbox-init) is not in the agent's key")
            let files = FileManager.default.enumerator(atPath: dir)?.compactMap { $0 as? String } ?? []
            for f in files where f.hasSuffix(".swift") {
                let text = try String(contentsOfFile: dir + "/" + f, encoding: .utf8)
                for line in text.split(separator: "\n") where line.hasPrefix("import ") || line.hasPrefix("@testable import ") {
                    queue.append(String(line.split(separator: " ").last!))
                }
            }
        }
        #expect(seen.contains("TreeArchive") && seen.contains("CInit"), "walked: \(seen.sorted())")
    }
}
