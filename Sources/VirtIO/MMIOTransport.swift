#if canImport(Glibc)
import Glibc
#endif
import Bus
import GuestMemory
import Synchronization
import SystemShims

/// virtio-mmio register offsets, version 2 (virtio spec 4.2.2).
public enum VirtioMMIORegister {
    public static let magicValue: UInt64 = 0x000
    public static let version: UInt64 = 0x004
    public static let deviceID: UInt64 = 0x008
    public static let vendorID: UInt64 = 0x00c
    public static let deviceFeatures: UInt64 = 0x010
    public static let deviceFeaturesSel: UInt64 = 0x014
    public static let driverFeatures: UInt64 = 0x020
    public static let driverFeaturesSel: UInt64 = 0x024
    public static let queueSel: UInt64 = 0x030
    public static let queueNumMax: UInt64 = 0x034
    public static let queueNum: UInt64 = 0x038
    public static let queueReady: UInt64 = 0x044
    public static let queueNotify: UInt64 = 0x050
    public static let interruptStatus: UInt64 = 0x060
    public static let interruptACK: UInt64 = 0x064
    public static let status: UInt64 = 0x070
    public static let queueDescLow: UInt64 = 0x080
    public static let queueDescHigh: UInt64 = 0x084
    public static let queueDriverLow: UInt64 = 0x090
    public static let queueDriverHigh: UInt64 = 0x094
    public static let queueDeviceLow: UInt64 = 0x0a0
    public static let queueDeviceHigh: UInt64 = 0x0a4
    public static let configGeneration: UInt64 = 0x0fc
    public static let config: UInt64 = 0x100
}

/// Plain-value snapshot of a virtio-mmio transport and its queues.
public struct MMIOTransportState: Sendable, Equatable, Codable {
    public var status: UInt32
    public var deviceFeaturesSel: UInt32
    public var driverFeaturesSel: UInt32
    public var driverFeatures: UInt64
    public var queueSel: UInt32
    /// The queues: the device's live state while active, else the transport's registers.
    public var queues: [VirtQueueState]
    public var interruptStatus: UInt32
    public var configGeneration: UInt32
    public var needsReset: Bool
}

/// A virtio-mmio (version 2, "modern") transport in front of one `VirtioDevice`.
///
/// The VMM maps it on the MMIO bus (`size` bytes at the device's base address),
/// backs the `InterruptTrigger` by an irqfd, and registers each queue's
/// `notifyEventFD(forQueue:)` with KVM_IOEVENTFD at `base + queueNotifyOffset`
/// (4 bytes, datamatch = queue index) so doorbells never exit to user space. Without
/// the ioeventfd, a QueueNotify MMIO write signals the same eventfd. The device
/// worker thread (`start()`/`stop()`) waits on those eventfds and calls
/// `VirtioDevice.queueNotify`.
///
/// A vCPU exit never waits on device I/O: the registers are the transport's own and
/// change at once, but the device's side of a reset (status 0) or an activation
/// (DRIVER_OK) is handed to the worker thread, which runs it in order after the I/O it
/// is doing. The driver sees the new register values immediately; the device catches
/// up before it serves any doorbell that follows. While the worker is not running
/// (before `start()`, after `stop()`), the work runs on the caller. `settle()` waits
/// until handed-over work is done (for snapshots and tests).
public final class MMIOTransport: MMIODevice, Sendable {
    /// "virt" little-endian.
    public static let magic: UInt32 = 0x7472_6976
    /// Our vendor ID (QEMU's is 0x554D4551; any value is fine for Linux).
    public static let vendor: UInt32 = 0x4b56_4d53  // "SMVK"
    /// Size of the register window including config space.
    public static let size: UInt64 = 0x200
    /// Offset of the QueueNotify register, for KVM_IOEVENTFD.
    public static let queueNotifyOffset: UInt64 = VirtioMMIORegister.queueNotify

    /// The device behind this transport.
    public let device: any VirtioDevice
    /// Interrupt status, config generation and the interrupt line.
    public let interrupt: VirtioInterrupt
    private let memory: GuestMemory
    private let notifiers: [EventFD]
    private let worker: DeviceWorker

    /// The registers.
    private struct State {
        var status: UInt32 = 0
        var deviceFeaturesSel: UInt32 = 0
        var driverFeaturesSel: UInt32 = 0
        var driverFeatures: UInt64 = 0
        var queueSel: UInt32 = 0
        var queues: [VirtQueue]
        /// Guest accesses that were ignored.
        var ignored = 0

