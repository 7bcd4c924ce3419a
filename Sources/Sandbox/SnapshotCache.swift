import Crypto
import Foundation
import SandboxCore
import SandboxImages
import SystemShims
#if canImport(Glibc)
import Glibc
#endif

/// The start snapshots runs restore by default: one per kernel, image, VM shape, host
/// and VMM build, made on first use (the first run of a shape boots, snapshots, then
/// restores like every later run) and kept in `$cache/snapshots/`.
///
/// ```
///   $cache/snapshots/
///     busybox-256m-1c-9f3a…/      a snapshot directory (Docs/SnapshotFormat.md)
///     .busybox-256m-1c-9f3a….lock  flock'ed while one process makes that snapshot
/// ```
///
/// Several processes may race to make the same entry: one makes it under the lock, the
/// others wait on the lock and then use it. An entry the VMM refuses (damaged, or made by
/// another build on the same key) is discarded and made again once (`discard`).
enum SnapshotCache {
    static var directory: String { SandboxPaths.cacheDirectory + "/snapshots" }
    /// Bump when what a cached snapshot holds changes in a way the key does not show.
    static let layoutVersion = "v2"  // v2: made after a warm-up (SnapshotMaker.warmUp)

    /// Why `config` boots instead of restoring the cached snapshot, or nil when it
    /// restores. Asked for (`cold`, `SANDBOX_COLD`), or a setting a snapshot cannot
    /// honour (a console stream shows the boot).
    static func coldReason(_ config: SandboxConfiguration) -> String? {
        if config.cold { return "asked for (cold)" }
        if let v = ProcessInfo.processInfo.environment["SANDBOX_COLD"], !v.isEmpty, v != "0" { return "SANDBOX_COLD=\(v) is set" }
        if config.consoleFD != nil { return "the console is streamed, which shows the boot" }
        return nil
    }

    /// The key inputs, one per line: anything that changes what the snapshot holds or
    /// whether this host can restore it.
    static func keyText(_ config: SandboxConfiguration, kernel: String, image: String, vmm: String) -> String {
        func id(_ path: String) -> String {
            var st = stat()
            guard stat(path, &st) == 0 else { return "\(path) missing" }
            return "\(path) \(st.st_size) \(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec) \(st.st_ino)"
        }
        return [
            "snapshot-cache \(layoutVersion)",
            "host \(HostKind.detect().rawValue) \(cpuIdentity())",
            "kernel \(id(kernel))",
            "image \(id(image))",
            "vmm \(id(vmm))",
            "memory \(config.memoryMiB) cpus \(config.cpus) disk \(config.diskSizeMiB.map(String.init) ?? "image")",
        ].joined(separator: "\n")
    }

    /// The CPU as a restore cares about it: vendor, family, model, stepping and a hash of
    /// the feature flags of the first processor in /proc/cpuinfo.
    static func cpuIdentity() -> String { cachedCPUIdentity }
    private static let cachedCPUIdentity: String = {
        guard let bytes = readToEnd("/proc/cpuinfo") else { return "unknown-cpu" }
        var parts: [String] = []
        for line in bytes.split(separator: 0x0A, omittingEmptySubsequences: false) {
            if line.isEmpty { break }  // the end of the first processor's block
            guard let colon = line.firstIndex(of: UInt8(ascii: ":")) else { continue }
            let value = textTrimmingBlanks(line[(colon + 1)...])
            switch textTrimmingBlanks(line[..<colon]) {
            case "vendor_id", "cpu family", "model", "stepping": parts.append(value)
            case "flags": parts.append(hexString(SHA256.hash(data: Array(value.utf8)).prefix(8)))
            default: break
            }
        }
        return parts.joined(separator: "/")
    }()

