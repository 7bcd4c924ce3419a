// libFuzzer target: tar streams as a hostile guest sends them (a copy-out's ReadTree
// answer), through TreeArchive's decoder and extractor. The input is fed in chunks
// (sizes from the input itself) to a TarDecoder with small limits, then to a
// TreeExtractor unpacking into a fresh directory on /dev/shm next to a sentinel
// directory. Checked every run: every failure is a TarError (typed throws); the decoder
// keeps its limits and never delivers more data than its entries declared; after the
// extractor, nothing exists beside the destination but the sentinel, the sentinel is
// untouched, nothing below the destination is a device, FIFO or set-id file, and every
// symbolic link there stays inside (its target is relative, climbs no higher than its
// own depth, and has no `..` after a name; an existing target resolves inside).
import Glibc
import Synchronization
import TreeArchive

private let base: String = {
    let dir = "/dev/shm/fuzz-tree-\(getpid())"
    _ = mkdir(dir, 0o700)
    atexit { removeTree(base) }  // each run removes its own directory; this, the parent
    return dir
}()
/// Runs are numbered so each unpacks into a directory of its own.
private let rounds = Atomic<Int>(0)

private var limits: TarLimits {  // computed: a fresh value per use
    var l = TarLimits()
    l.maxTotalBytes = 1 << 20
    l.maxEntries = 200
    l.maxPathLength = 1024
    l.maxExtendedHeader = 64 << 10
    return l
}

func one(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let data, size > 0 else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    decode(bytes)
    extract(bytes)
    return 0
}

/// Chunks of the input: sizes follow from its first byte.
private func chunks(_ bytes: [UInt8], _ body: (ArraySlice<UInt8>) throws(TarError) -> Void) throws(TarError) {
    var at = 0
    var chunk = Int(bytes[0]) * 7 + 1
    while at < bytes.count {
        let end = min(bytes.count, at + chunk)
        try body(bytes[at..<end])
        at = end
        chunk = chunk * 5 % 1031 + 1
    }
}

private func decode(_ bytes: [UInt8]) {
    var decoder = TarDecoder(limits: limits)
    var declared: UInt64 = 0
    var delivered: UInt64 = 0
    do throws(TarError) {
        try chunks(bytes) { piece throws(TarError) in
            for event in try decoder.feed(Array(piece)) {
                switch event {
                case .entry(let e):
                    if case .file = e.kind { declared += e.size }
                    if e.path.utf8.count > limits.maxPathLength { fatalError("an entry's path is longer than the limit: \(e.path.utf8.count)") }
                case .data(let d): delivered += UInt64(d.count)
                case .end: break
                }
                if delivered > declared { fatalError("the decoder delivered \(delivered) data bytes for entries declaring \(declared)") }
            }
        }
        try decoder.finish()
    } catch {
        _ = error.description  // a TarError, by type
    }
    if decoder.entries > limits.maxEntries { fatalError("\(decoder.entries) entries past the limit of \(limits.maxEntries)") }
    if decoder.totalBytes > limits.maxTotalBytes { fatalError("\(decoder.totalBytes) bytes past the limit of \(limits.maxTotalBytes)") }
}

private func extract(_ bytes: [UInt8]) {
    let round = rounds.add(1, ordering: .relaxed).newValue
    let dir = "\(base)/\(round)"
    let dest = dir + "/dest", outside = dir + "/outside"
    _ = mkdir(dir, 0o700)
    _ = mkdir(outside, 0o700)
    let keep = outside + "/keep"
    let fd = open(keep, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    _ = write(fd, "keep", 4)
    close(fd)
    defer { removeTree(dir) }
    do throws(TarError) {
        let x = try TreeExtractor(destination: dest, options: .init(dropSetID: true, limits: limits))
        try chunks(bytes) { piece throws(TarError) in try x.feed(Array(piece)) }
        try x.finish()
    } catch {
        _ = error.description
    }
    let beside = names(dir).sorted()
    if beside != ["dest", "outside"] && beside != ["outside"] { fatalError("the extractor left \(beside) beside its destination") }
    if names(outside) != ["keep"] { fatalError("the sentinel directory now holds \(names(outside))") }
    var st = stat()
    if lstat(keep, &st) != 0 || (st.st_mode & S_IFMT) != S_IFREG || st.st_size != 4 { fatalError("the sentinel file changed") }
    let real = realPath(dest)
    check(dest, depth: 0, realDest: real)
}

private func check(_ path: String, depth: Int, realDest: String?) {
    for name in names(path) {
        let p = path + "/" + name
        var st = stat()
        guard lstat(p, &st) == 0 else { continue }
        switch st.st_mode & S_IFMT {
        case S_IFDIR:
            check(p, depth: depth + 1, realDest: realDest)
        case S_IFREG:
            if st.st_mode & 0o6000 != 0 { fatalError("\(p): a set-id file from a guest's tree") }
        case S_IFLNK:
            var buf = [CChar](repeating: 0, count: 4097)
            let n = readlink(p, &buf, 4096)
            guard n >= 0 else { continue }
            let target = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if target.hasPrefix("/") { fatalError("\(p) -> \(target): an absolute link") }
            var ups = 0, sawName = false
            for c in target.split(separator: "/", omittingEmptySubsequences: true) where c != "." {
                if c == ".." {
                    if sawName { fatalError("\(p) -> \(target): '..' after a name") }
                    ups += 1
                } else { sawName = true }
            }
            if ups > depth { fatalError("\(p) -> \(target): climbs \(ups) levels from depth \(depth)") }
            if let realDest, let r = realPath(p), r != realDest, !r.hasPrefix(realDest + "/") {
                fatalError("\(p) -> \(target) resolves to \(r), outside \(realDest)")
            }
        default:
            fatalError("\(p): a special file (mode \(String(st.st_mode, radix: 8))) from a guest's tree")
        }
    }
}

private func names(_ path: String) -> [String] {
    guard let d = opendir(path) else { return [] }
    defer { closedir(d) }
    var out: [String] = []
    while let e = readdir(d) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        if name != "." && name != ".." { out.append(name) }
    }
    return out
}

private func realPath(_ path: String) -> String? {
    guard let r = realpath(path, nil) else { return nil }
    defer { free(r) }
    return String(cString: r)
}

/// rm -rf without following links (a directory left read-only is made writable first).
private func removeTree(_ path: String) {
    var st = stat()
    guard lstat(path, &st) == 0 else { return }
    if st.st_mode & S_IFMT == S_IFDIR {
        _ = chmod(path, 0o700)
        for name in names(path) { removeTree(path + "/" + name) }
        _ = rmdir(path)
    } else {
        _ = unlink(path)
    }
}
