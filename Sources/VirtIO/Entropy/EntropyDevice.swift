import GuestMemory
import Synchronization
import SystemShims

/// A virtio entropy device (virtio-rng, device ID 4; virtio spec 5.4): one request queue
/// of device-writable buffers, each filled with bytes from the host kernel's random source
/// (getrandom). The guest kernel uses it as a hardware RNG (`/dev/hwrng`, mixed into its
/// own pool by the hwrng thread), so every VM, restored ones included, draws entropy the
/// host made for it and no other.
///
/// The guest is hostile: a chain with device-readable buffers breaks the device's rules
/// (DEVICE_NEEDS_RESET); at most `maxBytesPerRequest` bytes go into one chain whatever its
/// size (the used length says how many); the interrupt is raised after at most a queue's
/// worth of answers, however fast the guest posts new requests.
public final class EntropyDevice: VirtioDevice, Sendable {
    /// The most bytes one request gets (Linux asks for 64 at a time).
    public static let maxBytesPerRequest = 4096

    public let deviceType: UInt32 = 4
    public let deviceFeatures: UInt64 = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX
    public let queueMaxSizes: [UInt16]

    private struct State {
        var memory: GuestMemory?
        var queue: VirtQueue?
        var interrupt: VirtioInterrupt?
        var broken = false
        var lastError: String?
        /// Bytes handed to the guest since activation.
        var served: UInt64 = 0
    }
    private let state = Mutex(State())

    public init(queueSize: UInt16 = 64) {
        precondition(queueSize >= 2 && queueSize & (queueSize - 1) == 0)
        queueMaxSizes = [queueSize]
    }

    /// Why the device set DEVICE_NEEDS_RESET, if it did.
    public var lastError: String? { state.withLock { $0.lastError } }
    /// Random bytes written into guest buffers since the driver activated the device.
    public var bytesServed: UInt64 { state.withLock { $0.served } }

    // MARK: VirtioDevice

    public func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        // No configuration space.
        readConfigSpace(UnsafeRawBufferPointer(start: nil, count: 0), offset: offset, into: data)
    }

    public func writeConfig(offset: Int, from data: UnsafeRawBufferPointer) {}

    public func acceptsFeatures(_ features: UInt64) -> Bool { true }

    public func activate(memory: GuestMemory, queues: [VirtQueue], features: UInt64, interrupt: VirtioInterrupt) throws {
        guard queues.count == 1, queues[0].ready else { throw VirtQueueError.notReady }
        state.withLock { s in
            s.memory = memory
            s.queue = queues[0]
            s.interrupt = interrupt
            s.broken = false
            s.served = 0
            // A restored device may have requests the guest posted before the snapshot:
            // they are answered now, or the guest's reader would wait for ever.
            processQueue(&s)
        }
    }

    public func queueNotify(_ index: Int) {
        guard index == 0 else { return }
        state.withLock { s in processQueue(&s) }
    }

    public func reset() {
        state.withLock { s in
            s.memory = nil
            s.queue = nil
            s.interrupt = nil
            s.broken = false
            s.lastError = nil
            s.served = 0
        }
    }

    public func queueStates() -> [VirtQueueState]? {
        state.withLock { s in s.queue.map { [$0.state] } }
    }

    // MARK: Requests (inside `state.withLock`)

    private struct FatalError: Error { var reason: String }

    private func processQueue(_ s: inout State) {
        guard var q = s.queue, let memory = s.memory, let interrupt = s.interrupt, !s.broken else { return }
        var bytes = [UInt8](repeating: 0, count: Self.maxBytesPerRequest)
        do {
            repeat {
                var answered = 0
                // At most a queue's worth between interrupts.
                while answered < Int(q.size), let chain = try q.popAvailable(memory: memory) {
                    guard chain.readable.isEmpty else {
                        throw FatalError(reason: "request chain \(chain.head) has \(chain.readableLength) device-readable bytes (an entropy request is writable only)")
                    }
                    let n = min(chain.writableLength, Self.maxBytesPerRequest)
                    if n > 0 {
                        try bytes.withUnsafeMutableBytes { b throws in
                            let part = UnsafeMutableRawBufferPointer(rebasing: b[0..<n])
                            do throws(SystemError) { try fillRandom(part) } catch {
                                throw FatalError(reason: "the host's random source failed: \(error)")
                            }
                            try chain.write(to: memory, offset: 0, from: UnsafeRawBufferPointer(part))
                        }
                    }
                    try q.addUsed(memory: memory, head: chain.head, length: UInt32(n))
                    s.served &+= UInt64(n)
                    answered += 1
                }
                if answered > 0, try q.needsInterrupt(memory: memory) { interrupt.signalUsedBuffer() }
            } while try q.enableNotification(memory: memory)
        } catch let e as FatalError {
            fail(&s, e.reason, interrupt)
        } catch {
            fail(&s, "virtqueue: \(error)", interrupt)
        }
        if !s.broken { s.queue = q }
    }

    private func fail(_ s: inout State, _ reason: String, _ interrupt: VirtioInterrupt) {
        s.broken = true
        s.lastError = reason
        interrupt.signalNeedsReset()
    }
}
