import Foundation

/// How many sandboxes a host can hold at once, and why.
///
/// The limit is the smallest of three bounds:
///
///     explicit   the caller's limit (nil = none)
///     cpu        host CPUs * vcpuOvercommit / vCPUs per sandbox
///     memory     (MemAvailable - reserve) / (guest memory + VMM overhead)
///
/// and never less than 1 (a pool that can run nothing would hang its callers; on a
/// host short of memory one sandbox at a time is the best it can do).
///
/// `vcpuOvercommit` is 2: test commands spend much of their time blocked (I/O, boot,
/// the agent round trip), so two runnable vCPUs per host CPU keeps the CPUs busy
/// without the long scheduling delays that make timeouts flaky. Guest memory is
/// counted in full although KVM only backs pages the guest touches: a busy guest can
/// touch all of it, and overcommitting memory ends in the host's OOM killer.
public struct SandboxPoolLimits: Sendable, Equatable, CustomStringConvertible {
    /// Runnable vCPUs allowed per host CPU.
    public static let vcpuOvercommit = 2
    /// Host memory kept free for everything else (the test runner, the compiler, ...).
    public static let defaultReserveMiB: UInt64 = 1024
    /// Host memory one VMM process uses besides guest memory (its own heap, the
    /// overlay's page cache, the virtqueue buffers). A debug-built VMM running a busybox
    /// `sleep` measured 44 MiB RSS, half of it shared library pages, guest pages included.
    public static let vmmOverheadMiB: UInt64 = 48

    /// The caller's limit, if any.
    public var explicitLimit: Int?
    /// The bound from CPUs.
    public var cpuLimit: Int
    /// The bound from memory; nil when `/proc/meminfo` could not be read.
    public var memoryLimit: Int?

    /// The number of sandboxes that may run at once (at least 1).
    public var maxConcurrent: Int {
        max(1, [explicitLimit, cpuLimit, memoryLimit].compactMap { $0 }.min() ?? 1)
    }

    public init(explicitLimit: Int?, cpuLimit: Int, memoryLimit: Int?) {
        self.explicitLimit = explicitLimit
        self.cpuLimit = cpuLimit
        self.memoryLimit = memoryLimit
    }

    /// Computes the limits from host facts (pure; tests pass a fake meminfo).
    /// - Parameters:
    ///   - explicitLimit: the caller's limit; nil = only the host bounds.
    ///   - hostCPUs: online CPUs.
    ///   - meminfo: the text of `/proc/meminfo`; nil (or no `MemAvailable`) = no memory bound.
    ///   - sandboxMemoryMiB: guest memory of one sandbox.
    ///   - sandboxCPUs: vCPUs of one sandbox.
    ///   - reserveMiB: host memory not to hand out.
    public static func compute(explicitLimit: Int?, hostCPUs: Int, meminfo: String?,
                               sandboxMemoryMiB: UInt64, sandboxCPUs: Int = 1,
                               reserveMiB: UInt64 = defaultReserveMiB) -> SandboxPoolLimits {
        let cpu = max(1, hostCPUs) * vcpuOvercommit / max(1, sandboxCPUs)
        var memory: Int?
        if let kib = meminfo.flatMap(memAvailableKiB) {
            let available = kib / 1024
            let usable = available > reserveMiB ? available - reserveMiB : 0
            memory = Int(usable / max(1, sandboxMemoryMiB + vmmOverheadMiB))
        }
        return SandboxPoolLimits(explicitLimit: explicitLimit, cpuLimit: cpu, memoryLimit: memory)
    }

    /// The limits for this host: `ProcessInfo.activeProcessorCount` and `/proc/meminfo`.
    public static func host(explicitLimit: Int? = nil, sandboxMemoryMiB: UInt64 = SandboxConfiguration().memoryMiB,
                            sandboxCPUs: Int = SandboxConfiguration().cpus,
                            reserveMiB: UInt64 = defaultReserveMiB) -> SandboxPoolLimits {
        compute(explicitLimit: explicitLimit, hostCPUs: ProcessInfo.processInfo.activeProcessorCount,
                meminfo: InputCheck.readText("/proc/meminfo"),
                sandboxMemoryMiB: sandboxMemoryMiB, sandboxCPUs: sandboxCPUs, reserveMiB: reserveMiB)
    }

    /// `MemAvailable` in KiB from the text of `/proc/meminfo` (`MemAvailable:  24071260 kB`).
    public static func memAvailableKiB(_ meminfo: String) -> UInt64? {
        for line in meminfo.split(whereSeparator: \.isNewline) where line.hasPrefix("MemAvailable:") {
            let fields = line.dropFirst("MemAvailable:".count).split(separator: " ")
            guard let value = fields.first.flatMap({ UInt64($0) }) else { return nil }
            switch fields.dropFirst().first?.lowercased() {
            case nil, "kb": return value
            case "mb": return value * 1024
            case "gb": return value * 1024 * 1024
            default: return nil
            }
        }
        return nil
    }

    public var description: String {
        "\(maxConcurrent) at once (explicit: \(explicitLimit.map(String.init) ?? "none"), cpu: \(cpuLimit), memory: \(memoryLimit.map(String.init) ?? "unknown"))"
    }
}
