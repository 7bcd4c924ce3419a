import Testing
import GuestMemory
@testable import MicroVM

private let mib: UInt64 = 1 << 20

/// Loads `elf` into fresh guest memory of `memorySize` bytes.
private func loadELF(_ elf: SyntheticELF, initrd: [UInt8]? = nil, commandLine: String = "console=ttyS0 reboot=t panic=-1",
                     memorySize: UInt64 = 64 * mib) throws -> (BootEntry, GuestMemory) {
    let bytes = elf.bytes()
    let memory = try GuestMemory(size: memorySize)
    let entry = try BootLoader.load(kernel: try KernelImage.parse(bytes), kernelBytes: bytes, initrd: initrd,
                                    commandLine: try KernelCommandLine(commandLine), memory: memory)
    return (entry, memory)
}

/// `struct hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h), version 1.
private struct StartInfo {
    var magic: UInt32, version: UInt32, flags: UInt32, nrModules: UInt32
    var modlist: UInt64, cmdline: UInt64, rsdp: UInt64, memmap: UInt64, memmapEntries: UInt32
    init(_ m: GuestMemory) throws {
        let b = try m.readBytes(at: Layout.pvhStartInfo, count: 56)
        magic = getLE32(b, 0); version = getLE32(b, 4); flags = getLE32(b, 8); nrModules = getLE32(b, 12)
        modlist = getLE64(b, 16); cmdline = getLE64(b, 24); rsdp = getLE64(b, 32); memmap = getLE64(b, 40)
        memmapEntries = getLE32(b, 48)
    }
}

@Suite("BootLoader: PVH (ELF vmlinux)")
struct BootLoaderPVHTests {
    @Test("segments are copied, bss zeroed, entry returned")
    func segmentsAndBSS() throws {
        let elf = SyntheticELF()
        let bytes = elf.bytes()
        let memory = try GuestMemory(size: 64 * mib)
        // Dirty the bss range first: the loader must clear it.
        try memory.writeBytes([UInt8](repeating: 0xAA, count: 0x1000), at: GuestAddress(0x100_2000))
        try memory.write(UInt8(0xAA), at: GuestAddress(0x100_3000))
        let entry = try BootLoader.load(kernel: try KernelImage.parse(bytes), kernelBytes: bytes, initrd: nil,
                                        commandLine: KernelCommandLine(), memory: memory)
        #expect(entry == .pvh(entry: 0x100_0040, startInfo: Layout.pvhStartInfo))
        #expect(try memory.readBytes(at: GuestAddress(0x100_0000), count: 0x2000) == elf.loads[0].data)
        #expect(try memory.readBytes(at: GuestAddress(0x100_2000), count: 0x1000) == [UInt8](repeating: 0, count: 0x1000))
        // Zeroing stops at memsz.
        #expect(try memory.read(UInt8.self, at: GuestAddress(0x100_3000)) == 0xAA)
        #expect(try memory.readBytes(at: GuestAddress(0x120_0000), count: 0x100) == elf.loads[1].data)
    }

    @Test("command line is placed NUL-terminated at Layout.commandLine")
    func commandLine() throws {
        let line = "console=ttyS0 init=\"/bin/sh -c true\""
        let (_, memory) = try loadELF(SyntheticELF(), commandLine: line)
        #expect(try memory.readBytes(at: Layout.commandLine, count: line.utf8.count + 1) == Array(line.utf8) + [0])
    }

    @Test("hvm_start_info v1 and its memory map")
    func startInfo() throws {
        let (_, memory) = try loadELF(SyntheticELF())
        let si = try StartInfo(memory)
        #expect(si.magic == 0x336E_C578)
        #expect(si.version == 1)
        #expect(si.flags == 0)
        #expect(si.nrModules == 0)
        #expect(si.cmdline == Layout.commandLine.rawValue)
        #expect(si.rsdp == 0)
        #expect(si.memmap == Layout.pvhMemmap.rawValue)
        let map = Layout.memoryMap(for: memory)
        #expect(si.memmapEntries == UInt32(map.count))
        #expect(map.count == 3)
        for (i, e) in map.enumerated() {
            let b = try memory.readBytes(at: GuestAddress(si.memmap + UInt64(i * 24)), count: 24)
            #expect(getLE64(b, 0) == e.address)
            #expect(getLE64(b, 8) == e.size)
            #expect(getLE32(b, 16) == e.kind.rawValue)
            #expect(getLE32(b, 20) == 0)
        }
        // The memmap table must not run into the module list.
        #expect(Layout.pvhMemmap.rawValue + UInt64(Layout.maxMemmapEntries * 24) <= Layout.pvhModlist.rawValue)
    }

