import Foundation
import SandboxCore
import SystemShims

/// Guest kernel flavors.
public enum KernelFlavor: String, Sendable, CaseIterable {
    /// For hardware KVM (VT-x / AMD-V).
    case standard
    /// For PVM hosts: the same kernel plus the PVM guest patch.
    case pvm

    /// The flavor that boots on `host`.
    public static func forHost(_ host: HostKind) -> KernelFlavor { host == .pvm ? .pvm : .standard }

    /// The flavor that boots on this machine.
    public static var forThisHost: KernelFlavor { forHost(HostKind.detect()) }
}

/// Builds guest kernels from Debian's linux-source package with the recipes in
/// `Sandboxes/kernel/`, and caches them by a hash of source version, config and patches.
public enum KernelStore {
    /// `<cache>/kernels`.
    public static var directory: String { SandboxPaths.cacheDirectory + "/kernels" }

    /// The cache key for `flavor` (computed by `Sandboxes/kernel/key-inputs`).
    public static func key(flavor: KernelFlavor) throws -> String {
        let res = try SandboxPaths.resourcesDirectory()
        let (status, out) = try runTool(res + "/kernel/key-inputs", [flavor.rawValue], captureStdout: true)
        let key = out.trimmingCharacters(in: .whitespacesAndNewlines)
        guard status == 0, key.count == 64 else {
            throw SandboxError.kernel("computing the kernel cache key failed (status \(status)); is linux-source-6.12 installed? run `sandbox kernel build`")
        }
        return key
    }

    /// Where the kernel for `flavor` lives once built. The key is remembered against a
    /// fingerprint of its inputs, so it is only recomputed when an input changed.
    public static func cachedPath(flavor: KernelFlavor) throws -> String {
        let res = try SandboxPaths.resourcesDirectory()
        let fingerprint = "kernel \(flavor.rawValue)\n" + InputFingerprint.of([res + "/kernel", "/var/lib/dpkg/status"])
        let memo = directory + "/\(flavor.rawValue).memo"
        if let p = InputFingerprint.recallPath(memo, fingerprint: fingerprint, under: directory) { return p }
        let p = directory + "/\(flavor.rawValue)-\(try key(flavor: flavor).prefix(16))/vmlinux"
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        InputFingerprint.rememberPath(memo, fingerprint: fingerprint, path: p, under: directory)
        return p
    }

    /// The kernel to use when none is given: `$SANDBOX_KERNEL`, else the cached kernel
    /// for this host's flavor, built first if needed.
    public static func defaultKernelPath(flavor: KernelFlavor? = nil, progress: (String) -> Void) throws -> String {
        if flavor == nil, let k = ProcessInfo.processInfo.environment["SANDBOX_KERNEL"], !k.isEmpty { return k }
        return try path(flavor: flavor ?? KernelFlavor.forThisHost, progress: progress)
    }

    /// The kernel for `flavor`, building it first if it is not cached.
    public static func path(flavor: KernelFlavor, progress: (String) -> Void) throws -> String {
        let target = try cachedPath(flavor: flavor)
        if FileManager.default.fileExists(atPath: target) { return target }
        try build(flavor: flavor, to: target, progress: progress)
        return target
    }

    /// Builds the kernel into `target` (atomically: the builder writes a temp file and renames).
    public static func build(flavor: KernelFlavor, to target: String, progress: (String) -> Void) throws {
        let res = try SandboxPaths.resourcesDirectory()
        let dir = (target as NSString).deletingLastPathComponent
        do { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) } catch {
            throw SandboxError.kernel("cannot create \(dir): \(error.localizedDescription)")
        }
        progress("sandbox: building the \(flavor.rawValue) guest kernel (first use only, about 6 minutes on 2 cores) into \(dir)")
        let (status, _) = try runTool(res + "/kernel/build-kernel", ["--flavor", flavor.rawValue, "--out", target])
        guard status == 0, FileManager.default.fileExists(atPath: target) else {
            throw SandboxError.kernel("building the \(flavor.rawValue) kernel failed (status \(status)); see the output above")
        }
    }
}
