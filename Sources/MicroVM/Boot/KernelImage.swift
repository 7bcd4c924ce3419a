/// A parsed guest kernel: an ELF `vmlinux` entered through its PVH note, or a
/// `bzImage` entered through the 64-bit Linux boot protocol.
public enum KernelImage: Equatable, Sendable {
    case elf(ELFKernel)
    case bzImage(BzImageKernel)

    public enum Error: Swift.Error, Equatable, Sendable, CustomStringConvertible {
        case empty
        case notAKernel
        case truncated(String)
        case unsupportedELF(String)
        case noPVHEntry
        case unsupportedBzImage(String)
        case badSegment(String)

        public var description: String {
            switch self {
            case .empty: return "the kernel file is empty"
            case .notAKernel: return "not a kernel: neither an ELF vmlinux nor a bzImage"
            case .truncated(let what): return "truncated kernel image: \(what)"
            case .unsupportedELF(let why): return "unsupported ELF kernel: \(why)"
            case .noPVHEntry: return "the ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build it with CONFIG_PVH=y"
            case .unsupportedBzImage(let why): return "unsupported bzImage: \(why)"
            case .badSegment(let why): return "bad kernel segment: \(why)"
            }
        }
    }

    /// Parses `bytes` (the whole kernel file).
    public static func parse(_ bytes: [UInt8]) throws(Error) -> KernelImage {
        if bytes.isEmpty { throw .empty }
        if bytes.count >= 4 && bytes[0] == 0x7F && bytes[1] == 0x45 && bytes[2] == 0x4C && bytes[3] == 0x46 {
            return .elf(try ELFKernel(bytes))
        }
        if bytes.count >= 0x206 && readLE32(bytes, 0x202) == 0x5372_6448 { // "HdrS"
            return .bzImage(try BzImageKernel(bytes))
        }
        throw .notAKernel
    }
}

/// One PT_LOAD segment of an ELF kernel.
public struct LoadSegment: Equatable, Sendable {
    public var physicalAddress: UInt64
    public var fileOffset: Int
    public var fileSize: Int
    public var memorySize: UInt64
}

/// An x86-64 ELF vmlinux with a PVH entry point.
public struct ELFKernel: Equatable, Sendable {
    public var segments: [LoadSegment]
    /// 32-bit physical entry point from XEN_ELFNOTE_PHYS32_ENTRY.
    public var pvhEntry: UInt32

    static let maxProgramHeaders = 64

    public init(_ b: [UInt8]) throws(KernelImage.Error) {
        guard b.count >= 64 else { throw .truncated("ELF header needs 64 bytes, file has \(b.count)") }
        guard b[4] == 2 else { throw .unsupportedELF("not 64-bit (EI_CLASS \(b[4]))") }
        guard b[5] == 1 else { throw .unsupportedELF("not little-endian") }
        let machine = readLE16(b, 18)
        guard machine == 62 else { throw .unsupportedELF("machine \(machine) is not x86-64") }
        let type = readLE16(b, 16)
        guard type == 2 else { throw .unsupportedELF("type \(type) is not an executable") }
        let phoff = readLE64(b, 32)
        let phentsize = Int(readLE16(b, 54))
        let phnum = Int(readLE16(b, 56))
        guard phentsize == 56 else { throw .unsupportedELF("program header size \(phentsize)") }
        guard phnum > 0, phnum <= Self.maxProgramHeaders else { throw .unsupportedELF("\(phnum) program headers") }
        guard phoff <= UInt64(b.count), UInt64(b.count) - phoff >= UInt64(phnum * 56) else {
            throw .truncated("program headers extend past the end of the file")
        }
        var segments: [LoadSegment] = []
        var entry: UInt32?
        for i in 0..<phnum {
            let h = Int(phoff) + i * 56
            let ptype = readLE32(b, h)
            let offset = readLE64(b, h + 8)
            let paddr = readLE64(b, h + 24)
            let filesz = readLE64(b, h + 32)
            let memsz = readLE64(b, h + 40)
            let (end, overflow) = offset.addingReportingOverflow(filesz)
            if ptype == 1 || ptype == 4 {
                guard !overflow, end <= UInt64(b.count) else {
                    throw .truncated("segment \(i) (offset \(offset), size \(filesz)) extends past the end of the file")
                }
            }
            switch ptype {
            case 1: // PT_LOAD
                guard filesz <= memsz else { throw .badSegment("segment \(i): file size \(filesz) > memory size \(memsz)") }
                guard !paddr.addingReportingOverflow(memsz).overflow else { throw .badSegment("segment \(i): address overflow") }
                segments.append(LoadSegment(physicalAddress: paddr, fileOffset: Int(offset), fileSize: Int(filesz), memorySize: memsz))
            case 4: // PT_NOTE
                if let e = Self.pvhEntry(notes: b, from: Int(offset), count: Int(filesz)) { entry = e }
            default:
                break
            }
        }
        guard !segments.isEmpty else { throw .unsupportedELF("no loadable segments") }
        guard let entry else { throw .noPVHEntry }
        self.segments = segments
        self.pvhEntry = entry
    }

