import Testing
@testable import MicroVM

/// Whether two errors are the same case, ignoring the human-readable detail string.
private func sameCase(_ a: KernelImage.Error, _ b: KernelImage.Error) -> Bool {
    switch (a, b) {
    case (.empty, .empty), (.notAKernel, .notAKernel), (.noPVHEntry, .noPVHEntry),
         (.truncated, .truncated), (.unsupportedELF, .unsupportedELF),
         (.unsupportedBzImage, .unsupportedBzImage), (.badSegment, .badSegment):
        return true
    default:
        return false
    }
}

private func parseError(_ bytes: [UInt8]) -> KernelImage.Error? {
    do { _ = try KernelImage.parse(bytes); return nil } catch { return error }
}

/// A named mutation of a valid synthetic ELF and the error kind it must produce.
struct ELFCase: CustomTestStringConvertible, Sendable {
    var name: String
    var expected: KernelImage.Error
    var mutate: @Sendable (inout [UInt8], SyntheticELF) -> Void
    var testDescription: String { name }
}

private let bzImageErrorCases: [(String, KernelImage.Error)] = [
    ("boot protocol 2.11", KernelImage.Error.unsupportedBzImage("")),
    ("boot protocol 2.00", .unsupportedBzImage("")),
    ("no XLF_KERNEL_64", .unsupportedBzImage("")),
    ("no 0xAA55", .unsupportedBzImage("")),
    ("cut inside the setup header", .truncated("")),
    ("no protected-mode kernel", .truncated("")),
    ("setup_sects past EOF", .truncated("")),
    ]

