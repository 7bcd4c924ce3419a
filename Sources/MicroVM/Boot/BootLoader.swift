import GuestMemory

/// Where the boot vCPU starts, decided by the kernel's entry protocol.
public enum BootEntry: Equatable, Sendable {
    /// PVH: 32-bit protected mode at `entry`, RBX = start_info.
    case pvh(entry: UInt32, startInfo: GuestAddress)
    /// 64-bit Linux boot protocol: long mode at `entry`, RSI = zero page.
    case linux64(entry: UInt64, zeroPage: GuestAddress)
}

/// Places a kernel, its command line, an optional initrd and the boot information
/// structures into guest memory (Linux boot protocol: Documentation/arch/x86/boot.rst;
/// PVH: xen/include/public/arch-x86/hvm/start_info.h).
public enum BootLoader {
    public enum Error: Swift.Error, Equatable, Sendable, CustomStringConvertible {
        case kernelDoesNotFit(address: UInt64, size: UInt64, memory: UInt64)
        case kernelOverlapsBootData(address: UInt64)
        case initrdDoesNotFit(size: UInt64, available: UInt64)
        case commandLineTooLong(length: Int, limit: Int)
        case tooLittleMemory(UInt64, minimum: UInt64)

        public var description: String {
            switch self {
            case let .kernelDoesNotFit(a, s, m):
                return "the kernel (\(s) bytes at 0x\(String(a, radix: 16))) does not fit in \(m >> 20) MiB of guest memory; give the VM more memory"
            case let .kernelOverlapsBootData(a):
                return "a kernel segment at 0x\(String(a, radix: 16)) overlaps the boot data below 1 MiB"
            case let .initrdDoesNotFit(s, a):
                return "the initrd (\(s) bytes) does not fit in the \(a) bytes of guest memory left after the kernel; give the VM more memory"
            case let .commandLineTooLong(l, limit):
                return "kernel command line is \(l) bytes; this kernel accepts at most \(limit)"
            case let .tooLittleMemory(m, min):
                return "\(m >> 20) MiB of guest memory is too little; the minimum is \(min >> 20) MiB"
            }
        }
    }

    /// Loads everything and returns the entry point.
    public static func load(kernel: KernelImage, kernelBytes: [UInt8], initrd: [UInt8]?,
                            commandLine: KernelCommandLine, memory: GuestMemory) throws -> BootEntry {
        guard memory.size >= Layout.minimumMemory else { throw Error.tooLittleMemory(memory.size, minimum: Layout.minimumMemory) }
        let lowEnd = memory.regions[0].end
        var kernelEnd: UInt64 = 0
        switch kernel {
        case .elf(let elf):
            for s in elf.segments {
                guard s.physicalAddress >= Layout.highMemory else { throw Error.kernelOverlapsBootData(address: s.physicalAddress) }
                guard memory.contains(GuestAddress(s.physicalAddress), length: s.memorySize) else {
                    throw Error.kernelDoesNotFit(address: s.physicalAddress, size: s.memorySize, memory: memory.size)
                }
                try kernelBytes.withUnsafeBytes { raw in
                    let slice = UnsafeRawBufferPointer(rebasing: raw[s.fileOffset..<s.fileOffset + s.fileSize])
                    try memory.writeBytes(slice, at: GuestAddress(s.physicalAddress))
                }
                if s.memorySize > UInt64(s.fileSize) {
                    try memory.zero(at: GuestAddress(s.physicalAddress + UInt64(s.fileSize)), count: Int(s.memorySize - UInt64(s.fileSize)))
                }
                kernelEnd = max(kernelEnd, s.physicalAddress + s.memorySize)
            }
        case .bzImage(let bz):
            let size = UInt64(bz.kernelSize)
            guard memory.contains(Layout.bzImageLoad, length: size) else {
                throw Error.kernelDoesNotFit(address: Layout.bzImageLoad.rawValue, size: size, memory: memory.size)
            }
            try kernelBytes.withUnsafeBytes { raw in
                try memory.writeBytes(UnsafeRawBufferPointer(rebasing: raw[bz.kernelOffset...]), at: Layout.bzImageLoad)
            }
            kernelEnd = Layout.bzImageLoad.rawValue + size
        }

        // Command line.
        let cmdline = commandLine.bytes
        var limit = Layout.maxCommandLine
        if case .bzImage(let bz) = kernel, bz.commandLineSize > 0 { limit = min(limit, Int(bz.commandLineSize) + 1) }
        guard cmdline.count <= limit else { throw Error.commandLineTooLong(length: cmdline.count - 1, limit: limit - 1) }
        try memory.writeBytes(cmdline, at: Layout.commandLine)

        // Initrd: page-aligned at the top of low RAM, above the kernel.
        var initrdRange: (address: UInt64, size: UInt64)?
        if let initrd, !initrd.isEmpty {
            var top = lowEnd
            if case .bzImage(let bz) = kernel, bz.initrdAddressMax > 0 { top = min(top, UInt64(bz.initrdAddressMax) + 1) }
            let size = UInt64(initrd.count)
            let alignedKernelEnd = (kernelEnd + 0xFFF) & ~0xFFF
            guard top > alignedKernelEnd, top - alignedKernelEnd >= size else {
                throw Error.initrdDoesNotFit(size: size, available: top > alignedKernelEnd ? top - alignedKernelEnd : 0)
            }
            let address = (top - size) & ~0xFFF
            try memory.writeBytes(initrd, at: GuestAddress(address))
            initrdRange = (address, size)
        }

        let map = Layout.memoryMap(for: memory)
        switch kernel {
        case .elf(let elf):
            try writePVHStartInfo(memory: memory, map: map, initrd: initrdRange)
            return .pvh(entry: elf.pvhEntry, startInfo: Layout.pvhStartInfo)
        case .bzImage(let bz):
            try writeZeroPage(memory: memory, kernel: bz, map: map, initrd: initrdRange)
            return .linux64(entry: Layout.bzImageLoad.rawValue + 0x200, zeroPage: Layout.zeroPage)
        }
    }

