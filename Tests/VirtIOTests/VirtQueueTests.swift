import GuestMemory
import Testing
@testable import VirtIO

@Suite struct VirtQueueTests {
    @Test func normalChainIsSplitIntoReadableAndWritable() throws {
        let d = try MockDriver()
        var q = d.makeQueue()
        let hdr = try d.allocate(16, fill: Array(0 ..< 16))
        let data = try d.allocate(100)
        let status = try d.allocate(1)
        let head = try d.post([.init(address: hdr, length: 16, writable: false),
                               .init(address: data, length: 100, writable: true),
                               .init(address: status, length: 1, writable: true)])
        let chain = try #require(try q.popAvailable(memory: d.memory))
        #expect(chain.head == head)
        #expect(chain.readable == [DescriptorBuffer(address: hdr, length: 16)])
        #expect(chain.writable.count == 2)
        #expect(chain.readableLength == 16 && chain.writableLength == 101)
        #expect(try chain.readBytes(from: d.memory, offset: 4, count: 4) == [4, 5, 6, 7])
        // Writes spanning two writable buffers.
        try chain.writeBytes(Array(repeating: 0xAB, count: 101), to: d.memory, offset: 0)
        #expect(try d.memory.readBytes(at: status, count: 1) == [0xAB])
        #expect(throws: DescriptorChainError.self) { try chain.writeBytes([1, 2], to: d.memory, offset: 100) }
        #expect(throws: DescriptorChainError.self) { try chain.readBytes(from: d.memory, offset: 10, count: 7) }
        #expect(try q.popAvailable(memory: d.memory) == nil)
    }

    @Test func usedRingIsWrittenCorrectly() throws {
        let d = try MockDriver()
        var q = d.makeQueue()
        let buf = try d.allocate(8)
        for _ in 0 ..< 20 {  // wraps the 16-entry rings
            let head = try d.post([.init(address: buf, length: 8, writable: true)])
            let chain = try #require(try q.popAvailable(memory: d.memory))
            try q.addUsed(memory: d.memory, head: chain.head, length: 5)
            let e = try d.usedElement(try d.usedIdx &- 1)
            #expect(e.id == UInt32(head) && e.length == 5)
        }
        #expect(try d.usedIdx == 20)
        #expect(q.nextUsed == 20 && q.nextAvail == 20)
    }

    @Test func chainLoopingBackOntoItselfIsRejected() throws {
        let d = try MockDriver()
        var q = d.makeQueue()
        let buf = try d.allocate(8)
        try d.setDescriptor(0, address: buf.rawValue, length: 8, flags: VIRTQ_DESC_F_NEXT, next: 1)
        try d.setDescriptor(1, address: buf.rawValue, length: 8, flags: VIRTQ_DESC_F_NEXT, next: 0)
        try d.publish(head: 0)
        #expect(throws: VirtQueueError.descriptorLoop(head: 0, index: 0)) { try q.popAvailable(memory: d.memory) }
        // Self loop.
        try d.setDescriptor(2, address: buf.rawValue, length: 8, flags: VIRTQ_DESC_F_NEXT, next: 2)
        try d.publish(head: 2)
        #expect(throws: VirtQueueError.descriptorLoop(head: 2, index: 2)) { try q.popAvailable(memory: d.memory) }
    }

    @Test func nextIndexOutOfRangeIsRejected() throws {
        let d = try MockDriver()
        var q = d.makeQueue()
        let buf = try d.allocate(8)
        try d.setDescriptor(0, address: buf.rawValue, length: 8, flags: VIRTQ_DESC_F_NEXT, next: 16)
        try d.publish(head: 0)
        #expect(throws: VirtQueueError.nextOutOfRange(index: 0, next: 16, tableSize: 16)) { try q.popAvailable(memory: d.memory) }
    }

    @Test func headIndexOutOfRangeIsRejected() throws {
        let d = try MockDriver()
        var q = d.makeQueue()
        try d.publish(head: 40)
        #expect(throws: VirtQueueError.headOutOfRange(head: 40, size: 16)) { try q.popAvailable(memory: d.memory) }
    }

