import Bus
import GuestMemory
import SystemShims
import VirtIO

// Shared fixtures for the MicroVM unit tests: little-endian byte helpers, small
// guest memories, synthetic kernel images and recording devices.

// MARK: - Little-endian helpers

func putLE16(_ b: inout [UInt8], _ o: Int, _ v: UInt16) {
    b[o] = UInt8(v & 0xFF); b[o + 1] = UInt8(v >> 8)
}
func putLE32(_ b: inout [UInt8], _ o: Int, _ v: UInt32) {
    for i in 0..<4 { b[o + i] = UInt8((v >> (8 * UInt32(i))) & 0xFF) }
}
func putLE64(_ b: inout [UInt8], _ o: Int, _ v: UInt64) {
    for i in 0..<8 { b[o + i] = UInt8((v >> (8 * UInt64(i))) & 0xFF) }
}
func getLE16(_ b: [UInt8], _ o: Int) -> UInt16 { UInt16(b[o]) | UInt16(b[o + 1]) << 8 }
func getLE32(_ b: [UInt8], _ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[o + $1]) << (8 * UInt32($1)) } }
func getLE64(_ b: [UInt8], _ o: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(b[o + $1]) << (8 * UInt64($1)) } }

/// A deterministic byte pattern (distinct per `seed`) so copies can be checked.
func pattern(_ count: Int, seed: UInt8 = 1) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed) &* 31 &+ ($0 >> 8)) }
}

/// Deterministic pseudo-random bytes (xorshift64*), for "random file" cases.
func pseudoRandomBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var x = seed | 1
    return (0..<count).map { _ in
        x ^= x >> 12; x ^= x << 25; x ^= x >> 27
        return UInt8(truncatingIfNeeded: (x &* 0x2545_F491_4F6C_DD1D) >> 56)
    }
}

// MARK: - Guest memory

/// One low region of `size` bytes starting at guest address 0.
func lowMemory(_ size: UInt64) throws -> GuestMemory {
    try GuestMemory(regions: [GuestRegion(start: GuestAddress(0), size: size, hostOffset: 0)], totalSize: Int(size))
}

/// Two regions: [0, lowSize) and [4 GiB, 4 GiB + highSize), backed by one small mapping.
func splitMemory(lowSize: UInt64, highSize: UInt64) throws -> GuestMemory {
    try GuestMemory(regions: [
        GuestRegion(start: GuestAddress(0), size: lowSize, hostOffset: 0),
        GuestRegion(start: GuestAddress(GuestMemory.highRAMStart), size: highSize, hostOffset: Int(lowSize)),
    ], totalSize: Int(lowSize + highSize))
}

// MARK: - Synthetic ELF kernels

/// Builds an x86-64 ELF64 executable in memory: ELF header, program headers (one
/// PT_NOTE first, then one PT_LOAD per segment), the note data, then segment data.
struct SyntheticELF {
    struct Load { var paddr: UInt64; var data: [UInt8]; var memsz: UInt64 }

    var loads: [Load] = [
        Load(paddr: 0x100_0000, data: pattern(0x2000, seed: 1), memsz: 0x3000),
        Load(paddr: 0x120_0000, data: pattern(0x100, seed: 2), memsz: 0x100),
    ]
    /// Notes in the PT_NOTE segment, in order.
    var notes: [[UInt8]] = [SyntheticELF.gnuBuildIDNote, SyntheticELF.pvhNote(entry: 0x100_0040)]

    static let headerSize = 64
    static let phentsize = 56

    /// Byte offset of program header `i` (0 is the PT_NOTE).
    static func phdr(_ i: Int) -> Int { headerSize + i * phentsize }

    /// One ELF note: namesz, descsz, type, name (NUL-terminated, padded to 4), desc (padded to 4).
    static func note(name: String, type: UInt32, desc: [UInt8]) -> [UInt8] {
        let nameBytes = Array(name.utf8) + [0]
        var b = [UInt8](repeating: 0, count: 12)
        putLE32(&b, 0, UInt32(nameBytes.count))
        putLE32(&b, 4, UInt32(desc.count))
        putLE32(&b, 8, type)
        b += nameBytes + [UInt8](repeating: 0, count: (4 - nameBytes.count % 4) % 4)
        b += desc + [UInt8](repeating: 0, count: (4 - desc.count % 4) % 4)
        return b
    }

