#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import SystemShims
@testable import VirtIO

/// One split ring of a mock driver at chosen addresses (MockDriver's rings sit at
/// fixed addresses, and vsock needs three queues in one guest memory).
final class VsockRing {
    let memory: GuestMemory
    let size: UInt16
    let descTable: GuestAddress
    let availRing: GuestAddress
    let usedRing: GuestAddress
    private(set) var availIdx: UInt16 = 0
    var lastUsed: UInt16 = 0

    init(memory: GuestMemory, size: UInt16, base: UInt64) {
        self.memory = memory
        self.size = size
        descTable = GuestAddress(base)
        availRing = GuestAddress(base + 0x1000)
        usedRing = GuestAddress(base + 0x2000)
    }

    var queue: VirtQueue {
        var q = VirtQueue(maxSize: size)
        q.descTable = descTable
        q.availRing = availRing
        q.usedRing = usedRing
        q.ready = true
        return q
    }

    func setDescriptor(_ index: UInt16, address: UInt64, length: UInt32, flags: UInt16, next: UInt16 = 0) throws {
        let base = descTable.rawValue + 16 * UInt64(index)
        try memory.write(address.littleEndian, at: GuestAddress(base))
        try memory.write(length.littleEndian, at: GuestAddress(base + 8))
        try memory.write(flags.littleEndian, at: GuestAddress(base + 12))
        try memory.write(next.littleEndian, at: GuestAddress(base + 14))
    }

    func publish(head: UInt16) throws {
        try memory.write(head.littleEndian, at: GuestAddress(availRing.rawValue + 4 + 2 * UInt64(availIdx % size)))
        availIdx &+= 1
        try memory.write(availIdx.littleEndian, at: GuestAddress(availRing.rawValue + 2))
    }

    func setAvailIndex(_ idx: UInt16) throws {
        availIdx = idx
        try memory.write(idx.littleEndian, at: GuestAddress(availRing.rawValue + 2))
    }

    var usedIdx: UInt16 {
        get throws { UInt16(littleEndian: try memory.read(UInt16.self, at: GuestAddress(usedRing.rawValue + 2))) }
    }

    func usedElement(_ slot: UInt16) throws -> (id: UInt32, length: UInt32) {
        let base = usedRing.rawValue + 4 + 8 * UInt64(slot % size)
        return (UInt32(littleEndian: try memory.read(UInt32.self, at: GuestAddress(base))),
                UInt32(littleEndian: try memory.read(UInt32.self, at: GuestAddress(base + 4))))
    }
}

/// A packet the device put into an rx buffer.
struct VsockTestPacket {
    var header: VsockHeader
    var payload: [UInt8]
    var op: UInt16 { header.op }
}

/// The guest side of a vsock device for tests: three rings in one guest memory, a
/// pool of rx buffers (one descriptor each, like Linux 6.x, or header + payload
/// descriptors like older kernels), and helpers to send packets on tx. The device
/// is driven directly: `send` calls queueNotify(tx) on the calling thread.
final class VsockGuest: @unchecked Sendable {
    // @unchecked: used from the test thread; host threads only touch `device`.
    static let guestCID: UInt64 = 3
    static let rxPayload = 4096
    static let rxSlot: UInt64 = 0x1100
    static let rxBase: UInt64 = 0x100000
    static let txBase: UInt64 = 0x400000

    let memory: GuestMemory
    let device: VsockDevice
    let trigger = CountingTrigger()
    let interrupt: VirtioInterrupt
    let rx: VsockRing
    let tx: VsockRing
    let event: VsockRing
    let splitRx: Bool
    private var txHead: UInt16 = 0
    private var inbox: [VsockTestPacket] = []

