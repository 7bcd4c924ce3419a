#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Synchronization
import SystemShims
import Testing
@testable import VirtIO

/// A device that records what the transport asks of it.
final class MockDevice: VirtioDevice, @unchecked Sendable {
    let lock = Lock()
    var notified: [Int] = []
    var activations: [(queues: [VirtQueue], features: UInt64)] = []
    var resets = 0
    var failActivation = false
    var rejectFeatures = false
    var interrupt: VirtioInterrupt?
    let notifySignal = try! EventFD()
    var config: [UInt8] = Array(0 ..< 16)

    let deviceType: UInt32 = 42
    let deviceFeatures: UInt64 = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | 0b101
    let queueMaxSizes: [UInt16] = [16, 32]

    func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        lock.withLock { for i in 0 ..< data.count { data[i] = offset + i < config.count ? config[offset + i] : 0 } }
    }
    func writeConfig(offset: Int, from data: UnsafeRawBufferPointer) {
        lock.withLock { for i in 0 ..< data.count where offset + i < config.count { config[offset + i] = data[i] } }
    }
    func acceptsFeatures(_ features: UInt64) -> Bool { !rejectFeatures }
    func activate(memory: GuestMemory, queues: [VirtQueue], features: UInt64, interrupt: VirtioInterrupt) throws {
        if failActivation { throw VirtQueueError.notReady }
        lock.withLock {
            activations.append((queues, features))
            self.interrupt = interrupt
        }
    }
    func queueNotify(_ index: Int) {
        lock.withLock { notified.append(index) }
        notifySignal.signal()
    }
    func reset() { lock.withLock { resets += 1 } }
    func queueStates() -> [VirtQueueState]? { lock.withLock { activations.last?.queues.map(\.state) } }
}

extension MMIOTransport {
    func read32(_ offset: UInt64) -> UInt32 {
        var v: UInt32 = 0
        withUnsafeMutableBytes(of: &v) { mmioRead(offset: offset, data: $0) }
        return UInt32(littleEndian: v)
    }
    func write32(_ offset: UInt64, _ value: UInt32) {
        withUnsafeBytes(of: value.littleEndian) { mmioWrite(offset: offset, data: $0) }
    }
    /// Runs the driver initialisation sequence (spec 3.1.1) for the given queues.
    func initialise(features: UInt64, queues: [(index: UInt32, driver: MockDriver)]) {
        write32(VirtioMMIORegister.status, VirtioStatus.acknowledge)
        write32(VirtioMMIORegister.status, VirtioStatus.acknowledge | VirtioStatus.driver)
        for sel in UInt32(0) ..< 2 {
            write32(VirtioMMIORegister.driverFeaturesSel, sel)
            write32(VirtioMMIORegister.driverFeatures, UInt32(truncatingIfNeeded: features >> (32 * UInt64(sel))))
        }
        write32(VirtioMMIORegister.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK)
        for (index, d) in queues {
            write32(VirtioMMIORegister.queueSel, index)
            write32(VirtioMMIORegister.queueNum, UInt32(d.size))
            write32(VirtioMMIORegister.queueDescLow, UInt32(truncatingIfNeeded: d.descTable.rawValue))
            write32(VirtioMMIORegister.queueDescHigh, UInt32(d.descTable.rawValue >> 32))
            write32(VirtioMMIORegister.queueDriverLow, UInt32(truncatingIfNeeded: d.availRing.rawValue))
            write32(VirtioMMIORegister.queueDriverHigh, 0)
            write32(VirtioMMIORegister.queueDeviceLow, UInt32(truncatingIfNeeded: d.usedRing.rawValue))
            write32(VirtioMMIORegister.queueDeviceHigh, 0)
            write32(VirtioMMIORegister.queueReady, 1)
        }
        write32(VirtioMMIORegister.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK)
    }
}

@Suite struct MMIOTransportTests {
    let full = VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK

    func make() throws -> (MMIOTransport, MockDevice, CountingTrigger, MockDriver) {
        let dev = MockDevice()
        let trig = CountingTrigger()
        let driver = try MockDriver()
        return (try MMIOTransport(device: dev, memory: driver.memory, interrupt: trig), dev, trig, driver)
    }

    @Test func identificationRegisters() throws {
        let (t, _, _, _) = try make()
        #expect(t.read32(VirtioMMIORegister.magicValue) == 0x7472_6976)
        #expect(t.read32(VirtioMMIORegister.version) == 2)
        #expect(t.read32(VirtioMMIORegister.deviceID) == 42)
        #expect(t.read32(VirtioMMIORegister.vendorID) == MMIOTransport.vendor)
        t.write32(VirtioMMIORegister.queueSel, 1)
        #expect(t.read32(VirtioMMIORegister.queueNumMax) == 32)
        t.write32(VirtioMMIORegister.queueSel, 0)
        #expect(t.read32(VirtioMMIORegister.queueNumMax) == 16)
    }