    /// XEN_ELFNOTE_PHYS32_ENTRY (18): the 32-bit PVH entry point, as a 4- or 8-byte desc.
    static func pvhNote(entry: UInt32, descSize: Int = 4) -> [UInt8] {
        var desc = [UInt8](repeating: 0, count: descSize)
        putLE32(&desc, 0, entry)
        return note(name: "Xen", type: 18, desc: desc)
    }

    /// An unrelated note the scanner must skip.
    static let gnuBuildIDNote = note(name: "GNU", type: 3, desc: pattern(20, seed: 9))

    /// File offset of the note data and of each segment's data in `bytes()`.
    var noteOffset: Int { Self.headerSize + (1 + loads.count) * Self.phentsize }
    var noteSize: Int { notes.reduce(0) { $0 + $1.count } }
    func loadOffset(_ i: Int) -> Int {
        noteOffset + noteSize + loads[..<i].reduce(0) { $0 + $1.data.count }
    }

    func bytes() -> [UInt8] {
        let phnum = 1 + loads.count
        var b = [UInt8](repeating: 0, count: Self.headerSize + phnum * Self.phentsize)
        b[0] = 0x7F; b[1] = 0x45; b[2] = 0x4C; b[3] = 0x46   // \x7FELF
        b[4] = 2                                            // ELFCLASS64
        b[5] = 1                                            // ELFDATA2LSB
        b[6] = 1                                            // EV_CURRENT
        putLE16(&b, 16, 2)                                  // ET_EXEC
        putLE16(&b, 18, 62)                                 // EM_X86_64
        putLE32(&b, 20, 1)
        putLE64(&b, 24, 0xFFFF_FFFF_8100_0000)              // e_entry (virtual; unused for PVH)
        putLE64(&b, 32, UInt64(Self.headerSize))            // e_phoff
        putLE16(&b, 52, UInt16(Self.headerSize))
        putLE16(&b, 54, UInt16(Self.phentsize))
        putLE16(&b, 56, UInt16(phnum))

        let ph0 = Self.phdr(0)
        putLE32(&b, ph0, 4)                                  // PT_NOTE
        putLE64(&b, ph0 + 8, UInt64(noteOffset))
        putLE64(&b, ph0 + 32, UInt64(noteSize))
        putLE64(&b, ph0 + 40, UInt64(noteSize))
        for (i, l) in loads.enumerated() {
            let h = Self.phdr(i + 1)
            putLE32(&b, h, 1)                                // PT_LOAD
            putLE32(&b, h + 4, 7)                            // RWX
            putLE64(&b, h + 8, UInt64(loadOffset(i)))
            putLE64(&b, h + 16, 0xFFFF_FFFF_8000_0000 | l.paddr)
            putLE64(&b, h + 24, l.paddr)
            putLE64(&b, h + 32, UInt64(l.data.count))
            putLE64(&b, h + 40, l.memsz)
            putLE64(&b, h + 48, 0x1000)
        }
        for n in notes { b += n }
        for l in loads { b += l.data }
        return b
    }
}

// MARK: - Synthetic bzImages

/// A bzImage with a boot protocol setup header (Documentation/arch/x86/boot.rst,
/// "The Real-Mode Kernel Header") followed by a protected-mode payload.
struct SyntheticBzImage {
    var setupSectors: UInt8 = 4
    var version: UInt16 = 0x020F
    var xloadflags: UInt16 = 0x0001 | 0x0002   // XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    var initrdAddressMax: UInt32 = 0x7FFF_FFFF
    var commandLineSize: UInt32 = 0x7FF
    /// Byte at 0x201: the setup header ends at 0x202 + this.
    var jumpOffset: UInt8 = 0x6A
    var payload: [UInt8] = pattern(0x3000, seed: 5)