    /// - Parameters:
    ///   - configuration: the device's limits.
    ///   - rxBuffers: rx buffers posted at start.
    ///   - splitRx: post rx buffers as two descriptors (header, payload).
    init(configuration: VsockConfiguration = VsockConfiguration(), rxBuffers: Int = 64, splitRx: Bool = false) throws {
        memory = try GuestMemory(size: 8 << 20)
        device = VsockDevice(guestCID: Self.guestCID, queueSize: 128, configuration: configuration)
        interrupt = VirtioInterrupt(trigger: trigger)
        rx = VsockRing(memory: memory, size: 128, base: 0x10000)
        tx = VsockRing(memory: memory, size: 128, base: 0x20000)
        event = VsockRing(memory: memory, size: 128, base: 0x30000)
        self.splitRx = splitRx
        try device.activate(memory: memory, queues: [rx.queue, tx.queue, event.queue],
                            features: VIRTIO_F_VERSION_1, interrupt: interrupt)
        try postRx(count: rxBuffers)
    }

    deinit { device.shutdown() }

    // MARK: rx

    private func rxAddress(_ buffer: UInt16) -> UInt64 { Self.rxBase + UInt64(buffer) * Self.rxSlot }

    /// Descriptor of rx buffer `i`: i (single) or 2i, 2i+1 (split); at most 64 buffers.
    private func postRxBuffer(_ i: UInt16) throws {
        let addr = rxAddress(i)
        if splitRx {
            try rx.setDescriptor(2 * i, address: addr, length: UInt32(VsockHeader.size),
                                 flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, next: 2 * i + 1)
            try rx.setDescriptor(2 * i + 1, address: addr + UInt64(VsockHeader.size), length: UInt32(Self.rxPayload),
                                 flags: VIRTQ_DESC_F_WRITE)
            try rx.publish(head: 2 * i)
        } else {
            try rx.setDescriptor(i, address: addr, length: UInt32(VsockHeader.size + Self.rxPayload), flags: VIRTQ_DESC_F_WRITE)
            try rx.publish(head: i)
        }
    }

    /// Posts rx buffers 0 ..< count and notifies.
    func postRx(count: Int) throws {
        guard count > 0 else { return }
        for i in 0 ..< UInt16(min(count, 64)) { try postRxBuffer(i) }
        device.queueNotify(VsockDevice.rxQueue)
    }

    /// Collects packets the device delivered, reposting their buffers (and notifying)
    /// unless `repost` is false.
    @discardableResult
    func collect(repost: Bool = true) throws -> Int {
        var n = 0
        let used = try rx.usedIdx
        while rx.lastUsed != used {
            let e = try rx.usedElement(rx.lastUsed)
            rx.lastUsed &+= 1
            let buffer = UInt16(splitRx ? e.id / 2 : e.id)
            let addr = GuestAddress(rxAddress(buffer))
            let header = VsockHeader(decoding: try memory.readBytes(at: addr, count: VsockHeader.size))
            let length = Int(e.length) - VsockHeader.size
            precondition(length >= 0 && Int(header.len) == length && length <= Self.rxPayload, "bad rx used length")
            let payload = try memory.readBytes(at: GuestAddress(addr.rawValue + UInt64(VsockHeader.size)), count: length)
            inbox.append(VsockTestPacket(header: header, payload: payload))
            if repost { try postRxBuffer(buffer) }
            n += 1
        }
        if n > 0 && repost { device.queueNotify(VsockDevice.rxQueue) }
        return n
    }

    /// The next delivered packet, waiting up to `timeoutMillis`.
    func next(timeoutMillis: Int = 5000) throws -> VsockTestPacket? {
        let end = monotonicNanos() + UInt64(timeoutMillis) * 1_000_000
        while true {
            if inbox.isEmpty { try collect() }
            if !inbox.isEmpty { return inbox.removeFirst() }
            if monotonicNanos() >= end { return nil }
            usleep(500)
        }
    }

    /// The next delivered packet with operation `op` (others are skipped).
    func next(op: UInt16, timeoutMillis: Int = 5000) throws -> VsockTestPacket? {
        let end = monotonicNanos() + UInt64(timeoutMillis) * 1_000_000
        while let p = try next(timeoutMillis: max(0, Int((Int64(end) - Int64(monotonicNanos())) / 1_000_000))) {
            if p.op == op { return p }
        }
        return nil
    }

    /// Everything delivered within `quietMillis` of silence.
    func drain(quietMillis: Int = 100) throws -> [VsockTestPacket] {
        var out: [VsockTestPacket] = []
        while let p = try next(timeoutMillis: quietMillis) { out.append(p) }
        return out
    }

