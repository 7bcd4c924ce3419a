#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import SystemShims
import Testing
@testable import VirtIO

/// virtio-rng driven directly by a mock driver.
@Suite("virtio-rng device")
struct EntropyDeviceTests {
    final class Harness {
        let device = EntropyDevice(queueSize: 16)
        let driver: MockDriver
        let trigger = CountingTrigger()
        let interrupt: VirtioInterrupt
        init(activate: Bool = true) throws {
            driver = try MockDriver(size: 16)
            interrupt = VirtioInterrupt(trigger: trigger)
            if activate { try self.activate() }
        }
        func activate() throws {
            try device.activate(memory: driver.memory, queues: [driver.makeQueue()], features: device.deviceFeatures, interrupt: interrupt)
        }
        /// Posts a writable buffer of `length` bytes filled with 0xEE; returns its address.
        func request(_ length: Int) throws -> GuestAddress {
            let a = try driver.allocate(length, fill: [UInt8](repeating: 0xEE, count: length))
            try driver.post([.init(address: a, length: UInt32(length), writable: true)])
            return a
        }
    }

    @Test("each request is filled with fresh host bytes, its used length says how many, one interrupt")
    func fillsRequests() throws {
        let h = try Harness()
        #expect(h.device.deviceType == 4 && h.device.queueMaxSizes == [16])
        let a = try h.request(64)
        let b = try h.request(64)
        h.device.queueNotify(0)
        #expect(try h.driver.usedIdx == 2)
        #expect(try h.driver.usedElement(0).length == 64 && h.driver.usedElement(1).length == 64)
        let x = try h.driver.memory.readBytes(at: a, count: 64)
        let y = try h.driver.memory.readBytes(at: b, count: 64)
        #expect(x != y, "two requests got the same bytes")
        #expect(x != [UInt8](repeating: 0xEE, count: 64) && y != [UInt8](repeating: 0xEE, count: 64))
        #expect(h.trigger.value == 1)
        #expect(h.device.bytesServed == 128)
        #expect(h.device.lastError == nil)
    }

    @Test("a huge buffer gets at most 4 KiB; the rest is left as it was")
    func capsEachRequest() throws {
        let h = try Harness()
        let a = try h.request(16 << 10)
        h.device.queueNotify(0)
        #expect(try h.driver.usedElement(0).length == UInt32(EntropyDevice.maxBytesPerRequest))
        let tail = try h.driver.memory.readBytes(at: GuestAddress(a.rawValue + UInt64(EntropyDevice.maxBytesPerRequest)), count: 16)
        #expect(tail == [UInt8](repeating: 0xEE, count: 16))
    }

    @Test("a chain with device-readable bytes stops the device with DEVICE_NEEDS_RESET")
    func readableChainIsRefused() throws {
        let h = try Harness()
        let r = try h.driver.allocate(16)
        try h.driver.post([.init(address: r, length: 16, writable: false)])
        h.device.queueNotify(0)
        #expect(h.interrupt.needsReset)
        #expect(h.device.lastError?.contains("device-readable") == true, "\(h.device.lastError ?? "")")
        #expect(try h.driver.usedIdx == 0)
        // Stopped: later requests are not answered until a reset.
        _ = try h.request(32)
        h.device.queueNotify(0)
        #expect(try h.driver.usedIdx == 0)
        h.device.reset()
        #expect(h.device.lastError == nil && h.device.queueStates() == nil)
    }

    @Test("a buffer outside guest RAM stops the device; nothing is written")
    func bufferOutsideRAM() throws {
        let h = try Harness()
        try h.driver.post([.init(address: GuestAddress(h.driver.memory.size - 8), length: 64, writable: true)])
        h.device.queueNotify(0)
        #expect(h.interrupt.needsReset)
        #expect(try h.driver.usedIdx == 0)
    }

    @Test("requests posted before activation (a restored guest's) are answered when it activates")
    func answersPendingOnActivate() throws {
        let h = try Harness(activate: false)
        _ = try h.request(32)
        try h.activate()
        #expect(try h.driver.usedIdx == 1)
        #expect(try h.driver.usedElement(0).length == 32)
        #expect(h.device.queueStates()?.first?.nextUsed == 1)
    }

    @Test("no configuration space: reads are zero, writes are ignored")
    func configSpace() throws {
        let h = try Harness()
        var bytes = [UInt8](repeating: 0xAA, count: 8)
        bytes.withUnsafeMutableBytes { h.device.readConfig(offset: 0, into: $0) }
        #expect(bytes == [UInt8](repeating: 0, count: 8))
        [UInt8](repeating: 1, count: 4).withUnsafeBytes { h.device.writeConfig(offset: 0, from: $0) }
    }
}