    var kernelOffset: Int { (Int(setupSectors == 0 ? 4 : setupSectors) + 1) * 512 }

    func bytes() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: kernelOffset)
        b[0x1F1] = setupSectors
        putLE16(&b, 0x1FE, 0xAA55)
        b[0x200] = 0xEB; b[0x201] = jumpOffset
        b[0x202] = 0x48; b[0x203] = 0x64; b[0x204] = 0x72; b[0x205] = 0x53 // "HdrS"
        putLE16(&b, 0x206, version)
        b[0x211] = 0x01                                  // loadflags: LOADED_HIGH
        putLE32(&b, 0x214, 0x10_0000)                    // code32_start
        putLE32(&b, 0x22C, initrdAddressMax)
        putLE32(&b, 0x230, 0x20_0000)                    // kernel_alignment
        b[0x234] = 1                                     // relocatable_kernel
        putLE16(&b, 0x236, xloadflags)
        putLE32(&b, 0x238, commandLineSize)
        putLE32(&b, 0x260, 0x100_0000)                   // init_size
        return b + payload
    }
}

// MARK: - Recording devices

/// Counts interrupt edges.
final class CountingTrigger: InterruptTrigger, @unchecked Sendable {
    // @unchecked: `count` is guarded by `lock`.
    private let lock = Lock()
    private var n = 0
    func trigger() { lock.withLock { n += 1 } }
    var count: Int { lock.withLock { n } }
}

/// Collects bytes handed to a callback.
final class ByteCollector: @unchecked Sendable {
    // @unchecked: `data` is guarded by `lock`.
    private let lock = Lock()
    private var data: [UInt8] = []
    private var chunks = 0
    func add(_ b: UnsafeRawBufferPointer) { lock.withLock { data += b; chunks += 1 } }
    var bytes: [UInt8] { lock.withLock { data } }
    var chunkCount: Int { lock.withLock { chunks } }
}

/// Counts calls.
final class CallCounter: @unchecked Sendable {
    // @unchecked: `n` is guarded by `lock`.
    private let lock = Lock()
    private var n = 0
    func bump() { lock.withLock { n += 1 } }
    var count: Int { lock.withLock { n } }
}

/// One access recorded by a test device.
struct Access: Equatable {
    var write: Bool
    var offset: UInt64
    var bytes: [UInt8]
}

/// An MMIO device that records accesses and answers reads with `offset + i`.
final class RecordingMMIODevice: MMIODevice, @unchecked Sendable {
    // @unchecked: `log` is guarded by `lock`.
    private let lock = Lock()
    private var log: [Access] = []
    var accesses: [Access] { lock.withLock { log } }
    func mmioRead(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        for i in 0..<data.count { data[i] = UInt8(truncatingIfNeeded: offset &+ UInt64(i)) }
        lock.withLock { log.append(Access(write: false, offset: offset, bytes: Array(data))) }
    }
    func mmioWrite(offset: UInt64, data: UnsafeRawBufferPointer) {
        lock.withLock { log.append(Access(write: true, offset: offset, bytes: Array(data))) }
    }
}

import MicroVM

/// A port device that records accesses and answers reads with `0xA0 + offset + i`.
final class RecordingPortDevice: PortIODevice, @unchecked Sendable {
    // @unchecked: `log` is guarded by `lock`.
    private let lock = Lock()
    private var log: [Access] = []
    var accesses: [Access] { lock.withLock { log } }
    func portRead(offset: UInt16, data: UnsafeMutableRawBufferPointer) {
        for i in 0..<data.count { data[i] = 0xA0 &+ UInt8(truncatingIfNeeded: Int(offset) + i) }
        lock.withLock { log.append(Access(write: false, offset: UInt64(offset), bytes: Array(data))) }
    }
    func portWrite(offset: UInt16, data: UnsafeRawBufferPointer) {
        lock.withLock { log.append(Access(write: true, offset: UInt64(offset), bytes: Array(data))) }
    }
}