        var selectedQueue: Int? {
            Int(queueSel) < queues.count ? Int(queueSel) : nil
        }
    }
    private let registers: Mutex<State>

    /// Device lifecycle work handed from a vCPU to the worker thread.
    private enum Lifecycle: Sendable {
        case reset
        case activate(queues: [VirtQueue], features: UInt64)
        /// DRIVER_OK with a queue the device cannot use: DEVICE_NEEDS_RESET, set in order
        /// with the other work (a reset still queued would otherwise clear it).
        case refuse
    }
    private struct Pending {
        var work: [Lifecycle] = []
        var submitted = 0
        var done = 0
    }
    private let pending = Mutex(Pending())
    /// Held while lifecycle work runs, so it runs one item at a time and in order,
    /// whichever thread runs it.
    private let lifecycleLock = Mutex(())

    /// Count of guest accesses that were ignored (bad size, offset or state); for
    /// diagnostics and tests.
    public var ignoredAccesses: Int { registers.withLock { $0.ignored } }

    /// - Parameters:
    ///   - device: the device model.
    ///   - memory: guest RAM, handed to the device at activation.
    ///   - interrupt: raises the device's interrupt line (irqfd, edge).
    public init(device: any VirtioDevice, memory: GuestMemory, interrupt: any InterruptTrigger) throws(SystemError) {
        self.device = device
        self.memory = memory
        self.interrupt = VirtioInterrupt(trigger: interrupt)
        self.registers = Mutex(State(queues: device.queueMaxSizes.map { VirtQueue(maxSize: $0) }))
        var fds: [EventFD] = []
        for _ in device.queueMaxSizes { fds.append(try EventFD(nonBlocking: true)) }
        self.notifiers = fds
        // The worker must not keep the transport alive (the transport's deinit stops it).
        let box = WeakReference<MMIOTransport>()
        self.worker = try DeviceWorker(notifiers: fds, control: { box.object?.runLifecycleWork() },
                                       handler: { [weak device] index in device?.queueNotify(index) })
        box.object = self
    }

    deinit { worker.stop() }

    /// The eventfd the driver's doorbell for `queue` signals; register it with
    /// KVM_IOEVENTFD at `base + queueNotifyOffset`, length 4, datamatch `queue`.
    public func notifyEventFD(forQueue queue: Int) -> EventFD? {
        notifiers.indices.contains(queue) ? notifiers[queue] : nil
    }

    /// Number of queues.
    public var queueCount: Int { notifiers.count }

    /// Starts the device worker thread. Call once the VM is assembled.
    public func start() throws(SystemError) { try worker.start() }

    /// Stops and joins the device worker thread, then runs any lifecycle work it left.
    /// Call before tearing the VM down.
    public func stop() {
        worker.stop()
        runLifecycleWork()
    }

    /// Waits until the device has done the reset and activation work handed to the
    /// worker so far (runs it here if the worker is not running). Call with the vCPUs
    /// paused, e.g. before reading `state` for a snapshot.
    public func settle() {
        let target = pending.withLock { $0.submitted }
        while pending.withLock({ $0.done }) < target {
            if !worker.isRunning { runLifecycleWork(); continue }
            usleep(100)
        }
    }

    /// Hands `work` to the worker thread, or runs it here when there is none.
    private func submit(_ work: Lifecycle) {
        pending.withLock { p in
            p.work.append(work)
            p.submitted += 1
        }
        if worker.isRunning { worker.controlEvent.signal() } else { runLifecycleWork() }
    }

    /// Runs the pending lifecycle work, oldest first.
    private func runLifecycleWork() {
        lifecycleLock.withLock { _ in
            while true {
                let next: Lifecycle? = pending.withLock { p in p.work.isEmpty ? nil : p.work.removeFirst() }
                guard let next else { return }
                switch next {
                case .reset:
                    device.reset()
                    // Whatever the old queues' last requests signalled is void now.
                    interrupt.resetDone()
                case .activate(let queues, let features):
                    do {
                        try device.activate(memory: memory, queues: queues, features: features, interrupt: interrupt)
                    } catch {
                        interrupt.signalNeedsReset()
                    }
                case .refuse:
                    interrupt.signalNeedsReset()
                }
                pending.withLock { $0.done += 1 }
            }
        }
    }