    @Test func featureWordsAreSelected() throws {
        let (t, _, _, _) = try make()
        t.write32(VirtioMMIORegister.deviceFeaturesSel, 0)
        #expect(t.read32(VirtioMMIORegister.deviceFeatures) == UInt32(1 << 29) | 0b101)
        t.write32(VirtioMMIORegister.deviceFeaturesSel, 1)
        #expect(t.read32(VirtioMMIORegister.deviceFeatures) == 1)  // VERSION_1 is bit 32
        t.write32(VirtioMMIORegister.deviceFeaturesSel, 7)
        #expect(t.read32(VirtioMMIORegister.deviceFeatures) == 0)
    }

    @Test func fullInitialisationActivatesWithNegotiatedFeaturesAndQueues() throws {
        let (t, dev, _, d) = try make()
        t.initialise(features: VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | 1, queues: [(0, d)])
        #expect(t.read32(VirtioMMIORegister.status) == full)
        let act = try #require(dev.activations.first)
        #expect(act.features == VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | 1)
        #expect(act.queues.count == 2)
        #expect(act.queues[0].ready && act.queues[0].size == 16 && act.queues[0].eventIndex)
        #expect(act.queues[0].descTable == d.descTable && act.queues[0].availRing == d.availRing && act.queues[0].usedRing == d.usedRing)
        #expect(!act.queues[1].ready)
        // Queue registers read back, and are frozen after DRIVER_OK.
        t.write32(VirtioMMIORegister.queueSel, 0)
        #expect(t.read32(VirtioMMIORegister.queueDriverLow) == UInt32(d.availRing.rawValue))
        #expect(t.read32(VirtioMMIORegister.queueReady) == 1)
        t.write32(VirtioMMIORegister.queueDescLow, 0x5000)
        #expect(t.read32(VirtioMMIORegister.queueDescLow) == UInt32(d.descTable.rawValue))
        #expect(t.state.queues[0].descTable == d.descTable.rawValue)
    }

    @Test func featuresOKRequiresAcceptableSubset() throws {
        let (t, dev, _, _) = try make()
        let ackDriver = VirtioStatus.acknowledge | VirtioStatus.driver
        func negotiate(_ features: UInt64) -> Bool {
            t.write32(VirtioMMIORegister.status, 0)
            t.write32(VirtioMMIORegister.status, VirtioStatus.acknowledge)
            t.write32(VirtioMMIORegister.status, ackDriver)
            for sel in UInt32(0) ..< 2 {
                t.write32(VirtioMMIORegister.driverFeaturesSel, sel)
                t.write32(VirtioMMIORegister.driverFeatures, UInt32(truncatingIfNeeded: features >> (32 * UInt64(sel))))
            }
            t.write32(VirtioMMIORegister.status, ackDriver | VirtioStatus.featuresOK)
            return t.read32(VirtioMMIORegister.status) & VirtioStatus.featuresOK != 0
        }
        #expect(negotiate(VIRTIO_F_VERSION_1))
        #expect(!negotiate(1))                          // legacy driver: no VERSION_1
        #expect(!negotiate(VIRTIO_F_VERSION_1 | 0b10))  // bit 1 not offered
        dev.rejectFeatures = true
        #expect(!negotiate(VIRTIO_F_VERSION_1))
    }

    @Test func statusMachineRejectsOutOfOrderTransitions() throws {
        let (t, dev, _, _) = try make()
        t.write32(VirtioMMIORegister.status, VirtioStatus.driver)  // DRIVER before ACKNOWLEDGE
        #expect(t.read32(VirtioMMIORegister.status) == 0)
        t.write32(VirtioMMIORegister.status, VirtioStatus.acknowledge)
        t.write32(VirtioMMIORegister.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.driverOK)  // skips FEATURES_OK
        #expect(t.read32(VirtioMMIORegister.status) == VirtioStatus.acknowledge)
        #expect(dev.activations.isEmpty)
        // Features cannot be written before DRIVER.
        t.write32(VirtioMMIORegister.driverFeatures, 0xffff_ffff)
        #expect(t.state.driverFeatures == 0)
        // FAILED can always be set; writing 0 resets.
        t.write32(VirtioMMIORegister.status, VirtioStatus.acknowledge | VirtioStatus.failed)
        #expect(t.read32(VirtioMMIORegister.status) == VirtioStatus.acknowledge | VirtioStatus.failed)
        t.write32(VirtioMMIORegister.status, 0)
        #expect(t.read32(VirtioMMIORegister.status) == 0)
        #expect(dev.resets == 1)
    }

