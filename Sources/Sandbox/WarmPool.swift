import AgentProtocol
import Foundation
import SandboxCore
import Synchronization
import SystemShims
import VMMProtocol
#if canImport(Glibc)
import Glibc
#endif

/// Restored VMs kept waiting for runs: each a VMM process that has restored its snapshot,
/// with the guest agent connected, greeted and seeded (fresh entropy, the host's clock),
/// so that a run only sends its command. Off until ``SandboxRunner/keepWarm(_:count:)``
/// asks for VMs of a start; `sandbox batch` keeps `--parallel` of each of its starts.
///
/// One thread refills the pool in the background (it is also the VMM processes' parent:
/// they die with it, and with the process, through PR_SET_PDEATHSIG). A warm VM that
/// cannot be made is retried a few times, then its start is left to runs themselves
/// (which then report the real error). `drain()` stops and reaps every waiting VM.
final class WarmPool: Sendable {
    static let shared = WarmPool()

    /// What makes two starts interchangeable.
    struct Key: Hashable, Sendable {
        var snapshot: String
        var memoryMiB: UInt64
        var cpus: Int
        var vmmExecutable: String?
        var jail: Bool
    }

    /// A waiting VM.
    struct VM: Sendable {
        let vmm: VMMProcess
        let ready: VMMEvent
        let client: AgentClient
        /// When its VMM process was spawned, and when it became ready (greeted and seeded).
        let spawnedNanos: UInt64
        let readyNanos: UInt64
    }

    private struct Entry {
        var target = 0
        var waiting: [VM] = []
        var failures = 0
        var lastError: String?
        var config: VMMConfig
        /// Runs on VMs taken from here that have not ended yet, and when the last was taken.
        var running = 0
        var lastTakeNanos: UInt64 = 0
    }
    private struct State {
        var entries: [Key: Entry] = [:]
        var thread: NativeThread?
        var draining = false
    }
    private let state = Mutex(State())
    /// Wakes the refill thread. nil only when no eventfd could be made (descriptors
    /// exhausted): the pool then stays off and runs spawn their own VMMs.
    private let wake: EventFD?

    private init() {
        wake = try? EventFD(nonBlocking: true)
    }

    /// Starts no more than this many failed attempts in a row per start.
    static let maxFailures = 3
    /// How long a replacement waits for the run that took a VM to end, while another VM
    /// still waits for the next run: a restore (about 30 ms of CPU) made while a short
    /// command runs competes with it for the host's CPUs and makes that command slower
    /// (measured on 2 cores: a `true` on a warm VM took 20-35 ms with its replacement
    /// restored at once, ~15 ms without). When nothing else is waiting (a batch taking VMs
    /// as fast as they come), the replacement is made at once: holding it there cost a
    /// 300-job batch 12 % of its rate. Runs longer than this get their replacement while
    /// they run.
    static let refillHoldNanos: UInt64 = 100_000_000

    /// Keeps `count` VMs of `key` waiting (0 stops refilling it; waiting ones stay until
    /// taken or drained).
    func keep(_ key: Key, count: Int, config: VMMConfig) {
        guard let wake else { return }
        let start: Bool = state.withLock { s in
            var e = s.entries[key] ?? Entry(config: config)
            e.target = max(0, count)
            e.config = config
            e.failures = 0
            s.entries[key] = e
            s.draining = false
            return s.thread == nil
        }
        if start {
            let t = try? NativeThread(name: "warm-pool") { [self] in refillLoop() }
            state.withLock { $0.thread = t }
        }
        wake.signal()
    }

    /// A waiting VM of `key`, if there is one (and asks for a replacement).
    func take(_ key: Key) -> VM? {
        var dead: [VM] = []
        var kept = false
        let vm: VM? = state.withLock { s in
            guard var e = s.entries[key] else { return nil }
            kept = true
            defer { s.entries[key] = e }
            while !e.waiting.isEmpty {
                let v = e.waiting.removeFirst()
                if v.vmm.isAlive {
                    e.running += 1
                    e.lastTakeNanos = monotonicNanos()
                    return v
                }
                dead.append(v)
            }
            return nil
        }
        guard kept else { return nil }  // no start is kept warm: nothing to refill
        for d in dead { d.vmm.kill(); d.vmm.reap(patienceMillis: 1000) }
        wake?.signal()
        return vm
    }