    @Test("initrd goes page-aligned to the top of low RAM and into the module list", arguments: [1, 4096, 10_000, 0x10_0000])
    func initrd(size: Int) throws {
        let initrd = pattern(size, seed: 3)
        let (_, memory) = try loadELF(SyntheticELF(), initrd: initrd)
        let address = (64 * mib - UInt64(size)) & ~0xFFF
        #expect(address % 0x1000 == 0)
        #expect(address + UInt64(size) <= 64 * mib)
        #expect(try memory.readBytes(at: GuestAddress(address), count: size) == initrd)
        let si = try StartInfo(memory)
        #expect(si.nrModules == 1)
        #expect(si.modlist == Layout.pvhModlist.rawValue)
        // struct hvm_modlist_entry: paddr, size, cmdline_paddr, reserved.
        let mod = try memory.readBytes(at: Layout.pvhModlist, count: 32)
        #expect(getLE64(mod, 0) == address)
        #expect(getLE64(mod, 8) == UInt64(size))
        #expect(getLE64(mod, 16) == 0)
        #expect(getLE64(mod, 24) == 0)
    }

    @Test("RAM above 4 GiB appears in the PVH memmap; the initrd stays in low RAM")
    func highRegionMemmap() throws {
        let bytes = SyntheticELF().bytes()
        let memory = try splitMemory(lowSize: 32 * mib, highSize: mib)
        _ = try BootLoader.load(kernel: try KernelImage.parse(bytes), kernelBytes: bytes, initrd: pattern(100),
                                commandLine: KernelCommandLine(), memory: memory)
        let si = try StartInfo(memory)
        #expect(si.memmapEntries == 4)
        let last = try memory.readBytes(at: GuestAddress(si.memmap + 3 * 24), count: 24)
        #expect(getLE64(last, 0) == 0x1_0000_0000)
        #expect(getLE64(last, 8) == mib)
        #expect(getLE32(last, 16) == 1)
        #expect(getLE64(try memory.readBytes(at: Layout.pvhModlist, count: 8), 0) == 32 * mib - 0x1000)
    }

    @Test("an empty initrd is treated as none")
    func emptyInitrd() throws {
        let (_, memory) = try loadELF(SyntheticELF(), initrd: [])
        #expect(try StartInfo(memory).nrModules == 0)
    }