    @Test func addressOutsideRAMIsRejected() throws {
        let d = try MockDriver()
        var q = d.makeQueue()
        try d.setDescriptor(0, address: (1 << 20) - 4, length: 8, flags: 0)
        try d.publish(head: 0)
        #expect(throws: VirtQueueError.bufferOutOfBounds(address: (1 << 20) - 4, length: 8)) { try q.popAvailable(memory: d.memory) }
        try d.setDescriptor(1, address: 0x8000_0000, length: 1, flags: 0)
        try d.publish(head: 1)
        #expect(throws: VirtQueueError.bufferOutOfBounds(address: 0x8000_0000, length: 1)) { try q.popAvailable(memory: d.memory) }
    }

    @Test func addressPlusLengthWrapIsRejected() throws {
        let d = try MockDriver()
        var q = d.makeQueue()
        try d.setDescriptor(0, address: UInt64.max - 10, length: 100, flags: 0)
        try d.publish(head: 0)
        #expect(throws: VirtQueueError.addressOverflow(address: UInt64.max - 10, length: 100)) { try q.popAvailable(memory: d.memory) }
    }

    @Test func totalLengthOverflowIsRejected() throws {
        // Two readable buffers totalling more than 4 GiB (RAM is lazily allocated).
        let big = try GuestMemory(size: 0x1_4000_0000)  // 5 GiB, lazily allocated (MAP_NORESERVE)
        let d2 = try MockDriver(memory: big)
        var q2 = d2.makeQueue()
        try d2.setDescriptor(0, address: 0x1000_0000, length: 0xB000_0000, flags: VIRTQ_DESC_F_NEXT, next: 1)
        try d2.setDescriptor(1, address: 0x1_0000_0000, length: 0x6000_0000, flags: 0)
        try d2.publish(head: 0)
        #expect(throws: VirtQueueError.lengthOverflow(head: 0)) { try q2.popAvailable(memory: big) }
    }

    @Test func writableBeforeReadableIsRejected() throws {
        let d = try MockDriver()
        var q = d.makeQueue()
        let a = try d.allocate(8), b = try d.allocate(8)
        try d.post([.init(address: a, length: 8, writable: true), .init(address: b, length: 8, writable: false)])
        #expect(throws: VirtQueueError.readableAfterWritable(head: 0, index: 1)) { try q.popAvailable(memory: d.memory) }
    }

    @Test func chainLongerThanQueueIsRejected() throws {
        // An indirect table with more entries than the queue size.
        let d = try MockDriver()
        var q = d.makeQueue()
        q.indirectDescriptors = true
        let buf = try d.allocate(8)
        let table = try d.allocate(17 * 16)
        for i in UInt16(0) ..< 17 {
            try d.setDescriptor(i, address: buf.rawValue, length: 8, flags: i < 16 ? VIRTQ_DESC_F_NEXT : 0, next: i + 1, table: table)
        }
        try d.setDescriptor(0, address: table.rawValue, length: 17 * 16, flags: VIRTQ_DESC_F_INDIRECT)
        try d.publish(head: 0)
        #expect(throws: VirtQueueError.chainTooLong(head: 0, limit: 16)) { try q.popAvailable(memory: d.memory) }
        // Direct descriptor plus indirect entries counting together past the size.
        let table2 = try d.allocate(16 * 16)
        for i in UInt16(0) ..< 16 {
            try d.setDescriptor(i, address: buf.rawValue, length: 8, flags: i < 15 ? VIRTQ_DESC_F_NEXT : 0, next: i + 1, table: table2)
        }
        try d.setDescriptor(1, address: buf.rawValue, length: 8, flags: VIRTQ_DESC_F_NEXT, next: 2)
        try d.setDescriptor(2, address: table2.rawValue, length: 16 * 16, flags: VIRTQ_DESC_F_INDIRECT)
        try d.publish(head: 1)
        #expect(throws: VirtQueueError.chainTooLong(head: 1, limit: 16)) { try q.popAvailable(memory: d.memory) }
    }

