import Foundation

/// Where the project keeps its caches and finds its recipes.
public enum SandboxPaths {
    /// `$SANDBOX_CACHE`, else `$XDG_CACHE_HOME/sandbox`, else `~/.cache/sandbox`.
    public static var cacheDirectory: String {
        let env = ProcessInfo.processInfo.environment
        if let c = env["SANDBOX_CACHE"], !c.isEmpty { return c }
        if let x = env["XDG_CACHE_HOME"], !x.isEmpty { return x + "/sandbox" }
        return (env["HOME"] ?? "/root") + "/.cache/sandbox"
    }

    /// The `Sandboxes/` folder with kernel and image recipes: `$SANDBOX_RESOURCES`, else
    /// found by walking up from the running executable (a source checkout's .build/...).
    public static func resourcesDirectory() throws -> String {
        let fm = FileManager.default
        if let r = ProcessInfo.processInfo.environment["SANDBOX_RESOURCES"], !r.isEmpty { return r }
        var candidates: [String] = []
        if let exe = try? fm.destinationOfSymbolicLink(atPath: "/proc/self/exe") { candidates.append(exe) }
        candidates.append(fm.currentDirectoryPath + "/x")
        for start in candidates {
            var dir = (start as NSString).deletingLastPathComponent
            while dir != "/" && !dir.isEmpty {
                let probe = dir + "/Sandboxes/kernel/build-kernel"
                if fm.isExecutableFile(atPath: probe) { return dir + "/Sandboxes" }
                dir = (dir as NSString).deletingLastPathComponent
            }
        }
        throw SandboxError.infrastructure("cannot find the Sandboxes/ recipes folder next to this executable; set SANDBOX_RESOURCES to the repository's Sandboxes/ directory")
    }
}

/// The library's public error.
public enum SandboxError: Error, Sendable, CustomStringConvertible {
    /// Bad input from the caller (flags, paths, job files).
    case invalidInput(String)
    /// Something on the host failed (KVM, files, builds).
    case infrastructure(String)

    public var description: String {
        switch self {
        case .invalidInput(let s): return s
        case .infrastructure(let s): return s
        }
    }
}

/// Runs a helper program, streaming its stderr/stdout to ours; returns its exit status.
func runTool(_ path: String, _ arguments: [String], captureStdout: Bool = false) throws -> (status: Int32, stdout: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = arguments
    let pipe = Pipe()
    if captureStdout { p.standardOutput = pipe } else { p.standardOutput = FileHandle.standardError }
    p.standardError = FileHandle.standardError
    do { try p.run() } catch { throw SandboxError.infrastructure("cannot run \(path): \(error.localizedDescription)") }
    var out = Data()
    if captureStdout { out = pipe.fileHandleForReading.readDataToEndOfFile() }
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: out, as: UTF8.self))
}