    @Test("an initrd that exactly fills the space above the kernel fits; one byte more does not")
    func initrdBoundary() throws {
        var elf = SyntheticELF()
        // The kernel ends at 63 MiB - 0x800, so 1 MiB is free above its page-aligned end.
        elf.loads = [SyntheticELF.Load(paddr: 0x3E0_0000, data: pattern(0x100), memsz: 0x10_0000 - 0x800)]
        let (_, memory) = try loadELF(elf, initrd: [UInt8](repeating: 0x5A, count: Int(mib)))
        let mod = try memory.readBytes(at: Layout.pvhModlist, count: 16)
        #expect(getLE64(mod, 0) == 0x3F0_0000)
        #expect(throws: BootLoader.Error.initrdDoesNotFit(size: mib + 1, available: mib)) {
            try loadELF(elf, initrd: [UInt8](repeating: 0x5A, count: Int(mib) + 1))
        }
    }

    @Test("a segment beyond RAM is kernelDoesNotFit")
    func kernelBeyondRAM() {
        var elf = SyntheticELF()
        elf.loads = [SyntheticELF.Load(paddr: 0x3F0_0000, data: pattern(0x100), memsz: 0x20_0000)]
        #expect(throws: BootLoader.Error.kernelDoesNotFit(address: 0x3F0_0000, size: 0x20_0000, memory: 64 * mib)) {
            try loadELF(elf)
        }
        // Also a segment that starts entirely past the end.
        elf.loads = [SyntheticELF.Load(paddr: 0x1_0000_0000, data: pattern(0x10), memsz: 0x10)]
        #expect(throws: BootLoader.Error.kernelDoesNotFit(address: 0x1_0000_0000, size: 0x10, memory: 64 * mib)) {
            try loadELF(elf)
        }
    }

    @Test("a segment below 1 MiB is kernelOverlapsBootData", arguments: [0 as UInt64, 0x7000, 0x9_FC00, 0xF_FFFF])
    func kernelBelowOneMiB(address: UInt64) {
        var elf = SyntheticELF()
        elf.loads = [SyntheticELF.Load(paddr: address, data: pattern(0x10), memsz: 0x10)]
        #expect(throws: BootLoader.Error.kernelOverlapsBootData(address: address)) { try loadELF(elf) }
    }

    @Test("less than 32 MiB of RAM is tooLittleMemory")
    func tooLittleMemory() {
        #expect(throws: BootLoader.Error.tooLittleMemory(16 * mib, minimum: 32 * mib)) {
            try loadELF(SyntheticELF(), memorySize: 16 * mib)
        }
        #expect(throws: BootLoader.Error.tooLittleMemory(32 * mib - 4096, minimum: 32 * mib)) {
            try loadELF(SyntheticELF(), memorySize: 32 * mib - 4096)
        }
    }

    @Test("exactly 32 MiB is enough")
    func minimumMemory() throws {
        let (entry, _) = try loadELF(SyntheticELF(), memorySize: 32 * mib)
        #expect(entry == .pvh(entry: 0x100_0040, startInfo: Layout.pvhStartInfo))
    }

    @Test("a command line longer than the zero-terminated 4 KiB area is refused")
    func commandLineTooLong() throws {
        let bytes = SyntheticELF().bytes()
        let memory = try GuestMemory(size: 32 * mib)
        let line = try KernelCommandLine(String(repeating: "a", count: Layout.maxCommandLine), limit: 8192)
        #expect(throws: BootLoader.Error.commandLineTooLong(length: Layout.maxCommandLine, limit: Layout.maxCommandLine - 1)) {
            try BootLoader.load(kernel: try KernelImage.parse(bytes), kernelBytes: bytes, initrd: nil,
                                commandLine: line, memory: memory)
        }
    }

    @Test("error messages say what to do")
    func errorDescriptions() {
        #expect(BootLoader.Error.kernelDoesNotFit(address: 0x100_0000, size: 1, memory: 64 * mib).description.contains("64 MiB"))
        #expect(BootLoader.Error.initrdDoesNotFit(size: 5, available: 4).description.contains("more memory"))
        #expect(BootLoader.Error.tooLittleMemory(16 * mib, minimum: 32 * mib).description.contains("32 MiB"))
    }
}

@Suite("BootLoader: 64-bit Linux boot protocol (bzImage)")
struct BootLoaderBzImageTests {
    static let zp = Layout.zeroPage.rawValue

    private func load(_ bz: SyntheticBzImage, initrd: [UInt8]? = nil, commandLine: String = "console=ttyS0",
                      memorySize: UInt64 = 64 * mib) throws -> (BootEntry, GuestMemory, [UInt8]) {
        let bytes = bz.bytes()
        let memory = try GuestMemory(size: memorySize)
        let entry = try BootLoader.load(kernel: try KernelImage.parse(bytes), kernelBytes: bytes, initrd: initrd,
                                        commandLine: try KernelCommandLine(commandLine), memory: memory)
        return (entry, memory, try memory.readBytes(at: Layout.zeroPage, count: 0x1000))
    }

