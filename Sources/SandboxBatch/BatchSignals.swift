import Sandbox
import SystemShims
#if canImport(Glibc)
import Glibc
#endif

/// SIGINT/SIGTERM handling for a batch: the handler only writes the signal number to a
/// pipe; a dedicated thread reads it and does the work (stopping the runner).
///
/// Why not `sigwait` or `signalfd` alone: under an async `main` (ArgumentParser's
/// `AsyncParsableCommand`) libdispatch parks the main thread in `sigsuspend` with an
/// empty mask, so a process-directed signal is always deliverable to that thread and
/// never stays pending for a `sigwait` thread or a `signalfd`. Blocking the signals in
/// our own threads is still done, so worker threads never see them.
public enum BatchSignals {
    /// Blocks SIGINT and SIGTERM in the calling thread (and the threads it starts later).
    public static func blockTermination() {
        var set = terminationSet()
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    /// Installs the SIGINT/SIGTERM handlers and starts the thread that calls
    /// `onFirst(signal)` for the first signal and `onRepeat(signal)` for each later one.
    /// A SIGINT ignored on entry (a background job of a non-interactive shell) stays ignored.
    /// - Throws: `SystemError` if the pipe or the thread cannot be created.
    public static func watch(onFirst: @escaping @Sendable (Int32) -> Void,
                             onRepeat: @escaping @Sendable (Int32) -> Void) throws {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw SystemError("pipe", errno: errno) }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        let readEnd = fds[0]
        signalPipeWriteEnd = fds[1]
        try NativeThread(name: "batch-signals") {
            var count = 0
            while true {
                var byte: UInt8 = 0
                let n = read(readEnd, &byte, 1)
                if n < 0 && errno == EINTR { continue }
                guard n == 1 else { return }
                count += 1
                if count == 1 { onFirst(Int32(byte)) } else { onRepeat(Int32(byte)) }
            }
        }.detach()  // lives as long as the process
        for sig in [SIGINT, SIGTERM] {
            var old = sigaction()
            sigaction(sig, nil, &old)
            // SIG_IGN is the handler value 1.
            if sig == SIGINT && unsafeBitCast(old.__sigaction_handler.sa_handler, to: Int.self) == 1 { continue }
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { sig in
                // Async-signal-safe: one write(2) of one byte to a pipe, errno preserved.
                let saved = errno
                var b = UInt8(truncatingIfNeeded: sig)
                _ = write(signalPipeWriteEnd, &b, 1)
                errno = saved
            }
            sigemptyset(&action.sa_mask)
            action.sa_flags = SA_RESTART
            sigaction(sig, &action, nil)
        }
    }

    private static func terminationSet() -> sigset_t {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        sigaddset(&set, SIGTERM)
        return set
    }
}

/// The pipe the signal handler writes to; set once before the handlers are installed.
nonisolated(unsafe) private var signalPipeWriteEnd: Int32 = -1
