import Foundation
import SandboxTesting
import Testing

@Suite struct PoolLimitTests {
    let meminfo4GiB = """
        MemTotal:        8000000 kB
        MemFree:          100000 kB
        MemAvailable:    4194304 kB
        Buffers:           10000 kB
        """

    @Test func parsesMemAvailable() {
        #expect(SandboxPoolLimits.memAvailableKiB(meminfo4GiB) == 4_194_304)
        #expect(SandboxPoolLimits.memAvailableKiB("MemTotal: 5 kB\n") == nil)
        #expect(SandboxPoolLimits.memAvailableKiB("MemAvailable: lots\n") == nil)
    }

    @Test func cpuBoundIsTwiceTheHostCPUs() {
        let l = SandboxPoolLimits.compute(explicitLimit: nil, hostCPUs: 2, meminfo: meminfo4GiB, sandboxMemoryMiB: 256)
        // memory: (4096 - 1024) / (256 + 48) = 10; cpu: 2 * 2 = 4
        #expect(l.memoryLimit == 10)
        #expect(l.cpuLimit == 4)
        #expect(l.maxConcurrent == 4)
    }

    @Test func memoryBoundWins() {
        let l = SandboxPoolLimits.compute(explicitLimit: nil, hostCPUs: 64, meminfo: meminfo4GiB, sandboxMemoryMiB: 1024)
        #expect(l.memoryLimit == 2) // 3072 / 1072
        #expect(l.maxConcurrent == 2)
    }

    @Test func explicitLimitWins() {
        let l = SandboxPoolLimits.compute(explicitLimit: 3, hostCPUs: 64, meminfo: meminfo4GiB, sandboxMemoryMiB: 128)
        #expect(l.maxConcurrent == 3)
    }

    @Test func multiVCPUSandboxesCountEachVCPU() {
        let l = SandboxPoolLimits.compute(explicitLimit: nil, hostCPUs: 4, meminfo: nil, sandboxMemoryMiB: 256, sandboxCPUs: 2)
        #expect(l.cpuLimit == 4)
        #expect(l.memoryLimit == nil)
    }

    @Test func neverBelowOne() {
        let starved = "MemAvailable:     512000 kB\n" // less than the reserve
        let l = SandboxPoolLimits.compute(explicitLimit: 0, hostCPUs: 1, meminfo: starved, sandboxMemoryMiB: 256)
        #expect(l.memoryLimit == 0)
        #expect(l.maxConcurrent == 1)
    }

    @Test func hostLimitsAreSane() {
        let l = SandboxPoolLimits.host()
        #expect(l.maxConcurrent >= 1)
        #expect(l.cpuLimit == ProcessInfo.processInfo.activeProcessorCount * SandboxPoolLimits.vcpuOvercommit)
    }
}

@Suite struct PoolSchedulingTests {
    @Test func respectsTheLimit() async {
        let tracker = ConcurrencyTracker()
        let pool = SandboxPool(limits: fixedLimits(3)) { command, _, _ in
            await tracker.enter(command[0])
            try? await Task.sleep(for: .milliseconds(Int.random(in: 5...25)))
            await tracker.leave()
            return ExecResult(command: command, outcome: .exited(0))
        }
        await withTaskGroup(of: ExecResult.self) { group in
            for i in 0..<20 { group.addTask { await pool.run(["job\(i)"]) } }
            for await r in group { #expect(r.outcome == .exited(0)) }
        }
        #expect(await tracker.maximum == 3)
        #expect(await tracker.started.count == 20)
        #expect(pool.runningCount == 0)
        #expect(pool.queuedCount == 0)
    }

    @Test func servesWaitersInArrivalOrder() async {
        let tracker = ConcurrencyTracker()
        let gate = Gate()
        let pool = SandboxPool(limits: fixedLimits(1)) { command, _, _ in
            await tracker.enter(command[0])
            if command[0] == "holder" { await gate.wait() }
            await tracker.leave()
            return ExecResult(command: command, outcome: .exited(0))
        }
        let holder = Task { await pool.run(["holder"]) }
        #expect(await eventually { pool.runningCount == 1 })
        var tasks: [Task<ExecResult, Never>] = []
        for i in 1...6 {
            tasks.append(Task { await pool.run(["w\(i)"]) })
            #expect(await eventually { pool.queuedCount == i })
        }
        await gate.open()
        _ = await holder.value
        for t in tasks { _ = await t.value }
        #expect(await tracker.started == ["holder", "w1", "w2", "w3", "w4", "w5", "w6"])
        #expect(await tracker.maximum == 1)
    }

    @Test func cancelledWaiterLeavesTheQueue() async {
        let tracker = ConcurrencyTracker()
        let gate = Gate()
        let pool = SandboxPool(limits: fixedLimits(1)) { command, _, _ in
            await tracker.enter(command[0])
            if command[0] == "holder" { await gate.wait() }
            await tracker.leave()
            return ExecResult(command: command, outcome: .exited(0))
        }
        let holder = Task { await pool.run(["holder"]) }
        #expect(await eventually { pool.runningCount == 1 })
        let a = Task { await pool.run(["a"]) }
        #expect(await eventually { pool.queuedCount == 1 })
        let b = Task { await pool.run(["b"]) }
        #expect(await eventually { pool.queuedCount == 2 })

        a.cancel()
        let ra = await a.value // returns while the holder still holds the only slot
        #expect(ra.outcome == .infrastructureError(.cancelled))
        #expect(pool.queuedCount == 1)
        #expect(pool.runningCount == 1)

        await gate.open()
        #expect(await holder.value.outcome == .exited(0))
        #expect(await b.value.outcome == .exited(0))
        #expect(await tracker.started == ["holder", "b"])
        #expect(pool.runningCount == 0)
    }

    @Test func alreadyCancelledCallerDoesNotRun() async {
        let tracker = ConcurrencyTracker()
        let pool = SandboxPool(limits: fixedLimits(2)) { command, _, _ in
            await tracker.enter(command[0])
            await tracker.leave()
            return ExecResult(command: command, outcome: .exited(0))
        }
        let t = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            return await pool.run(["never"])
        }
        #expect(await t.value.outcome == .infrastructureError(.cancelled))
        #expect(await tracker.started.isEmpty)
        #expect(pool.runningCount == 0)
    }

    @Test func cancelledRunReleasesItsSlot() async {
        let pool = SandboxPool(limits: fixedLimits(1)) { command, _, _ in
            guard command[0] == "long" else { return ExecResult(command: command, outcome: .exited(0)) }
            // Like Sandbox.run: a cancelled run stops early and says so.
            do { try await Task.sleep(for: .seconds(60)) } catch {
                return ExecResult(command: command, outcome: .infrastructureError(.cancelled))
            }
            return ExecResult(command: command, outcome: .exited(0))
        }
        let long = Task { await pool.run(["long"]) }
        #expect(await eventually { pool.runningCount == 1 })
        long.cancel()
        #expect(await long.value.outcome == .infrastructureError(.cancelled))
        #expect(pool.runningCount == 0)
        // The slot is free again: a new run does not wait.
        #expect(await pool.run(["next"]).outcome == .exited(0))
    }

    @Test func withSlotCountsAsARun() async throws {
        let pool = SandboxPool(limits: fixedLimits(1)) { c, _, _ in ExecResult(command: c, outcome: .exited(0)) }
        let inside = try await pool.withSlot { pool.runningCount }
        #expect(inside == 1)
        #expect(pool.runningCount == 0)
    }
}