@Suite("ELF vmlinux parsing")
struct ELFKernelTests {
    @Test("a PVH vmlinux parses into its PT_LOAD segments and entry", arguments: [4, 8])
    func valid(descSize: Int) throws {
        var elf = SyntheticELF()
        elf.notes = [SyntheticELF.gnuBuildIDNote, SyntheticELF.pvhNote(entry: 0x0100_0040, descSize: descSize)]
        let bytes = elf.bytes()
        guard case .elf(let k) = try KernelImage.parse(bytes) else {
            Issue.record("expected an ELF kernel"); return
        }
        #expect(k.pvhEntry == 0x0100_0040)
        #expect(k.segments == [
            LoadSegment(physicalAddress: 0x100_0000, fileOffset: elf.loadOffset(0), fileSize: 0x2000, memorySize: 0x3000),
            LoadSegment(physicalAddress: 0x120_0000, fileOffset: elf.loadOffset(1), fileSize: 0x100, memorySize: 0x100),
        ])
        #expect(Array(bytes[k.segments[0].fileOffset..<k.segments[0].fileOffset + 0x2000]) == elf.loads[0].data)
    }

    @Test("the entry is found in a second PT_NOTE, after unrelated notes")
    func noteInSecondSegment() throws {
        var elf = SyntheticELF()
        elf.notes = [SyntheticELF.gnuBuildIDNote, SyntheticELF.note(name: "Linux", type: 6, desc: [1, 2, 3]),
                     SyntheticELF.pvhNote(entry: 0x0123_4567, descSize: 8)]
        let k = try ELFKernel(elf.bytes())
        #expect(k.pvhEntry == 0x0123_4567)
    }

    static let malformed: [ELFCase] = [
        ELFCase(name: "empty file", expected: .empty) { b, _ in b = [] },
        ELFCase(name: "random bytes", expected: .notAKernel) { b, _ in
            b = pseudoRandomBytes(4096, seed: 42); b[0] = 0; b[0x202] = 0
        },
        ELFCase(name: "two bytes", expected: .notAKernel) { b, _ in b = [0x4D, 0x5A] },
        ELFCase(name: "magic only", expected: .truncated("")) { b, _ in b = Array(b[0..<4]) },
        ELFCase(name: "truncated header", expected: .truncated("")) { b, _ in b = Array(b[0..<63]) },
        ELFCase(name: "32-bit class", expected: .unsupportedELF("")) { b, _ in b[4] = 1 },
        ELFCase(name: "big-endian", expected: .unsupportedELF("")) { b, _ in b[5] = 2 },
        ELFCase(name: "wrong machine (i386)", expected: .unsupportedELF("")) { b, _ in putLE16(&b, 18, 3) },
        ELFCase(name: "wrong machine (aarch64)", expected: .unsupportedELF("")) { b, _ in putLE16(&b, 18, 183) },
        ELFCase(name: "shared object, not executable", expected: .unsupportedELF("")) { b, _ in putLE16(&b, 16, 3) },
        ELFCase(name: "phentsize 32", expected: .unsupportedELF("")) { b, _ in putLE16(&b, 54, 32) },
        ELFCase(name: "phnum 0", expected: .unsupportedELF("")) { b, _ in putLE16(&b, 56, 0) },
        ELFCase(name: "phnum 65", expected: .unsupportedELF("")) { b, _ in putLE16(&b, 56, 65) },
        ELFCase(name: "phnum 0xFFFF", expected: .unsupportedELF("")) { b, _ in putLE16(&b, 56, 0xFFFF) },
        ELFCase(name: "program headers start past EOF", expected: .truncated("")) { b, _ in
            putLE64(&b, 32, UInt64(b.count) + 1)
        },
        ELFCase(name: "program headers end past EOF", expected: .truncated("")) { b, _ in
            putLE64(&b, 32, UInt64(b.count) - 56)
        },
        ELFCase(name: "phoff near UInt64.max", expected: .truncated("")) { b, _ in putLE64(&b, 32, UInt64.max - 8) },
        ELFCase(name: "more headers than the file holds", expected: .truncated("")) { b, _ in
            // 64 headers, placed so that only 63 fit before the end of the file.
            putLE16(&b, 56, 64); putLE64(&b, 32, UInt64(b.count - 63 * 56))
        },
        ELFCase(name: "PT_LOAD offset + filesz overflows", expected: .truncated("")) { b, _ in
            putLE64(&b, SyntheticELF.phdr(1) + 8, UInt64.max - 0xF)
        },
        ELFCase(name: "PT_LOAD data past EOF", expected: .truncated("")) { b, elf in
            putLE64(&b, SyntheticELF.phdr(2) + 32, UInt64(b.count - elf.loadOffset(1) + 1))
            putLE64(&b, SyntheticELF.phdr(2) + 40, UInt64(b.count))
        },
        ELFCase(name: "PT_LOAD offset past EOF", expected: .truncated("")) { b, _ in
            putLE64(&b, SyntheticELF.phdr(1) + 8, UInt64(b.count) + 0x1000)
        },
        ELFCase(name: "PT_NOTE offset + filesz overflows", expected: .truncated("")) { b, _ in
            putLE64(&b, SyntheticELF.phdr(0) + 8, UInt64.max)
        },
        ELFCase(name: "PT_NOTE past EOF", expected: .truncated("")) { b, _ in
            putLE64(&b, SyntheticELF.phdr(0) + 32, UInt64(b.count))
        },
        ELFCase(name: "filesz > memsz", expected: .badSegment("")) { b, _ in
            putLE64(&b, SyntheticELF.phdr(2) + 40, 0xFF)
        },
        ELFCase(name: "paddr + memsz overflows", expected: .badSegment("")) { b, _ in
            putLE64(&b, SyntheticELF.phdr(1) + 24, UInt64.max - 0x1000)
        },
        ELFCase(name: "no PT_LOAD", expected: .unsupportedELF("")) { b, _ in
            putLE32(&b, SyntheticELF.phdr(1), 6); putLE32(&b, SyntheticELF.phdr(2), 6)
        },
        ELFCase(name: "no PT_NOTE", expected: .noPVHEntry) { b, _ in putLE32(&b, SyntheticELF.phdr(0), 0x6474_E551) },
        ELFCase(name: "note type 17 instead of 18", expected: .noPVHEntry) { b, elf in
            putLE32(&b, elf.noteOffset + SyntheticELF.gnuBuildIDNote.count + 8, 17)
        },
        ELFCase(name: "note name Xeo", expected: .noPVHEntry) { b, elf in
            b[elf.noteOffset + SyntheticELF.gnuBuildIDNote.count + 12 + 2] = UInt8(ascii: "o")
        },
        ELFCase(name: "PVH desc of 2 bytes", expected: .noPVHEntry) { b, elf in
            putLE32(&b, elf.noteOffset + SyntheticELF.gnuBuildIDNote.count + 4, 2)
        },
        ELFCase(name: "first note namesz 0xFFFFFFFF", expected: .noPVHEntry) { b, elf in
            putLE32(&b, elf.noteOffset, 0xFFFF_FFFF)
        },
        ELFCase(name: "first note descsz runs past the segment", expected: .noPVHEntry) { b, elf in
            putLE32(&b, elf.noteOffset + 4, UInt32(elf.noteSize))
        },
        ELFCase(name: "PVH descsz 0x7FFFFFFF", expected: .noPVHEntry) { b, elf in
            putLE32(&b, elf.noteOffset + SyntheticELF.gnuBuildIDNote.count + 4, 0x7FFF_FFFF)
        },
        ELFCase(name: "PT_NOTE segment cut inside the PVH note", expected: .noPVHEntry) { b, elf in
            putLE64(&b, SyntheticELF.phdr(0) + 32, UInt64(elf.noteSize - 4))
        },
        ELFCase(name: "PT_NOTE shorter than a note header", expected: .noPVHEntry) { b, _ in
            putLE64(&b, SyntheticELF.phdr(0) + 32, 11)
        },
        ELFCase(name: "PT_NOTE at the very end of the file", expected: .noPVHEntry) { b, _ in
            putLE64(&b, SyntheticELF.phdr(0) + 8, UInt64(b.count)); putLE64(&b, SyntheticELF.phdr(0) + 32, 0)
        },
    ]

    @Test("malformed and hostile files are rejected without crashing", arguments: malformed)
    func malformedFiles(c: ELFCase) {
        let elf = SyntheticELF()
        var bytes = elf.bytes()
        c.mutate(&bytes, elf)
        guard let error = parseError(bytes) else {
            Issue.record("\(c.name): parsed successfully"); return
        }
        #expect(sameCase(error, c.expected), "\(c.name): got \(error)")
        #expect(!error.description.isEmpty)
    }

    @Test("every truncation of a valid image is rejected, never crashes")
    func everyTruncation() {
        let bytes = SyntheticELF().bytes()
        for n in 0..<bytes.count {
            #expect(parseError(Array(bytes[0..<n])) != nil, "prefix of \(n) bytes parsed")
        }
    }

    @Test("single-byte corruption of headers and notes never crashes")
    func byteFlips() {
        let elf = SyntheticELF()
        let bytes = elf.bytes()
        for i in 0..<(elf.noteOffset + elf.noteSize) {
            for v: UInt8 in [0x00, 0x7F, 0x80, 0xFF] {
                var b = bytes
                b[i] = v
                _ = parseError(b)
            }
        }
    }
}