    @Test func availIndexJumpingByMoreThanSizeIsRejected() throws {
        let d = try MockDriver()
        var q = d.makeQueue()
        try d.setAvailIndex(17)
        #expect(throws: VirtQueueError.availIndexJump(lastSeen: 0, published: 17, size: 16)) { try q.popAvailable(memory: d.memory) }
        // Going backwards looks like a huge jump too.
        try d.setAvailIndex(0xFFFF)
        #expect(throws: VirtQueueError.availIndexJump(lastSeen: 0, published: 0xFFFF, size: 16)) { try q.popAvailable(memory: d.memory) }
        // Exactly `size` outstanding is fine.
        let buf = try d.allocate(8)
        for i in UInt16(0) ..< 16 { try d.setDescriptor(i, address: buf.rawValue, length: 8, flags: 0) }
        try d.setAvailIndex(0)
        for i in UInt16(0) ..< 16 { try d.publish(head: i) }
        #expect(try q.pendingCount(memory: d.memory) == 16)
    }

    @Test func indirectTableIsWalked() throws {
        let d = try MockDriver()
        var q = d.makeQueue()
        q.indirectDescriptors = true
        let a = try d.allocate(4, fill: [1, 2, 3, 4]), b = try d.allocate(4)
        let table = try d.allocate(32)
        try d.setDescriptor(0, address: a.rawValue, length: 4, flags: VIRTQ_DESC_F_NEXT, next: 1, table: table)
        try d.setDescriptor(1, address: b.rawValue, length: 4, flags: VIRTQ_DESC_F_WRITE, table: table)
        try d.setDescriptor(3, address: table.rawValue, length: 32, flags: VIRTQ_DESC_F_INDIRECT)
        try d.publish(head: 3)
        let chain = try #require(try q.popAvailable(memory: d.memory))
        #expect(chain.head == 3 && chain.readableLength == 4 && chain.writableLength == 4)
        #expect(try chain.readBytes(from: d.memory, offset: 0, count: 4) == [1, 2, 3, 4])
    }

    @Test func badIndirectTablesAreRejected() throws {
        let d = try MockDriver()
        var q = d.makeQueue()
        let buf = try d.allocate(8)
        let table = try d.allocate(32)
        try d.setDescriptor(0, address: table.rawValue, length: 32, flags: VIRTQ_DESC_F_INDIRECT)
        try d.publish(head: 0)
        #expect(throws: VirtQueueError.indirectNotNegotiated(head: 0)) { try q.popAvailable(memory: d.memory) }
        q.indirectDescriptors = true
        // Nested indirect.
        try d.setDescriptor(0, address: table.rawValue, length: 16, flags: VIRTQ_DESC_F_INDIRECT, table: table)
        try d.publish(head: 0)
        #expect(throws: VirtQueueError.nestedIndirect(head: 0)) { try q.popAvailable(memory: d.memory) }
        // Length not a multiple of 16.
        try d.setDescriptor(1, address: table.rawValue, length: 20, flags: VIRTQ_DESC_F_INDIRECT)
        try d.publish(head: 1)
        #expect(throws: VirtQueueError.invalidIndirectTable(head: 1, length: 20)) { try q.popAvailable(memory: d.memory) }
        // Table outside RAM.
        try d.setDescriptor(2, address: 0xFFFF_0000, length: 32, flags: VIRTQ_DESC_F_INDIRECT)
        try d.publish(head: 2)
        #expect(throws: VirtQueueError.bufferOutOfBounds(address: 0xFFFF_0000, length: 32)) { try q.popAvailable(memory: d.memory) }
        // INDIRECT together with NEXT.
        try d.setDescriptor(3, address: table.rawValue, length: 32, flags: VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, next: 4)
        try d.publish(head: 3)
        #expect(throws: VirtQueueError.indirectWithNext(head: 3)) { try q.popAvailable(memory: d.memory) }
        // Loop inside the table.
        try d.setDescriptor(0, address: buf.rawValue, length: 8, flags: VIRTQ_DESC_F_NEXT, next: 1, table: table)
        try d.setDescriptor(1, address: buf.rawValue, length: 8, flags: VIRTQ_DESC_F_NEXT, next: 0, table: table)
        try d.setDescriptor(5, address: table.rawValue, length: 32, flags: VIRTQ_DESC_F_INDIRECT)
        try d.publish(head: 5)
        #expect(throws: VirtQueueError.descriptorLoop(head: 5, index: 0)) { try q.popAvailable(memory: d.memory) }
    }

