import Foundation
import SandboxCore
import SystemShims

/// Range checks for every number a caller hands the library (CLI flags, job files, the
/// API), each with a message that names the input and the accepted range. Nothing
/// here traps: a value out of range is a `SandboxError` with code `.invalidInput`.
public enum InputCheck {
    /// The longest command timeout accepted: 30 days.
    public static let maxTimeoutSeconds: Double = 30 * 24 * 3600
    /// The most vCPUs one sandbox may have.
    public static let maxCPUs = 32
    /// The least guest memory a sandbox may have.
    public static let minMemoryMiB: UInt64 = 32
    /// The largest root disk a sandbox may have: 16 TiB.
    public static let maxDiskSizeMiB: UInt64 = 16 << 20

    /// A duration from a number of seconds as typed (`--timeout 2.5`, `timeout: 10`):
    /// finite, not negative, at most `max`. Zero means "none" (nil) when `zeroMeansNone`.
    public static func seconds(_ value: Double, name: String, max: Double = maxTimeoutSeconds,
                               zeroMeansNone: Bool = true) throws(SandboxError) -> Duration? {
        guard value.isFinite, value >= 0, value <= max else {
            throw SandboxError.invalidInput("\(name) must be a number of seconds from 0 to \(format(max)) (got \(format(value)))")
        }
        if value == 0 {
            if zeroMeansNone { return nil }
            throw SandboxError.invalidInput("\(name) must be more than 0 seconds")
        }
        return .nanoseconds(Int64((value * 1e9).rounded()))
    }

    /// Seconds in a `Duration`, which must be positive-or-zero and at most `max`.
    static func seconds(of d: Duration, name: String, max: Double = maxTimeoutSeconds) throws(SandboxError) -> Double {
        let s = SandboxRunner.seconds(d)
        guard s >= 0, s <= max else {
            throw SandboxError.invalidInput("\(name) must be from 0 to \(format(max)) seconds (got \(d))")
        }
        return s
    }

    /// Checks guest memory against the minimum and against what this host can hold:
    /// `MemAvailable` and, when this process is in a memory-limited cgroup (v2), the
    /// room left under its limit.
    public static func memory(_ mib: UInt64, name: String = "memory") throws(SandboxError) {
        guard mib >= minMemoryMiB else {
            throw SandboxError.invalidInput("\(name) \(mib) MiB is too little; the minimum is \(minMemoryMiB) MiB")
        }
        let available = hostMemoryAvailableMiB()
        if let limit = available.mib, mib > limit {
            throw SandboxError.invalidInput("\(name) \(mib) MiB is more than this host can give a guest: \(available.why); ask for at most \(limit) MiB")
        }
    }

    /// Checks a root disk size (MiB) against the limit; against the image's size when
    /// `imageBytes` is known.
    public static func diskSize(_ mib: UInt64, name: String = "diskSize", imageBytes: UInt64? = nil,
                                imageName: String = "the image") throws(SandboxError) {
        guard mib >= 1, mib <= maxDiskSizeMiB else {
            throw SandboxError.invalidInput("\(name) must be from 1 MiB to \(maxDiskSizeMiB) MiB (16 TiB) (got \(mib) MiB)")
        }
        if let imageBytes, mib << 20 < imageBytes {
            let imageMiB = (imageBytes + (1 << 20) - 1) >> 20
            throw SandboxError.invalidInput("\(name) \(mib) MiB is smaller than \(imageName) (\(imageMiB) MiB); a disk can only grow")
        }
    }

    /// Parses a size typed by a person: a whole number of MiB, or one with a unit
    /// (`512M`, `4G`, `1T`; `MiB`/`GiB`/`TiB` too, powers of 1024).
    public static func parseSizeMiB(_ text: String, name: String) throws(SandboxError) -> UInt64 {
        let t = text.trimmingCharacters(in: .whitespaces)
        let digits = t.prefix(while: { $0.isASCII && $0.isNumber })
        let unit = t.dropFirst(digits.count).lowercased()
        let shift: UInt64
        switch unit {
        case "", "m", "mb", "mib": shift = 0
        case "g", "gb", "gib": shift = 10
        case "t", "tb", "tib": shift = 20
        default:
            throw SandboxError.invalidInput("\(name) '\(text)' is not a size: use MiB (2048) or a unit (512M, 4G, 1T)")
        }
        guard let n = UInt64(digits), n <= maxDiskSizeMiB >> shift else {
            throw SandboxError.invalidInput("\(name) '\(text)' is not a size from 1 MiB to 16 TiB")
        }
        return n << shift
    }

    /// Checks a vCPU count.
    public static func cpus(_ n: Int, name: String = "cpus") throws(SandboxError) {
        guard n >= 1, n <= maxCPUs else {
            throw SandboxError.invalidInput("\(name) must be from 1 to \(maxCPUs) (got \(n))")
        }
    }

    /// Every number in `config`.
    static func check(_ config: SandboxConfiguration) throws(SandboxError) {
        if let t = config.timeout { _ = try seconds(of: t, name: "timeout") }
        try memory(config.memoryMiB)
        try cpus(config.cpus)
        if let d = config.diskSizeMiB { try diskSize(d) }
    }

    /// What the host can give one more guest, in MiB (nil = unknown), and how that was found.
    static func hostMemoryAvailableMiB(meminfo: String? = readText("/proc/meminfo"),
                                       cgroupRoom: UInt64? = cgroupRoomBytes()) -> (mib: UInt64?, why: String) {
        var best: UInt64?
        var reasons: [String] = []
        if let m = meminfo, let kib = SandboxPoolLimits.memAvailableKiB(m) {
            best = kib / 1024
            reasons.append("MemAvailable is \(kib / 1024) MiB")
        }
        if let room = cgroupRoom {
            let mib = room >> 20
            if best == nil || mib < best! { best = mib }
            reasons.append("the cgroup memory limit leaves \(mib) MiB")
        }
        return (best, reasons.isEmpty ? "unknown" : reasons.joined(separator: ", "))
    }

    /// Bytes left under this process's cgroup v2 memory.max (nil when unlimited or unknown).
    static func cgroupRoomBytes() -> UInt64? {
        guard let line = readText("/proc/self/cgroup")?.split(separator: "\n").first(where: { $0.hasPrefix("0::") }) else { return nil }
        let dir = "/sys/fs/cgroup" + line.dropFirst(3)
        guard let max = readText(dir + "/memory.max"), let limit = UInt64(max) else { return nil }  // "max" = no limit
        let current = readText(dir + "/memory.current").flatMap { UInt64($0) } ?? 0
        return limit > current ? limit - current : 0
    }

    /// A small file's text with the whitespace around it trimmed (nil: unreadable).
    static func readText(_ path: String) -> String? {
        readToEnd(path).map(textTrimmingBlanks)
    }

    static func format(_ v: Double) -> String {
        if v.isNaN { return "nan" }
        if v.isInfinite { return v > 0 ? "inf" : "-inf" }
        if v == v.rounded() && abs(v) < 1e15 { return String(Int64(v)) }
        return String(format: "%g", v)
    }
}
