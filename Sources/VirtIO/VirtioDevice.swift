import Bus
import GuestMemory
import Synchronization

/// Feature bit: the device complies with virtio 1.x (required for virtio-mmio version 2).
public let VIRTIO_F_VERSION_1: UInt64 = 1 << 32
/// Feature bit: the driver may use indirect descriptor tables.
public let VIRTIO_F_INDIRECT_DESC: UInt64 = 1 << 28
/// Feature bit: used_event / avail_event notification suppression.
public let VIRTIO_F_EVENT_IDX: UInt64 = 1 << 29

/// Device status bits (virtio spec 2.1).
public enum VirtioStatus {
    public static let acknowledge: UInt32 = 1
    public static let driver: UInt32 = 2
    public static let driverOK: UInt32 = 4
    public static let featuresOK: UInt32 = 8
    public static let deviceNeedsReset: UInt32 = 64
    public static let failed: UInt32 = 128
}

/// InterruptStatus bits (virtio-mmio, spec 4.2.2).
public enum VirtioInterruptBits {
    /// The device used a buffer in at least one queue.
    public static let usedBuffer: UInt32 = 1
    /// The configuration (or DEVICE_NEEDS_RESET) changed.
    public static let configChange: UInt32 = 2
}

/// The device-to-driver signals of one virtio device: the InterruptStatus register,
/// the config generation and DEVICE_NEEDS_RESET, plus the interrupt line. Shared by
/// the transport (vCPU threads read and acknowledge) and the device (its worker
/// thread raises), hence atomics.
public final class VirtioInterrupt: Sendable {
    private let trigger: any InterruptTrigger
    private let status = Atomic<UInt32>(0)
    private let generation = Atomic<UInt32>(0)
    private let needsResetFlag = Atomic<Bool>(false)
    /// Resets the driver asked for that the device has not done yet (`resetRequested`,
    /// `resetDone`). Until then the device may still be walking the old queues, and what
    /// that walk signals is void: the driver must not see it in the new generation.
    private let resetsPending = Atomic<Int>(0)

    /// - Parameter trigger: raises the guest interrupt line (an irqfd in the VMM).
    public init(trigger: any InterruptTrigger) {
        self.trigger = trigger
    }

    /// The InterruptStatus register value.
    public var interruptStatus: UInt32 { resetsPending.load(ordering: .acquiring) == 0 ? status.load(ordering: .acquiring) : 0 }
    /// The ConfigGeneration register value.
    public var configGeneration: UInt32 { generation.load(ordering: .acquiring) }
    /// Whether the device asked for a reset (DEVICE_NEEDS_RESET).
    public var needsReset: Bool { resetsPending.load(ordering: .acquiring) == 0 && needsResetFlag.load(ordering: .acquiring) }

    /// Sets the used-buffer bit and raises the interrupt.
    public func signalUsedBuffer() {
        status.bitwiseOr(VirtioInterruptBits.usedBuffer, ordering: .acquiringAndReleasing)
        trigger.trigger()
    }

    /// Bumps the config generation, sets the config-change bit and raises the interrupt.
    public func signalConfigChange() {
        generation.wrappingAdd(1, ordering: .acquiringAndReleasing)
        status.bitwiseOr(VirtioInterruptBits.configChange, ordering: .acquiringAndReleasing)
        trigger.trigger()
    }

    /// The device hit a driver error it cannot recover from: sets DEVICE_NEEDS_RESET
    /// and notifies the driver with a configuration change interrupt (spec 2.1.2).
    public func signalNeedsReset() {
        if !needsResetFlag.exchange(true, ordering: .acquiringAndReleasing) {
            status.bitwiseOr(VirtioInterruptBits.configChange, ordering: .acquiringAndReleasing)
            trigger.trigger()
        }
    }

    /// InterruptACK: clears `bits`.
    public func acknowledge(_ bits: UInt32) {
        status.bitwiseAnd(~bits, ordering: .acquiringAndReleasing)
    }

    /// The driver wrote 0 to Status: the registers read as reset at once, while the
    /// device's own reset waits its turn on the worker (`resetDone`). A walk of the old
    /// queues still running may signal in between (a malformed descriptor it met, found by
    /// the hostile-guest suite under load); that is hidden until the reset is done, which
    /// clears it.
    func resetRequested() {
        resetsPending.wrappingAdd(1, ordering: .acquiringAndReleasing)
        status.store(0, ordering: .releasing)
        needsResetFlag.store(false, ordering: .releasing)
    }

    /// The device did a reset asked for with `resetRequested`: clears status and
    /// DEVICE_NEEDS_RESET (the generation keeps counting), then shows signals again.
    func resetDone() {
        status.store(0, ordering: .releasing)
        needsResetFlag.store(false, ordering: .releasing)
        resetsPending.wrappingSubtract(1, ordering: .acquiringAndReleasing)
    }

    /// Restores register values from a snapshot.
    func restore(interruptStatus: UInt32, configGeneration: UInt32, needsReset: Bool) {
        status.store(interruptStatus, ordering: .releasing)
        generation.store(configGeneration, ordering: .releasing)
        needsResetFlag.store(needsReset, ordering: .releasing)
    }
}

/// A virtio device model behind a transport. The transport handles registers,
/// feature negotiation and the status machine; the device handles its configuration
/// space and its queues.
///
/// Threading: `readConfig`/`writeConfig`/`activate`/`reset` are called from vCPU
/// threads (through MMIO exits), `queueNotify` from the device's worker thread.
/// Implementations synchronise internally and never block a vCPU for long.
public protocol VirtioDevice: AnyObject, Sendable {
    /// The virtio device ID (2 = block, 19 = vsock).
    var deviceType: UInt32 { get }
    /// Features offered to the driver; must include `VIRTIO_F_VERSION_1`.
    var deviceFeatures: UInt64 { get }
    /// Maximum size of each queue; the count is the number of queues.
    var queueMaxSizes: [UInt16] { get }
    /// Reads `data.count` bytes of configuration space at `offset`; bytes beyond
    /// the config space read as zero.
    func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer)
    /// Handles a driver write to configuration space (ignored for read-only fields).
    func writeConfig(offset: Int, from data: UnsafeRawBufferPointer)
    /// Extra feature checks at FEATURES_OK (the transport already checked that
    /// `features` is a subset of `deviceFeatures` that includes VERSION_1).
    func acceptsFeatures(_ features: UInt64) -> Bool
    /// Starts the device after DRIVER_OK with validated queues and the negotiated
    /// features. Throwing makes the transport set DEVICE_NEEDS_RESET.
    func activate(memory: GuestMemory, queues: [VirtQueue], features: UInt64, interrupt: VirtioInterrupt) throws
    /// The driver notified queue `index` (called on the device worker thread).
    func queueNotify(_ index: Int)
    /// Returns the device to its pre-activation state (driver wrote status 0).
    func reset()
    /// The device's live queue state while active (nil when not active), for snapshots.
    func queueStates() -> [VirtQueueState]?
}

/// Copies the part of a device configuration space (`config`) that a driver read at
/// `offset` asks for into `data`; bytes outside the space read as 0.
public func readConfigSpace(_ config: UnsafeRawBufferPointer, offset: Int, into data: UnsafeMutableRawBufferPointer) {
    for i in 0 ..< data.count {
        let o = offset + i
        data[i] = o >= 0 && o < config.count ? config[o] : 0
    }
}
