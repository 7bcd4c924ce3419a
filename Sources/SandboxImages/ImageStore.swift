import Foundation
import SandboxCore
#if canImport(Glibc)
import Glibc
#endif

/// One image in the store.
public struct ImageInfo: Sendable, Equatable, Codable {
    /// The name it is known by (`busybox`, or the name given to an import).
    public var name: String
    /// SHA-256 of the image file.
    public var hash: String
    /// The recipe that made it, or `import-dir:PATH` / `import-tar:PATH`.
    public var recipe: String
    public var created: Date
    /// The image file's size in bytes (the file is sparse; see `ImageDetails.allocatedBytes`).
    public var size: UInt64
    /// SHA-256 over the recipe folder's files and the agent binary; empty for imports.
    public var recipeKey: String
    /// `<cache>/images/<hash>.ext4`.
    public var path: String
}

/// What `ImageStore.inspect(_:)` reports.
public struct ImageDetails: Sendable, Equatable {
    public var image: ImageInfo
    /// Bytes the image file occupies on disk.
    public var allocatedBytes: UInt64
    /// Whether `/sbin/sandbox-init` is in the image (checked with debugfs).
    public var containsAgent: Bool
}

/// The outcome of `build`, `importDirectory` and `importTarball`.
public struct ImageBuildResult: Sendable {
    public var image: ImageInfo
    /// True when an image with the same recipe key already existed and was reused.
    public var reused: Bool
    /// Wall-clock time the call took.
    public var seconds: Double
}

/// Builds root file system images from recipes in `Sandboxes/images/<name>/` (or from
/// a user's directory or tarball), adds the guest agent, and caches them as
/// content-addressed, read-only ext4 files:
///
///     <root>/images/<sha256>.ext4     image files, named by the hash of their content
///     <root>/images/index.json        name -> {hash, recipe, created, size, recipeKey}
///     <root>/images/index.lock        flock held while the index is rewritten
///     <root>/images/build-NAME.lock   flock held while NAME is being built
///     <root>/agent/<key>/sandbox-init the guest agent, keyed by its sources
///     <root>/tmp/                      work directories of builds in progress
///
/// See Docs/Images.md.
public struct ImageStore: Sendable {
    /// The image used when none is named.
    public static let defaultImageName = "busybox"

    /// The cache root (`SandboxPaths.cacheDirectory` by default).
    public let root: String
    /// The `Sandboxes/` folder; nil finds it with `SandboxPaths.resourcesDirectory()`.
    public let resourcesDirectory: String?
    /// A prebuilt agent binary to use instead of building one (`$SANDBOX_INIT`).
    public let agentOverride: String?

    /// - Parameters:
    ///   - root: the cache directory; images go in `root/images`.
    ///   - resourcesDirectory: the `Sandboxes/` folder with `images/<recipe>/`.
    ///   - agentBinary: a static `sandbox-init` to put in images; default `$SANDBOX_INIT`.
    public init(root: String = SandboxPaths.cacheDirectory, resourcesDirectory: String? = nil,
                agentBinary: String? = ProcessInfo.processInfo.environment["SANDBOX_INIT"]) {
        self.root = root
        self.resourcesDirectory = resourcesDirectory
        self.agentOverride = (agentBinary?.isEmpty ?? true) ? nil : agentBinary
    }

    public var imagesDirectory: String { root + "/images" }
    var indexPath: String { imagesDirectory + "/index.json" }
    var indexLockPath: String { imagesDirectory + "/index.lock" }

    func resources() throws -> String {
        if let resourcesDirectory { return resourcesDirectory }
        return try SandboxPaths.resourcesDirectory()
    }

    func imagePath(hash: String) -> String { imagesDirectory + "/\(hash).ext4" }

    func info(_ name: String, _ e: ImageIndex.Entry) -> ImageInfo {
        ImageInfo(name: name, hash: e.hash, recipe: e.recipe, created: e.created, size: e.size,
                  recipeKey: e.recipeKey, path: imagePath(hash: e.hash))
    }

    // MARK: Recipes

    /// The recipe folder for `name`, if `Sandboxes/images/<name>/recipe` exists.
    func recipeDirectory(_ name: String) -> String? {
        guard let res = try? resources() else { return nil }
        let dir = res + "/images/" + name
        return FileManager.default.isExecutableFile(atPath: dir + "/recipe") ? dir : nil
    }