    /// The Status register.
    public var deviceStatus: UInt32 { registers.withLock { r in statusValue(r) } }

    private func statusValue(_ r: State) -> UInt32 {
        r.status | (interrupt.needsReset ? VirtioStatus.deviceNeedsReset : 0)
    }

    /// The transport's state as plain values. Call `settle()` first for the device's
    /// queue state to reflect the last activation.
    public var state: MMIOTransportState {
        registers.withLock { r in
            let live = r.status & VirtioStatus.driverOK != 0 ? device.queueStates() : nil
            return MMIOTransportState(status: r.status, deviceFeaturesSel: r.deviceFeaturesSel,
                                      driverFeaturesSel: r.driverFeaturesSel, driverFeatures: r.driverFeatures,
                                      queueSel: r.queueSel, queues: live ?? r.queues.map(\.state),
                                      interruptStatus: interrupt.interruptStatus,
                                      configGeneration: interrupt.configGeneration,
                                      needsReset: interrupt.needsReset)
        }
    }

    /// Puts back a saved transport (`state` of the same device kind in the VM the
    /// snapshot came from): the registers and, when the saved driver had reached
    /// DRIVER_OK, the device re-activated with the saved queues, indices included. The
    /// state is checked first as a guest's queue setup is (sizes, alignment, rings inside
    /// guest RAM, features the device offers); a state that fails is refused and nothing
    /// changes. Call before `start()`, on a transport whose driver has not touched it.
    public func restore(_ saved: MMIOTransportState) throws(MMIORestoreError) {
        guard saved.queues.count == queueCount else {
            throw .invalid("\(saved.queues.count) queues saved, the device has \(queueCount)")
        }
        let driverOK = saved.status & VirtioStatus.driverOK != 0
        var queues: [VirtQueue] = []
        for (i, q) in saved.queues.enumerated() {
            guard q.maxSize == device.queueMaxSizes[i] else {
                throw .invalid("queue \(i) was saved with maximum size \(q.maxSize), the device's is \(device.queueMaxSizes[i])")
            }
            let vq = VirtQueue(state: q)
            if driverOK && vq.ready {
                do { try vq.validate(memory: memory) } catch { throw .invalid("queue \(i): \(error)") }
            }
            queues.append(vq)
        }
        if driverOK && !featuresAcceptable(saved.driverFeatures) {
            throw .invalid("the saved features 0x\(String(saved.driverFeatures, radix: 16)) are not ones this device offers")
        }
        registers.withLock { r in
            r.status = saved.status & ~VirtioStatus.deviceNeedsReset
            r.deviceFeaturesSel = saved.deviceFeaturesSel
            r.driverFeaturesSel = saved.driverFeaturesSel
            r.driverFeatures = saved.driverFeatures
            r.queueSel = saved.queueSel
            r.queues = queues
        }
        interrupt.restore(interruptStatus: saved.interruptStatus, configGeneration: saved.configGeneration,
                          needsReset: saved.needsReset)
        if driverOK && !saved.needsReset {
            submit(.activate(queues: queues, features: saved.driverFeatures))
            settle()
        }
    }

    // MARK: MMIODevice

    public func mmioRead(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        if offset >= VirtioMMIORegister.config {
            // Config space: any access width; the device zero-fills out of range.
            guard offset - VirtioMMIORegister.config < 0x1000 else { return zeroFill(data) }
            device.readConfig(offset: Int(offset - VirtioMMIORegister.config), into: data)
            return
        }
        guard data.count == 4, offset % 4 == 0 else {
            registers.withLock { $0.ignored += 1 }
            return zeroFill(data)
        }
        let value: UInt32 = registers.withLock { r in readRegister(&r, offset) }
        // SAFETY: data.count == 4 was checked above.
        data.storeBytes(of: value.littleEndian, as: UInt32.self)
    }

