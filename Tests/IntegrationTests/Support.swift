import Foundation
import Sandbox

/// Paths and helpers shared by the real-VM tests.
enum Fixture {
    /// The repository root (from this file's location).
    static let repoRoot: String = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url.path
    }()

    /// The directory holding the built products (next to the test bundle).
    static let productsDirectory: String = {
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
        var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
        while dir.path != "/" {
            if FileManager.default.isExecutableFile(atPath: dir.appendingPathComponent("sandbox").path) { return dir.path }
            dir.deleteLastPathComponent()
        }
        return repoRoot + "/.build/debug"
    }()

    static var sandboxBinary: String { productsDirectory + "/sandbox" }

    /// True inside the lab (emulated SVM machine, hardware KVM semantics).
    static var inLab: Bool { ProcessInfo.processInfo.environment["KVM_LAB"] == "1" }

    /// The cached kernel for this host's flavor; the test suite's set-up builds it.
    static func kernel() throws -> String {
        let flavor = KernelFlavor.forThisHost
        let path = try KernelStore.cachedPath(flavor: flavor)
        guard FileManager.default.fileExists(atPath: path) else {
            throw FixtureError("the \(flavor.rawValue) kernel is not built (\(path)); run `sandbox kernel build --flavor \(flavor.rawValue)` first")
        }
        return path
    }

    /// A busybox initramfs whose init runs `script` (busybox sh) and then reboots.
    static func initramfs(named name: String, script: String) throws -> String {
        let dir = NSTemporaryDirectory() + "sandbox-it-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let initPath = dir + "/\(name).init"
        let out = dir + "/\(name).cpio.gz"
        if FileManager.default.fileExists(atPath: out) { return out }
        try ("#!/bin/busybox sh\n" + script + "\n/bin/busybox reboot -f\n").write(toFile: initPath, atomically: true, encoding: .utf8)
        let r = try run(repoRoot + "/Scripts/make-initramfs", [out, "--init-script", initPath])
        guard r.status == 0 else { throw FixtureError("make-initramfs failed: \(r.stderr)") }
        return out
    }

    struct Result {
        var status: Int32; var stdoutData: Data; var stderr: String; var seconds: Double
        var stdout: String { String(decoding: stdoutData, as: UTF8.self) }
    }

    /// Damages a (read-only) snapshot file for a test: cuts it to `size` bytes.
    static func truncate(_ path: String, to size: UInt64) throws {
        chmod(path, 0o644)
        let fh = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        try fh.truncate(atOffset: size)
        try fh.close()
    }

    /// Damages a (read-only) snapshot file for a test: writes `bytes` at its start.
    static func overwrite(_ path: String, with bytes: [UInt8]) throws {
        chmod(path, 0o644)
        let fh = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        try fh.write(contentsOf: Data(bytes))
        try fh.close()
    }

    /// Damages a (read-only) snapshot file for a test: zeroes `count` bytes at `offset`.
    static func zeroFill(_ path: String, from offset: UInt64, count: Int) throws {
        chmod(path, 0o644)
        let fh = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        try fh.seek(toOffset: offset)
        try fh.write(contentsOf: Data(count: count))
        try fh.close()
    }

    /// Rewrites a text file through `change`.
    static func edit(_ path: String, _ change: (inout String) throws -> Void) throws {
        var text = try String(contentsOfFile: path, encoding: .utf8)
        try change(&text)
        try text.write(toFile: path, atomically: true, encoding: .utf8)
    }

    /// `stderr` without the lines a run prints when it makes (or waits for) its start
    /// snapshot, which only the first run of a shape prints.
    static func withoutStartProgress(_ stderr: String) -> String {
        stderr.split(separator: "\n", omittingEmptySubsequences: false).filter { l in
            !(l.hasPrefix("sandbox: making the start snapshot") || l.hasPrefix("sandbox: start snapshot made in")
              || l.hasPrefix("sandbox: waiting for another process that is making the start snapshot"))
        }.joined(separator: "\n")
    }

    /// The library's cache directory (as the CLI computes it).
    static var cacheDirectory: String { SandboxPaths.cacheDirectory }

    /// Hex SHA-256 of `data` (via sha256sum).
    static func sha256(_ data: Data) throws -> String {
        let path = NSTemporaryDirectory() + "sandbox-sha-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try data.write(to: URL(fileURLWithPath: path))
        defer { try? FileManager.default.removeItem(atPath: path) }
        return try sha256(file: path)
    }

    /// Hex SHA-256 of the file at `path` (via sha256sum, streaming: images are large).
    static func sha256(file path: String) throws -> String {
        let r = try run("/usr/bin/sha256sum", [path])
        guard r.status == 0, r.stdout.count >= 64 else { throw CocoaError(.fileReadUnknown, userInfo: [NSFilePathErrorKey: path]) }
        return String(r.stdout.prefix(64))
    }

    /// Runs a program to completion, capturing its output.
    static func run(_ path: String, _ args: [String], timeout: Double = 300, stdinFile: String? = nil,
                    environment: [String: String] = [:]) throws -> Result {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = args
        if !environment.isEmpty {
            p.environment = ProcessInfo.processInfo.environment.merging(environment) { _, new in new }
        }
        let base = NSTemporaryDirectory() + "sandbox-it-run-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        FileManager.default.createFile(atPath: base + ".out", contents: nil)
        FileManager.default.createFile(atPath: base + ".err", contents: nil)
        defer { try? FileManager.default.removeItem(atPath: base + ".out"); try? FileManager.default.removeItem(atPath: base + ".err") }
        p.standardOutput = FileHandle(forWritingAtPath: base + ".out")
        p.standardError = FileHandle(forWritingAtPath: base + ".err")
        p.standardInput = stdinFile.flatMap { FileHandle(forReadingAtPath: $0) } ?? FileHandle.nullDevice
        let start = Date()
        try p.run()
        let killer = DispatchWorkItem { [p] in if p.isRunning { p.terminate() } }
        DispatchQueue.global().asyncAfter(deadline: .now() + timeout, execute: killer)
        p.waitUntilExit()
        killer.cancel()
        let outData = FileManager.default.contents(atPath: base + ".out") ?? Data()
        let errData = FileManager.default.contents(atPath: base + ".err") ?? Data()
        return Result(status: p.terminationStatus, stdoutData: outData,
                      stderr: String(decoding: errData, as: UTF8.self), seconds: Date().timeIntervalSince(start))
    }
}

struct FixtureError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}