    /// `struct hvm_start_info` (version 1) with memmap and module list.
    static func writePVHStartInfo(memory: GuestMemory, map: [MemoryMapEntry], initrd: (address: UInt64, size: UInt64)?) throws {
        let base = Layout.pvhStartInfo.rawValue
        try memory.zero(at: Layout.pvhStartInfo, count: 0x1000)
        try memory.write(UInt32(0x336E_C578), at: GuestAddress(base + 0))   // magic
        try memory.write(UInt32(1), at: GuestAddress(base + 4))             // version
        try memory.write(UInt32(0), at: GuestAddress(base + 8))             // flags
        try memory.write(UInt32(initrd == nil ? 0 : 1), at: GuestAddress(base + 12)) // nr_modules
        try memory.write(Layout.pvhModlist.rawValue, at: GuestAddress(base + 16))   // modlist_paddr
        try memory.write(Layout.commandLine.rawValue, at: GuestAddress(base + 24))  // cmdline_paddr
        try memory.write(UInt64(0), at: GuestAddress(base + 32))                    // rsdp_paddr
        try memory.write(Layout.pvhMemmap.rawValue, at: GuestAddress(base + 40))    // memmap_paddr
        try memory.write(UInt32(min(map.count, Layout.maxMemmapEntries)), at: GuestAddress(base + 48)) // memmap_entries
        for (i, e) in map.prefix(Layout.maxMemmapEntries).enumerated() {
            let p = Layout.pvhMemmap.rawValue + UInt64(i * 24)
            try memory.write(e.address, at: GuestAddress(p))
            try memory.write(e.size, at: GuestAddress(p + 8))
            try memory.write(e.kind.rawValue, at: GuestAddress(p + 16))
            try memory.write(UInt32(0), at: GuestAddress(p + 20))
        }
        if let initrd {
            let p = Layout.pvhModlist.rawValue
            try memory.write(initrd.address, at: GuestAddress(p))
            try memory.write(initrd.size, at: GuestAddress(p + 8))
            try memory.write(UInt64(0), at: GuestAddress(p + 16))
            try memory.write(UInt64(0), at: GuestAddress(p + 24))
        }
    }

    /// `struct boot_params` for the 64-bit boot protocol.
    static func writeZeroPage(memory: GuestMemory, kernel: BzImageKernel, map: [MemoryMapEntry],
                              initrd: (address: UInt64, size: UInt64)?) throws {
        let zp = Layout.zeroPage.rawValue
        try memory.zero(at: Layout.zeroPage, count: 0x1000)
        try memory.writeBytes(kernel.setupHeader, at: GuestAddress(zp + 0x1F1))
        try memory.write(UInt8(0xFF), at: GuestAddress(zp + 0x210))        // type_of_loader: undefined
        let loadflags: UInt8 = try memory.read(at: GuestAddress(zp + 0x211))
        try memory.write(loadflags | 0x01 | 0x80, at: GuestAddress(zp + 0x211)) // LOADED_HIGH | CAN_USE_HEAP
        try memory.write(UInt16(0xFE00), at: GuestAddress(zp + 0x224))     // heap_end_ptr
        try memory.write(UInt32(truncatingIfNeeded: Layout.commandLine.rawValue), at: GuestAddress(zp + 0x228))
        if let initrd {
            try memory.write(UInt32(truncatingIfNeeded: initrd.address), at: GuestAddress(zp + 0x218))
            try memory.write(UInt32(truncatingIfNeeded: initrd.size), at: GuestAddress(zp + 0x21C))
            try memory.write(UInt32(truncatingIfNeeded: initrd.address >> 32), at: GuestAddress(zp + 0x0C0))
            try memory.write(UInt32(truncatingIfNeeded: initrd.size >> 32), at: GuestAddress(zp + 0x0C4))
        }
        let entries = map.prefix(128)
        try memory.write(UInt8(entries.count), at: GuestAddress(zp + 0x1E8))
        for (i, e) in entries.enumerated() {
            let p = zp + 0x2D0 + UInt64(i * 20)
            try memory.write(e.address, at: GuestAddress(p))
            try memory.write(e.size, at: GuestAddress(p + 8))
            try memory.write(e.kind.rawValue, at: GuestAddress(p + 16))
        }
    }
}
