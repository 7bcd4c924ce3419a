import Testing
import GuestMemory
@testable import MicroVM

/// A parsed MP configuration table entry (Intel MP spec 1.4, section 4.3).
private enum MPEntry: Equatable {
    case processor(apicID: UInt8, flags: UInt8)
    case bus(id: UInt8, type: String)
    case ioapic(id: UInt8, flags: UInt8, address: UInt32)
    case ioInterrupt(type: UInt8, bus: UInt8, irq: UInt8, ioapic: UInt8, pin: UInt8)
    case localInterrupt(type: UInt8, lapic: UInt8, lint: UInt8)
}

private func parseEntries(_ config: [UInt8]) -> [MPEntry] {
    var out: [MPEntry] = []
    var p = 44
    while p < config.count {
        switch config[p] {
        case 0:
            out.append(.processor(apicID: config[p + 1], flags: config[p + 3])); p += 20
        case 1:
            out.append(.bus(id: config[p + 1], type: String(decoding: config[p + 2..<p + 8], as: UTF8.self))); p += 8
        case 2:
            out.append(.ioapic(id: config[p + 1], flags: config[p + 3], address: getLE32(config, p + 4))); p += 8
        case 3:
            out.append(.ioInterrupt(type: config[p + 1], bus: config[p + 4], irq: config[p + 5], ioapic: config[p + 6], pin: config[p + 7])); p += 8
        case 4:
            out.append(.localInterrupt(type: config[p + 1], lapic: config[p + 6], lint: config[p + 7])); p += 8
        default:
            Issue.record("unknown entry type \(config[p]) at \(p)"); return out
        }
    }
    return out
}

private func byteSum(_ b: some Sequence<UInt8>) -> UInt8 { b.reduce(0, &+) }

@Suite("MP table (Intel MP spec 1.4)")
struct MPTableTests {
    @Test("floating pointer and configuration table are well formed", arguments: [1, 2, 4, 31, 32])
    func wellFormed(cpus: Int) throws {
        let bytes = try MPTable.build(cpus: cpus)
        let floating = Array(bytes[0..<16])
        let config = Array(bytes[16...])

        // Floating pointer structure (section 4.1).
        #expect(Array(floating[0..<4]) == Array("_MP_".utf8))
        #expect(getLE32(floating, 4) == UInt32(Layout.mpTable.rawValue + 16))
        #expect(floating[8] == 1)      // length in 16-byte units
        #expect(floating[9] == 4)      // spec revision 1.4
        #expect(byteSum(floating) == 0)
        #expect(floating[11] == 0)     // feature byte 1: a configuration table is present

        // Configuration table header (section 4.2).
        #expect(Array(config[0..<4]) == Array("PCMP".utf8))
        #expect(Int(getLE16(config, 4)) == config.count)
        #expect(config[6] == 4)
        #expect(byteSum(config) == 0)
        #expect(getLE32(config, 36) == Layout.lapicAddress)
        let count = Int(getLE16(config, 34))
        #expect(count == cpus + 1 + 1 + MPTable.ioapicPins + 2)

        let entries = parseEntries(config)
        #expect(entries.count == count)
        let expectedCPUs = (0..<cpus).map { MPEntry.processor(apicID: UInt8($0), flags: $0 == 0 ? 0x3 : 0x1) }
        #expect(Array(entries.prefix(cpus)) == expectedCPUs)
        #expect(entries[cpus] == .bus(id: 0, type: "ISA   "))
        #expect(entries[cpus + 1] == .ioapic(id: UInt8(cpus), flags: 1, address: Layout.ioapicAddress))
        for irq in 0..<MPTable.ioapicPins {
            #expect(entries[cpus + 2 + irq] == .ioInterrupt(type: 0, bus: 0, irq: UInt8(irq), ioapic: UInt8(cpus), pin: UInt8(irq)))
        }
        #expect(entries[count - 2] == .localInterrupt(type: 3, lapic: 0xFF, lint: 0))
        #expect(entries[count - 1] == .localInterrupt(type: 1, lapic: 0xFF, lint: 1))

        // The serial and virtio IRQs are routed through the IOAPIC.
        #expect(Int(Layout.serialIRQ) < MPTable.ioapicPins)
        #expect(Int(Layout.virtioFirstIRQ) + Layout.maxVirtioDevices <= MPTable.ioapicPins)
    }