    @Test func validateChecksRingsAndSize() throws {
        let d = try MockDriver()
        var q = d.makeQueue(maxSize: 32)
        try q.validate(memory: d.memory)
        q.size = 12
        #expect(throws: VirtQueueError.invalidSize(12)) { try q.validate(memory: d.memory) }
        q.size = 64
        #expect(throws: VirtQueueError.invalidSize(64)) { try q.validate(memory: d.memory) }
        q.size = 16
        q.usedRing = GuestAddress(0x4002)
        #expect(throws: VirtQueueError.misalignedRing(address: 0x4002, alignment: 4)) { try q.validate(memory: d.memory) }
        q.usedRing = GuestAddress((1 << 20) - 8)
        #expect(throws: VirtQueueError.ringOutOfBounds(address: (1 << 20) - 8, length: 6 + 8 * 16)) { try q.validate(memory: d.memory) }
        q.ready = false
        #expect(throws: VirtQueueError.notReady) { try q.validate(memory: d.memory) }
    }

    @Test func noInterruptFlagSuppressesInterrupts() throws {
        let d = try MockDriver()
        var q = d.makeQueue()
        let buf = try d.allocate(8)
        try d.post([.init(address: buf, length: 8, writable: true)])
        let c = try #require(try q.popAvailable(memory: d.memory))
        try q.addUsed(memory: d.memory, head: c.head, length: 0)
        #expect(try q.needsInterrupt(memory: d.memory))
        try d.setAvailFlags(VIRTQ_AVAIL_F_NO_INTERRUPT)
        #expect(try !q.needsInterrupt(memory: d.memory))
    }

    @Test func eventIndexSuppressesInterruptsAndRequestsNotifications() throws {
        let d = try MockDriver()
        var q = d.makeQueue()
        q.eventIndex = true
        let buf = try d.allocate(8)
        func complete() throws {
            try d.post([.init(address: buf, length: 8, writable: true)])
            let c = try #require(try q.popAvailable(memory: d.memory))
            try q.addUsed(memory: d.memory, head: c.head, length: 0)
        }
        try complete()
        #expect(try q.needsInterrupt(memory: d.memory))  // first decision always signals
        try d.setUsedEvent(5)   // driver wants an interrupt once used idx passes 5
        try complete()          // used idx 2
        #expect(try !q.needsInterrupt(memory: d.memory))
        for _ in 0 ..< 4 { try complete() }  // used idx 6 crosses 5 -> 6
        #expect(try q.needsInterrupt(memory: d.memory))
        // enableNotification publishes avail_event and reports pending work.
        #expect(try !q.enableNotification(memory: d.memory))
        #expect(try d.availEvent == q.nextAvail)
        try d.post([.init(address: buf, length: 8, writable: true)])
        #expect(try q.enableNotification(memory: d.memory))
    }

    @Test func stateRoundTrips() throws {
        let d = try MockDriver()
        var q = d.makeQueue()
        let buf = try d.allocate(8)
        try d.post([.init(address: buf, length: 8, writable: true)])
        let c = try #require(try q.popAvailable(memory: d.memory))
        try q.addUsed(memory: d.memory, head: c.head, length: 1)
        let restored = VirtQueue(state: q.state)
        #expect(restored == q)
        #expect(restored.state.nextAvail == 1 && restored.state.nextUsed == 1)
    }
}