    public func mmioWrite(offset: UInt64, data: UnsafeRawBufferPointer) {
        if offset >= VirtioMMIORegister.config {
            guard offset - VirtioMMIORegister.config < 0x1000 else { return }
            device.writeConfig(offset: Int(offset - VirtioMMIORegister.config), from: data)
            return
        }
        guard data.count == 4, offset % 4 == 0 else {
            registers.withLock { $0.ignored += 1 }
            return
        }
        // SAFETY: data.count == 4 was checked above.
        let value = UInt32(littleEndian: data.loadUnaligned(as: UInt32.self))
        if offset == VirtioMMIORegister.queueNotify {
            // The doorbell: same path as KVM_IOEVENTFD, no lock, no device work here.
            if let n = notifyEventFD(forQueue: Int(value)) { n.signal() } else { registers.withLock { $0.ignored += 1 } }
            return
        }
        registers.withLock { r in writeRegister(&r, offset, value) }
    }

    private func zeroFill(_ data: UnsafeMutableRawBufferPointer) {
        data.initializeMemory(as: UInt8.self, repeating: 0)
    }

    // MARK: Registers (called inside `registers.withLock`)

    private func readRegister(_ r: inout State, _ offset: UInt64) -> UInt32 {
        switch offset {
        case VirtioMMIORegister.magicValue: return Self.magic
        case VirtioMMIORegister.version: return 2
        case VirtioMMIORegister.deviceID: return device.deviceType
        case VirtioMMIORegister.vendorID: return Self.vendor
        case VirtioMMIORegister.deviceFeatures:
            switch r.deviceFeaturesSel {
            case 0: return UInt32(truncatingIfNeeded: device.deviceFeatures)
            case 1: return UInt32(truncatingIfNeeded: device.deviceFeatures >> 32)
            default: return 0
            }
        case VirtioMMIORegister.queueNumMax:
            return r.selectedQueue.map { UInt32(r.queues[$0].maxSize) } ?? 0
        case VirtioMMIORegister.queueReady:
            return r.selectedQueue.map { r.queues[$0].ready ? 1 : 0 } ?? 0
        case VirtioMMIORegister.interruptStatus: return interrupt.interruptStatus
        case VirtioMMIORegister.status: return statusValue(r)
        case VirtioMMIORegister.configGeneration: return interrupt.configGeneration
        case VirtioMMIORegister.queueNum:
            return r.selectedQueue.map { UInt32(r.queues[$0].size) } ?? 0
        case VirtioMMIORegister.queueDescLow, VirtioMMIORegister.queueDescHigh,
             VirtioMMIORegister.queueDriverLow, VirtioMMIORegister.queueDriverHigh,
             VirtioMMIORegister.queueDeviceLow, VirtioMMIORegister.queueDeviceHigh:
            guard let q = r.selectedQueue else { return 0 }
            let addr: GuestAddress
            switch offset & ~0x7 {
            case VirtioMMIORegister.queueDescLow: addr = r.queues[q].descTable
            case VirtioMMIORegister.queueDriverLow: addr = r.queues[q].availRing
            default: addr = r.queues[q].usedRing
            }
            return UInt32(truncatingIfNeeded: offset & 4 == 0 ? addr.rawValue : addr.rawValue >> 32)
        default:
            r.ignored += 1
            return 0
        }
    }

    private func writeRegister(_ r: inout State, _ offset: UInt64, _ value: UInt32) {
        switch offset {
        case VirtioMMIORegister.deviceFeaturesSel: r.deviceFeaturesSel = value
        case VirtioMMIORegister.driverFeaturesSel: r.driverFeaturesSel = value
        case VirtioMMIORegister.driverFeatures:
            // Only while negotiating (spec 3.1.1: before FEATURES_OK).
            guard r.status & VirtioStatus.driver != 0, r.status & VirtioStatus.featuresOK == 0,
                  r.driverFeaturesSel < 2 else { r.ignored += 1; return }
            let shift = UInt64(r.driverFeaturesSel) * 32
            r.driverFeatures = (r.driverFeatures & ~(UInt64(0xffff_ffff) << shift)) | (UInt64(value) << shift)
        case VirtioMMIORegister.queueSel: r.queueSel = value
        case VirtioMMIORegister.interruptACK: interrupt.acknowledge(value)
        case VirtioMMIORegister.status: writeStatus(&r, value)
        case VirtioMMIORegister.queueNum, VirtioMMIORegister.queueReady,
             VirtioMMIORegister.queueDescLow, VirtioMMIORegister.queueDescHigh,
             VirtioMMIORegister.queueDriverLow, VirtioMMIORegister.queueDriverHigh,
             VirtioMMIORegister.queueDeviceLow, VirtioMMIORegister.queueDeviceHigh:
            writeQueueRegister(&r, offset, value)
        default:
            r.ignored += 1
        }
    }

