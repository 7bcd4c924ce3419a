import CInit
import Glibc
import SystemShims

/// Reaps every child (as PID 1 also orphans re-parented to us) and keeps the wait
/// status of the children someone asked to track, so the exec'd command's status is
/// never lost to the general `waitpid(-1)` loop.
final class Reaper {
    /// signalfd readable when SIGCHLD is pending (SIGCHLD is blocked).
    let fd: Int32
    private var tracked: Set<pid_t> = []
    private var statuses: [pid_t: Int32] = [:]

    /// Blocks SIGCHLD, ignores SIGPIPE and opens the signalfd.
    init() throws(SystemError) {
        let fd = cinit_sigchld_fd()
        guard fd >= 0 else { throw SystemError("signalfd", errno: -fd) }
        self.fd = fd
    }

    /// Remembers the status of `pid` when it is reaped.
    func track(_ pid: pid_t) { tracked.insert(pid) }

    /// Drains the signalfd and reaps every exited child without blocking.
    func reap() {
        cinit_drain_signalfd(fd)
        while true {
            var status: Int32 = 0
            let pid = waitpid(-1, &status, WNOHANG)
            if pid > 0 {
                if tracked.remove(pid) != nil { statuses[pid] = status }
                continue
            }
            if pid < 0 && errno == EINTR { continue }
            break
        }
    }

    /// The wait status of a tracked child once it has been reaped (then forgotten).
    func takeStatus(_ pid: pid_t) -> Int32? { statuses.removeValue(forKey: pid) }

    /// Blocks until the tracked `pid` has exited and returns its status; nil if its
    /// status was lost (never a made-up "exited 0").
    func waitFor(_ pid: pid_t) -> Int32? {
        if let s = takeStatus(pid) { return s }
        var status: Int32 = 0
        while true {
            let r = waitpid(pid, &status, 0)
            if r == pid { tracked.remove(pid); return status }
            if r < 0 && errno == EINTR { continue }
            // ECHILD: already reaped by reap().
            reap()
            return takeStatus(pid)
        }
    }
}
