import GuestMemory
import Synchronization

// Split virtqueue, virtio 1.x spec section 2.7 ("Split Virtqueues").
//
//   descriptor table (16 bytes each, 16-byte aligned)
//     le64 addr | le32 len | le16 flags | le16 next
//   available ring (driver -> device, 2-byte aligned)
//     le16 flags | le16 idx | le16 ring[size] | le16 used_event (EVENT_IDX)
//   used ring (device -> driver, 4-byte aligned)
//     le16 flags | le16 idx | { le32 id, le32 len }[size] | le16 avail_event (EVENT_IDX)
//
// The queue keeps only addresses and indices; every operation takes the guest
// memory as a parameter. Everything read from guest memory is treated as hostile.

/// Descriptor flag: the buffer continues via the `next` field.
public let VIRTQ_DESC_F_NEXT: UInt16 = 1
/// Descriptor flag: the buffer is device write-only (otherwise device read-only).
public let VIRTQ_DESC_F_WRITE: UInt16 = 2
/// Descriptor flag: the buffer holds a table of indirect descriptors.
public let VIRTQ_DESC_F_INDIRECT: UInt16 = 4
/// Available ring flag: the driver does not want an interrupt for used buffers.
public let VIRTQ_AVAIL_F_NO_INTERRUPT: UInt16 = 1
/// Used ring flag: the device does not want notifications for available buffers.
public let VIRTQ_USED_F_NO_NOTIFY: UInt16 = 1

/// Why the virtqueue refused the driver's rings or a descriptor chain. Any of these
/// means the driver broke the protocol; the device should stop using the queue
/// (virtio-mmio: set DEVICE_NEEDS_RESET).
public enum VirtQueueError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The queue is not ready (or was never configured).
    case notReady
    /// The queue size is 0, larger than the device maximum, or not a power of two.
    case invalidSize(UInt16)
    /// A ring address is not aligned as the spec requires.
    case misalignedRing(address: UInt64, alignment: UInt64)
    /// A ring (descriptor table, available or used ring) is not inside guest RAM.
    case ringOutOfBounds(address: UInt64, length: UInt64)
    /// The available index moved by more than the queue size since we last looked.
    case availIndexJump(lastSeen: UInt16, published: UInt16, size: UInt16)
    /// A head index taken from the available ring is not below the queue size.
    case headOutOfRange(head: UInt16, size: UInt16)
    /// A descriptor's `next` is not below the table size.
    case nextOutOfRange(index: UInt16, next: UInt16, tableSize: UInt32)
    /// A chain visits the same descriptor twice.
    case descriptorLoop(head: UInt16, index: UInt16)
    /// A chain has more descriptors than the queue size (direct plus indirect).
    case chainTooLong(head: UInt16, limit: Int)
    /// `address + length` of a buffer wraps around 2^64.
    case addressOverflow(address: UInt64, length: UInt32)
    /// A buffer is not entirely inside guest RAM.
    case bufferOutOfBounds(address: UInt64, length: UInt32)
    /// The readable or writable part of a chain adds up to more than 2^32 - 1 bytes.
    case lengthOverflow(head: UInt16)
    /// A device-readable descriptor follows a device-writable one.
    case readableAfterWritable(head: UInt16, index: UInt16)
    /// An indirect table contains an INDIRECT descriptor.
    case nestedIndirect(head: UInt16)
    /// A descriptor has both INDIRECT and NEXT set.
    case indirectWithNext(head: UInt16)
    /// An indirect table's length is zero or not a multiple of 16.
    case invalidIndirectTable(head: UInt16, length: UInt32)
    /// INDIRECT used although VIRTIO_F_INDIRECT_DESC was not negotiated.
    case indirectNotNegotiated(head: UInt16)

    public var description: String {
        switch self {
        case .notReady: return "virtqueue not ready"
        case let .invalidSize(s): return "invalid virtqueue size \(s)"
        case let .misalignedRing(a, al): return "virtqueue ring 0x\(String(a, radix: 16)) not \(al)-byte aligned"
        case let .ringOutOfBounds(a, l): return "virtqueue ring 0x\(String(a, radix: 16)) (+\(l)) outside guest RAM"
        case let .availIndexJump(l, p, s): return "available index jumped from \(l) to \(p) (queue size \(s))"
        case let .headOutOfRange(h, s): return "chain head \(h) >= queue size \(s)"
        case let .nextOutOfRange(i, n, t): return "descriptor \(i): next \(n) >= table size \(t)"
        case let .descriptorLoop(h, i): return "chain \(h) loops at descriptor \(i)"
        case let .chainTooLong(h, l): return "chain \(h) longer than \(l) descriptors"
        case let .addressOverflow(a, l): return "buffer 0x\(String(a, radix: 16)) + \(l) wraps"
        case let .bufferOutOfBounds(a, l): return "buffer 0x\(String(a, radix: 16)) (+\(l)) outside guest RAM"
        case let .lengthOverflow(h): return "chain \(h) total length overflows 32 bits"
        case let .readableAfterWritable(h, i): return "chain \(h): readable descriptor \(i) after a writable one"
        case let .nestedIndirect(h): return "chain \(h): nested indirect descriptor"
        case let .indirectWithNext(h): return "chain \(h): descriptor has both INDIRECT and NEXT"
        case let .invalidIndirectTable(h, l): return "chain \(h): invalid indirect table length \(l)"
        case let .indirectNotNegotiated(h): return "chain \(h): INDIRECT without VIRTIO_F_INDIRECT_DESC"
        }
    }
}