    private func writeQueueRegister(_ r: inout State, _ offset: UInt64, _ value: UInt32) {
        // Queue setup happens after FEATURES_OK and before DRIVER_OK (spec 3.1.1).
        guard let q = r.selectedQueue, r.status & VirtioStatus.featuresOK != 0,
              r.status & VirtioStatus.driverOK == 0 else { r.ignored += 1; return }
        if offset == VirtioMMIORegister.queueReady {
            r.queues[q].ready = value == 1
            return
        }
        // The layout must not change while the queue is enabled.
        guard !r.queues[q].ready else { r.ignored += 1; return }
        func set(_ a: inout GuestAddress) {
            let v = UInt64(value)
            a = GuestAddress(offset & 4 == 0 ? (a.rawValue & ~0xffff_ffff) | v : (a.rawValue & 0xffff_ffff) | (v << 32))
        }
        switch offset {
        case VirtioMMIORegister.queueNum:
            // Validated at DRIVER_OK (power of two, <= max); keep what the driver wrote.
            r.queues[q].size = UInt16(truncatingIfNeeded: min(value, 0xffff))
        case VirtioMMIORegister.queueDescLow, VirtioMMIORegister.queueDescHigh: set(&r.queues[q].descTable)
        case VirtioMMIORegister.queueDriverLow, VirtioMMIORegister.queueDriverHigh: set(&r.queues[q].availRing)
        default: set(&r.queues[q].usedRing)
        }
    }

    /// The device status state machine (spec 2.1, 3.1.1).
    private func writeStatus(_ r: inout State, _ value: UInt32) {
        if value == 0 {
            resetDevice(&r)
            return
        }
        let added = value & ~r.status
        // The driver may only set bits, never clear them (except by writing 0).
        guard value & r.status == r.status, added & VirtioStatus.deviceNeedsReset == 0 else {
            r.ignored += 1
            return
        }
        if added & VirtioStatus.failed != 0 {
            r.status |= VirtioStatus.failed
            return
        }
        switch (r.status, added) {
        case (0, VirtioStatus.acknowledge):
            r.status = value
        case (VirtioStatus.acknowledge, VirtioStatus.driver):
            r.status = value
        case (VirtioStatus.acknowledge | VirtioStatus.driver, VirtioStatus.featuresOK):
            // FEATURES_OK sticks only if we accept the subset (the driver re-reads it).
            if featuresAcceptable(r.driverFeatures) { r.status = value }
        case (VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK, VirtioStatus.driverOK):
            r.status = value
            activateDevice(r)
        default:
            r.ignored += 1
        }
    }

    private func featuresAcceptable(_ features: UInt64) -> Bool {
        features & ~device.deviceFeatures == 0 && features & VIRTIO_F_VERSION_1 != 0 && device.acceptsFeatures(features)
    }

    private func activateDevice(_ r: State) {
        var active: [VirtQueue] = []
        for var q in r.queues {
            q.eventIndex = r.driverFeatures & VIRTIO_F_EVENT_IDX != 0
            q.indirectDescriptors = r.driverFeatures & VIRTIO_F_INDIRECT_DESC != 0
            // A queue the driver did not enable stays unused; an enabled one must be valid.
            if q.ready, (try? q.validate(memory: memory)) == nil {
                // Through the worker, after any reset still queued (found by the
                // hostile-guest suite: a reset's late interrupt.reset() wiped this).
                submit(.refuse)
                return
            }
            active.append(q)
        }
        submit(.activate(queues: active, features: r.driverFeatures))
    }

    private func resetDevice(_ r: inout State) {
        interrupt.resetRequested()  // before the submit: without a worker it runs the reset here
        submit(.reset)
        r.status = 0
        r.deviceFeaturesSel = 0
        r.driverFeaturesSel = 0
        r.driverFeatures = 0
        r.queueSel = 0
        for i in r.queues.indices { r.queues[i].reset() }
        for n in notifiers { n.wait() }  // drop doorbells meant for the old queues
    }
}


/// Why a saved transport state cannot be restored.
public enum MMIORestoreError: Error, Equatable, Sendable, CustomStringConvertible {
    case invalid(String)
    public var description: String {
        switch self { case .invalid(let why): return "the saved virtio-mmio state cannot be restored: \(why)" }
    }
}
