#if canImport(Glibc)
import Glibc
#endif
import CURing
import Synchronization
import SystemShims

/// Block I/O through io_uring: all operations of one batch (every segment of every
/// request popped in one notify round) are queued, submitted with one
/// `io_uring_enter`, and reaped on the device worker thread, which waits for them
/// with `submit_and_wait` (vCPU threads never wait on I/O). Short transfers are
/// finished with pread/pwrite.
public final class IOUringEngine: BlockIOEngine, Sendable {
    private let entries: Int
    private struct State {
        /// The ring (not thread-safe): only used inside `state.withLock`.
        let ring: OpaquePointer
        /// Set when a submission failed part-way; the ring is then never used again.
        var poisoned = false
    }
    private let state: Mutex<State>

    /// Creates a ring with `entries` submission slots (batches larger than that are
    /// submitted in several rounds).
    public init(entries: UInt32 = 128) throws(SystemError) {
        var err: Int32 = 0
        guard let r = curing_create(entries, &err) else { throw SystemError("io_uring_queue_init", errno: -err) }
        state = Mutex(State(ring: r))
        self.entries = Int(entries)
    }

    deinit { state.withLock { curing_destroy($0.ring) } }

    public var kind: BlockEngineKind { .ioUring }

    public func perform(_ operations: [IOOperation]) -> [Int32] {
        state.withLock { s in
            var results = [Int32](repeating: 0, count: operations.count)
            var start = 0
            if s.poisoned {
                return operations.map { syncFallback($0, from: 0) }
            }
            while start < operations.count {
                let end = min(start + entries, operations.count)
                runChunk(&s, operations, start ..< end, &results)
                start = end
            }
            return results
        }
    }

    /// Submits operations[range], waits for all of their completions and stores results.
    /// Called inside `state.withLock`.
    private func runChunk(_ s: inout State, _ ops: [IOOperation], _ range: Range<Int>, _ results: inout [Int32]) {
        let ring = s.ring
        var queued: [Int] = []
        for i in range {
            let op = ops[i]
            let rc: Int32
            switch op.kind {
            case .read:
                // SAFETY: the caller keeps `op.buffer` (op.length bytes) alive until perform returns,
                // and we wait for every queued completion before returning.
                rc = curing_prep_read(ring, op.fd, op.buffer, UInt32(op.length), op.offset, UInt64(i))
            case .write:
                // SAFETY: as above.
                rc = curing_prep_write(ring, op.fd, op.buffer, UInt32(op.length), op.offset, UInt64(i))
            case .fdatasync:
                rc = curing_prep_fsync(ring, op.fd, UInt64(i))
            }
            if rc == 0 { queued.append(i) } else { results[i] = syncFallback(op, from: 0) }
        }
        guard !queued.isEmpty else { return }
        var rc: Int32
        repeat { rc = curing_submit_and_wait(ring, UInt32(queued.count)) } while rc == -EINTR
        let submitted = rc < 0 ? 0 : min(Int(rc), queued.count)
        if submitted < queued.count {
            // The kernel consumes SQEs in order; the rest stay in the SQ. Never submit
            // on this ring again (those SQEs point at buffers we are about to reuse),
            // and finish them synchronously.
            s.poisoned = true
            for i in queued[submitted...] { results[i] = syncFallback(ops[i], from: 0) }
        }
        var outstanding = submitted
        var userData = [UInt64](repeating: 0, count: max(outstanding, 1))
        var res = [Int32](repeating: 0, count: max(outstanding, 1))
        var failedWaits = 0
        while outstanding > 0 {
            var n = Int(curing_reap(ring, &userData, &res, Int32(outstanding)))
            if n == 0 {
                // Must not return while the kernel still owns buffers: keep waiting, but
                // not forever. A wait that keeps failing (a broken ring) would otherwise
                // spin this thread at 100% CPU; after 10 s of it the VMM stops, which
                // the library reports, rather than reuse buffers the kernel may write.
                let rc = curing_wait_one(ring, &userData, &res)
                if rc != 0 {
                    failedWaits += 1
                    precondition(failedWaits < 10_000, "io_uring: waiting for \(outstanding) completions failed \(failedWaits) times (last errno \(-rc)); stopping the VMM rather than reusing buffers the kernel may still own")
                    usleep(1000)
                    continue
                }
                failedWaits = 0
                n = 1
            }
            for k in 0 ..< n {
                let i = Int(userData[k])
                results[i] = complete(ops[i], result: res[k])
            }
            outstanding -= n
        }
    }

    /// Turns a completion into 0 / -errno, finishing short transfers synchronously.
    private func complete(_ op: IOOperation, result: Int32) -> Int32 {
        if result < 0 {
            // EAGAIN/EINTR from the ring: retry the whole operation synchronously.
            return result == -EAGAIN || result == -EINTR ? syncFallback(op, from: 0) : result
        }
        if op.kind == .fdatasync || Int(result) >= op.length { return 0 }
        return syncFallback(op, from: Int(result))
    }

    private func syncFallback(_ op: IOOperation, from done: Int) -> Int32 {
        do {
            try SyncEngine.perform(op, from: done)
            return 0
        } catch {
            return -error.errno
        }
    }
}
