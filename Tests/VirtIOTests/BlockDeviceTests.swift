#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import SystemShims
import Foundation
import Testing
@testable import VirtIO

/// A block device over a copy-on-write disk of a random 8 MiB base image, driven
/// directly (activate + queueNotify on the test thread) by a mock driver.
final class BlockHarness {
    static let baseSize = 8 << 20
    let dir = TempDirectory()
    let basePath: String
    let baseBytes: [UInt8]
    let disk: CopyOnWriteDisk
    let device: BlockDevice
    let driver: MockDriver
    let trigger = CountingTrigger()
    let interrupt: VirtioInterrupt

    init(engine: BlockEngineKind, base: (path: String, bytes: [UInt8])? = nil, serial: String = "sandbox-disk-0") throws {
        if let base {
            basePath = base.path
            baseBytes = base.bytes
        } else {
            basePath = dir.path + "/base.img"
            baseBytes = randomBytes(Self.baseSize, seed: 0x5eed)
            try writeFile(basePath, baseBytes)
        }
        disk = try CopyOnWriteDisk(baseImage: basePath, overlayDirectory: dir.path)
        device = BlockDevice(backend: disk, engine: try engine.makeEngine(), serial: serial, queueSize: 64)
        driver = try MockDriver(size: 64)
        interrupt = VirtioInterrupt(trigger: trigger)
        var q = driver.makeQueue()
        q.indirectDescriptors = true
        try device.activate(memory: driver.memory, queues: [q], features: device.deviceFeatures, interrupt: interrupt)
    }

    deinit {
        device.close()
        dir.remove()
    }

    struct Result { var status: UInt8; var data: [UInt8]; var usedLength: UInt32 }

    /// Posts one request (header, optional OUT data, optional IN buffer, status) without notifying.
    func post(type: UInt32, sector: UInt64, out: [UInt8] = [], inLength: Int = 0) throws -> (GuestAddress?, GuestAddress) {
        var header = [UInt8](repeating: 0, count: 16)
        withUnsafeBytes(of: type.littleEndian) { for i in 0 ..< 4 { header[i] = $0[i] } }
        withUnsafeBytes(of: sector.littleEndian) { for i in 0 ..< 8 { header[8 + i] = $0[i] } }
        var buffers = [MockDriver.Buffer(address: try driver.allocate(16, fill: header), length: 16, writable: false)]
        if !out.isEmpty { buffers.append(.init(address: try driver.allocate(out.count, fill: out), length: UInt32(out.count), writable: false)) }
        var inAddr: GuestAddress? = nil
        if inLength > 0 {
            inAddr = try driver.allocate(inLength)
            buffers.append(.init(address: inAddr!, length: UInt32(inLength), writable: true))
        }
        let status = try driver.allocate(1, fill: [0xEE])
        buffers.append(.init(address: status, length: 1, writable: true))
        try driver.post(buffers)
        return (inAddr, status)
    }

    /// Posts one request, notifies the device and returns the result.
    func request(type: UInt32, sector: UInt64, out: [UInt8] = [], inLength: Int = 0) throws -> Result {
        driver.rewind()
        let (inAddr, status) = try post(type: type, sector: sector, out: out, inLength: inLength)
        device.queueNotify(0)
        let used = try driver.usedElement(try driver.usedIdx &- 1)
        return Result(status: try driver.memory.readBytes(at: status, count: 1)[0],
                      data: try inAddr.map { try driver.memory.readBytes(at: $0, count: inLength) } ?? [],
                      usedLength: used.length)
    }

    func read(sector: UInt64, count: Int) throws -> Result {
        try request(type: VirtioBlockRequest.typeIn, sector: sector, inLength: count)
    }

    func write(sector: UInt64, _ data: [UInt8]) throws -> Result {
        try request(type: VirtioBlockRequest.typeOut, sector: sector, out: data)
    }
}

/// The engines available on this host (io_uring only if the probe succeeds). When
/// io_uring is missing, `ioUringEngineIsCovered` shows as skipped with the reason, so
/// the dropped io_uring cases are visible in the report.
let availableEngines: [BlockEngineKind] = BlockEngineKind.auto.kind == .ioUring ? [.ioUring, .sync] : [.sync]