    @Test("the zero page carries the setup header, loader fields, command line and E820 map")
    func zeroPage() throws {
        let bz = SyntheticBzImage()
        let file = bz.bytes()
        let (entry, memory, page) = try load(bz)
        #expect(entry == .linux64(entry: 0x10_0200, zeroPage: Layout.zeroPage))
        // Protected-mode kernel at 1 MiB.
        #expect(try memory.readBytes(at: Layout.bzImageLoad, count: bz.payload.count) == bz.payload)
        // Setup header copied (up to type_of_loader, which the loader fills in).
        #expect(Array(page[0x1F1..<0x210]) == Array(file[0x1F1..<0x210]))
        #expect(Array(page[0x202..<0x206]) == Array("HdrS".utf8))
        #expect(getLE16(page, 0x206) == 0x020F)
        #expect(getLE16(page, 0x236) == bz.xloadflags)
        #expect(page[0x210] == 0xFF)                       // type_of_loader
        #expect(page[0x211] & 0x81 == 0x81)                // LOADED_HIGH | CAN_USE_HEAP
        #expect(getLE16(page, 0x224) == 0xFE00)            // heap_end_ptr
        #expect(getLE32(page, 0x228) == UInt32(Layout.commandLine.rawValue))
        #expect(try memory.readBytes(at: Layout.commandLine, count: 14) == Array("console=ttyS0".utf8) + [0])
        // No initrd.
        #expect(getLE32(page, 0x218) == 0)
        #expect(getLE32(page, 0x21C) == 0)
        // E820 table.
        let map = Layout.memoryMap(for: memory)
        #expect(page[0x1E8] == UInt8(map.count))
        for (i, e) in map.enumerated() {
            let p = 0x2D0 + i * 20
            #expect(getLE64(page, p) == e.address)
            #expect(getLE64(page, p + 8) == e.size)
            #expect(getLE32(page, p + 16) == e.kind.rawValue)
        }
        #expect(map == [
            MemoryMapEntry(address: 0, size: 0x9_FC00, kind: .ram),
            MemoryMapEntry(address: 0x9_FC00, size: 0x6_0400, kind: .reserved),
            MemoryMapEntry(address: 0x10_0000, size: 63 * mib, kind: .ram),
        ])
    }

    @Test("the zero page is cleared before it is filled")
    func zeroPageCleared() throws {
        let bz = SyntheticBzImage()
        let bytes = bz.bytes()
        let memory = try GuestMemory(size: 64 * mib)
        try memory.writeBytes([UInt8](repeating: 0xEE, count: 0x1000), at: Layout.zeroPage)
        _ = try BootLoader.load(kernel: try KernelImage.parse(bytes), kernelBytes: bytes, initrd: nil,
                                commandLine: KernelCommandLine(), memory: memory)
        let page = try memory.readBytes(at: Layout.zeroPage, count: 0x1000)
        #expect(page[0..<0x1E8].allSatisfy { $0 == 0 })
        #expect(getLE32(page, 0x0C0) == 0)
        #expect(page[0x2D0 + 3 * 20..<0x1000].allSatisfy { $0 == 0 })
    }

    @Test("ramdisk fields point at the initrd, below initrd_addr_max")
    func ramdisk() throws {
        var bz = SyntheticBzImage()
        bz.initrdAddressMax = 0x37F_FFFF // 56 MiB - 1
        let initrd = pattern(10_000, seed: 4)
        let (_, memory, page) = try load(bz, initrd: initrd)
        let address = (56 * mib - 10_000) & ~0xFFF
        #expect(getLE32(page, 0x218) == UInt32(address))     // ramdisk_image
        #expect(getLE32(page, 0x21C) == 10_000)              // ramdisk_size
        #expect(getLE32(page, 0x0C0) == 0)                   // ext_ramdisk_image
        #expect(getLE32(page, 0x0C4) == 0)                   // ext_ramdisk_size
        #expect(try memory.readBytes(at: GuestAddress(address), count: initrd.count) == initrd)
    }

    @Test("cmdline_size limits the command line")
    func commandLineSize() throws {
        var bz = SyntheticBzImage()
        bz.commandLineSize = 255
        _ = try load(bz, commandLine: String(repeating: "x", count: 255))
        #expect(throws: BootLoader.Error.commandLineTooLong(length: 256, limit: 255)) {
            try load(bz, commandLine: String(repeating: "x", count: 256))
        }
    }

    @Test("a bzImage larger than RAM is kernelDoesNotFit")
    func tooBig() throws {
        var bz = SyntheticBzImage()
        bz.payload = [UInt8](repeating: 0x90, count: Int(31 * mib) + 1)   // ends one byte past 32 MiB
        #expect(throws: BootLoader.Error.kernelDoesNotFit(address: 0x10_0000, size: 31 * mib + 1, memory: 32 * mib)) {
            try load(bz, memorySize: 32 * mib)
        }
    }
}
