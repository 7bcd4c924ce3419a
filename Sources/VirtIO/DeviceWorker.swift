#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import SystemShims

/// One thread per device that waits on the device's queue-notify eventfds (which
/// either the transport signals on a QueueNotify MMIO exit, or KVM signals directly
/// through KVM_IOEVENTFD) and calls the handler for each signalled queue. It also runs
/// the device's lifecycle work (reset, activation) that a vCPU hands it through the
/// control eventfd, before any doorbell of the same wake-up. vCPU threads never wait
/// on device I/O.
final class DeviceWorker: Sendable {
    private let notifiers: [EventFD]
    private let stopEvent: EventFD
    /// Signalled when lifecycle work is pending (see `MMIOTransport`).
    let controlEvent: EventFD
    private let handler: @Sendable (Int) -> Void
    private let control: @Sendable () -> Void
    private struct State {
        var thread: NativeThread? = nil
    }
    private let state = Mutex(State())

    /// - Parameters:
    ///   - notifiers: one non-blocking eventfd per queue.
    ///   - control: called on the worker thread when `controlEvent` was signalled.
    ///   - handler: called on the worker thread with the queue index.
    init(notifiers: [EventFD], control: @escaping @Sendable () -> Void,
         handler: @escaping @Sendable (Int) -> Void) throws(SystemError) {
        self.notifiers = notifiers
        self.stopEvent = try EventFD(nonBlocking: true)
        self.controlEvent = try EventFD(nonBlocking: true)
        self.control = control
        self.handler = handler
    }

    /// Whether the thread is running.
    var isRunning: Bool { state.withLock { $0.thread != nil } }

    /// Starts the thread (no-op if running).
    func start() throws(SystemError) {
        try state.withLock { (s: inout State) throws(SystemError) in
            guard s.thread == nil else { return }
            stopEvent.wait()  // drain a stale stop request
            s.thread = try NativeThread(name: "virtio-worker") { [self] in run() }
        }
    }

    /// Stops and joins the thread (no-op if not running). Must not be called from
    /// the worker thread itself.
    func stop() {
        let t: NativeThread? = state.withLock { s in
            let t = s.thread
            s.thread = nil
            return t
        }
        guard let t else { return }
        stopEvent.signal()
        t.join()
    }

    private func run() {
        var fds = [pollfd(fd: stopEvent.fd.rawValue, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: controlEvent.fd.rawValue, events: Int16(POLLIN), revents: 0)]
        for n in notifiers { fds.append(pollfd(fd: n.fd.rawValue, events: Int16(POLLIN), revents: 0)) }
        while true {
            for i in fds.indices { fds[i].revents = 0 }
            let rc = poll(&fds, nfds_t(fds.count), -1)
            if rc < 0 {
                if errno == EINTR { continue }
                return  // cannot happen with valid descriptors; stop serving rather than spin
            }
            if fds[0].revents != 0 { return }
            // Lifecycle work first: a doorbell in the same wake-up may be for the queues
            // an activation brings up.
            if fds[1].revents != 0, controlEvent.wait() > 0 { control() }
            for i in 2..<fds.count where fds[i].revents != 0 {
                if notifiers[i - 2].wait() > 0 { handler(i - 2) }
            }
        }
    }
}