    @Test func activationFailureSetsNeedsReset() throws {
        let (t, dev, trig, d) = try make()
        dev.failActivation = true
        t.initialise(features: VIRTIO_F_VERSION_1, queues: [(0, d)])
        #expect(t.read32(VirtioMMIORegister.status) & VirtioStatus.deviceNeedsReset != 0)
        #expect(t.read32(VirtioMMIORegister.interruptStatus) & VirtioInterruptBits.configChange != 0)
        #expect(trig.value == 1)
        t.write32(VirtioMMIORegister.status, 0)
        #expect(t.read32(VirtioMMIORegister.status) == 0)
        #expect(t.read32(VirtioMMIORegister.interruptStatus) == 0)
    }

    @Test func invalidQueueSetsNeedsResetInsteadOfActivating() throws {
        let (t, dev, _, _) = try make()
        let bad = try MockDriver(size: 12)  // not a power of two
        t.initialise(features: VIRTIO_F_VERSION_1, queues: [(0, bad)])
        #expect(dev.activations.isEmpty)
        #expect(t.read32(VirtioMMIORegister.status) & VirtioStatus.deviceNeedsReset != 0)
    }

    @Test func notifyReachesDeviceOnWorkerThread() throws {
        let (t, dev, _, d) = try make()
        t.initialise(features: VIRTIO_F_VERSION_1, queues: [(0, d), (1, try MockDriver(size: 32))])
        try t.start()
        t.write32(VirtioMMIORegister.queueNotify, 1)
        dev.notifySignal.wait()
        #expect(dev.lock.withLock { dev.notified } == [1])
        // The VMM's ioeventfd path: KVM signals the same eventfd.
        try #require(t.notifyEventFD(forQueue: 0)).signal()
        dev.notifySignal.wait()
        #expect(dev.lock.withLock { dev.notified } == [1, 0])
        #expect(t.notifyEventFD(forQueue: 2) == nil)
        t.stop()
        t.stop()  // idempotent
        // Out-of-range notify is ignored, not a crash.
        t.write32(VirtioMMIORegister.queueNotify, 99)
        #expect(t.ignoredAccesses == 1)
    }

    @Test func interruptStatusAndAck() throws {
        let (t, dev, trig, d) = try make()
        t.initialise(features: VIRTIO_F_VERSION_1, queues: [(0, d)])
        let irq = try #require(dev.interrupt)
        irq.signalUsedBuffer()
        #expect(trig.value == 1)
        #expect(t.read32(VirtioMMIORegister.interruptStatus) == VirtioInterruptBits.usedBuffer)
        let gen = t.read32(VirtioMMIORegister.configGeneration)
        irq.signalConfigChange()
        #expect(t.read32(VirtioMMIORegister.interruptStatus) == 3)
        #expect(t.read32(VirtioMMIORegister.configGeneration) == gen &+ 1)
        t.write32(VirtioMMIORegister.interruptACK, 1)
        #expect(t.read32(VirtioMMIORegister.interruptStatus) == 2)
        t.write32(VirtioMMIORegister.interruptACK, 2)
        #expect(t.read32(VirtioMMIORegister.interruptStatus) == 0)
    }

    @Test func configSpaceAnyWidth() throws {
        let (t, dev, _, _) = try make()
        var b: UInt8 = 0
        withUnsafeMutableBytes(of: &b) { t.mmioRead(offset: 0x103, data: $0) }
        #expect(b == 3)
        #expect(t.read32(0x104) == 0x0706_0504)
        var q: UInt64 = 0
        withUnsafeMutableBytes(of: &q) { t.mmioRead(offset: 0x108, data: $0) }
        #expect(q == 0x0f0e_0d0c_0b0a_0908)
        withUnsafeBytes(of: UInt16(0xBEEF).littleEndian) { t.mmioWrite(offset: 0x100, data: $0) }
        #expect(dev.config[0] == 0xEF && dev.config[1] == 0xBE)
        #expect(t.read32(0x1000) == 0)  // far beyond config space
    }

