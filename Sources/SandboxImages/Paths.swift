import Foundation
import SandboxCore

/// Where the project keeps its caches and finds its recipes.
public enum SandboxPaths {
    /// `$SANDBOX_CACHE`, else `$XDG_CACHE_HOME/sandbox`, else `~/.cache/sandbox`.
    /// (getenv, not Foundation's ProcessInfo: `sandbox exec` asks this before anything
    /// else to find the sandbox server, and the first ProcessInfo costs a few hundred µs.)
    public static var cacheDirectory: String {
        func env(_ name: String) -> String? { getenv(name).map { String(cString: $0) } }
        if let c = env("SANDBOX_CACHE"), !c.isEmpty { return c }
        if let x = env("XDG_CACHE_HOME"), !x.isEmpty { return x + "/sandbox" }
        return (env("HOME") ?? "/root") + "/.cache/sandbox"
    }

    /// Where VMMs create per-sandbox disk overlays (each is unlinked at once).
    public static var overlayDirectory: String { cacheDirectory + "/overlays" }

    /// The `Sandboxes/` folder with kernel and image recipes, found by one rule, in order:
    /// 1. `$SANDBOX_RESOURCES` (an override; it must hold `kernel/build-kernel`);
    /// 2. the package checkout this library was built from (SwiftPM builds a dependency
    ///    from its checkout, by path or by URL, so the recipes and the guest agent's
    ///    sources sit next to the library's own sources, whatever the working directory);
    /// 3. a `Sandboxes/` folder above the running executable (a copied build tree).
    public static func resourcesDirectory() throws -> String {
        let fm = FileManager.default
        func holdsRecipes(_ dir: String) -> Bool { fm.isExecutableFile(atPath: dir + "/kernel/build-kernel") }
        if let r = ProcessInfo.processInfo.environment["SANDBOX_RESOURCES"], !r.isEmpty {
            guard holdsRecipes(r) else {
                throw SandboxError.invalidInput("SANDBOX_RESOURCES=\(r) is not a Sandboxes/ recipes folder (no kernel/build-kernel in it)")
            }
            return r
        }
        var tried: [String] = []
        let checkout = packageCheckout + "/Sandboxes"
        if holdsRecipes(checkout) { return checkout }
        tried.append(checkout)
        if let exe = try? fm.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            var dir = (exe as NSString).deletingLastPathComponent
            while dir != "/" && !dir.isEmpty {
                if holdsRecipes(dir + "/Sandboxes") { return dir + "/Sandboxes" }
                dir = (dir as NSString).deletingLastPathComponent
            }
            tried.append("Sandboxes/ above \(exe)")
        }
        throw SandboxError(.host, "cannot find the Sandboxes/ recipes folder (tried \(tried.joined(separator: ", "))); the package checkout this library was built from seems to be gone; set SANDBOX_RESOURCES to a checkout's Sandboxes/ directory")
    }

    /// The root of the package checkout this file was compiled from (three levels above
    /// `Sources/SandboxImages/Paths.swift`).
    static let packageCheckout: String = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url.path
    }()
}

/// Runs a helper program, streaming its stderr/stdout to ours; returns its exit status.
func runTool(_ path: String, _ arguments: [String], captureStdout: Bool = false) throws -> (status: Int32, stdout: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = arguments
    let pipe = Pipe()
    if captureStdout { p.standardOutput = pipe } else { p.standardOutput = FileHandle.standardError }
    p.standardError = FileHandle.standardError
    do { try p.run() } catch { throw SandboxError(.host, "cannot run \(path)", underlying: error) }
    var out = Data()
    if captureStdout { out = pipe.fileHandleForReading.readDataToEndOfFile() }
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: out, as: UTF8.self))
}