/// One guest buffer of a descriptor chain, already checked to lie inside guest RAM.
public struct DescriptorBuffer: Equatable, Sendable {
    public var address: GuestAddress
    public var length: UInt32
}

/// A descriptor chain popped from the available ring, validated as a whole: every
/// buffer is inside guest RAM, readable buffers come first, and the total lengths fit
/// in 32 bits. Bytes are still read and written through `GuestMemory` (bounds-checked
/// again), since the guest may change its memory map only through the VMM.
public struct DescriptorChain: Equatable, Sendable {
    /// The head descriptor index (what goes back into the used ring).
    public let head: UInt16
    /// Device-readable buffers, in chain order.
    public let readable: [DescriptorBuffer]
    /// Device-writable buffers, in chain order.
    public let writable: [DescriptorBuffer]
    /// Sum of the readable buffer lengths.
    public let readableLength: Int
    /// Sum of the writable buffer lengths.
    public let writableLength: Int

    /// Makes a chain from already validated buffers.
    public init(head: UInt16, readable: [DescriptorBuffer], writable: [DescriptorBuffer]) {
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readableLength = readable.reduce(0) { $0 + Int($1.length) }
        self.writableLength = writable.reduce(0) { $0 + Int($1.length) }
    }

    /// Copies `destination.count` readable bytes starting at byte `offset` of the
    /// readable part into `destination`.
    /// - Throws: `DescriptorChainError.shortReadable` if the readable part is too short,
    ///   `GuestMemoryError` if a buffer left guest RAM.
    public func read(from memory: GuestMemory, offset: Int, into destination: UnsafeMutableRawBufferPointer) throws {
        guard offset >= 0, offset <= readableLength, destination.count <= readableLength - offset else {
            throw DescriptorChainError.shortReadable(needed: offset + destination.count, available: readableLength)
        }
        try Self.scatter(buffers: readable, skipping: offset, count: destination.count) { addr, len, done in
            try memory.withBuffer(at: addr, length: len) { src in
                // SAFETY: `destination` has count bytes and done + len <= count (scatter
                // never hands out more than `count` bytes); `src` is a bounds-checked
                // lend of exactly len bytes of guest RAM.
                (destination.baseAddress! + done).copyMemory(from: src.baseAddress!, byteCount: len)
            }
        }
    }

