import Testing
import VMMProtocol

/// The working-set file's codec: what a VMM accepts before it copies pages in.
@Suite("working-set files: encode, decode, and refuse what does not fit the snapshot")
struct WorkingSetTests {
    let memory: UInt64 = 256 << 20  // 65,536 pages

    func bytes(pages: UInt32, _ ranges: [(UInt32, UInt32)]) -> [UInt8] {
        WorkingSet(memoryPages: pages, ranges: ranges.map { WorkingSet.Range(first: $0.0, count: $0.1) }).encoded()
    }

    @Test("a working set round-trips, adjacent ranges included")
    func roundTrip() throws {
        let set = WorkingSet(memoryPages: 65_536, ranges: [.init(first: 0, count: 3), .init(first: 3, count: 1), .init(first: 65_000, count: 536)])
        let decoded = try WorkingSet.decode(set.encoded(), memoryBytes: memory)
        #expect(decoded == set)
        #expect(decoded.pages == 540)
        #expect(set.encoded().count == 16 + 3 * 8)
    }

    @Test("damaged or implausible files are refused, each with its own reason")
    func refusals() {
        func error(_ b: [UInt8]) -> WorkingSet.DecodeError? {
            do { _ = try WorkingSet.decode(b, memoryBytes: memory); return nil } catch { return error }
        }
        let good = bytes(pages: 65_536, [(10, 5)])
        #expect(error(Array(good.prefix(10))) == .truncated(10))
        #expect(error(Array(good.dropLast())) == .truncated(good.count - 1))
        #expect(error(good + [0]) == .truncated(good.count + 1))
        var magic = good
        magic[0] = UInt8(ascii: "X")
        #expect(error(magic) == .badMagic)
        #expect(error(bytes(pages: 32_768, [(10, 5)])) == .wrongMemory(recorded: 32_768, expected: 65_536))
        #expect(error(bytes(pages: 65_536, [(65_535, 2)])) == .badRange(index: 0, first: 65_535, count: 2))
        #expect(error(bytes(pages: 65_536, [(10, 0)])) == .badRange(index: 0, first: 10, count: 0))
        #expect(error(bytes(pages: 65_536, [(10, 5), (12, 5)])) == .badRange(index: 1, first: 12, count: 5))
        #expect(error(bytes(pages: 65_536, [(20, 5), (10, 5)])) == .badRange(index: 1, first: 10, count: 5))
        #expect(error(bytes(pages: 65_536, [(UInt32.max, 1)])) == .badRange(index: 0, first: UInt32.max, count: 1))
        #expect(error(bytes(pages: 65_536, [(0, 16_385)])) == .tooLarge(pages: 16_385, memoryPages: 65_536))
        var many = Array(good.prefix(12))
        withUnsafeBytes(of: UInt32(WorkingSet.maxRanges + 1).littleEndian) { many += $0 }
        #expect(error(many) == .tooManyRanges(UInt32(WorkingSet.maxRanges + 1)))
        #expect(error(bytes(pages: 65_536, [(0, 16_384)])) == nil)
    }
}