    // MARK: tx

    /// A header from the guest (CID 3) to the host (CID 2).
    func header(op: UInt16, srcPort: UInt32, dstPort: UInt32, len: UInt32 = 0, flags: UInt32 = 0,
                bufAlloc: UInt32 = 256 << 10, fwdCnt: UInt32 = 0) -> VsockHeader {
        VsockHeader(srcCID: Self.guestCID, dstCID: VsockCID.host, srcPort: srcPort, dstPort: dstPort, len: len,
                    type: VsockType.stream, op: op, flags: flags, bufAlloc: bufAlloc, fwdCnt: fwdCnt)
    }

    /// Sends raw buffers as one tx chain and notifies (processed synchronously).
    func sendRaw(_ buffers: [(bytes: [UInt8], writable: Bool)]) throws {
        // Small chains get a slot each (by head), so that chains the device has not
        // taken yet (a paused tx queue) keep their bytes; big ones share the area's start.
        let total = buffers.reduce(0) { $0 + (($1.bytes.count + 15) & ~15) }
        var addr = total <= 256 ? Self.txBase + (2 << 20) + UInt64(txHead % 256) * 256 : Self.txBase
        for (i, b) in buffers.enumerated() {
            let index = (txHead &+ UInt16(i)) % tx.size
            let last = i == buffers.count - 1
            try memory.writeBytes(b.bytes, at: GuestAddress(addr))
            try tx.setDescriptor(index, address: addr, length: UInt32(b.bytes.count),
                                 flags: (b.writable ? VIRTQ_DESC_F_WRITE : 0) | (last ? 0 : VIRTQ_DESC_F_NEXT),
                                 next: (index + 1) % tx.size)
            addr += UInt64((b.bytes.count + 15) & ~15)
        }
        let head = txHead
        txHead = (txHead &+ UInt16(buffers.count)) % tx.size
        try tx.publish(head: head)
        device.queueNotify(VsockDevice.txQueue)
    }

    /// Sends a packet: header and payload in two descriptors (Linux's layout).
    func send(_ header: VsockHeader, payload: [UInt8] = []) throws {
        var h = header
        if h.len == 0 { h.len = UInt32(payload.count) }
        try sendRaw(payload.isEmpty ? [(h.bytes, false)] : [(h.bytes, false), (payload, false)])
    }

    // MARK: Conveniences

    /// Connects the host to guest port `port` and answers with RESPONSE.
    func establish(port: UInt32 = 1024, guestBufAlloc: UInt32 = 256 << 10) throws -> (VsockConnection, VsockTestPacket) {
        let pending = Background { () throws(VsockError) in try self.device.connect(guestPort: port, timeoutMillis: 5000) }
        guard let request = try next(op: VsockOp.request) else { throw TestFailure("no REQUEST") }
        try send(header(op: VsockOp.response, srcPort: port, dstPort: request.header.srcPort, bufAlloc: guestBufAlloc))
        guard case let .success(conn)? = pending.wait() else { throw TestFailure("connect failed") }
        return (conn, request)
    }
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// Runs a blocking host call on its own thread; `wait` gives up after a timeout so a
/// test never hangs.
final class Background<T>: @unchecked Sendable {
    // @unchecked: `result` is written once by the thread and read after `done`.
    private var result: Result<T, VsockError>?
    private let done = try! EventFD(nonBlocking: true)
    private var thread: NativeThread?

    init(_ body: @escaping @Sendable () throws(VsockError) -> T) {
        thread = try! NativeThread(name: "vsock-test") { [self] in
            do throws(VsockError) { result = .success(try body()) } catch { result = .failure(error) }
            done.signal()
        }
    }

    /// The result, or nil if the call has not finished within `timeoutMillis`.
    func wait(timeoutMillis: Int32 = 10_000) -> Result<T, VsockError>? {
        guard waitReadable(done.fd.rawValue, timeoutMillis: timeoutMillis) else { return nil }
        thread?.join()
        thread = nil
        return result
    }

    /// Whether the call has finished (non-blocking).
    var isDone: Bool { waitReadable(done.fd.rawValue, timeoutMillis: 0) }
}