    @Test func badAccessesAreIgnored() throws {
        let (t, _, _, _) = try make()
        // Wrong width on a register: reads zero, writes ignored.
        var b: UInt8 = 0xff
        withUnsafeMutableBytes(of: &b) { t.mmioRead(offset: VirtioMMIORegister.magicValue, data: $0) }
        #expect(b == 0)
        withUnsafeBytes(of: UInt16(1)) { t.mmioWrite(offset: VirtioMMIORegister.status, data: $0) }
        #expect(t.read32(VirtioMMIORegister.status) == 0)
        // Misaligned and unknown registers.
        #expect(t.read32(0x02) == 0)
        #expect(t.read32(0x0f8) == 0)
        t.write32(0x0f8, 1)
        // Out-of-range queue select.
        t.write32(VirtioMMIORegister.status, VirtioStatus.acknowledge)
        t.write32(VirtioMMIORegister.status, VirtioStatus.acknowledge | VirtioStatus.driver)
        t.write32(VirtioMMIORegister.driverFeaturesSel, 1)
        t.write32(VirtioMMIORegister.driverFeatures, 1)
        t.write32(VirtioMMIORegister.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK)
        t.write32(VirtioMMIORegister.queueSel, 1000)
        #expect(t.read32(VirtioMMIORegister.queueNumMax) == 0)
        t.write32(VirtioMMIORegister.queueNum, 8)
        t.write32(VirtioMMIORegister.queueReady, 1)
        #expect(t.read32(VirtioMMIORegister.queueReady) == 0)
        // Queue layout frozen while ready.
        t.write32(VirtioMMIORegister.queueSel, 0)
        t.write32(VirtioMMIORegister.queueNum, 8)
        t.write32(VirtioMMIORegister.queueReady, 1)
        t.write32(VirtioMMIORegister.queueNum, 4)
        #expect(t.read32(VirtioMMIORegister.queueNum) == 8)
        #expect(t.ignoredAccesses >= 6)
    }

    @Test func snapshotStateIsPlainValues() throws {
        let (t, _, _, d) = try make()
        let before = t.state
        t.initialise(features: VIRTIO_F_VERSION_1, queues: [(0, d)])
        let after = t.state
        #expect(before != after)
        #expect(after.status == full && after.driverFeatures == VIRTIO_F_VERSION_1)
        #expect(after == t.state)
    }
}

/// A device whose queue work holds its lock until the test releases it, like a block
/// device in the middle of a large batch of I/O.
final class BusyDevice: VirtioDevice, Sendable {
    private let log = Mutex<[String]>([])
    private let deviceLock = Mutex(())
    let busy = try! EventFD()
    let release = try! EventFD()
    let deviceType: UInt32 = 43
    let deviceFeatures: UInt64 = VIRTIO_F_VERSION_1
    let queueMaxSizes: [UInt16] = [16]
    var events: [String] { log.withLock { $0 } }
    func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) { data.initializeMemory(as: UInt8.self, repeating: 0) }
    func writeConfig(offset: Int, from data: UnsafeRawBufferPointer) {}
    func acceptsFeatures(_ features: UInt64) -> Bool { true }
    func activate(memory: GuestMemory, queues: [VirtQueue], features: UInt64, interrupt: VirtioInterrupt) throws {
        deviceLock.withLock { _ in log.withLock { $0.append("activate") } }
    }
    func queueNotify(_ index: Int) {
        deviceLock.withLock { _ in
            log.withLock { $0.append("notify") }
            busy.signal()
            release.wait()  // "I/O" in progress, device lock held
        }
    }
    func reset() { deviceLock.withLock { _ in log.withLock { $0.append("reset") } } }
    func queueStates() -> [VirtQueueState]? { nil }
}

@Suite struct MMIOTransportLifecycleTests {
    /// Runs `body` on another thread; true if it returned within `seconds`.
    func returnsPromptly(within seconds: Int32 = 5, _ body: @escaping @Sendable () -> Void) throws -> Bool {
        let done = try EventFD(nonBlocking: true)
        let t = try NativeThread(name: "vcpu") { body(); done.signal() }
        let ok = waitReadable(done.fd.rawValue, timeoutMillis: seconds * 1000)
        if ok { t.join() } else { t.detach() }
        return ok
    }

