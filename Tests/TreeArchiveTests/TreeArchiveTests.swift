import Foundation
import Testing
import TreeArchive

/// Tar streams of directory trees, on the host (no VM): round trips, compatibility with
/// GNU tar both ways, and hostile streams refused without writing outside the destination.
@Suite("directory trees as tar streams")
struct TreeArchiveTests {
    let scratch: String

    init() throws {
        scratch = NSTemporaryDirectory() + "tree-archive-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
    }

    func sh(_ script: String) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", script]
        p.currentDirectoryURL = URL(fileURLWithPath: scratch)
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw TarError("`\(script)` failed with \(p.terminationStatus)") }
        return String(decoding: data, as: UTF8.self)
    }

    /// A listing that shows every difference that matters: type, mode, link target, content digest.
    func listing(_ dir: String) throws -> String {
        try sh("cd '\(dir)' && find . -mindepth 1 | LC_ALL=C sort | while read -r p; do if [ -L \"$p\" ]; then echo \"$p link $(readlink \"$p\")\"; elif [ -d \"$p\" ]; then echo \"$p dir $(stat -c %a \"$p\")\"; else echo \"$p file $(stat -c %a \"$p\") $(sha256sum < \"$p\" | cut -c1-16)\"; fi; done")
    }

    func makeSampleTree(_ dir: String) throws {
        let long = String(repeating: "n", count: 120)
        try sh("""
            mkdir -p '\(dir)/a/b/c' '\(dir)/empty' '\(dir)/\(long)/\(long)' && cd '\(dir)' &&
            printf 'hello\\n' > a/hello.txt && chmod 640 a/hello.txt &&
            head -c 300000 /dev/urandom > a/b/random.bin && : > a/b/c/zero-length &&
            printf x > '\(long)/\(long)/deep.txt' && printf '#!/bin/sh\\n' > a/run.sh && chmod 755 a/run.sh &&
            ln -s hello.txt a/link-to-hello && ln -s ../../a/hello.txt a/b/c/up-link && ln -s b a/dir-link &&
            chmod 700 a/b && chmod 555 empty
            """)
    }

    func roundTrip(_ source: String, _ dest: String, chunk: Int = 7_777) throws {
        var stream: [UInt8] = []
        try TreeWriter.write(directory: source, chunkSize: 4096) { stream += $0 }
        let x = try TreeExtractor(destination: dest)
        var i = 0
        while i < stream.count {
            try x.feed(Array(stream[i..<min(i + chunk, stream.count)]))
            i += chunk
        }
        try x.finish()
    }

    @Test("a tree round-trips: nested and empty directories, modes, symbolic links, long names, binary data")
    func roundTrip() throws {
        defer { try? sh("chmod -R u+w '\(scratch)'; rm -rf '\(scratch)'") }
        try makeSampleTree(scratch + "/src")
        try roundTrip(scratch + "/src", scratch + "/out/made/with/parents")
        #expect(try listing(scratch + "/out/made/with/parents") == listing(scratch + "/src"))
    }

    @Test("GNU tar reads what the writer writes, and the extractor reads GNU tar's pax and gnu output")
    func gnuTarCompatibility() throws {
        defer { try? sh("chmod -R u+w '\(scratch)'; rm -rf '\(scratch)'") }
        try makeSampleTree(scratch + "/src")
        var stream: [UInt8] = []
        try TreeWriter.write(directory: scratch + "/src") { stream += $0 }
        try Data(stream).write(to: URL(fileURLWithPath: scratch + "/ours.tar"))
        _ = try sh("mkdir by-gnu && tar -xpf ours.tar -C by-gnu")
        #expect(try listing(scratch + "/by-gnu") == listing(scratch + "/src"))
        for format in ["pax", "gnu"] {
            _ = try sh("tar --format=\(format) -cf \(format).tar -C src .")
            let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: scratch + "/\(format).tar")))
            let x = try TreeExtractor(destination: scratch + "/from-\(format)")
            try x.feed(bytes)
            try x.finish()
            #expect(try listing(scratch + "/from-\(format)") == listing(scratch + "/src"), "\(format)")
        }
    }

    /// A stream of hand-made entries (the writer's own header encoder), optionally with data.
    func stream(_ entries: [(TarEntry, [UInt8])], trailer: Bool = true) -> [UInt8] {
        var out: [UInt8] = []
        for (e, data) in entries {
            out += TestTar.header(e)
            out += data + [UInt8](repeating: 0, count: (512 - data.count % 512) % 512)
        }
        if trailer { out += [UInt8](repeating: 0, count: 1024) }
        return out
    }

    func refused(_ bytes: [UInt8], limits: TarLimits = TarLimits(), mentioning: String) throws {
        let dest = scratch + "/dest"
        let x = try TreeExtractor(destination: dest, options: .init(limits: limits))
        do {
            try x.feed(bytes)
            try x.finish()
            Issue.record("accepted a stream that should be refused (\(mentioning))")
        } catch {
            #expect(error.description.contains(mentioning), "\(error)")
        }
    }

    @Test("hostile streams are refused with a clear error and write nothing outside the destination")
    func hostileStreams() throws {
        defer { try? sh("chmod -R u+w '\(scratch)'; rm -rf '\(scratch)'") }
        let outside = scratch + "/outside"
        try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
        func file(_ path: String, _ text: String = "pwned") -> (TarEntry, [UInt8]) {
            (TarEntry(path: path, kind: .file, mode: 0o644, size: UInt64(text.utf8.count)), Array(text.utf8))
        }
        func link(_ path: String, _ target: String) -> (TarEntry, [UInt8]) {
            (TarEntry(path: path, kind: .symlink(target: target), mode: 0o777), [])
        }
        try refused(stream([file("../outside/dotdot")]), mentioning: "'..'")
        try refused(stream([file("a/../../outside/dotdot2")]), mentioning: "'..'")
        try refused(stream([file("\(outside)/absolute")]), mentioning: "absolute path")
        try refused(stream([link("abs", outside)]), mentioning: "absolute path")
        try refused(stream([link("up", "../outside")]), mentioning: "leaves the destination")
        try refused(stream([link("d/up", "../../outside")]), mentioning: "leaves the destination")
        // Each link alone stays inside, together they would not: refused by the form rule.
        try refused(stream([link("a", "."), link("b", "a/../..")]), mentioning: "'..' after a name")
        // A file written through a link made by the same stream.
        try refused(stream([link("via", "sub"), (TarEntry(path: "sub", kind: .directory, mode: 0o755), []), file("via/x")]),
                    mentioning: "symbolic link")
        // A link that is already there, pointing outside (left by an earlier copy or by hand).
        try FileManager.default.createDirectory(atPath: scratch + "/dest", withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: scratch + "/dest/pre", withDestinationPath: outside)
        try refused(stream([file("pre/x")]), mentioning: "symbolic link")
        try refused(stream([file("pre")]), mentioning: "symbolic link")
        // A FIFO in the way of a file is refused at once, never opened blocking.
        _ = try sh("mkfifo dest/fifo")
        try refused(stream([file("fifo")]), mentioning: "is in the way of this file")
        // A tar bomb: more bytes, or more entries, than the limits.
        var small = TarLimits()
        small.maxTotalBytes = 1000
        try refused(stream([file("big", String(repeating: "b", count: 2000))]), limits: small, mentioning: "limit of 1000 bytes")
        var few = TarLimits()
        few.maxEntries = 10
        try refused(stream((0..<20).map { file("f\($0)") }), limits: few, mentioning: "more than 10 entries")
        // A stream of nothing but (global) extended headers is bounded too.
        let record = Array("12 comment=\n".utf8)
        var pax = TestTar.header(TarEntry(path: "PaxHeader", kind: .file, mode: 0o644, size: UInt64(record.count)))
        pax[156] = UInt8(ascii: "g")
        TestTar.fixChecksum(&pax)
        let paxBlock = pax + record + [UInt8](repeating: 0, count: 512 - record.count)
        try refused(Array([[UInt8]](repeating: paxBlock, count: 20).joined()), limits: few, mentioning: "more than 10 entries")
        // Not tar, damaged, cut short, unsupported entries.
        try refused(Array(repeating: 0x41, count: 1024), mentioning: "checksum")
        var damaged = stream([file("ok")])
        damaged[10] ^= 0x01
        try refused(damaged, mentioning: "checksum")
        try refused(Array(stream([file("cut", "0123456789")], trailer: false).prefix(515)), mentioning: "ends")
        var hard = TestTar.header(TarEntry(path: "h", kind: .file, mode: 0o644))
        hard[156] = UInt8(ascii: "1")
        TestTar.fixChecksum(&hard)
        try refused(hard + [UInt8](repeating: 0, count: 1024), mentioning: "hard links")
        // Setuid bits from a hostile writer are dropped on the host.
        let dest = scratch + "/setid"
        let x = try TreeExtractor(destination: dest)
        try x.feed(stream([(TarEntry(path: "suid", kind: .file, mode: 0o4755, size: 1), [0x41])]))
        try x.finish()
        let mode = (try FileManager.default.attributesOfItem(atPath: dest + "/suid")[.posixPermissions] as? NSNumber)?.intValue
        #expect(mode == 0o755)
        // Nothing landed outside the destination.
        #expect(try FileManager.default.contentsOfDirectory(atPath: outside).isEmpty)
    }

    @Test("the writer refuses what it cannot copy (a FIFO) with its name, and never follows a link")
    func writerRefusesSpecialFiles() throws {
        defer { try? sh("rm -rf '\(scratch)'") }
        _ = try sh("mkdir -p src/d && mkfifo src/d/pipe")
        #expect(throws: TarError.self) { try TreeWriter.write(directory: scratch + "/src") { _ in } }
        do { try TreeWriter.write(directory: scratch + "/src") { _ in } } catch {
            #expect("\(error)".contains("d/pipe: is a FIFO"), "\(error)")
        }
        _ = try sh("rm src/d/pipe && mkdir -p target && echo secret > target/s && ln -s ../target src/d/link")
        var stream: [UInt8] = []
        try TreeWriter.write(directory: scratch + "/src") { stream += $0 }
        #expect(!String(decoding: stream, as: UTF8.self).contains("secret"))
    }
}