    /// Names of the recipes in `Sandboxes/images/`.
    public func recipes() throws -> [String] {
        let dir = try resources() + "/images"
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        return names.filter { FileManager.default.isExecutableFile(atPath: dir + "/" + $0 + "/recipe") }.sorted()
    }

    /// The recipe key: SHA-256 over the recipe folder's files (contents, executable
    /// bits, names), the agent binary's hash and the mkfs settings.
    public func recipeKey(recipe name: String, agentHash: String) throws -> String {
        guard let dir = recipeDirectory(name) else { throw unknownImage(name) }
        let manifest = try ImageFiles.manifest(of: ["."], relativeTo: dir)
        return try ImageFiles.sha256(text: "sandbox image \(Self.layoutVersion)\nmkfs: \(Self.mkfsFeatures.joined(separator: " "))\nagent: \(agentHash)\n" + manifest)
    }

    static func validateName(_ name: String) throws {
        let ok = !name.isEmpty && name.count <= 64 && name.first != "." && name.first != "-"
            && name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "._-".contains($0)) }
        guard ok else {
            throw SandboxError.invalidInput("invalid image name \"\(name)\": use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'")
        }
    }

    func unknownImage(_ name: String) -> SandboxError {
        let known = ((try? ImageIndex.load(indexPath))?.images.keys.sorted() ?? [])
        let recipes = (try? recipes()) ?? []
        return .invalidInput("unknown image \"\(name)\": it is not in the image index \(indexPath) and there is no recipe Sandboxes/images/\(name)/recipe"
            + " (images: \(known.isEmpty ? "none" : known.joined(separator: ", ")); recipes: \(recipes.isEmpty ? "none found" : recipes.joined(separator: ", ")))")
    }

    // MARK: Building

    /// Builds image `name` from its recipe, or reuses the cached one when the recipe
    /// key (recipe files + agent binary) is unchanged.
    ///
    /// - Parameters:
    ///   - name: a recipe in `Sandboxes/images/`; default `busybox`.
    ///   - progress: receives `[image] ...` lines while building.
    /// - Throws: `SandboxError.invalidInput` for an unknown recipe,
    ///   `.image` for an unwritable cache, a failing recipe or mkfs.
    @discardableResult
    public func build(name: String = ImageStore.defaultImageName, progress: (String) -> Void = { _ in }) throws -> ImageBuildResult {
        let started = Date()
        try Self.validateName(name)
        guard let recipeDir = recipeDirectory(name) else { throw unknownImage(name) }
        try ensureWritable()
        let agent = try agentBinary(progress: progress)
        let agentHash = try ImageFiles.sha256(file: agent)
        let key = try recipeKey(recipe: name, agentHash: agentHash)
        return try ImageFiles.withLock(imagesDirectory + "/build-\(name).lock") {
            if let e = try ImageIndex.load(indexPath).images[name], e.recipeKey == key,
               ImageFiles.ext4Problem(imagePath(hash: e.hash)) == nil {
                let s = Date().timeIntervalSince(started)
                progress("[image] \(name) is up to date: \(e.hash.prefix(12)) (reused in \(String(format: "%.0f", s * 1000)) ms)")
                return ImageBuildResult(image: info(name, e), reused: true, seconds: s)
            }
            // The image for exactly these inputs may have been replaced a moment ago by a
            // build for other inputs (another version of this library sharing the cache):
            // take it back instead of building it again.
            if let old = try ImageIndex.load(indexPath).retired?.values.first(where: { $0.name == name && $0.entry?.recipeKey == key }),
               let e = old.entry, ImageFiles.ext4Problem(imagePath(hash: e.hash)) == nil {
                try updateIndex { index in index.images[name] = e }
                let s = Date().timeIntervalSince(started)
                progress("[image] \(name) is up to date: \(e.hash.prefix(12)), built earlier for these inputs, taken back (in \(String(format: "%.0f", s * 1000)) ms)")
                return ImageBuildResult(image: info(name, e), reused: true, seconds: s)
            }
            return try make(name: name, recipe: name, recipeKey: key, agent: agent, started: started, progress: progress) { rootfs in
                progress("[image] running recipe \(name)… (\(recipeDir)/recipe)")
                let (status, _) = try runTool(recipeDir + "/recipe", [rootfs])
                guard status == 0 else {
                    throw SandboxError.image("recipe \(name) failed with exit status \(status) (\(recipeDir)/recipe); see its output above")
                }
            }
        }
    }

    /// Checks an import's name and source (a directory, or a tarball file) and the cache,
    /// and gets the agent: what both imports need before building.
    private func prepareImport(name: String, path: String, directory: Bool,
                               progress: (String) -> Void) throws -> (source: String, agent: String) {
        try Self.validateName(name)
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir), isDir.boolValue == directory else {
            throw SandboxError.invalidInput(directory ? "cannot import \(path): it is not a directory"
                                                      : "cannot import \(path): no such tarball")
        }
        try ensureWritable()
        return (URL(fileURLWithPath: path).standardizedFileURL.path, try agentBinary(progress: progress))
    }

    /// Makes image `name` from a root file system directory (copied; not modified).
    ///
    /// - Throws: `SandboxError.invalidInput` if `path` is not a directory.
    @discardableResult
    public func importDirectory(path: String, name: String, progress: (String) -> Void = { _ in }) throws -> ImageBuildResult {
        let started = Date()
        let (source, agent) = try prepareImport(name: name, path: path, directory: true, progress: progress)
        return try make(name: name, recipe: "import-dir:" + source, recipeKey: "", agent: agent, started: started, progress: progress) { rootfs in
            progress("[image] copying \(source) into a work directory…")
            guard let cp = ImageFiles.findTool("cp") else { throw SandboxError.image("cp (coreutils) is not installed") }
            let (status, _) = try runTool(cp, ["-a", "--", source + "/.", rootfs + "/"])
            guard status == 0 else { throw SandboxError.image("copying \(source) failed (cp exit status \(status)); see its output above") }
        }
    }

    /// Makes image `name` from a root file system tarball (any compression tar detects).
    ///
    /// - Throws: `SandboxError.invalidInput` if the file is missing or tar cannot extract it.
    @discardableResult
    public func importTarball(path: String, name: String, progress: (String) -> Void = { _ in }) throws -> ImageBuildResult {
        let started = Date()
        let (source, agent) = try prepareImport(name: name, path: path, directory: false, progress: progress)
        return try make(name: name, recipe: "import-tar:" + source, recipeKey: "", agent: agent, started: started, progress: progress) { rootfs in
            progress("[image] extracting \(source)…")
            guard let tar = ImageFiles.findTool("tar") else { throw SandboxError.image("tar is not installed") }
            let (status, _) = try runTool(tar, ["-xpf", source, "-C", rootfs, "--numeric-owner"])
            guard status == 0 else { throw SandboxError.invalidInput("cannot import \(source): tar -xpf failed with exit status \(status); see its output above") }
        }
    }

    /// mkfs.ext4 `-O` settings. No journal: a base image is never written after it is
    /// made (sandboxes write to a copy-on-write view they throw away), so a journal
    /// would only cost space and a replay check at mount.
    static let mkfsFeatures = ["^has_journal"]
    /// Changes whenever the image layout below changes (part of the recipe key).
    /// v2: `headroomMiB` free, inodes for it, inode tables written at mkfs time.
    static let layoutVersion = "v2"
    /// Free space every image gets beyond its content. The image file is sparse, so the
    /// headroom costs no host space until a sandbox writes (to its own overlay).
    public static let headroomMiB: UInt64 = 1024
    /// Bytes of image per inode (ext4's default is 16 KiB; test trees are many small files).
    static let bytesPerInode: UInt64 = 32 * 1024

    /// Populates a fresh work directory with `populate`, adds the agent, runs mkfs.ext4,
    /// hashes the result and installs it atomically under its hash, then points `name`
    /// at it in the index.
    private func make(name: String, recipe: String, recipeKey: String, agent: String, started: Date,
                      progress: (String) -> Void, populate: (String) throws -> Void) throws -> ImageBuildResult {
        let fm = FileManager.default
        let tmpRoot = root + "/tmp"
        try ImageFiles.ensureWritableDirectory(tmpRoot, what: "image cache directory")
        var template = Array("\(tmpRoot)/image-\(name)-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else {
            throw SandboxError.image("cannot create a work directory in \(tmpRoot): \(String(cString: strerror(errno)))")
        }
        let work = String(cString: made)
        defer { try? fm.removeItem(atPath: work) }
        let rootfs = work + "/rootfs"
        try fm.createDirectory(atPath: rootfs, withIntermediateDirectories: false)
        chmod(rootfs, 0o755)

        try populate(rootfs)
        progress("[image] adding the guest agent as /sbin/sandbox-init")
        try installAgent(agent, into: rootfs)
        try addDefaultHosts(to: rootfs, progress: progress)

        let mkfs = try ImageFiles.requireTool("mkfs.ext4", package: "e2fsprogs", progress: progress)
        let (bytes, entries) = try ImageFiles.usage(of: rootfs)
        let mib = ImageFiles.mebibyte
        // Content * 1.25 + 64 MiB of file-system overhead, rounded up, plus the headroom.
        let sizeMiB = (bytes + bytes / 4 + 64 * mib + mib - 1) / mib + Self.headroomMiB
        let inodes = max(UInt64(entries) * 2 + 1024, sizeMiB * mib / Self.bytesPerInode)
        let image = work + "/image.ext4"
        let args = ["-q", "-F", "-t", "ext4", "-d", rootfs, "-L", "sandbox", "-m", "0", "-N", String(inodes),
                    "-O", Self.mkfsFeatures.joined(separator: ","), "-E", "root_owner=0:0,lazy_itable_init=0", image, "\(sizeMiB)M"]
        progress("[image] mkfs.ext4 -d (\(entries) files, \(bytes / 1024) KiB of content) → \(sizeMiB) MiB image…")
        let r = try ImageFiles.capture(mkfs, args)
        guard r.status == 0 else {
            throw SandboxError.image("mkfs.ext4 failed with exit status \(r.status): \(r.stderr.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        try ImageFiles.fsync(path: image)
        if let problem = ImageFiles.ext4Problem(image) {
            throw SandboxError.image("mkfs.ext4 made an unusable image (\(problem))")
        }
        let hash = try ImageFiles.sha256(file: image)
        let final = imagePath(hash: hash)
        chmod(image, 0o444)  // base images are never written
        guard rename(image, final) == 0 else {
            throw SandboxError.image("cannot move the new image to \(final): \(String(cString: strerror(errno)))")
        }
        try ImageFiles.fsync(path: imagesDirectory)
        var st = stat()
        let size = stat(final, &st) == 0 ? UInt64(st.st_size) : 0
        let entry = ImageIndex.Entry(hash: hash, recipe: recipe, created: Date(), size: size, recipeKey: recipeKey)
        try updateIndex { index in index.images[name] = entry }
        let s = Date().timeIntervalSince(started)
        progress("[image] installed \(name) as \(hash.prefix(12)) (\(size / mib) MiB) in \(String(format: "%.1f", s)) s")
        return ImageBuildResult(image: info(name, entry), reused: false, seconds: s)
    }

    /// Gives a root file system without `/etc/hosts` (a minimal imported tree, say) the
    /// usual localhost lines, so that `localhost` resolves in the guest.
    func addDefaultHosts(to rootfs: String, progress: (String) -> Void) throws {
        let etc = rootfs + "/etc", hosts = etc + "/hosts"
        var st = stat()
        // An /etc that is a symbolic link could point out of the tree (onto the host):
        // never write through it.
        if lstat(etc, &st) == 0 && (st.st_mode & S_IFMT) == S_IFLNK {
            progress("[image] /etc in the root file system is a symbolic link; not adding /etc/hosts")
            return
        }
        guard lstat(hosts, &st) != 0 else { return }  // present (a file or a link): keep it
        do {
            try FileManager.default.createDirectory(atPath: etc, withIntermediateDirectories: true)
            try Data("127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n".utf8)
                .write(to: URL(fileURLWithPath: hosts))
            chmod(hosts, 0o644)
        } catch {
            throw SandboxError.image("cannot add a default /etc/hosts to the image: \(error.localizedDescription)")
        }
        progress("[image] the root file system had no /etc/hosts; added one for localhost")
    }

    /// Read-modify-write of the index under its flock. Image files that no name refers
    /// to any more are deleted at once when `deleteOrphans` (an explicit `rm`), else
    /// retired: deleted by a later update once they have been unreferenced for
    /// `ImageIndex.retirementSeconds` (open VMs keep their descriptor either way).
    private func updateIndex(deleteOrphans: Bool = false, _ change: (inout ImageIndex) throws -> Void) throws {
        try ImageFiles.withLock(indexLockPath) {
            var index = try ImageIndex.load(indexPath)
            let before = index
            try change(&index)
            let after = index
            let now = Date()
            var retired = index.retired ?? [:]
            var doomed: [String] = []
            for (name, entry) in before.images where after.images[name]?.hash != entry.hash {
                if deleteOrphans { doomed.append(entry.hash) } else { retired[entry.hash] = .init(name: name, since: now, entry: entry) }
            }
            let live = Set(after.images.values.map(\.hash))
            for (hash, r) in retired where live.contains(hash) || (deleteOrphans && after.images[r.name] == nil)
                || now.timeIntervalSince(r.since) > ImageIndex.retirementSeconds {
                retired[hash] = nil
                doomed.append(hash)
            }
            doomed.removeAll { live.contains($0) }
            index.retired = retired.isEmpty ? nil : retired
            try index.save(indexPath)
            for hash in Set(doomed) { unlink(imagePath(hash: hash)) }
        }
    }

    /// Creates `<root>/images` if needed and checks it is writable.
    func ensureWritable() throws {
        try ImageFiles.ensureWritableDirectory(imagesDirectory, what: "image cache directory")
    }

    // MARK: Queries

    /// All images in the index, sorted by name.
    public func list() throws -> [ImageInfo] {
        try ImageIndex.load(indexPath).images.map { info($0.key, $0.value) }.sorted { $0.name < $1.name }
    }

    /// Details of image `name`.
    ///
    /// - Throws: `SandboxError.invalidInput` for an unknown name or a missing or
    ///   damaged image file.
    public func inspect(_ name: String) throws -> ImageDetails {
        guard let e = try ImageIndex.load(indexPath).images[name] else { throw unknownImage(name) }
        let image = info(name, e)
        try checkIndexed(image)
        var st = stat()
        let allocated = stat(image.path, &st) == 0 ? UInt64(st.st_blocks) * 512 : 0
        return ImageDetails(image: image, allocatedBytes: allocated, containsAgent: Self.containsAgent(image: image.path))
    }

    /// Whether `/sbin/sandbox-init` exists in the ext4 image at `path` (via debugfs).
    public static func containsAgent(image path: String) -> Bool {
        guard let debugfs = ImageFiles.findTool("debugfs"),
              let r = try? ImageFiles.capture(debugfs, ["-R", "stat /sbin/sandbox-init", path]) else { return false }
        return r.status == 0 && r.stdout.contains("Inode:") && r.stdout.contains("Type: regular")
    }

    /// The image file to boot: for a path (contains `/`, ends in `.ext4`/`.img`, or is
    /// an existing file that is not an image name) the validated file itself; for a
    /// name, the indexed image, building a recipe (the default `busybox` included)
    /// first when it is missing or out of date (unless the cache is read-only and
    /// already holds an image of that name: then that one).
    ///
    /// - Throws: `SandboxError.invalidInput` for an unknown name, a missing file, a
    ///   truncated file or one that is not ext4.
    /// The inputs that decide which image a recipe name resolves to, or nil if they
    /// cannot be listed (then the full key is always computed).
    private func memoFingerprint(_ name: String) -> String? {
        guard let recipeDir = recipeDirectory(name) else { return nil }
        var inputs = [recipeDir, indexPath]
        if let override = agentOverride {
            inputs.append(override)
        } else if let repo = try? repositoryRoot() {
            inputs += Self.agentSourceDirectories.map { repo + "/" + $0 }
        } else {
            return nil
        }
        return "image \(name)\n" + InputFingerprint.of(inputs)
    }

    public func path(_ nameOrPath: String, progress: (String) -> Void = { _ in }) throws -> String {
        let looksLikePath = nameOrPath.contains("/") || nameOrPath.hasSuffix(".ext4") || nameOrPath.hasSuffix(".img")
        if looksLikePath {
            try Self.validateImageFile(nameOrPath)
            return URL(fileURLWithPath: nameOrPath).standardizedFileURL.path
        }
        // Warm path, before the index is even read: the same recipe, agent sources and
        // index as when this name last resolved give the same image. (The index is one of
        // the fingerprinted inputs, so an import under this name since then misses.)
        let memo = imagesDirectory + "/\(nameOrPath).memo"
        if recipeDirectory(nameOrPath) != nil, access(imagesDirectory, W_OK) == 0, let fingerprint = memoFingerprint(nameOrPath),
           let p = InputFingerprint.recallPath(memo, fingerprint: fingerprint, under: imagesDirectory), ImageFiles.ext4Problem(p) == nil {
            return p
        }
        let entry = try ImageIndex.load(indexPath).images[nameOrPath]
        if let entry, entry.recipe.hasPrefix("import-") || recipeDirectory(nameOrPath) == nil {
            let image = info(nameOrPath, entry)
            try checkIndexed(image)
            return image.path
        }
        if recipeDirectory(nameOrPath) != nil {
            // A read-only cache (shared, or mounted into a jail) still serves what it has.
            if let entry, access(imagesDirectory, W_OK) != 0, ImageFiles.ext4Problem(imagePath(hash: entry.hash)) == nil {
                return imagePath(hash: entry.hash)
            }
            let built = try build(name: nameOrPath, progress: progress).image.path
            if let after = memoFingerprint(nameOrPath) {
                InputFingerprint.rememberPath(memo, fingerprint: after, path: built, under: imagesDirectory)
            }
            return built
        }
        if FileManager.default.fileExists(atPath: nameOrPath) {
            try Self.validateImageFile(nameOrPath)
            return URL(fileURLWithPath: nameOrPath).standardizedFileURL.path
        }
        throw unknownImage(nameOrPath)
    }

    /// Removes `name` from the index, and its file if no other name uses it.
    ///
    /// - Throws: `SandboxError.invalidInput` for an unknown name.
    public func remove(_ name: String) throws {
        guard try ImageIndex.load(indexPath).images[name] != nil else { throw unknownImage(name) }
        try ensureWritable()
        try updateIndex(deleteOrphans: true) { index in
            guard index.images.removeValue(forKey: name) != nil else { throw unknownImage(name) }
        }
    }

    /// Checks that `path` is an ext4 image file.
    ///
    /// - Throws: `SandboxError.invalidInput` naming the problem: missing, not a regular
    ///   file, truncated (under 2 KiB or shorter than its superblock says), unreadable
    ///   superblock, or bad magic (not ext4).
    public static func validateImageFile(_ path: String) throws {
        guard let problem = ImageFiles.ext4Problem(path) else { return }
        throw SandboxError.invalidInput(describe(problem, path: path))
    }

    static func describe(_ problem: ImageFiles.Ext4Problem, path: String) -> String {
        switch problem {
        case .missing: return "image file \(path) does not exist"
        case .notAFile: return "image \(path) is not a regular file"
        case .truncated(let why): return "image \(path) is truncated: \(why)"
        case .unreadable(let why): return "cannot read the ext4 superblock of image \(path): \(why)"
        case .notExt4(let magic):
            return "image \(path) is not an ext4 file system: the superblock magic at byte 1080 is 0x\(String(magic, radix: 16, uppercase: true)), not 0xEF53"
        }
    }

    /// Validates the file behind an index entry, with advice on how to repair it.
    func checkIndexed(_ image: ImageInfo) throws {
        guard let problem = ImageFiles.ext4Problem(image.path) else { return }
        let advice = image.recipe.hasPrefix("import-") ? "import it again or remove it with `sandbox image rm \(image.name)`"
            : "rebuild it with `sandbox image build \(image.name)`"
        if problem == .missing {
            throw SandboxError.invalidInput("image \"\(image.name)\" is in the index but its file \(image.path) is missing; \(advice)")
        }
        throw SandboxError.invalidInput("image \"\(image.name)\": \(Self.describe(problem, path: image.path)); \(advice)")
    }
}
