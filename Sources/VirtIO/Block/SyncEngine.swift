#if canImport(Glibc)
import Glibc
#endif
import SystemShims

/// Block I/O with pread/pwrite/fdatasync, one call per segment. Used only when
/// io_uring is unavailable (see `BlockEngineKind.auto`).
public final class SyncEngine: BlockIOEngine {
    public init() {}

    public var kind: BlockEngineKind { .sync }

    public func perform(_ operations: [IOOperation]) -> [Int32] {
        operations.map { op -> Int32 in
            do throws(SystemError) {
                try Self.perform(op, from: 0)
                return 0
            } catch {
                return -error.errno
            }
        }
    }

    /// Finishes `op` synchronously from byte `done` on (also used by the io_uring
    /// engine for short transfers).
    static func perform(_ op: IOOperation, from done: Int) throws(SystemError) {
        switch op.kind {
        case .fdatasync:
            try retryingEINTR("fdatasync") { fdatasync(op.fd) }
        case .read:
            guard done < op.length, let base = op.buffer else { return }
            // SAFETY: the caller owns `op.buffer` with `op.length` bytes for this call.
            try readFully(fd: op.fd, into: UnsafeMutableRawBufferPointer(start: base + done, count: op.length - done),
                          at: op.offset + UInt64(done))
        case .write:
            var written = done
            guard let base = op.buffer else { return }
            while written < op.length {
                // SAFETY: as above; [written, length) is inside the buffer.
                let n = try retryingEINTR("pwrite") {
                    pwrite(op.fd, base + written, op.length - written, off_t(op.offset + UInt64(written)))
                }
                if n == 0 { throw SystemError("pwrite", errno: EIO) }
                written += n
            }
        }
    }

    /// Reads all of `buffer` at `offset`; bytes past end of file are zero-filled.
    static func readFully(fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SystemError) {
        var done = 0
        while done < buffer.count {
            // SAFETY: [done, count) lies inside `buffer`.
            let n = try retryingEINTR("pread") {
                pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset + UInt64(done)))
            }
            if n == 0 {
                // End of file: the rest of the disk range reads as zeros.
                UnsafeMutableRawBufferPointer(rebasing: buffer[done...]).initializeMemory(as: UInt8.self, repeating: 0)
                return
            }
            done += n
        }
    }
}