    /// Reads `count` readable bytes starting at `offset` into a new array.
    public func readBytes(from memory: GuestMemory, offset: Int, count: Int) throws -> [UInt8] {
        guard count >= 0 else { throw DescriptorChainError.shortReadable(needed: offset, available: readableLength) }
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try read(from: memory, offset: offset, into: $0) }
        return out
    }

    /// Copies `source` into the writable part, starting at byte `offset` of it.
    /// - Throws: `DescriptorChainError.shortWritable` if the writable part is too short.
    public func write(to memory: GuestMemory, offset: Int, from source: UnsafeRawBufferPointer) throws {
        guard offset >= 0, offset <= writableLength, source.count <= writableLength - offset else {
            throw DescriptorChainError.shortWritable(needed: offset + source.count, available: writableLength)
        }
        try Self.scatter(buffers: writable, skipping: offset, count: source.count) { addr, len, done in
            try memory.withBuffer(at: addr, length: len) { dst in
                // SAFETY: `source` has count bytes and done + len <= count; `dst` is a
                // bounds-checked lend of exactly len bytes of guest RAM.
                dst.baseAddress!.copyMemory(from: source.baseAddress! + done, byteCount: len)
            }
        }
    }

    /// Copies `bytes` into the writable part at `offset`.
    public func writeBytes(_ bytes: [UInt8], to memory: GuestMemory, offset: Int) throws {
        try bytes.withUnsafeBytes { try write(to: memory, offset: offset, from: $0) }
    }

    /// Walks `count` bytes of `buffers` after skipping `skipping` bytes, calling
    /// `body(address, length, bytesDoneSoFar)` for each piece.
    private static func scatter(buffers: [DescriptorBuffer], skipping: Int, count: Int,
                                _ body: (GuestAddress, Int, Int) throws -> Void) throws {
        var skip = skipping
        var done = 0
        for b in buffers where done < count {
            let len = Int(b.length)
            if skip >= len { skip -= len; continue }
            let n = min(len - skip, count - done)
            // addr + skip cannot overflow: the whole buffer was validated at pop time.
            try body(GuestAddress(b.address.rawValue + UInt64(skip)), n, done)
            done += n
            skip = 0
        }
    }
}

/// Access beyond the readable or writable part of a chain.
public enum DescriptorChainError: Error, Equatable, Sendable {
    case shortReadable(needed: Int, available: Int)
    case shortWritable(needed: Int, available: Int)
}

/// Plain-value snapshot of a virtqueue (for VM snapshots).
public struct VirtQueueState: Sendable, Equatable, Codable {
    public var maxSize: UInt16
    public var size: UInt16
    public var ready: Bool
    public var descTable: UInt64
    public var availRing: UInt64
    public var usedRing: UInt64
    public var nextAvail: UInt16
    public var nextUsed: UInt16
    public var eventIndex: Bool
    public var indirectDescriptors: Bool
    public var signalledUsed: UInt16?
}

/// A split virtqueue: the ring addresses, size and the device's indices.
public struct VirtQueue: Sendable, Equatable {
    /// The largest size the device accepts (QueueNumMax).
    public let maxSize: UInt16
    /// The size the driver chose (QueueNum).
    public var size: UInt16
    /// QueueReady.
    public var ready: Bool = false
    /// Guest address of the descriptor table.
    public var descTable = GuestAddress(0)
    /// Guest address of the available ("driver") ring.
    public var availRing = GuestAddress(0)
    /// Guest address of the used ("device") ring.
    public var usedRing = GuestAddress(0)
    /// The next available-ring slot the device will consume (last_avail_idx).
    public private(set) var nextAvail: UInt16 = 0
    /// The next used-ring slot the device will fill (free-running used idx).
    public private(set) var nextUsed: UInt16 = 0
    /// VIRTIO_F_EVENT_IDX was negotiated.
    public var eventIndex = false
    /// VIRTIO_F_INDIRECT_DESC was negotiated.
    public var indirectDescriptors = false
    /// The used index at the last interrupt decision (EVENT_IDX).
    private var signalledUsed: UInt16? = nil

    /// A queue that accepts sizes up to `maxSize` (a power of two, at most 32768).
    public init(maxSize: UInt16) {
        precondition(maxSize > 0 && maxSize <= 32768 && maxSize & (maxSize - 1) == 0)
        self.maxSize = maxSize
        self.size = maxSize
    }

