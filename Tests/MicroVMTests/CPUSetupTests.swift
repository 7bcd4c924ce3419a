import Testing
import GuestMemory
import KVM
@testable import MicroVM

private let gdtPackingCases: [(flags: UInt16, base: UInt32, limit: UInt32, expected: UInt64)] = [
    (flags: 0xC09B as UInt16, base: 0 as UInt32, limit: 0xFFFFF as UInt32, expected: 0x00CF_9B00_0000_FFFF as UInt64),
    (0xA09B, 0, 0xFFFFF, 0x00AF_9B00_0000_FFFF),
    (0xC093, 0, 0xFFFFF, 0x00CF_9300_0000_FFFF),
    (0x008B, 0, 0x67, 0x0000_8B00_0000_0067),
    (0x4093, 0x1234_5678, 0xABCDE, 0x124A_9334_5678_BCDE),
    // Bits outside the access byte and flags nibble, and above 20 bits of limit, are dropped.
    (0xFFFF, 0, 0xFFF0_0000, 0x00F0_FF00_0000_0000),
    ]

private let segmentDecodeCases: [(entry: UInt64, type: UInt8, s: UInt8, l: UInt8, db: UInt8, g: UInt8, limit: UInt32)] = [
    (entry: 0x00AF_9B00_0000_FFFF as UInt64, type: 0xB as UInt8, s: 1 as UInt8, l: 1 as UInt8, db: 0 as UInt8, g: 1 as UInt8, limit: 0xFFFF_FFFF as UInt32),
    (0x00CF_9300_0000_FFFF, 0x3, 1, 0, 1, 1, 0xFFFF_FFFF),
    (0x0000_8B00_0000_0067, 0xB, 0, 0, 0, 0, 0x67),
    ]

@Suite("CPUSetup: descriptors, page tables, entry state")
struct CPUSetupTests {
    @Test("gdtEntry packs flags, base and limit", arguments: gdtPackingCases)
    func gdtEntryPacking(flags: UInt16, base: UInt32, limit: UInt32, expected: UInt64) {
        #expect(CPUSetup.gdtEntry(flags: flags, base: base, limit: limit) == expected)
    }

