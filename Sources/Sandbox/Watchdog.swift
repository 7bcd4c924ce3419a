import Synchronization
import SystemShims

/// Runs an action once when a deadline passes, unless cancelled first: the host's own
/// bound on a run, which holds whatever the VMM or the guest does (a stopped VMM, a
/// guest that ignores its timeout, a fork bomb that starves the agent).
final class Watchdog: Sendable {
    private let wake: EventFD
    private let thread: Mutex<NativeThread?>
    private let firedFlag = Flag()

    private final class Flag: Sendable {
        let value = Atomic<Bool>(false)
    }

    /// Arms the watchdog: `action` runs on its own thread after `seconds`.
    init(after seconds: Double, action: @escaping @Sendable () -> Void) throws(SystemError) {
        let wake = try EventFD()
        self.wake = wake
        thread = Mutex(nil)
        let deadline = monotonicNanos() + UInt64(max(0, seconds) * 1e9)
        let t = try NativeThread(name: "watchdog") { [firedFlag] in
            while true {
                let now = monotonicNanos()
                if now >= deadline { break }
                let millis = Int32(min((deadline - now) / 1_000_000 + 1, 60_000))
                if waitReadable(wake.fd.rawValue, timeoutMillis: millis) { return }  // cancelled
            }
            firedFlag.value.store(true, ordering: .sequentiallyConsistent)
            action()
        }
        thread.withLock { $0 = t }
    }

    /// Whether the deadline passed and the action ran (or is running).
    var fired: Bool { firedFlag.value.load(ordering: .sequentiallyConsistent) }

    /// Disarms it (if it has not fired) and waits for its thread. Idempotent.
    func cancel() {
        wake.signal()
        let t = thread.withLock { t -> NativeThread? in defer { t = nil }; return t }
        t?.join()
    }

    deinit { cancel() }
}