    /// Restores a queue from a snapshot.
    public init(state: VirtQueueState) {
        maxSize = state.maxSize
        size = state.size
        ready = state.ready
        descTable = GuestAddress(state.descTable)
        availRing = GuestAddress(state.availRing)
        usedRing = GuestAddress(state.usedRing)
        nextAvail = state.nextAvail
        nextUsed = state.nextUsed
        eventIndex = state.eventIndex
        indirectDescriptors = state.indirectDescriptors
        signalledUsed = state.signalledUsed
    }

    /// The queue as plain values.
    public var state: VirtQueueState {
        VirtQueueState(maxSize: maxSize, size: size, ready: ready, descTable: descTable.rawValue,
                       availRing: availRing.rawValue, usedRing: usedRing.rawValue, nextAvail: nextAvail,
                       nextUsed: nextUsed, eventIndex: eventIndex, indirectDescriptors: indirectDescriptors,
                       signalledUsed: signalledUsed)
    }

    /// Back to the power-on state (driver reset), keeping `maxSize`.
    public mutating func reset() {
        self = VirtQueue(maxSize: maxSize)
    }

    // MARK: Layout

    private var sizeBytes: UInt64 { UInt64(size) }
    private var descTableBytes: UInt64 { 16 * sizeBytes }
    private var availRingBytes: UInt64 { 6 + 2 * sizeBytes }
    private var usedRingBytes: UInt64 { 6 + 8 * sizeBytes }

    /// Checks size, alignment and that all three rings lie inside guest RAM. The
    /// transport calls this when the driver sets DRIVER_OK.
    public func validate(memory: GuestMemory) throws(VirtQueueError) {
        guard ready else { throw .notReady }
        guard size > 0, size <= maxSize, size & (size - 1) == 0 else { throw .invalidSize(size) }
        for (addr, align, len) in [(descTable, UInt64(16), descTableBytes),
                                   (availRing, UInt64(2), availRingBytes),
                                   (usedRing, UInt64(4), usedRingBytes)] {
            guard addr.rawValue % align == 0 else { throw .misalignedRing(address: addr.rawValue, alignment: align) }
            guard memory.contains(addr, length: len) else { throw .ringOutOfBounds(address: addr.rawValue, length: len) }
        }
    }

    /// Reads a u16 at `base + offset` from a ring (already validated, but re-checked).
    private func ringRead16(_ memory: GuestMemory, _ base: GuestAddress, _ offset: UInt64) throws(VirtQueueError) -> UInt16 {
        guard let a = base.adding(offset) else { throw .ringOutOfBounds(address: base.rawValue, length: offset) }
        do { return UInt16(littleEndian: try memory.read(UInt16.self, at: a)) } catch {
            throw .ringOutOfBounds(address: a.rawValue, length: 2)
        }
    }

    private func ringWrite<T: BitwiseCopyable>(_ memory: GuestMemory, _ value: T, _ base: GuestAddress, _ offset: UInt64) throws(VirtQueueError) {
        guard let a = base.adding(offset) else { throw .ringOutOfBounds(address: base.rawValue, length: offset) }
        do { try memory.write(value, at: a) } catch {
            throw .ringOutOfBounds(address: a.rawValue, length: UInt64(MemoryLayout<T>.size))
        }
    }

    // MARK: Available ring

    /// How many chains the driver has published that the device has not consumed.
    /// - Throws: `.availIndexJump` if the driver's index moved by more than `size`.
    public func pendingCount(memory: GuestMemory) throws(VirtQueueError) -> UInt16 {
        guard ready else { throw .notReady }
        let published = try ringRead16(memory, availRing, 2)
        // Acquire: the ring entries and descriptors published before idx must be read
        // after idx (virtio spec 2.7.13, "read barrier" on the device side).
        atomicMemoryFence(ordering: .acquiring)
        let pending = published &- nextAvail
        guard pending <= size else {
            throw .availIndexJump(lastSeen: nextAvail, published: published, size: size)
        }
        return pending
    }