    @Test("a status write (reset, DRIVER_OK) does not wait for the device's I/O in progress")
    func statusWritesDoNotWaitForDeviceIO() throws {
        let dev = BusyDevice()
        let d = try MockDriver()
        let t = try MMIOTransport(device: dev, memory: d.memory, interrupt: CountingTrigger())
        try t.start()
        defer { dev.release.signal(); t.stop() }
        t.initialise(features: VIRTIO_F_VERSION_1, queues: [(0, d)])
        t.settle()
        #expect(dev.events == ["activate"])
        // The device is busy on its worker thread, holding its lock.
        t.write32(VirtioMMIORegister.queueNotify, 0)
        dev.busy.wait()
        // A reset and a full re-initialisation from a "vCPU" return at once, and the
        // registers already say so.
        // (This thread does not touch the driver while the other one uses it.)
        nonisolated(unsafe) let driver = d
        let returned = try returnsPromptly {
            t.write32(VirtioMMIORegister.status, 0)
            precondition(t.read32(VirtioMMIORegister.status) == 0)
            t.initialise(features: VIRTIO_F_VERSION_1, queues: [(0, driver)])
        }
        #expect(returned, "a status write waited for the device's I/O")
        let full = VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK
        #expect(t.read32(VirtioMMIORegister.status) == full)
        #expect(dev.events == ["activate", "notify"], "the device was reset under its own I/O")
        // Once the I/O ends, the worker resets and re-activates the device, in order.
        dev.release.signal()
        t.settle()
        #expect(dev.events == ["activate", "notify", "reset", "activate"])
    }

    @Test("without a running worker, lifecycle work runs on the caller at once")
    func lifecycleWithoutWorker() throws {
        let dev = BusyDevice()
        let d = try MockDriver()
        let t = try MMIOTransport(device: dev, memory: d.memory, interrupt: CountingTrigger())
        t.initialise(features: VIRTIO_F_VERSION_1, queues: [(0, d)])
        #expect(dev.events == ["activate"])
        t.write32(VirtioMMIORegister.status, 0)
        #expect(dev.events == ["activate", "reset"])
    }

    @Test("what a walk of the old queues signals after the driver's reset is never seen in the new generation")
    func staleSignalsAfterResetAreHidden() throws {
        let dev = StaleSignalDevice()
        let d = try MockDriver()
        let t = try MMIOTransport(device: dev, memory: d.memory, interrupt: CountingTrigger())
        try t.start()
        defer { dev.release.signal(); dev.finish.signal(); t.stop() }
        t.initialise(features: VIRTIO_F_VERSION_1, queues: [(0, d)])
        t.settle()
        t.write32(VirtioMMIORegister.queueNotify, 0)
        dev.busy.wait()
        // The driver resets and sets the device up again while the old walk still runs.
        t.write32(VirtioMMIORegister.status, 0)
        t.initialise(features: VIRTIO_F_VERSION_1, queues: [(0, d)])
        let full = VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK
        // The old walk meets a bad descriptor and signals, before the worker reaches the reset.
        dev.release.signal()
        dev.signalled.wait()
        #expect(t.read32(VirtioMMIORegister.status) == full, "the old walk's DEVICE_NEEDS_RESET showed in the new generation")
        #expect(t.read32(VirtioMMIORegister.interruptStatus) == 0)
        dev.finish.signal()
        t.settle()
        #expect(t.read32(VirtioMMIORegister.status) == full)
        #expect(t.read32(VirtioMMIORegister.interruptStatus) == 0)
        // A signal of the new generation shows.
        dev.interrupt.withLock { $0 }?.signalNeedsReset()
        #expect(t.read32(VirtioMMIORegister.status) == full | VirtioStatus.deviceNeedsReset)
    }
}

/// A device whose queue work, once released, signals DEVICE_NEEDS_RESET and a used buffer
/// (as a block device walking a descriptor the driver rewrote), then waits again.
final class StaleSignalDevice: VirtioDevice, Sendable {
    let busy = try! EventFD()
    let release = try! EventFD()
    let signalled = try! EventFD()
    let finish = try! EventFD()
    let interrupt = Mutex<VirtioInterrupt?>(nil)
    let deviceType: UInt32 = 43
    let deviceFeatures: UInt64 = VIRTIO_F_VERSION_1
    let queueMaxSizes: [UInt16] = [16]
    func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) { data.initializeMemory(as: UInt8.self, repeating: 0) }
    func writeConfig(offset: Int, from data: UnsafeRawBufferPointer) {}
    func acceptsFeatures(_ features: UInt64) -> Bool { true }
    func activate(memory: GuestMemory, queues: [VirtQueue], features: UInt64, interrupt: VirtioInterrupt) throws {
        self.interrupt.withLock { $0 = interrupt }
    }
    func queueNotify(_ index: Int) {
        busy.signal()
        release.wait()
        let i = interrupt.withLock { $0 }
        i?.signalNeedsReset()
        i?.signalUsedBuffer()
        signalled.signal()
        finish.wait()
    }
    func reset() {}
    func queueStates() -> [VirtQueueState]? { nil }
}
