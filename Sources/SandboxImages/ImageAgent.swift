import Foundation
import SandboxCore

/// The guest agent (`sandbox-init`, the guest's PID 1) that the store copies into
/// every image as `/sbin/sandbox-init`.
///
/// It is built by `Scripts/build-init` (static, stripped) and cached under
/// `<cache>/agent/<key>/sandbox-init`, where the key is a SHA-256 over the files of
/// sandbox-init and every module it is built from. An explicit binary
/// (`$SANDBOX_INIT`, or `ImageStore(agentBinary:)`) replaces all of this.
extension ImageStore {
    /// The source folders whose contents decide the agent's cache key.
    /// Every module sandbox-init is built from (its dependencies in Package.swift and
    /// theirs): a change in any of them makes a new agent (ImageStoreTests checks the list
    /// against sandbox-init's imports).
    public static let agentSourceDirectories = [
        "Sources/sandbox-init", "Sources/AgentProtocol", "Sources/CInit", "Sources/SandboxABI",
        "Sources/SystemShims", "Sources/CSystem", "Sources/TreeArchive",
    ]

    /// The repository checkout holding the agent sources and Scripts/build-init.
    func repositoryRoot() throws -> String {
        ((try resources()) as NSString).deletingLastPathComponent
    }

    /// The agent's cache key: SHA-256 of a sorted manifest of its source files.
    public func agentSourceKey() throws -> String {
        let repo = try repositoryRoot()
        for d in Self.agentSourceDirectories where !FileManager.default.fileExists(atPath: repo + "/" + d) {
            throw SandboxError.image("cannot find the guest agent sources \(repo)/\(d) to build sandbox-init; set SANDBOX_INIT to a static sandbox-init binary")
        }
        return try ImageFiles.sha256(text: "sandbox-init sources v1\n" + ImageFiles.manifest(of: Self.agentSourceDirectories, relativeTo: repo))
    }

    /// The agent binary to put into images: the override if one was given, else the
    /// cached build for the current sources, building it first (minutes) if needed.
    ///
    /// - Parameter progress: receives a line before a build starts.
    /// - Returns: the path of a static `sandbox-init` executable.
    /// - Throws: `SandboxError.invalidInput` for a bad override path,
    ///   `.image` if the build fails.
    public func agentBinary(progress: (String) -> Void = { _ in }) throws -> String {
        if let override = agentOverride {
            guard FileManager.default.isExecutableFile(atPath: override) else {
                throw SandboxError.invalidInput("the guest agent \(override) (SANDBOX_INIT) does not exist or is not executable")
            }
            return override
        }
        let key = try agentSourceKey()
        let dir = root + "/agent/" + key
        let binary = dir + "/sandbox-init"
        if FileManager.default.isExecutableFile(atPath: binary) { return binary }
        try ImageFiles.ensureWritableDirectory(root + "/agent", what: "agent cache directory")
        return try ImageFiles.withLock(root + "/agent/build.lock") {
            // Another process may have built it while we waited for the lock.
            if FileManager.default.isExecutableFile(atPath: binary) { return binary }
            try ImageFiles.ensureWritableDirectory(dir, what: "agent cache directory")
            progress("[image] building the guest agent (first use)… (sandbox-init, static release build; sources key \(key.prefix(12)))")
            let started = Date()
            let script = try repositoryRoot() + "/Scripts/build-init"
            let (status, _) = try runTool(script, [binary])
            guard status == 0, FileManager.default.isExecutableFile(atPath: binary) else {
                throw SandboxError.image("building the guest agent with \(script) failed (exit status \(status)); see its output above, or set SANDBOX_INIT to a static sandbox-init binary")
            }
            progress("[image] guest agent built in \(String(format: "%.1f", Date().timeIntervalSince(started))) s: \(binary)")
            return binary
        }
    }

    /// Copies `agent` to `<rootfs>/sbin/sandbox-init` (mode 0755), resolving a `/sbin`
    /// symlink (merged /usr) inside the root file system rather than on the host.
    func installAgent(_ agent: String, into rootfs: String) throws {
        let fm = FileManager.default
        var sbin = rootfs + "/sbin"
        for _ in 0..<8 {  // follow sbin -> usr/sbin (-> ...) within rootfs
            guard let target = try? fm.destinationOfSymbolicLink(atPath: sbin) else { break }
            sbin = target.hasPrefix("/") ? rootfs + target
                : ((sbin as NSString).deletingLastPathComponent as NSString).appendingPathComponent(target)
        }
        do {
            try fm.createDirectory(atPath: sbin, withIntermediateDirectories: true)
            let dest = sbin + "/sandbox-init"
            if (try? fm.attributesOfItem(atPath: dest)) != nil || (try? fm.destinationOfSymbolicLink(atPath: dest)) != nil {
                try fm.removeItem(atPath: dest)
            }
            try fm.copyItem(atPath: agent, toPath: dest)
            try fm.setAttributes([.posixPermissions: 0o755, .ownerAccountID: 0, .groupOwnerAccountID: 0], ofItemAtPath: dest)
        } catch {
            throw SandboxError.image("cannot add the guest agent to \(sbin): \(error.localizedDescription)")
        }
    }
}