    @Test("the boot GDT: null, code32, code64, data, TSS")
    func gdtTable() {
        #expect(CPUSetup.gdtEntries == [0, 0x00CF_9B00_0000_FFFF, 0x00AF_9B00_0000_FFFF,
                                        0x00CF_9300_0000_FFFF, 0x0000_8B00_0000_0067])
        // Selectors index the table.
        #expect(Int(CPUSetup.code32Selector) / 8 == 1)
        #expect(Int(CPUSetup.code64Selector) / 8 == 2)
        #expect(Int(CPUSetup.dataSelector) / 8 == 3)
        #expect(Int(CPUSetup.tssSelector) / 8 == 4)
    }

    @Test("segment(fromGDT:) decodes a 4 GiB 32-bit code segment")
    func decodeCode32() {
        let s = CPUSetup.segment(fromGDT: 0x00CF_9B00_0000_FFFF, selector: 0x08)
        #expect(s.base == 0)
        #expect(s.limit == 0xFFFF_FFFF)   // G scales 0xFFFFF by 4 KiB
        #expect(s.selector == 0x08)
        #expect(s.type == 0xB)
        #expect(s.s == 1)
        #expect(s.dpl == 0)
        #expect(s.present == 1)
        #expect(s.db == 1)
        #expect(s.l == 0)
        #expect(s.g == 1)
        #expect(s.avl == 0)
        #expect(s.unusable == 0)
    }

    @Test("segment(fromGDT:) decodes 64-bit code, data and TSS descriptors", arguments: segmentDecodeCases)
    func decodeOthers(entry: UInt64, type: UInt8, s: UInt8, l: UInt8, db: UInt8, g: UInt8, limit: UInt32) {
        let seg = CPUSetup.segment(fromGDT: entry, selector: 0x10)
        #expect(seg.type == type)
        #expect(seg.s == s)
        #expect(seg.l == l)
        #expect(seg.db == db)
        #expect(seg.g == g)
        #expect(seg.limit == limit)
        #expect(seg.present == 1)
        #expect(seg.unusable == 0)
    }

    @Test("segment(fromGDT:) decodes a split base and marks non-present segments unusable")
    func decodeBaseAndNotPresent() {
        let packed = CPUSetup.gdtEntry(flags: 0x4093, base: 0x1234_5678, limit: 0xABCDE)
        let s = CPUSetup.segment(fromGDT: packed, selector: 0x18)
        #expect(s.base == 0x1234_5678)
        #expect(s.limit == 0xABCDE)   // byte granular
        #expect(s.db == 1)
        #expect(s.g == 0)
        let null = CPUSetup.segment(fromGDT: 0, selector: 0)
        #expect(null.present == 0)
        #expect(null.unusable == 1)
    }

    @Test("descriptor tables are written at Layout.gdt and Layout.idt")
    func descriptorTablesInMemory() throws {
        let m = try lowMemory(1 << 20)
        try m.writeBytes([UInt8](repeating: 0xFF, count: 8), at: Layout.idt)
        try CPUSetup.writeDescriptorTables(m)
        for (i, e) in CPUSetup.gdtEntries.enumerated() {
            #expect(try m.read(UInt64.self, at: GuestAddress(Layout.gdt.rawValue + UInt64(i * 8))) == e)
        }
        #expect(try m.read(UInt64.self, at: Layout.idt) == 0)
        // The GDT ends before the IDT.
        #expect(Layout.gdt.rawValue + UInt64(CPUSetup.gdtEntries.count * 8) <= Layout.idt.rawValue)
    }

    @Test("identity page tables map the first 4 GiB with 2 MiB pages")
    func pageTables() throws {
        let m = try lowMemory(1 << 20)
        // Leftovers in the PML4/PDPT must be cleared.
        try m.writeBytes([UInt8](repeating: 0xFF, count: 0x2000), at: Layout.pml4)
        try CPUSetup.writeIdentityPageTables(m)
        #expect(try m.read(UInt64.self, at: Layout.pml4) == Layout.pdpt.rawValue | 3)
        for i in 1..<512 {
            #expect(try m.read(UInt64.self, at: GuestAddress(Layout.pml4.rawValue + UInt64(i * 8))) == 0)
        }
        for i in 0..<4 {
            let pd = Layout.pageDirectories.rawValue + UInt64(i) * 0x1000
            #expect(try m.read(UInt64.self, at: GuestAddress(Layout.pdpt.rawValue + UInt64(i * 8))) == pd | 3)
        }
        for i in 4..<512 {
            #expect(try m.read(UInt64.self, at: GuestAddress(Layout.pdpt.rawValue + UInt64(i * 8))) == 0)
        }
        let entries = try m.readBytes(at: Layout.pageDirectories, count: 4 * 0x1000)
        for n in 0..<2048 {
            let e = getLE64(entries, n * 8)
            #expect(e == (UInt64(n) << 21) | 0x83, "PD entry \(n)")
            if e != (UInt64(n) << 21) | 0x83 { break }
        }
        #expect(getLE64(entries, 2047 * 8) == (0x1_0000_0000 - 0x20_0000) | 0x83)
        // The tables stay below the command line and above the zero page.
        #expect(Layout.pageDirectories.rawValue + 4 * 0x1000 <= Layout.commandLine.rawValue)
        #expect(Layout.zeroPage.rawValue + 0x1000 <= Layout.pml4.rawValue)
    }

    @Test("PVH entry state: flat 32-bit protected mode, paging off, RBX = start_info")
    func pvhState() {
        let (regs, sregs) = CPUSetup.pvhState(base: SpecialRegisters(), entry: 0x100_0040, startInfo: Layout.pvhStartInfo)
        #expect(regs.rip == 0x100_0040)
        #expect(regs.rbx == Layout.pvhStartInfo.rawValue)
        #expect(regs.rflags == 0x2)
        #expect(sregs.cr0 & 0x1 == 0x1)          // PE
        #expect(sregs.cr0 & 0x8000_0000 == 0)    // PG off
        #expect(sregs.cr4 == 0)
        #expect(sregs.efer == 0)
        #expect(sregs.cs.selector == CPUSetup.code32Selector)
        #expect(sregs.cs.db == 1)
        #expect(sregs.cs.l == 0)
        #expect(sregs.cs.limit == 0xFFFF_FFFF)
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            #expect(seg.selector == CPUSetup.dataSelector)
            #expect(seg.type == 0x3)
            #expect(seg.base == 0)
            #expect(seg.limit == 0xFFFF_FFFF)
        }
        #expect(sregs.tr.selector == CPUSetup.tssSelector)
        #expect(sregs.tr.type == 0xB)
        #expect(sregs.gdt.base == Layout.gdt.rawValue)
        #expect(sregs.gdt.limit == UInt16(CPUSetup.gdtEntries.count * 8 - 1))
        #expect(sregs.idt.base == Layout.idt.rawValue)
    }

    @Test("long mode state: EFER.LME|LMA, CR4.PAE, CR3 = PML4, CR0.PG, RSI = zero page")
    func longModeState() {
        var base = SpecialRegisters()
        base.apic_base = 0xFEE0_0900
        let (regs, sregs) = CPUSetup.longModeState(base: base, entry: 0x10_0200, rsi: Layout.zeroPage.rawValue)
        #expect(regs.rip == 0x10_0200)
        #expect(regs.rsi == Layout.zeroPage.rawValue)
        #expect(regs.rflags == 0x2)
        #expect(sregs.efer == 0x500)
        #expect(sregs.cr4 & 0x20 == 0x20)
        #expect(sregs.cr3 == Layout.pml4.rawValue)
        #expect(sregs.cr0 & 0x8000_0001 == 0x8000_0001)
        #expect(sregs.cs.selector == CPUSetup.code64Selector)
        #expect(sregs.cs.l == 1)
        #expect(sregs.cs.db == 0)
        #expect(sregs.ds.selector == CPUSetup.dataSelector)
        #expect(sregs.ss.selector == CPUSetup.dataSelector)
        // Fields not part of the entry protocol are kept from the base.
        #expect(sregs.apic_base == 0xFEE0_0900)
    }
}