@Suite("bzImage parsing")
struct BzImageTests {
    @Test("a 64-bit bzImage's setup header is parsed")
    func valid() throws {
        let bz = SyntheticBzImage()
        let bytes = bz.bytes()
        guard case .bzImage(let k) = try KernelImage.parse(bytes) else {
            Issue.record("expected a bzImage"); return
        }
        #expect(k.setupSectors == 4)
        #expect(k.protocolVersion == 0x020F)
        #expect(k.kernelOffset == 5 * 512)
        #expect(k.kernelSize == bz.payload.count)
        #expect(k.initrdAddressMax == 0x7FFF_FFFF)
        #expect(k.commandLineSize == 0x7FF)
        // The header runs from 0x1F1 to 0x202 + the jump offset.
        #expect(k.setupHeader == Array(bytes[0x1F1..<(0x202 + 0x6A)]))
    }

    @Test("setup_sects 0 means 4")
    func zeroSetupSectors() throws {
        var bz = SyntheticBzImage()
        bz.setupSectors = 0
        let k = try BzImageKernel(bz.bytes())
        #expect(k.setupSectors == 4)
        #expect(k.kernelOffset == 5 * 512)
    }

    @Test("a setup header longer than boot_params allows is capped at 0x290")
    func longHeaderCapped() throws {
        var bz = SyntheticBzImage()
        bz.jumpOffset = 0xFF
        let k = try BzImageKernel(bz.bytes())
        #expect(k.setupHeader.count == 0x290 - 0x1F1)
    }

    @Test("protocol 2.12 is the oldest accepted")
    func oldestProtocol() throws {
        var bz = SyntheticBzImage()
        bz.version = 0x020C
        #expect(try BzImageKernel(bz.bytes()).protocolVersion == 0x020C)
    }

    @Test("unsupported and truncated bzImages are rejected", arguments: bzImageErrorCases)
    func invalid(name: String, expected: KernelImage.Error) {
        var bz = SyntheticBzImage()
        var bytes: [UInt8]
        switch name {
        case "boot protocol 2.11": bz.version = 0x020B; bytes = bz.bytes()
        case "boot protocol 2.00": bz.version = 0x0200; bytes = bz.bytes()
        case "no XLF_KERNEL_64": bz.xloadflags = 0x0002; bytes = bz.bytes()
        case "no 0xAA55": bytes = bz.bytes(); bytes[0x1FE] = 0
        case "cut inside the setup header": bytes = Array(bz.bytes()[0..<0x240])
        case "no protected-mode kernel": bz.payload = []; bytes = bz.bytes()
        case "setup_sects past EOF": bytes = bz.bytes(); bytes[0x1F1] = 0x7F
        default: Issue.record("unknown case \(name)"); return
        }
        guard let error = parseError(bytes) else { Issue.record("\(name): parsed"); return }
        #expect(sameCase(error, expected), "\(name): got \(error)")
    }

    @Test("every truncation of the setup area is rejected, never crashes")
    func everyTruncation() {
        let bytes = SyntheticBzImage().bytes()
        for n in 0...0xA00 {
            #expect(parseError(Array(bytes[0..<n])) != nil, "prefix of \(n) bytes parsed")
        }
    }
}