/// Header blocks for hand-made streams.
enum TestTar {
    static func header(_ e: TarEntry) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 512)
        func put(_ s: String, _ at: Int, _ width: Int) { for (i, c) in s.utf8.prefix(width).enumerated() { b[at + i] = c } }
        func octal(_ v: UInt64, _ at: Int, _ width: Int) { put(String(repeating: "0", count: max(0, width - 1 - String(v, radix: 8).count)) + String(v, radix: 8), at, width - 1) }
        put(e.path, 0, 100)
        octal(UInt64(e.mode), 100, 8); octal(0, 108, 8); octal(0, 116, 8)
        octal(e.size, 124, 12); octal(UInt64(e.mtime), 136, 12)
        switch e.kind {
        case .file: b[156] = UInt8(ascii: "0")
        case .directory: b[156] = UInt8(ascii: "5")
        case .symlink(let t): b[156] = UInt8(ascii: "2"); put(t, 157, 100)
        }
        put("ustar\0", 257, 6); put("00", 263, 2)
        fixChecksum(&b)
        return b
    }

    static func fixChecksum(_ b: inout [UInt8]) {
        for i in 148..<156 { b[i] = 32 }
        let sum = b.reduce(0) { $0 + Int($1) }
        let s = String(sum, radix: 8)
        let digits = String(repeating: "0", count: max(0, 6 - s.count)) + s
        for (i, c) in digits.utf8.enumerated() { b[148 + i] = c }
        b[154] = 0; b[155] = 32
    }
}