    /// Pops the next available chain and validates it completely, or returns nil if
    /// the driver has published nothing new. On error the queue state is unchanged
    /// except that a malformed chain is consumed (its slot is not revisited).
    public mutating func popAvailable(memory: GuestMemory) throws(VirtQueueError) -> DescriptorChain? {
        guard try pendingCount(memory: memory) > 0 else { return nil }
        let slot = UInt64(nextAvail % size)
        let head = try ringRead16(memory, availRing, 4 + 2 * slot)
        nextAvail &+= 1
        guard head < size else { throw .headOutOfRange(head: head, size: size) }
        return try walkChain(memory: memory, head: head)
    }

    /// A raw descriptor as laid out in guest memory.
    private struct RawDescriptor {
        var addr: UInt64
        var len: UInt32
        var flags: UInt16
        var next: UInt16
    }

    private func readDescriptor(_ memory: GuestMemory, table: GuestAddress, index: UInt16) throws(VirtQueueError) -> RawDescriptor {
        guard let a = table.adding(16 * UInt64(index)) else { throw .ringOutOfBounds(address: table.rawValue, length: 16) }
        do {
            return RawDescriptor(addr: UInt64(littleEndian: try memory.read(UInt64.self, at: a)),
                                 len: UInt32(littleEndian: try memory.read(UInt32.self, at: GuestAddress(a.rawValue + 8))),
                                 flags: UInt16(littleEndian: try memory.read(UInt16.self, at: GuestAddress(a.rawValue + 12))),
                                 next: UInt16(littleEndian: try memory.read(UInt16.self, at: GuestAddress(a.rawValue + 14))))
        } catch {
            throw .ringOutOfBounds(address: a.rawValue, length: 16)
        }
    }

    /// Walks a chain from `head`, following at most one indirect table.
    private func walkChain(memory: GuestMemory, head: UInt16) throws(VirtQueueError) -> DescriptorChain {
        var readable: [DescriptorBuffer] = []
        var writable: [DescriptorBuffer] = []
        var readableTotal: UInt64 = 0
        var writableTotal: UInt64 = 0
        let limit = Int(size)
        var count = 0

        // Adds one data descriptor to the chain after checking it.
        func take(_ d: RawDescriptor, index: UInt16) throws(VirtQueueError) {
            count += 1
            guard count <= limit else { throw .chainTooLong(head: head, limit: limit) }
            guard GuestAddress(d.addr).adding(UInt64(d.len)) != nil else {
                throw .addressOverflow(address: d.addr, length: d.len)
            }
            guard memory.contains(GuestAddress(d.addr), length: UInt64(d.len)) else {
                throw .bufferOutOfBounds(address: d.addr, length: d.len)
            }
            let buffer = DescriptorBuffer(address: GuestAddress(d.addr), length: d.len)
            if d.flags & VIRTQ_DESC_F_WRITE != 0 {
                writableTotal += UInt64(d.len)
                guard writableTotal <= UInt64(UInt32.max) else { throw .lengthOverflow(head: head) }
                writable.append(buffer)
            } else {
                guard writable.isEmpty else { throw .readableAfterWritable(head: head, index: index) }
                readableTotal += UInt64(d.len)
                guard readableTotal <= UInt64(UInt32.max) else { throw .lengthOverflow(head: head) }
                readable.append(buffer)
            }
        }

        // Walks a table of `tableSize` descriptors starting at `first`, with loop detection.
        func walk(table: GuestAddress, tableSize: UInt32, first: UInt16, indirect: Bool) throws(VirtQueueError) {
            var visited = [UInt64](repeating: 0, count: (Int(tableSize) + 63) / 64)
            var index = first
            while true {
                let word = Int(index) / 64, bit = UInt64(1) << UInt64(index % 64)
                guard visited[word] & bit == 0 else { throw .descriptorLoop(head: head, index: index) }
                visited[word] |= bit
                let d = try readDescriptor(memory, table: table, index: index)
                if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                    guard !indirect else { throw .nestedIndirect(head: head) }
                    guard indirectDescriptors else { throw .indirectNotNegotiated(head: head) }
                    guard d.flags & VIRTQ_DESC_F_NEXT == 0 else { throw .indirectWithNext(head: head) }
                    guard d.len > 0, d.len % 16 == 0 else { throw .invalidIndirectTable(head: head, length: d.len) }
                    guard GuestAddress(d.addr).adding(UInt64(d.len)) != nil else {
                        throw .addressOverflow(address: d.addr, length: d.len)
                    }
                    guard memory.contains(GuestAddress(d.addr), length: UInt64(d.len)) else {
                        throw .bufferOutOfBounds(address: d.addr, length: d.len)
                    }
                    let entries = d.len / 16
                    // More entries than the queue size can never be a valid chain.
                    guard entries <= UInt32(limit) else { throw .chainTooLong(head: head, limit: limit) }
                    try walk(table: GuestAddress(d.addr), tableSize: entries, first: 0, indirect: true)
                    return
                }
                try take(d, index: index)
                guard d.flags & VIRTQ_DESC_F_NEXT != 0 else { return }
                guard UInt32(d.next) < tableSize else {
                    throw .nextOutOfRange(index: index, next: d.next, tableSize: tableSize)
                }
                index = d.next
            }
        }