@Suite struct BlockEngineCoverage {
    @Test(.enabled(if: BlockEngineKind.auto.kind == .ioUring, "io_uring is unavailable here (\(BlockEngineKind.auto.reason)): the io_uring cases of the block tests do not run"))
    func ioUringEngineIsCovered() {
        #expect(availableEngines.contains(.ioUring))
    }
}

@Suite struct BlockDeviceTests {
    @Test(arguments: availableEngines)
    func writeThenReadBack(engine: BlockEngineKind) throws {
        let h = try BlockHarness(engine: engine)
        var model = h.baseBytes
        // Unaligned to the 4 KiB copy-on-write blocks on both ends: exercises copy-up.
        let data = randomBytes(8192 + 1024, seed: 7)
        let r = try h.write(sector: 3, data)
        #expect(r.status == VirtioBlockRequest.statusOK && r.usedLength == 1)
        model.replaceSubrange(3 * 512 ..< 3 * 512 + data.count, with: data)
        // Read a wider range: written bytes, copied-up neighbours, and pure base blocks.
        let back = try h.read(sector: 0, count: 32 * 1024)
        #expect(back.status == VirtioBlockRequest.statusOK)
        #expect(back.usedLength == 32 * 1024 + 1)
        #expect(back.data == Array(model[0 ..< 32 * 1024]))
        // Unwritten blocks far away come from the base.
        let far = try h.read(sector: 10_000, count: 4096)
        #expect(far.data == Array(h.baseBytes[10_000 * 512 ..< 10_000 * 512 + 4096]))
        // The last sector of the disk.
        let last = try h.read(sector: UInt64(BlockHarness.baseSize / 512 - 1), count: 512)
        #expect(last.status == VirtioBlockRequest.statusOK && last.data == Array(h.baseBytes.suffix(512)))
        #expect(h.disk.overlayBlockCount == 3)
        #expect(h.trigger.value > 0)
        // The base image file is untouched.
        #expect(try readFile(h.basePath) == h.baseBytes)
    }