    /// The run on a VM `take` gave for `key` has ended: its replacement need not wait.
    func release(_ key: Key) {
        state.withLock { s in
            if let r = s.entries[key]?.running, r > 0 { s.entries[key]?.running = r - 1 }
        }
        wake?.signal()
    }

    /// How many VMs of `key` are waiting.
    func waitingCount(_ key: Key) -> Int { state.withLock { $0.entries[key]?.waiting.count ?? 0 } }

    /// Why the pool gave up on `key`, if it did.
    func lastError(_ key: Key) -> String? { state.withLock { $0.entries[key]?.lastError } }

    /// Stops refilling and stops every waiting VM (reaping its process).
    func drain() {
        let vms: [VM] = state.withLock { s in
            s.draining = true
            var all: [VM] = []
            for k in s.entries.keys {
                all += s.entries[k]!.waiting
                s.entries[k]!.waiting = []
                s.entries[k]!.target = 0
            }
            return all
        }
        for v in vms { v.vmm.requestStop() }
        for v in vms { v.vmm.reap(patienceMillis: 2000) }
    }

    private func refillLoop() {
        while true {
            // The next start below its target, if any, unless a run just took one of its
            // VMs and is still going (then its replacement waits up to refillHoldNanos).
            let (next, holdMillis): ((Key, VMMConfig)?, Int32) = state.withLock { s in
                guard !s.draining else { return (nil, 1000) }
                let now = monotonicNanos()
                var hold: UInt64 = 1_000_000_000
                for (k, e) in s.entries where e.waiting.count < e.target && e.failures < Self.maxFailures {
                    let since = now &- e.lastTakeNanos
                    if e.running > 0 && since < Self.refillHoldNanos && !e.waiting.isEmpty {
                        hold = min(hold, Self.refillHoldNanos - since)
                        continue
                    }
                    return ((k, e.config), 0)
                }
                return (nil, Int32(max(1, hold / 1_000_000)))
            }
            guard let (key, config) = next else {
                if let wake {
                    _ = waitReadable(wake.fd.rawValue, timeoutMillis: holdMillis)
                    _ = try? wake.tryWait()
                }
                continue
            }
            switch Self.make(key, config) {
            case .success(let vm):
                let keep: Bool = state.withLock { s in
                    guard !s.draining, var e = s.entries[key], e.waiting.count < e.target else { return false }
                    e.waiting.append(vm)
                    e.failures = 0
                    s.entries[key] = e
                    return true
                }
                if !keep { vm.vmm.requestStop(); vm.vmm.reap(patienceMillis: 2000) }
            case .failure(let error):
                state.withLock { s in
                    s.entries[key]?.failures += 1
                    s.entries[key]?.lastError = "\(error)"
                }
                usleep(200_000)
            }
        }
    }

    /// Spawns a VMM restoring `key`'s snapshot and gets its agent ready for a command.
    static func make(_ key: Key, _ config: VMMConfig) -> Result<VM, SandboxError> {
        let t0 = monotonicNanos()
        let vmm: VMMProcess
        do { vmm = try VMMProcess.spawn(config, executable: key.vmmExecutable) } catch { return .failure(error) }
        guard let ready = vmm.nextEvent(timeoutMillis: 30_000), ready.kind == .ready else {
            vmm.kill()
            let why = vmm.outcomeForEarlyEnd(nil)
            vmm.reap(patienceMillis: 2000)
            return .failure(SandboxError(.snapshot, "a warm VM of \(key.snapshot) did not come up: \(why)"))
        }
        let client = AgentClient(fd: vmm.agent)
        let watchdog = try? Watchdog(after: 30) { [vmm] in vmm.kill() }
        defer { watchdog?.cancel() }
        do {
            _ = try client.greet(seed: true)
        } catch {
            vmm.kill()
            vmm.reap(patienceMillis: 2000)
            return .failure(.from(error, code: .agent, context: "the agent of a warm VM did not answer"))
        }
        return .success(VM(vmm: vmm, ready: ready, client: client, spawnedNanos: t0, readyNanos: monotonicNanos()))
    }
}