        try walk(table: descTable, tableSize: UInt32(size), first: head, indirect: false)
        return DescriptorChain(head: head, readable: readable, writable: writable)
    }

    /// Puts back the last popped chain so that it is popped again (e.g. when the
    /// device runs out of resources before it could handle it).
    public mutating func undoPop() {
        nextAvail &-= 1
    }

    // MARK: Used ring

    /// Returns chain `head` to the driver, reporting `length` bytes written into its
    /// writable part. Publishes the new used index with release ordering.
    public mutating func addUsed(memory: GuestMemory, head: UInt16, length: UInt32) throws(VirtQueueError) {
        guard ready else { throw .notReady }
        guard head < size else { throw .headOutOfRange(head: head, size: size) }
        let slot = UInt64(nextUsed % size)
        try ringWrite(memory, UInt32(head).littleEndian, usedRing, 4 + 8 * slot)
        try ringWrite(memory, length.littleEndian, usedRing, 8 + 8 * slot)
        nextUsed &+= 1
        // Release: the element (and the data written into the buffers) must be
        // visible before the index that publishes it (spec 2.7.13 "write barrier").
        atomicMemoryFence(ordering: .releasing)
        try ringWrite(memory, nextUsed.littleEndian, usedRing, 2)
    }

    /// Whether the driver wants an interrupt for the used buffers added since the
    /// last call (VIRTQ_AVAIL_F_NO_INTERRUPT, or used_event with EVENT_IDX).
    public mutating func needsInterrupt(memory: GuestMemory) throws(VirtQueueError) -> Bool {
        guard ready else { throw .notReady }
        // Full fence: our used idx store must be ordered before the loads of the
        // driver's flags / used_event (store -> load, spec 2.7.10).
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        if eventIndex {
            let usedEvent = try ringRead16(memory, availRing, 4 + 2 * sizeBytes)
            let old = signalledUsed
            signalledUsed = nextUsed
            guard let old else { return true }
            // vring_need_event(event, new, old): (u16)(new - event - 1) < (u16)(new - old)
            return (nextUsed &- usedEvent &- 1) < (nextUsed &- old)
        }
        let flags = try ringRead16(memory, availRing, 0)
        return flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0
    }

    /// Re-arms driver notifications before the device goes idle and returns whether
    /// more chains arrived meanwhile (the caller must then keep processing). With
    /// EVENT_IDX this publishes avail_event = nextAvail; without it, the used ring
    /// flags stay 0 (notifications are never suppressed).
    public func enableNotification(memory: GuestMemory) throws(VirtQueueError) -> Bool {
        guard ready else { throw .notReady }
        if eventIndex {
            try ringWrite(memory, nextAvail.littleEndian, usedRing, 4 + 8 * sizeBytes)
        }
        // Full fence: the avail_event store must precede the re-read of avail idx, or
        // a driver that just published a chain may skip the notification.
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        return try pendingCount(memory: memory) > 0
    }
}