    /// Scans a note section for XEN_ELFNOTE_PHYS32_ENTRY (type 18, name "Xen").
    static func pvhEntry(notes b: [UInt8], from start: Int, count: Int) -> UInt32? {
        var p = start
        let end = start + count
        while p + 12 <= end {
            let namesz = Int(readLE32(b, p)), descsz = Int(readLE32(b, p + 4)), type = readLE32(b, p + 8)
            let nameStart = p + 12
            let descStart = nameStart + ((namesz + 3) & ~3)
            let next = descStart + ((descsz + 3) & ~3)
            guard namesz < 1 << 16, descsz < 1 << 16, next <= end, next > p else { return nil }
            if type == 18, namesz == 4, b[nameStart..<nameStart + 3].elementsEqual("Xen".utf8), descsz == 4 || descsz == 8 {
                return readLE32(b, descStart)
            }
            p = next
        }
        return nil
    }
}

/// A bzImage (Linux boot protocol >= 2.12 with a 64-bit entry point).
public struct BzImageKernel: Equatable, Sendable {
    public var setupSectors: Int
    public var protocolVersion: UInt16
    /// The setup header bytes, copied into the zero page at offset 0x1f1.
    public var setupHeader: [UInt8]
    /// Offset and length of the protected-mode kernel in the file.
    public var kernelOffset: Int
    public var kernelSize: Int
    public var initrdAddressMax: UInt32
    public var commandLineSize: UInt32

    public init(_ b: [UInt8]) throws(KernelImage.Error) {
        guard b.count >= 0x270 else { throw .truncated("setup header needs 0x270 bytes, file has \(b.count)") }
        guard readLE16(b, 0x1FE) == 0xAA55 else { throw .unsupportedBzImage("missing boot sector signature 0xAA55") }
        var sects = Int(b[0x1F1])
        if sects == 0 { sects = 4 }
        let version = readLE16(b, 0x206)
        guard version >= 0x020C else {
            throw .unsupportedBzImage("boot protocol \(version >> 8).\(version & 0xFF) is older than 2.12")
        }
        let xloadflags = readLE16(b, 0x236)
        guard xloadflags & 1 != 0 else { throw .unsupportedBzImage("no 64-bit entry point (XLF_KERNEL_64 not set)") }
        let headerEnd = 0x202 + Int(b[0x201])
        guard headerEnd <= b.count, headerEnd > 0x1F1 else { throw .truncated("setup header") }
        let kernelOffset = (sects + 1) * 512
        guard kernelOffset < b.count else { throw .truncated("no protected-mode kernel after \(sects) setup sectors") }
        self.setupSectors = sects
        self.protocolVersion = version
        self.setupHeader = Array(b[0x1F1..<min(headerEnd, 0x290)])
        self.kernelOffset = kernelOffset
        self.kernelSize = b.count - kernelOffset
        self.initrdAddressMax = readLE32(b, 0x22C)
        self.commandLineSize = readLE32(b, 0x238)
    }
}

@inline(__always) func readLE16(_ b: [UInt8], _ o: Int) -> UInt16 { UInt16(b[o]) | UInt16(b[o + 1]) << 8 }
@inline(__always) func readLE32(_ b: [UInt8], _ o: Int) -> UInt32 {
    UInt32(b[o]) | UInt32(b[o + 1]) << 8 | UInt32(b[o + 2]) << 16 | UInt32(b[o + 3]) << 24
}
@inline(__always) func readLE64(_ b: [UInt8], _ o: Int) -> UInt64 { UInt64(readLE32(b, o)) | UInt64(readLE32(b, o + 4)) << 32 }
