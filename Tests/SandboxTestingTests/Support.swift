import Foundation
import SandboxTesting

/// Whether this machine can boot sandboxes (the real-VM tests are skipped otherwise).
let kvmAvailable = FileManager.default.isWritableFile(atPath: "/dev/kvm")

/// Counts how many fake runs overlap and in which order they started.
actor ConcurrencyTracker {
    private(set) var current = 0
    private(set) var maximum = 0
    private(set) var started: [String] = []

    func enter(_ name: String) {
        current += 1
        maximum = max(maximum, current)
        started.append(name)
    }

    func leave() { current -= 1 }
}

/// A latch fake runs wait on until the test opens it.
actor Gate {
    private var isOpen = false
    private var waiters: [CheckedContinuation<Void, Never>] = []

    func wait() async {
        if isOpen { return }
        await withCheckedContinuation { waiters.append($0) }
    }

    func open() {
        isOpen = true
        for w in waiters { w.resume() }
        waiters = []
    }
}

/// Limits with only an explicit bound (no host facts).
func fixedLimits(_ n: Int) -> SandboxPoolLimits {
    SandboxPoolLimits(explicitLimit: n, cpuLimit: 1000, memoryLimit: nil)
}

/// Waits (politely) until `condition` holds, at most ~5 s.
func eventually(_ condition: () -> Bool) async -> Bool {
    for _ in 0..<5000 {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(1))
    }
    return condition()
}
