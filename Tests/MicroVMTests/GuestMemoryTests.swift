import Testing
import GuestMemory

private let regionSize: UInt64 = 1 << 20

private let outOfBoundsCases: [(address: UInt64, length: UInt64)] = [
    (address: regionSize - 7, length: 8 as UInt64),
    (address: regionSize, length: 1),
    (address: regionSize + 0x1000, length: 1),
    (address: UInt64.max, length: 1),
    (address: UInt64.max - 3, length: 8),   // address + length overflows
    (address: 0, length: regionSize + 1),
    (address: 1, length: UInt64.max),      // overflow from a valid start
    ]

@Suite("GuestMemory bounds checks")
struct GuestMemoryTests {
    static let size = regionSize

    @Test("reads and writes at the first and last bytes of a region")
    func regionEdges() throws {
        let m = try lowMemory(Self.size)
        try m.write(UInt8(0x11), at: GuestAddress(0))
        try m.write(UInt8(0x22), at: GuestAddress(Self.size - 1))
        try m.write(UInt64(0x0102_0304_0506_0708), at: GuestAddress(Self.size - 8))
        #expect(try m.read(UInt8.self, at: GuestAddress(0)) == 0x11)
        #expect(try m.read(UInt64.self, at: GuestAddress(Self.size - 8)) == 0x0102_0304_0506_0708)
        #expect(try m.readBytes(at: GuestAddress(Self.size - 8), count: 8) == [8, 7, 6, 5, 4, 3, 2, 1])
        // Unaligned access is fine.
        try m.write(UInt32(0xDEAD_BEEF), at: GuestAddress(0x1001))
        #expect(try m.read(UInt32.self, at: GuestAddress(0x1001)) == 0xDEAD_BEEF)
        #expect(try m.readBytes(at: GuestAddress(0x1001), count: 4) == [0xEF, 0xBE, 0xAD, 0xDE])
        // A zero-length access exactly at the end is inside [start, end].
        #expect(try m.readBytes(at: GuestAddress(Self.size), count: 0) == [])
        #expect(m.contains(GuestAddress(0), length: Self.size))
        #expect(!m.contains(GuestAddress(0), length: Self.size + 1))
    }

    @Test("out-of-range accesses throw .outOfBounds", arguments: outOfBoundsCases)
    func outOfBounds(address: UInt64, length: UInt64) throws {
        let m = try lowMemory(Self.size)
        #expect(!m.contains(GuestAddress(address), length: length))
        if length <= 8 {
            #expect(throws: GuestMemoryError.outOfBounds(address: address, length: 8)) {
                try m.read(UInt64.self, at: GuestAddress(address))
            }
            #expect(throws: GuestMemoryError.outOfBounds(address: address, length: 8)) {
                try m.write(UInt64(1), at: GuestAddress(address))
            }
        }
        if length <= UInt64(Int.max) {
            #expect(throws: GuestMemoryError.outOfBounds(address: address, length: length)) {
                try m.readBytes(at: GuestAddress(address), count: Int(length))
            }
            #expect(throws: GuestMemoryError.outOfBounds(address: address, length: length)) {
                try m.zero(at: GuestAddress(address), count: Int(length))
            }
        }
    }

    @Test("a failed write leaves memory untouched")
    func failedWriteIsAtomic() throws {
        let m = try lowMemory(Self.size)
        #expect(throws: GuestMemoryError.self) {
            try m.writeBytes([UInt8](repeating: 0xAB, count: 16), at: GuestAddress(Self.size - 8))
        }
        #expect(try m.readBytes(at: GuestAddress(Self.size - 8), count: 8) == [UInt8](repeating: 0, count: 8))
    }

    @Test("a negative length is rejected")
    func negativeLength() throws {
        let m = try lowMemory(Self.size)
        #expect(throws: GuestMemoryError.self) { try m.readBytes(at: GuestAddress(0), count: -1) }
    }

    @Test("two regions: the high one at 4 GiB, the hole between them unmapped")
    func twoRegions() throws {
        let low: UInt64 = 0x10_0000, high: UInt64 = 0x2_0000
        let m = try splitMemory(lowSize: low, highSize: high)
        #expect(m.size == low + high)
        #expect(m.regions.count == 2)
        #expect(m.regions[1].start == GuestAddress(0x1_0000_0000))
        #expect(m.regions[1].end == 0x1_0000_0000 + high)

        let hi = GuestAddress(GuestMemory.highRAMStart)
        try m.write(UInt32(0xCAFE_F00D), at: hi)
        try m.write(UInt8(0x77), at: GuestAddress(hi.rawValue + high - 1))
        #expect(try m.read(UInt32.self, at: hi) == 0xCAFE_F00D)
        #expect(try m.read(UInt8.self, at: GuestAddress(hi.rawValue + high - 1)) == 0x77)
        // The high region has its own backing: the low region's first bytes are untouched.
        #expect(try m.read(UInt32.self, at: GuestAddress(0)) == 0)
        // The backing is contiguous on the host, but guest accesses may not run from
        // the end of the low region into the high one, nor into the hole.
        #expect(!m.contains(GuestAddress(low - 4), length: 8))
        #expect(!m.contains(GuestAddress(low), length: 1))
        #expect(!m.contains(GuestAddress(GuestMemory.mmioHoleStart), length: 1))
        #expect(!m.contains(GuestAddress(hi.rawValue - 1), length: 2))
        #expect(!m.contains(GuestAddress(hi.rawValue + high), length: 1))
        #expect(throws: GuestMemoryError.outOfBounds(address: low - 4, length: 8)) {
            try m.read(UInt64.self, at: GuestAddress(low - 4))
        }
        #expect(m.hostAddress(of: m.regions[1]) == m.hostAddress(of: m.regions[0]) + low)
    }

    @Test("GuestAddress.adding reports overflow")
    func addressAdding() {
        #expect(GuestAddress(0x1000).adding(0x10) == GuestAddress(0x1010))
        #expect(GuestAddress(UInt64.max).adding(1) == nil)
        #expect(GuestAddress(0x9FC00).description == "0x9fc00")
    }
}