    /// The entry's directory name: a readable label and the key's hash.
    static func entryName(_ config: SandboxConfiguration, keyText: String) -> (label: String, name: String) {
        let imageName = (config.image as NSString).lastPathComponent.replacingOccurrences(of: ".ext4", with: "")
        let safe = String(imageName.map { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" ? $0 : "_" }.prefix(40))
        // The host kind is in the label so that hosts sharing a cache (this one and the
        // lab, over 9p) do not prune each other's entries.
        let label = "\(safe)-\(config.memoryMiB)m-\(config.cpus)c" + (config.diskSizeMiB.map { "-\($0)d" } ?? "") + "-\(HostKind.detect().rawValue)"
        let hash = hexString(SHA256.hash(data: Array(keyText.utf8)).prefix(8))
        return (label, label + "-" + hash)
    }

    /// The cached start snapshot for `config` (booting `kernel` and `image`), made now if
    /// there is none. Progress lines say when a snapshot is being made or waited for.
    static func entry(for config: SandboxConfiguration, kernel: String, image: String,
                      progress: (String) -> Void) throws -> String {
        let vmm = try VMMExecutable.locate(explicit: config.vmmExecutable)
        let (label, name) = entryName(config, keyText: keyText(config, kernel: kernel, image: image, vmm: vmm))
        let dir = directory + "/" + name
        if isComplete(dir) { return dir }
        if let failed = recentFailure(name) { throw SandboxError(.snapshot, failed) }
        do { try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) } catch {
            throw SandboxError(.host, "cannot create the snapshot cache \(directory)", underlying: error)
        }
        let lock = try lockEntry(name, progress: progress)
        defer { lock.close() }  // closing the descriptor releases the lock
        if isComplete(dir) { return dir }
        if let failed = recentFailure(name) { throw SandboxError(.snapshot, failed) }
        // A directory without its state file is a leftover (a crash while renaming is
        // not possible, but a hand-made one is): clear it.
        try? FileManager.default.removeItem(atPath: dir)
        let shape = "\(config.memoryMiB) MiB, \(config.cpus) vCPU" + (config.diskSizeMiB.map { ", \($0) MiB disk" } ?? "")
        progress("sandbox: making the start snapshot for \(config.image) (\(shape)); later runs restore it")
        var boot = SandboxConfiguration()
        boot.kernel = kernel
        boot.image = image
        boot.memoryMiB = config.memoryMiB
        boot.cpus = config.cpus
        boot.diskSizeMiB = config.diskSizeMiB
        // The snapshot's boot is the cache's, not the run's: a short boot limit set for
        // the run (which then bounds its restore) must not fail the shared snapshot.
        let limit = max(try SandboxConfiguration.resolvedBootTimeout(config.bootTimeout), SandboxConfiguration.defaultBootTimeoutSeconds)
        boot.bootTimeout = .milliseconds(Int64(limit * 1000))
        boot.vmmExecutable = vmm
        var made: SnapshotMaker.Result?
        for attempt in 1 ... 2 where made == nil {
            do { made = try SnapshotMaker.create(directory: dir, configuration: boot, progress: progress) } catch {
                // Once more at once (a guest that resets while booting now and then, as
                // emulated hosts do, is not a reason to boot every run for ten minutes);
                // after that, remembered for a while (runs of this shape boot meanwhile
                // without trying again) and for `sandbox doctor`.
                guard attempt == 2 else {
                    progress("sandbox: making the start snapshot failed (\(error)); trying once more")
                    continue
                }
                try? "\(error)\n".write(toFile: failureFile(name), atomically: true, encoding: .utf8)
                throw error
            }
        }
        guard let made else { throw SandboxError.internal("the start snapshot was neither made nor failed") }
        unlink(failureFile(name))
        // Which VMM made the entry, for `prune`: entries of other VMM builds are kept.
        try? (vmm + "\n").write(toFile: dir + "/" + vmmFileName, atomically: true, encoding: .utf8)
        progress(String(format: "sandbox: start snapshot made in %.0f ms (%@)", made.totalMillis, dir))
        prune(label: label, keeping: name, vmm: vmm)
        return dir
    }

    /// Whether `dir` holds a whole snapshot (its state file is written last).
    static func isComplete(_ dir: String) -> Bool {
        FileManager.default.fileExists(atPath: dir + "/state.json")
    }

    /// Takes the entry's lock (an flock on a file beside it), saying so when another
    /// process holds it.
    static func lockEntry(_ name: String, progress: (String) -> Void) throws -> FileDescriptor {
        let path = directory + "/." + name + ".lock"
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(path, O_RDWR | O_CREAT | O_CLOEXEC, mode: 0o644) } catch {
            throw SandboxError(.host, "cannot open the snapshot cache lock \(path)", underlying: error)
        }
        // Touched once held: `prune` removes only locks nobody took for an hour.
        if flock(fd.rawValue, LOCK_EX | LOCK_NB) == 0 { futimens(fd.rawValue, nil); return fd }
        progress("sandbox: waiting for another process that is making the start snapshot \(name)")
        while flock(fd.rawValue, LOCK_EX) != 0 {
            guard errno == EINTR else {
                let e = errno
                fd.close()
                throw SandboxError(.host, "cannot lock \(path): \(String(cString: strerror(e)))")
            }
        }
        futimens(fd.rawValue, nil)
        return fd
    }