    @Test(arguments: availableEngines)
    func batchOfRequestsIsCompletedInOneRound(engine: BlockEngineKind) throws {
        let h = try BlockHarness(engine: engine)
        h.driver.rewind()
        var expected: [(GuestAddress, [UInt8])] = []
        for i in 0 ..< 4 {
            _ = try h.post(type: VirtioBlockRequest.typeOut, sector: UInt64(100 + 8 * i), out: randomBytes(4096, seed: UInt64(i + 1)))
        }
        for i in 0 ..< 4 {
            let (addr, _) = try h.post(type: VirtioBlockRequest.typeIn, sector: UInt64(200 + 8 * i), inLength: 4096)
            expected.append((addr!, Array(h.baseBytes[(200 + 8 * i) * 512 ..< (200 + 8 * i) * 512 + 4096])))
        }
        _ = try h.post(type: VirtioBlockRequest.typeFlush, sector: 0)
        h.device.queueNotify(0)
        #expect(try h.driver.usedIdx == 9)
        #expect(h.trigger.value == 1)
        for (addr, bytes) in expected { #expect(try h.driver.memory.readBytes(at: addr, count: 4096) == bytes) }
        for i in 0 ..< 4 {
            #expect(try h.read(sector: UInt64(100 + 8 * i), count: 4096).data == randomBytes(4096, seed: UInt64(i + 1)))
        }
    }

    @Test func twoDisksOverOneBaseAreIsolated() throws {
        let a = try BlockHarness(engine: .sync)
        let b = try BlockHarness(engine: .sync, base: (a.basePath, a.baseBytes))
        #expect(try a.write(sector: 8, Array(repeating: 0xAA, count: 4096)).status == 0)
        #expect(try b.write(sector: 16, Array(repeating: 0xBB, count: 4096)).status == 0)
        #expect(try b.read(sector: 8, count: 4096).data == Array(a.baseBytes[4096 ..< 8192]))
        #expect(try a.read(sector: 16, count: 4096).data == Array(a.baseBytes[8192 ..< 12288]))
        #expect(try a.read(sector: 8, count: 4096).data == Array(repeating: 0xAA, count: 4096))
        #expect(try readFile(a.basePath) == a.baseBytes)
    }

    @Test func outOfRangeAndMalformedRequestsGetIOError() throws {
        let h = try BlockHarness(engine: .sync)
        let sectors = UInt64(BlockHarness.baseSize / 512)
        #expect(try h.read(sector: sectors, count: 512).status == VirtioBlockRequest.statusIOError)
        #expect(try h.read(sector: sectors - 1, count: 1024).status == VirtioBlockRequest.statusIOError)
        #expect(try h.write(sector: sectors, Array(repeating: 1, count: 512)).status == VirtioBlockRequest.statusIOError)
        // sector * 512 overflows 64 bits; sector + length wraps.
        #expect(try h.read(sector: UInt64.max / 256, count: 512).status == VirtioBlockRequest.statusIOError)
        #expect(try h.read(sector: UInt64.max / 512, count: 512).status == VirtioBlockRequest.statusIOError)
        // Data not a multiple of 512.
        #expect(try h.read(sector: 0, count: 100).status == VirtioBlockRequest.statusIOError)
        // IN with extra readable data, FLUSH with data.
        #expect(try h.request(type: VirtioBlockRequest.typeIn, sector: 0, out: [1, 2], inLength: 512).status == VirtioBlockRequest.statusIOError)
        #expect(try h.request(type: VirtioBlockRequest.typeFlush, sector: 0, inLength: 512).status == VirtioBlockRequest.statusIOError)
        // Header shorter than 16 bytes.
        h.driver.rewind()
        let status = try h.driver.allocate(1, fill: [0xEE])
        try h.driver.post([.init(address: try h.driver.allocate(8), length: 8, writable: false),
                           .init(address: status, length: 1, writable: true)])
        h.device.queueNotify(0)
        #expect(try h.driver.memory.readBytes(at: status, count: 1) == [VirtioBlockRequest.statusIOError])
        // Nothing was written and the device still works.
        #expect(h.disk.overlayBlockCount == 0)
        #expect(h.interrupt.needsReset == false)
        #expect(try h.read(sector: 0, count: 512).data == Array(h.baseBytes[0 ..< 512]))
    }

    @Test func unsupportedFlushAndGetID() throws {
        let h = try BlockHarness(engine: .sync, serial: "disk-serial-123")
        #expect(try h.request(type: 77, sector: 0).status == VirtioBlockRequest.statusUnsupported)
        #expect(try h.request(type: VirtioBlockRequest.typeFlush, sector: 0).status == VirtioBlockRequest.statusOK)
        let id = try h.request(type: VirtioBlockRequest.typeGetID, sector: 0, inLength: 20)
        #expect(id.status == VirtioBlockRequest.statusOK && id.usedLength == 21)
        #expect(id.data == Array("disk-serial-123".utf8) + [0, 0, 0, 0, 0])
        #expect(try h.request(type: VirtioBlockRequest.typeGetID, sector: 0, inLength: 8).status == VirtioBlockRequest.statusIOError)
    }

    @Test func malformedChainsSetNeedsResetWithoutCrashing() throws {
        let h = try BlockHarness(engine: .sync)
        // No writable status byte at all.
        h.driver.rewind()
        try h.driver.post([.init(address: try h.driver.allocate(16), length: 16, writable: false)])
        h.device.queueNotify(0)
        #expect(h.interrupt.needsReset)
        #expect(h.device.lastError?.contains("status") == true)
        // Further notifications are ignored until reset.
        h.device.queueNotify(0)

        let h2 = try BlockHarness(engine: .sync)
        // A looping chain.
        let buf = try h2.driver.allocate(16)
        try h2.driver.setDescriptor(0, address: buf.rawValue, length: 16, flags: VIRTQ_DESC_F_NEXT, next: 1)
        try h2.driver.setDescriptor(1, address: buf.rawValue, length: 16, flags: VIRTQ_DESC_F_NEXT, next: 0)
        try h2.driver.publish(head: 0)
        h2.device.queueNotify(0)
        #expect(h2.interrupt.needsReset)
        #expect(h2.device.lastError?.contains("loops") == true)
        #expect(h2.interrupt.interruptStatus & VirtioInterruptBits.configChange != 0)
    }

    @Test func configSpaceAndFeatures() throws {
        let h = try BlockHarness(engine: .sync)
        var cap: UInt64 = 0
        withUnsafeMutableBytes(of: &cap) { h.device.readConfig(offset: 0, into: $0) }
        #expect(cap == UInt64(BlockHarness.baseSize / 512))
        var segMax: UInt32 = 0, blkSize: UInt32 = 0
        withUnsafeMutableBytes(of: &segMax) { h.device.readConfig(offset: 12, into: $0) }
        withUnsafeMutableBytes(of: &blkSize) { h.device.readConfig(offset: 20, into: $0) }
        #expect(segMax == 62 && blkSize == 512)
        let f = h.device.deviceFeatures
        #expect(f & VIRTIO_F_VERSION_1 != 0 && f & VirtioBlockFeature.flush != 0 && f & VirtioBlockFeature.readOnly == 0)
        #expect(h.device.deviceType == 2)
    }

    @Test func readOnlyDiskRefusesWrites() throws {
        let dir = TempDirectory()
        defer { dir.remove() }
        let path = dir.path + "/ro.img"
        try writeFile(path, randomBytes(64 * 1024, seed: 3))
        let disk = try RawFileDisk(path: path, readOnly: true)
        let dev = BlockDevice(backend: disk, engine: SyncEngine(), queueSize: 16)
        #expect(dev.deviceFeatures & VirtioBlockFeature.readOnly != 0)
        let d = try MockDriver()
        try dev.activate(memory: d.memory, queues: [d.makeQueue()], features: dev.deviceFeatures,
                         interrupt: VirtioInterrupt(trigger: CountingTrigger()))
        let hdr = try d.allocate(16, fill: [1] + [UInt8](repeating: 0, count: 15))
        let status = try d.allocate(1)
        try d.post([.init(address: hdr, length: 16, writable: false),
                    .init(address: try d.allocate(512), length: 512, writable: false),
                    .init(address: status, length: 1, writable: true)])
        dev.queueNotify(0)
        #expect(try d.memory.readBytes(at: status, count: 1) == [VirtioBlockRequest.statusIOError])
        #expect(try readFile(path) == randomBytes(64 * 1024, seed: 3))
        dev.close()
    }

    @Test func exportMergedAndOverlayLifetime() throws {
        let dir = TempDirectory()
        defer { dir.remove() }
        let base = dir.path + "/base.img"
        let bytes = randomBytes(1 << 20, seed: 11)
        try writeFile(base, bytes)
        let overlays = dir.path + "/overlays"
        mkdir(overlays, 0o755)
        defer { rmdir(overlays) }

        let disk = try CopyOnWriteDisk(baseImage: base, overlayDirectory: overlays)
        // The overlay is unlinked at once: nothing to leak if the process dies.
        #expect(TempDirectory.entries(of: overlays).isEmpty)
        #expect(!fileExists(disk.overlayPath))
        let patch = [UInt8](repeating: 0x5A, count: 1000)
        try patch.withUnsafeBytes { try disk.write($0, at: 5000) }
        var merged = bytes
        merged.replaceSubrange(5000 ..< 6000, with: patch)
        let out = dir.path + "/merged.img"
        try disk.exportMerged(to: out)
        #expect(try readFile(out) == merged)
        #expect(try readFile(base) == bytes)
        try disk.flush()
        disk.close()
        disk.close()
        #expect(TempDirectory.entries(of: overlays).isEmpty)
        unlink(out)

        // keepOverlay leaves the file in place.
        let kept = try CopyOnWriteDisk(baseImage: base, overlayDirectory: overlays, keepOverlay: true)
        #expect(fileExists(kept.overlayPath))
        kept.close()
        #expect(fileExists(kept.overlayPath))
        unlink(kept.overlayPath)
    }

    @Test("a grown disk: the base reads as before, the rest reads as zeros and keeps writes, export stays sparse")
    func grownDisk() throws {
        let dir = TempDirectory()
        defer { dir.remove() }
        let base = dir.path + "/base.img"
        // Not a whole number of 4 KiB blocks: the base's last block is partial.
        let bytes = randomBytes(64 * 1024 + 1536, seed: 31)
        try writeFile(base, bytes)
        let grownSize: UInt64 = 16 << 20
        let disk = try CopyOnWriteDisk(baseImage: base, overlayDirectory: dir.path, minimumCapacity: grownSize + 100)
        defer { disk.close() }
        #expect(disk.capacity == grownSize)  // rounded down to whole blocks
        #expect(disk.baseCapacity == UInt64(bytes.count))
        func read(_ offset: UInt64, _ count: Int) throws -> [UInt8] {
            var b = [UInt8](repeating: 0xEE, count: count)
            try b.withUnsafeMutableBytes { try disk.read(into: $0, at: offset) }
            return b
        }
        #expect(try read(0, bytes.count) == bytes)
        // The partial block: the base's bytes, then zeros.
        let tail = UInt64(bytes.count / 4096 * 4096)
        #expect(try read(tail, 4096) == Array(bytes[Int(tail)...]) + [UInt8](repeating: 0, count: 4096 - (bytes.count - Int(tail))))
        #expect(try read(grownSize - 8192, 8192) == [UInt8](repeating: 0, count: 8192))
        let patch = [UInt8](repeating: 0x6B, count: 3000)
        try patch.withUnsafeBytes { try disk.write($0, at: 10 << 20) }
        #expect(try read(10 << 20, 3000) == patch)
        #expect(try read((10 << 20) + 3000, 1096) == [UInt8](repeating: 0, count: 1096))
        // Beyond the grown size is still out of range.
        #expect(throws: BlockBackendError.self) { try read(grownSize, 512) }
        let out = dir.path + "/merged.img"
        try disk.exportMerged(to: out)
        var st = stat()
        #expect(stat(out, &st) == 0 && UInt64(st.st_size) == grownSize)
        // Two 1 MiB export chunks hold data (the base, the patch); the other 14 stay holes.
        #expect(UInt64(st.st_blocks) * 512 <= 2 << 20, "the export wrote \(st.st_blocks * 512) bytes for 16 MiB that is mostly zeros")
        let merged = try readFile(out)
        #expect(Array(merged[0 ..< bytes.count]) == bytes)
        #expect(Array(merged[(10 << 20) ..< (10 << 20) + 3000]) == patch)
        // A smaller minimum keeps the base's size.
        let same = try CopyOnWriteDisk(baseImage: base, overlayDirectory: dir.path, minimumCapacity: 4096)
        #expect(same.capacity == UInt64(bytes.count))
        same.close()
    }

    @Test("a layer: a disk's writes exported as a layer read back through a new disk over the same base, which keeps its own writes private")
    func layerStack() throws {
        let dir = TempDirectory()
        defer { dir.remove() }
        let base = dir.path + "/base.img"
        let bytes = randomBytes(256 * 1024, seed: 41)
        try writeFile(base, bytes)
        let grown: UInt64 = 8 << 20
        let first = try CopyOnWriteDisk(baseImage: base, overlayDirectory: dir.path, minimumCapacity: grown)
        func read(_ disk: CopyOnWriteDisk, _ offset: UInt64, _ count: Int) throws -> [UInt8] {
            var b = [UInt8](repeating: 0xEE, count: count)
            try b.withUnsafeMutableBytes { try disk.read(into: $0, at: offset) }
            return b
        }
        // In the base: a partial-block write (copy-up), and a whole block of zeros that
        // must hide the base's data. Past the base: data, which the layer must carry.
        let patch = [UInt8](repeating: 0x77, count: 100)
        try patch.withUnsafeBytes { try first.write($0, at: 5000) }
        let zeroBlock = [UInt8](repeating: 0, count: 4096)
        try zeroBlock.withUnsafeBytes { try first.write($0, at: 64 * 1024) }
        let far = [UInt8](repeating: 0x42, count: 8192)
        try far.withUnsafeBytes { try first.write($0, at: 6 << 20) }
        let layer = try first.exportLayer(dataPath: dir.path + "/layer", mapPath: dir.path + "/layer.map")
        first.close()
        // Blocks 1 (5000) and 16 (64 KiB) in the base's range, two blocks at 6 MiB.
        #expect(layer.blockCount == 4)
        var st = stat()
        #expect(stat(layer.dataPath, &st) == 0 && UInt64(st.st_size) == grown)
        #expect(UInt64(st.st_blocks) * 512 <= 64 * 1024, "the layer stored \(st.st_blocks * 512) bytes for 4 blocks")
        // Read back from the files, as a restore does.
        let mapBytes = try readFile(dir.path + "/layer.map")
        let loaded = try DiskLayer(dataPath: layer.dataPath, capacity: grown, mapBytes: mapBytes)
        #expect(loaded == layer)

        var expected = bytes
        expected.replaceSubrange(5000 ..< 5100, with: patch)
        expected.replaceSubrange(64 * 1024 ..< 68 * 1024, with: zeroBlock)
        let a = try CopyOnWriteDisk(baseImage: base, overlayDirectory: dir.path, layer: loaded)
        let b = try CopyOnWriteDisk(baseImage: base, overlayDirectory: dir.path, layer: loaded)
        defer { a.close(); b.close() }
        #expect(a.capacity == grown)
        #expect(try read(a, 0, bytes.count) == expected)
        #expect(try read(a, 6 << 20, 8192) == far)
        #expect(try read(a, 7 << 20, 4096) == zeroBlock)
        // A partial write over a layer block copies the layer's block up, not the base's.
        try [UInt8](repeating: 0x99, count: 10).withUnsafeBytes { try a.write($0, at: 5010) }
        #expect(try read(a, 4096, 4096) == Array(expected[4096 ..< 5010]) + [UInt8](repeating: 0x99, count: 10) + Array(expected[5020 ..< 8192]))
        try [UInt8](repeating: 0x11, count: 10).withUnsafeBytes { try a.write($0, at: (6 << 20) + 100) }
        #expect(try read(a, 6 << 20, 200) == Array(far[0 ..< 100]) + [UInt8](repeating: 0x11, count: 10) + Array(far[110 ..< 200]))
        // The other disk over the same layer sees none of that; the files are unchanged.
        #expect(try read(b, 0, bytes.count) == expected)
        #expect(try read(b, 6 << 20, 8192) == far)
        #expect(try readFile(base) == bytes)
        #expect(try readFile(dir.path + "/layer.map") == mapBytes)
        // A merged export of a disk over a layer holds all three.
        try a.exportMerged(to: dir.path + "/merged")
        let merged = try readFile(dir.path + "/merged")
        #expect(Array(merged[5010 ..< 5020]) == [UInt8](repeating: 0x99, count: 10))
        #expect(Array(merged[(6 << 20) + 110 ..< (6 << 20) + 200]) == Array(far[110 ..< 200]))
        // A layer of a layered disk carries the lower layer's blocks too (one flat layer).
        let second = try a.exportLayer(dataPath: dir.path + "/layer2", mapPath: dir.path + "/layer2.map")
        #expect(second.blockCount == 4)
    }

    @Test("damaged layer files are refused with what is wrong")
    func damagedLayers() throws {
        let dir = TempDirectory()
        defer { dir.remove() }
        let data = dir.path + "/layer"
        try writeFile(data, [UInt8](repeating: 0, count: 64 * 1024))
        let good = [UInt8](repeating: 0, count: 8)  // 16 blocks: one word
        _ = try DiskLayer(dataPath: data, capacity: 64 * 1024, mapBytes: good)
        func refused(_ capacity: UInt64, _ map: [UInt8], _ path: String? = nil, _ words: String) {
            do {
                _ = try DiskLayer(dataPath: path ?? data, capacity: capacity, mapBytes: map)
                Issue.record("accepted a bad layer (\(words))")
            } catch {
                #expect(error.description.contains(words), "\(error.description)")
            }
        }
        refused(64 * 1024, [0, 0, 0], nil, "block map is 3 bytes")
        refused(64 * 1024, [0, 0, 1, 0, 0, 0, 0, 0], nil, "past the end")
        refused(8 << 20, good, nil, "needs 256")
        refused(128 * 1024, good, nil, "data file is 65536 bytes; its disk is 131072")
        refused(64 * 1024, good, dir.path + "/missing", "cannot read")
        refused(1000, good, nil, "not a valid layer size")
        // A layer smaller than the base does not open.
        let base = dir.path + "/base"
        try writeFile(base, [UInt8](repeating: 1, count: 128 * 1024))
        let small = try DiskLayer(dataPath: data, capacity: 64 * 1024, mapBytes: good)
        #expect(throws: SystemError.self) { try CopyOnWriteDisk(baseImage: base, overlayDirectory: dir.path, layer: small) }
    }

    @Test("a transport saved mid-run and restored over a fresh device serves the next request where the old one left off")
    func transportRestoreContinues() throws {
        let dir = TempDirectory()
        defer { dir.remove() }
        let base = dir.path + "/base.img"
        let bytes = randomBytes(1 << 20, seed: 41)
        try writeFile(base, bytes)
        let driver = try MockDriver(size: 16)
        func read(_ sector: UInt8, via transport: MMIOTransport, _ irq: EventTrigger) throws -> [UInt8] {
            let hdr = try driver.allocate(16, fill: [0, 0, 0, 0, 0, 0, 0, 0, sector, 0, 0, 0, 0, 0, 0, 0])
            let data = try driver.allocate(512)
            let status = try driver.allocate(1, fill: [0xEE])
            _ = try driver.post([.init(address: hdr, length: 16, writable: false),
                                 .init(address: data, length: 512, writable: true),
                                 .init(address: status, length: 1, writable: true)])
            transport.write32(VirtioMMIORegister.queueNotify, 0)
            try #require(irq.wait(), "no interrupt; device error: \((transport.device as? BlockDevice)?.lastError ?? "none"), used \((try? driver.usedIdx) ?? 99), status 0x\(String(transport.deviceStatus, radix: 16))")
            #expect(try driver.memory.readBytes(at: status, count: 1) == [0])
            return try driver.memory.readBytes(at: data, count: 512)
        }
        let devA = try BlockDevice(baseImage: base, overlayDirectory: dir.path, serial: "a")
        let irqA = EventTrigger()
        let a = try MMIOTransport(device: devA, memory: driver.memory, interrupt: irqA)
        a.initialise(features: VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX, queues: [(0, driver)])
        try a.start()
        #expect(try read(1, via: a, irqA) == Array(bytes[512 ..< 1024]))
        a.stop()
        a.settle()
        let saved = try JSONDecoder().decode(MMIOTransportState.self, from: JSONEncoder().encode(a.state))
        #expect(saved.queues[0].nextAvail == 1 && saved.queues[0].nextUsed == 1, "\(saved.queues[0])")

        // A fresh device and transport over the same guest memory, as a restored VM has.
        let devB = try BlockDevice(baseImage: base, overlayDirectory: dir.path, serial: "b")
        let irqB = EventTrigger()
        let b = try MMIOTransport(device: devB, memory: driver.memory, interrupt: irqB)
        try b.restore(saved)
        #expect(b.deviceStatus == saved.status)
        #expect(devB.queueStates()?.first?.nextAvail == 1)
        try b.start()
        // EVENT_IDX: the driver asks for an interrupt once the used index passes 1.
        try driver.setUsedEvent(1)
        #expect(try read(2, via: b, irqB) == Array(bytes[1024 ..< 1536]))
        #expect(try driver.usedIdx == 2)
        b.stop()

        // A state that does not fit is refused, and nothing changes.
        let devC = try BlockDevice(baseImage: base, overlayDirectory: dir.path, serial: "c")
        let c = try MMIOTransport(device: devC, memory: driver.memory, interrupt: EventTrigger())
        var bad = saved
        bad.queues[0].descTable = 1 << 40  // outside guest RAM
        #expect(throws: MMIORestoreError.self) { try c.restore(bad) }
        var tooMany = saved
        tooMany.queues.append(saved.queues[0])
        #expect(throws: MMIORestoreError.invalid("2 queues saved, the device has 1")) { try c.restore(tooMany) }
        #expect(c.deviceStatus == 0 && devC.queueStates() == nil)
        devA.close(); devB.close(); devC.close()
    }

    @Test func engineSelectionReportsAReason() throws {
        let s = BlockEngineKind.auto
        let disabled = (try? String(contentsOfFile: "/proc/sys/kernel/io_uring_disabled", encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines)
        switch s.kind {
        case .ioUring:
            #expect(s.reason == "io_uring probe ring created")
            #expect(disabled != "2", "io_uring chosen although kernel.io_uring_disabled=2")
        case .sync:
            #expect(s.reason.hasPrefix("io_uring unavailable (") && s.reason.hasSuffix("); using pread/pwrite"), "\(s.reason)")
        }
        if disabled == "2" { #expect(s.kind == .sync) }
    }

    @Test func endToEndThroughTransportAndWorker() throws {
        let dir = TempDirectory()
        defer { dir.remove() }
        let base = dir.path + "/base.img"
        let bytes = randomBytes(1 << 20, seed: 21)
        try writeFile(base, bytes)
        let device = try BlockDevice(baseImage: base, overlayDirectory: dir.path, serial: "e2e")
        let driver = try MockDriver(size: 16)
        let irq = EventTrigger()
        let transport = try MMIOTransport(device: device, memory: driver.memory, interrupt: irq)
        transport.initialise(features: VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX, queues: [(0, driver)])
        #expect(transport.deviceStatus & VirtioStatus.driverOK != 0)
        try transport.start()

        // Write a block, ring the doorbell via MMIO, wait for the interrupt.
        let hdr = try driver.allocate(16, fill: [1, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0])
        let data = try driver.allocate(4096, fill: Array(repeating: 0x77, count: 4096))
        let status = try driver.allocate(1, fill: [0xEE])
        try driver.post([.init(address: hdr, length: 16, writable: false),
                         .init(address: data, length: 4096, writable: false),
                         .init(address: status, length: 1, writable: true)])
        transport.write32(VirtioMMIORegister.queueNotify, 0)
        try #require(irq.wait())
        #expect(transport.read32(VirtioMMIORegister.interruptStatus) & VirtioInterruptBits.usedBuffer != 0)
        transport.write32(VirtioMMIORegister.interruptACK, VirtioInterruptBits.usedBuffer)
        #expect(try driver.memory.readBytes(at: status, count: 1) == [0])

        // Read it back through the ioeventfd path.
        let hdr2 = try driver.allocate(16, fill: [0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0])
        let back = try driver.allocate(8192)
        let status2 = try driver.allocate(1, fill: [0xEE])
        try driver.post([.init(address: hdr2, length: 16, writable: false),
                         .init(address: back, length: 8192, writable: true),
                         .init(address: status2, length: 1, writable: true)])
        // EVENT_IDX: the driver asks for an interrupt once used idx passes 1.
        try driver.setUsedEvent(1)
        try #require(transport.notifyEventFD(forQueue: 0)).signal()
        try #require(irq.wait())
        #expect(try driver.memory.readBytes(at: status2, count: 1) == [0])
        #expect(try driver.memory.readBytes(at: back, count: 8192) == Array(repeating: 0x77, count: 4096) + Array(bytes[12288 ..< 16384]))
        #expect(transport.state.queues[0].nextUsed == 2)

        // Driver reset deactivates (on the worker thread: settle waits for it); stop joins the worker.
        transport.write32(VirtioMMIORegister.status, 0)
        #expect(transport.deviceStatus == 0)
        transport.settle()
        #expect(device.queueStates() == nil)
        transport.stop()
        device.close()
    }
}
