// libFuzzer target: the virtio devices as a hostile driver drives them: virtio-blk
// requests (headers, sectors, lengths, chain shapes), virtio-vsock packets (headers
// that lie about lengths, ops, ports, credit; rx buffers too small) and virtio-rng
// requests (readable parts, huge or empty buffers), each over guest RAM
// the input fills, with three queues at fixed addresses. A device may refuse, mark
// itself broken or reset connections; it may not trap, touch memory outside guest RAM
// (ASan) or hang (libFuzzer's timeout).
import Foundation
import Bus
import GuestMemory
@testable import VirtIO

struct NoInterrupt: InterruptTrigger { func trigger() {} }

let ramSize: UInt64 = 64 << 10
let memory = try! GuestMemory(size: ramSize)
let zeros = [UInt8](repeating: 0, count: Int(ramSize))
let scratch = NSTemporaryDirectory() + "sandbox-fuzz-devices-\(getpid())"
let block: BlockDevice = {
    try! FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
    let base = scratch + "/base.img"
    FileManager.default.createFile(atPath: base, contents: Data(repeating: 0x5A, count: 1 << 20))
    let disk = try! CopyOnWriteDisk(baseImage: base, overlayDirectory: scratch)
    return BlockDevice(backend: disk, engine: SyncEngine(), queueSize: 16)
}()
let vsock: VsockDevice = {
    let v = VsockDevice(guestCID: 3, queueSize: 16)
    // A listener, so that connection requests from the "guest" are accepted and the
    // connection paths (data, credit, shutdown) are reached.
    try? v.listen(port: 1024) { _ in }
    return v
}()
let entropy = EntropyDevice(queueSize: 16)

func queue(_ n: UInt64, size: UInt16, indirect: Bool, eventIndex: Bool) -> VirtQueue {
    var q = VirtQueue(maxSize: 16)
    q.size = size
    q.ready = true
    q.indirectDescriptors = indirect
    q.eventIndex = eventIndex
    q.descTable = GuestAddress(n * 0x400)
    q.availRing = GuestAddress(n * 0x400 + 0x100)
    q.usedRing = GuestAddress(n * 0x400 + 0x200)
    return q
}

func one(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let data, size >= 2 else { return 0 }
    let input = UnsafeRawBufferPointer(start: data, count: size)
    try! memory.writeBytes(zeros, at: GuestAddress(0))
    try! memory.writeBytes(UnsafeRawBufferPointer(rebasing: input[2 ..< min(size, 2 + Int(ramSize))]), at: GuestAddress(0))
    let flags = input[1]
    let qsize = UInt16(1) << UInt16(flags & 3 + 2)  // 4 ... 32 (32: above the device's maximum)
    let indirect = flags & 4 != 0, eventIndex = flags & 8 != 0
    let features = VIRTIO_F_VERSION_1 | (indirect ? VIRTIO_F_INDIRECT_DESC : 0) | (eventIndex ? VIRTIO_F_EVENT_IDX : 0)
    let interrupt = VirtioInterrupt(trigger: NoInterrupt())
    // Byte 0: bit 0 set = vsock; else bit 1 set = virtio-rng; else virtio-blk.
    if input[0] & 3 == 2 {
        entropy.reset()
        let q = queue(0, size: qsize, indirect: indirect, eventIndex: eventIndex)
        guard (try? q.validate(memory: memory)) != nil else { return 0 }
        guard (try? entropy.activate(memory: memory, queues: [q], features: features, interrupt: interrupt)) != nil else { return 0 }
        entropy.queueNotify(0)
    } else if input[0] & 1 == 0 {
        block.reset()
        let q = queue(0, size: qsize, indirect: indirect, eventIndex: eventIndex)
        guard (try? q.validate(memory: memory)) != nil else { return 0 }
        guard (try? block.activate(memory: memory, queues: [q], features: features, interrupt: interrupt)) != nil else { return 0 }
        block.queueNotify(0)
        block.queueNotify(0)
    } else {
        vsock.reset()
        let qs = (0 ..< 3).map { queue(UInt64($0), size: qsize, indirect: indirect, eventIndex: eventIndex) }
        guard qs.allSatisfy({ (try? $0.validate(memory: memory)) != nil }) else { return 0 }
        guard (try? vsock.activate(memory: memory, queues: qs, features: features, interrupt: interrupt)) != nil else { return 0 }
        for index in [1, 0, 2, 1, 0] { vsock.queueNotify(index) }
    }
    return 0
}