    @Test("the largest table fits between the EBDA start and 0xA0000")
    func fitsBelowVGA() throws {
        let bytes = try MPTable.build(cpus: MPTable.maxCPUs)
        #expect(Layout.mpTable.rawValue + UInt64(bytes.count) <= 0xA_0000)
        #expect(Layout.mpTable.rawValue >= Layout.ebdaStart)
    }

    @Test("CPU counts outside 1...32 are refused", arguments: [0, -1, 33, 255])
    func tooManyCPUs(cpus: Int) {
        #expect(throws: MPTable.Error.tooManyCPUs(cpus)) { try MPTable.build(cpus: cpus) }
    }

    @Test("write() places the table in guest memory; another address moves the pointer")
    func writeToMemory() throws {
        let m = try lowMemory(1 << 20)
        try MPTable.write(cpus: 2, to: m)
        let bytes = try MPTable.build(cpus: 2)
        #expect(try m.readBytes(at: Layout.mpTable, count: bytes.count) == bytes)

        let moved = try MPTable.build(cpus: 2, at: GuestAddress(0xF_0000))
        #expect(getLE32(moved, 4) == 0xF_0010)
        #expect(byteSum(moved[0..<16]) == 0)
    }
}

@Suite("Layout.memoryMap")
struct MemoryMapTests {
    @Test("256 MiB: low RAM, reserved EBDA + legacy hole, RAM from 1 MiB")
    func twoFiftySixMiB() throws {
        let m = try GuestMemory(size: 256 << 20)
        #expect(Layout.memoryMap(for: m) == [
            MemoryMapEntry(address: 0, size: 0x9_FC00, kind: .ram),
            MemoryMapEntry(address: 0x9_FC00, size: 0x10_0000 - 0x9_FC00, kind: .reserved),
            MemoryMapEntry(address: 0x10_0000, size: (256 << 20) - 0x10_0000, kind: .ram),
        ])
    }

    @Test("regions above 4 GiB get their own RAM entry")
    func highRegion() throws {
        let m = try splitMemory(lowSize: 32 << 20, highSize: 2 << 20)
        #expect(Layout.memoryMap(for: m) == [
            MemoryMapEntry(address: 0, size: 0x9_FC00, kind: .ram),
            MemoryMapEntry(address: 0x9_FC00, size: 0x6_0400, kind: .reserved),
            MemoryMapEntry(address: 0x10_0000, size: (32 << 20) - 0x10_0000, kind: .ram),
            MemoryMapEntry(address: 0x1_0000_0000, size: 2 << 20, kind: .ram),
        ])
    }

    @Test("the boot structures sit in the first RAM range, clear of each other")
    func bootDataPlacement() {
        let ranges: [(String, UInt64, UInt64)] = [
            ("gdt", Layout.gdt.rawValue, 5 * 8),
            ("idt", Layout.idt.rawValue, 8),
            ("start_info", Layout.pvhStartInfo.rawValue, 56),
            ("memmap", Layout.pvhMemmap.rawValue, UInt64(Layout.maxMemmapEntries * 24)),
            ("modlist", Layout.pvhModlist.rawValue, 32),
            ("zero page", Layout.zeroPage.rawValue, 0x1000),
            ("pml4", Layout.pml4.rawValue, 0x1000),
            ("pdpt", Layout.pdpt.rawValue, 0x1000),
            ("pds", Layout.pageDirectories.rawValue, 0x4000),
            ("cmdline", Layout.commandLine.rawValue, UInt64(Layout.maxCommandLine)),
        ]
        let sorted = ranges.sorted { $0.1 < $1.1 }
        for (a, b) in zip(sorted, sorted.dropFirst()) {
            #expect(a.1 + a.2 <= b.1, "\(a.0) overlaps \(b.0)")
        }
        #expect(sorted.last!.1 + sorted.last!.2 <= Layout.ebdaStart)
        // The virtio windows are inside the MMIO hole, below the IOAPIC.
        #expect(Layout.virtioMMIOBase >= GuestMemory.mmioHoleStart)
        #expect(Layout.virtioMMIOBase + UInt64(Layout.maxVirtioDevices) * Layout.virtioMMIOSize <= UInt64(Layout.ioapicAddress))
    }
}
