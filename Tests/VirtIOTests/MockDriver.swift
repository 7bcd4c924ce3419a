#if canImport(Glibc)
import Glibc
#endif
import Bus
import GuestMemory
import Synchronization
import SystemShims
@testable import VirtIO

/// A minimal guest virtio driver for tests: lays out the split rings in guest
/// memory, writes descriptors, publishes chains and reads the used ring back.
final class MockDriver {
    let memory: GuestMemory
    let size: UInt16
    let descTable = GuestAddress(0x1000)
    let availRing = GuestAddress(0x3000)
    let usedRing = GuestAddress(0x4000)
    private var dataCursor: UInt64 = 0x10000
    private(set) var availIdx: UInt16 = 0
    private var nextDesc: UInt16 = 0

    init(size: UInt16 = 16, memory: GuestMemory? = nil) throws {
        self.memory = try memory ?? GuestMemory(size: 1 << 20)
        self.size = size
    }

    /// A queue configured for this driver's rings.
    func makeQueue(maxSize: UInt16? = nil) -> VirtQueue {
        var q = VirtQueue(maxSize: maxSize ?? size)
        q.size = size
        q.descTable = descTable
        q.availRing = availRing
        q.usedRing = usedRing
        q.ready = true
        return q
    }

    /// Forgets earlier data allocations (their memory is reused).
    func rewind() { dataCursor = 0x10000 }

    /// Reserves `count` bytes of data memory (8-byte aligned), optionally filled.
    func allocate(_ count: Int, fill: [UInt8]? = nil) throws -> GuestAddress {
        let a = GuestAddress(dataCursor)
        dataCursor += UInt64((count + 15) & ~15)
        precondition(dataCursor < memory.size, "mock driver out of data memory")
        if let fill { try memory.writeBytes(fill, at: a) } else { try memory.zero(at: a, count: count) }
        return a
    }

    func setDescriptor(_ index: UInt16, address: UInt64, length: UInt32, flags: UInt16, next: UInt16 = 0,
                       table: GuestAddress? = nil) throws {
        let base = (table ?? descTable).rawValue + 16 * UInt64(index)
        try memory.write(address.littleEndian, at: GuestAddress(base))
        try memory.write(length.littleEndian, at: GuestAddress(base + 8))
        try memory.write(flags.littleEndian, at: GuestAddress(base + 12))
        try memory.write(next.littleEndian, at: GuestAddress(base + 14))
    }

    /// Puts `head` in the next available slot and bumps the index by `bump` (1 normally).
    func publish(head: UInt16, bump: UInt16 = 1) throws {
        try memory.write(head.littleEndian, at: GuestAddress(availRing.rawValue + 4 + 2 * UInt64(availIdx % size)))
        availIdx &+= bump
        try memory.write(availIdx.littleEndian, at: GuestAddress(availRing.rawValue + 2))
    }

    /// Sets the available index directly.
    func setAvailIndex(_ idx: UInt16) throws {
        availIdx = idx
        try memory.write(idx.littleEndian, at: GuestAddress(availRing.rawValue + 2))
    }

    func setAvailFlags(_ flags: UInt16) throws {
        try memory.write(flags.littleEndian, at: availRing)
    }

    func setUsedEvent(_ value: UInt16) throws {
        try memory.write(value.littleEndian, at: GuestAddress(availRing.rawValue + 4 + 2 * UInt64(size)))
    }

    var availEvent: UInt16 {
        get throws { try memory.read(UInt16.self, at: GuestAddress(usedRing.rawValue + 4 + 8 * UInt64(size))) }
    }

    /// One buffer of a chain to post.
    struct Buffer {
        var address: GuestAddress
        var length: UInt32
        var writable: Bool
    }

    /// Writes `buffers` as a chain in consecutive descriptors (wrapping) and publishes it.
    @discardableResult
    func post(_ buffers: [Buffer]) throws -> UInt16 {
        let head = nextDesc
        for (i, b) in buffers.enumerated() {
            let index = (head &+ UInt16(i)) % size
            let last = i == buffers.count - 1
            try setDescriptor(index, address: b.address.rawValue, length: b.length,
                              flags: (b.writable ? VIRTQ_DESC_F_WRITE : 0) | (last ? 0 : VIRTQ_DESC_F_NEXT),
                              next: (index + 1) % size)
        }
        nextDesc = (head &+ UInt16(buffers.count)) % size
        try publish(head: head)
        return head
    }

    var usedIdx: UInt16 {
        get throws { UInt16(littleEndian: try memory.read(UInt16.self, at: GuestAddress(usedRing.rawValue + 2))) }
    }

    func usedElement(_ slot: UInt16) throws -> (id: UInt32, length: UInt32) {
        let base = usedRing.rawValue + 4 + 8 * UInt64(slot % size)
        return (UInt32(littleEndian: try memory.read(UInt32.self, at: GuestAddress(base))),
                UInt32(littleEndian: try memory.read(UInt32.self, at: GuestAddress(base + 4))))
    }
}

/// Counts interrupts.
final class CountingTrigger: InterruptTrigger {
    let count = Atomic<Int>(0)
    func trigger() { count.wrappingAdd(1, ordering: .relaxed) }
    var value: Int { count.load(ordering: .relaxed) }
}

/// Signals an eventfd per interrupt, so tests can wait for one.
final class EventTrigger: InterruptTrigger {
    let event = try! EventFD()
    func trigger() { event.signal() }

    /// Waits up to `milliseconds` for an interrupt; false on timeout.
    func wait(milliseconds: Int32 = 5000) -> Bool {
        var p = pollfd(fd: event.fd.rawValue, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, milliseconds) == 1 else { return false }
        event.wait()
        return true
    }
}

/// A temporary directory removed (with its files) by `remove()`.
struct TempDirectory {
    let path: String
    init() {
        var template = Array("/tmp/virtio-test-XXXXXX".utf8CString)
        let p = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(p != nil)
        path = String(cString: p!)
    }

    /// Names of the files inside.
    var entries: [String] { Self.entries(of: path) }

    /// Names of the files in `path`.
    static func entries(of path: String) -> [String] {
        guard let d = opendir(path) else { return [] }
        defer { closedir(d) }
        var names: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    func remove() {
        for e in entries { unlink(path + "/" + e) }
        rmdir(path)
    }
}

func fileExists(_ path: String) -> Bool { access(path, F_OK) == 0 }

/// Writes `bytes` to a new file at `path`.
func writeFile(_ path: String, _ bytes: [UInt8]) throws {
    let fd = try FileDescriptor.open(path, O_WRONLY | O_CREAT | O_TRUNC)
    try bytes.withUnsafeBytes { try fd.writeAll($0, at: 0) }
    fd.close()
}

/// Reads a whole file.
func readFile(_ path: String) throws -> [UInt8] {
    let fd = try FileDescriptor.open(path, O_RDONLY)
    defer { fd.close() }
    let size = Int(try fd.size())
    var out = [UInt8](repeating: 0, count: size)
    var done = 0
    while done < size {
        let n = try out.withUnsafeMutableBytes { b in
            try fd.read(into: UnsafeMutableRawBufferPointer(rebasing: b[done...]), at: UInt64(done))
        }
        if n == 0 { break }
        done += n
    }
    return out
}

/// Deterministic pseudo-random bytes.
func randomBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var x = seed | 1
    var out = [UInt8](repeating: 0, count: count)
    for i in 0 ..< count {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17
        out[i] = UInt8(truncatingIfNeeded: x)
    }
    return out
}