    /// Removes a cached entry the VMM refused, so the next use makes it again. Under the
    /// entry's lock, and by renaming first: no reader sees half a directory.
    static func discard(_ dir: String) {
        let name = (dir as NSString).lastPathComponent
        guard let lock = try? lockEntry(name, progress: { _ in }) else { return }
        defer { lock.close() }
        let trash = directory + "/.trash-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        if rename(dir, trash) == 0 { try? FileManager.default.removeItem(atPath: trash) }
    }

    /// The file in an entry naming the VMM executable that made it.
    static let vmmFileName = "made-by-vmm"

    /// How long an entry of another VMM build (a release build beside a debug one, a
    /// user's package's copy) is kept beside the current one.
    static let otherBuildDays: Double = 7

    /// Removes the other entries of the same label made by the same VMM executable (for
    /// an older kernel, image or build of it), or by a VMM that no longer exists or that
    /// made it more than a week ago, and leftovers of interrupted makes older than an
    /// hour. Entries of another VMM that still exists stay: a debug and a release build,
    /// or a user's package beside this checkout, each keep their own and do not remake
    /// each other's. Entries are renamed away first; a sandbox already restored from one
    /// keeps its open files.
    static func prune(label: String, keeping name: String, vmm: String, in directory: String = directory) {
        let fm = FileManager.default
        guard let names = try? fm.contentsOfDirectory(atPath: directory) else { return }
        let now = Date()
        let hour = now.addingTimeInterval(-3600)
        let otherBuildLimit = now.addingTimeInterval(-otherBuildDays * 86400)
        for n in names where n != name {
            let path = directory + "/" + n
            let modified = (try? fm.attributesOfItem(atPath: path)[.modificationDate]) as? Date
            let old = modified.map { $0 < hour } ?? false
            var stale = false
            if n.hasPrefix(label + "-") && n.count == name.count {
                let maker = (try? String(contentsOfFile: path + "/" + vmmFileName, encoding: .utf8))?
                    .trimmingCharacters(in: .whitespacesAndNewlines)
                if let maker, maker != vmm, fm.isExecutableFile(atPath: maker) {
                    stale = modified.map { $0 < otherBuildLimit } ?? true
                } else {
                    stale = true  // the same VMM, one that is gone, or an unrecorded maker
                }
            }
            // Leftovers: interrupted makes and removals, old failure notes, and the locks
            // of entries that no longer exist.
            let orphanLock = n.hasPrefix(".") && n.hasSuffix(".lock") && !names.contains(String(n.dropFirst().dropLast(".lock".count)))
            let leftover = (n.hasPrefix(".trash-") || n.contains(".partial-") || n.hasSuffix(".failed") || orphanLock) && old
            guard stale || leftover else { continue }
            let trash = directory + "/.trash-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            if rename(path, trash) == 0 { try? fm.removeItem(atPath: trash) }
        }
    }

    /// How long a failed make is believed before the next run tries again.
    static let failureMemorySeconds: Double = 600

    static func failureFile(_ name: String) -> String { directory + "/." + name + ".failed" }

    /// Why the entry could not be made, when that was tried in the last ten minutes.
    static func recentFailure(_ name: String) -> String? {
        let path = failureFile(name)
        guard let when = (try? FileManager.default.attributesOfItem(atPath: path)[.modificationDate]) as? Date,
              Date().timeIntervalSince(when) < failureMemorySeconds,
              let why = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
        let ago = Int(Date().timeIntervalSince(when))
        return "making it failed \(ago) s ago (tried again after \(Int(failureMemorySeconds / 60)) minutes): " + why.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// The entries whose last make failed recently, with why (for `sandbox doctor`).
    static func recentFailures() -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return names.filter { $0.hasPrefix(".") && $0.hasSuffix(".failed") }.sorted().compactMap { f in
            let name = String(f.dropFirst().dropLast(".failed".count))
            return recentFailure(name).map { "\(name): \($0)" }
        }
    }

    /// The entries now in the cache (for `sandbox doctor`).
    static func entries() -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).filter { !$0.hasPrefix(".") }.sorted()
    }
}
