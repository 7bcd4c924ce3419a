import GuestMemory
import KVM

/// Initial vCPU state for each entry protocol, and the tables it needs in guest memory.
public enum CPUSetup {
    /// GDT selectors (see `gdtEntries`).
    public static let code32Selector: UInt16 = 0x08
    public static let code64Selector: UInt16 = 0x10 // __BOOT_CS of the 64-bit boot protocol
    public static let dataSelector: UInt16 = 0x18   // __BOOT_DS
    public static let tssSelector: UInt16 = 0x20

    /// Packs a GDT descriptor from flags (access byte + flags nibble as 0xF0FF-style), base and limit.
    public static func gdtEntry(flags: UInt16, base: UInt32, limit: UInt32) -> UInt64 {
        (UInt64(base & 0xFF00_0000) << 32)
            | (UInt64(flags & 0xF0FF) << 40)
            | (UInt64(limit & 0x000F_0000) << 32)
            | (UInt64(base & 0x00FF_FFFF) << 16)
            | UInt64(limit & 0xFFFF)
    }

    /// null, code32, code64, data, busy 32-bit TSS.
    public static let gdtEntries: [UInt64] = [
        0,
        gdtEntry(flags: 0xC09B, base: 0, limit: 0xFFFFF), // 32-bit code, 4 GiB, G, D
        gdtEntry(flags: 0xA09B, base: 0, limit: 0xFFFFF), // 64-bit code, L
        gdtEntry(flags: 0xC093, base: 0, limit: 0xFFFFF), // data, 4 GiB
        gdtEntry(flags: 0x008B, base: 0, limit: 0x67),    // busy 32-bit TSS
    ]

    /// Decodes a GDT entry into the `kvm_segment` KVM expects for a loaded selector.
    public static func segment(fromGDT entry: UInt64, selector: UInt16) -> Segment {
        var s = Segment()
        s.base = ((entry >> 16) & 0xFF_FFFF) | (((entry >> 56) & 0xFF) << 24)
        let rawLimit = UInt32((entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16))
        let g = UInt8((entry >> 55) & 1)
        s.limit = g == 1 ? (rawLimit << 12) | 0xFFF : rawLimit
        s.selector = selector
        s.type = UInt8((entry >> 40) & 0xF)
        s.s = UInt8((entry >> 44) & 1)
        s.dpl = UInt8((entry >> 45) & 3)
        s.present = UInt8((entry >> 47) & 1)
        s.avl = UInt8((entry >> 52) & 1)
        s.l = UInt8((entry >> 53) & 1)
        s.db = UInt8((entry >> 54) & 1)
        s.g = g
        s.unusable = s.present == 0 ? 1 : 0
        return s
    }

    /// Writes the GDT and an empty IDT.
    public static func writeDescriptorTables(_ memory: GuestMemory) throws {
        for (i, e) in gdtEntries.enumerated() {
            try memory.write(e, at: GuestAddress(Layout.gdt.rawValue + UInt64(i * 8)))
        }
        try memory.write(UInt64(0), at: Layout.idt)
    }

    private static func applyTables(_ sregs: inout SpecialRegisters) {
        sregs.gdt.base = Layout.gdt.rawValue
        sregs.gdt.limit = UInt16(gdtEntries.count * 8 - 1)
        sregs.idt.base = Layout.idt.rawValue
        sregs.idt.limit = 7
    }

    /// PVH entry state: 32-bit flat protected mode, paging off, RBX = start_info.
    public static func pvhState(base: SpecialRegisters, entry: UInt32, startInfo: GuestAddress) -> (Registers, SpecialRegisters) {
        var sregs = base
        applyTables(&sregs)
        sregs.cs = segment(fromGDT: gdtEntries[1], selector: code32Selector)
        let data = segment(fromGDT: gdtEntries[3], selector: dataSelector)
        sregs.ds = data; sregs.es = data; sregs.fs = data; sregs.gs = data; sregs.ss = data
        sregs.tr = segment(fromGDT: gdtEntries[4], selector: tssSelector)
        sregs.cr0 = 0x1 | 0x10  // PE | ET
        sregs.cr4 = 0
        sregs.efer = 0
        var regs = Registers()
        regs.rflags = 0x2
        regs.rip = UInt64(entry)
        regs.rbx = startInfo.rawValue
        return (regs, sregs)
    }

    /// Writes identity page tables for the first 4 GiB (2 MiB pages).
    public static func writeIdentityPageTables(_ memory: GuestMemory) throws {
        let present: UInt64 = 0x3 // P | RW
        try memory.zero(at: Layout.pml4, count: 0x1000)
        try memory.zero(at: Layout.pdpt, count: 0x1000)
        try memory.write(Layout.pdpt.rawValue | present, at: Layout.pml4)
        for i in 0..<4 {
            let pd = Layout.pageDirectories.rawValue + UInt64(i) * 0x1000
            try memory.write(pd | present, at: GuestAddress(Layout.pdpt.rawValue + UInt64(i * 8)))
            for j in 0..<512 {
                let frame = (UInt64(i) * 512 + UInt64(j)) << 21
                try memory.write(frame | present | 0x80 /* PS */, at: GuestAddress(pd + UInt64(j * 8)))
            }
        }
    }

    /// 64-bit long mode with identity paging (bzImage 64-bit entry, long-mode test guests).
    public static func longModeState(base: SpecialRegisters, entry: UInt64, rsi: UInt64 = 0) -> (Registers, SpecialRegisters) {
        var sregs = base
        applyTables(&sregs)
        sregs.cs = segment(fromGDT: gdtEntries[2], selector: code64Selector)
        let data = segment(fromGDT: gdtEntries[3], selector: dataSelector)
        sregs.ds = data; sregs.es = data; sregs.fs = data; sregs.gs = data; sregs.ss = data
        sregs.tr = segment(fromGDT: gdtEntries[4], selector: tssSelector)
        sregs.cr3 = Layout.pml4.rawValue
        sregs.cr4 = 0x20                      // PAE
        sregs.cr0 = 0x8000_0000 | 0x10 | 0x1  // PG | ET | PE
        sregs.efer = 0x500                    // LME | LMA
        var regs = Registers()
        regs.rflags = 0x2
        regs.rip = entry
        regs.rsi = rsi
        regs.rsp = 0x8FF0
        return (regs, sregs)
    }

    /// Real mode at `segment:offset` (tests).
    public static func realModeState(base: SpecialRegisters, entry: UInt16, segment seg: UInt16 = 0) -> (Registers, SpecialRegisters) {
        var sregs = base
        sregs.cs.selector = seg
        sregs.cs.base = UInt64(seg) << 4
        var regs = Registers()
        regs.rflags = 0x2
        regs.rip = UInt64(entry)
        return (regs, sregs)
    }
}
