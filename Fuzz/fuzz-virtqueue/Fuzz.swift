// libFuzzer target: the split-virtqueue walker (VirtQueue) over guest memory the input
// fills: ring addresses, sizes, indices, descriptor chains (looping, indirect, out of
// range, lengths that lie). Every failure must be a VirtQueueError; nothing may trap,
// read or write outside guest memory (ASan), or loop without end (libFuzzer's timeout).
import GuestMemory
@testable import VirtIO

let memorySize: UInt64 = 16 << 10
let memory = try! GuestMemory(size: memorySize)
let zeros = [UInt8](repeating: 0, count: Int(memorySize))

func one(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let data, size >= 16 else { return 0 }
    let input = UnsafeBufferPointer(start: data, count: size)
    func u16(_ i: Int) -> UInt16 { UInt16(input[i]) | UInt16(input[i + 1]) << 8 }
    // Guest RAM: zeros, then the input after its 16-byte header.
    try! memory.writeBytes(zeros, at: GuestAddress(0))
    let body = UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(input)[16 ..< min(size, 16 + Int(memorySize))])
    try! memory.writeBytes(body, at: GuestAddress(0))
    var q = VirtQueue(maxSize: 256)
    q.size = UInt16(1) << UInt16(input[0] % 10)  // 1 ... 512 (above maxSize: refused)
    q.ready = input[1] & 1 == 0
    q.indirectDescriptors = input[1] & 2 != 0
    q.eventIndex = input[1] & 4 != 0
    q.descTable = GuestAddress(UInt64(u16(2)) * (input[1] & 8 != 0 ? 1 : 16))
    q.availRing = GuestAddress(UInt64(u16(4)))
    q.usedRing = GuestAddress(UInt64(u16(6)) | (input[1] & 16 != 0 ? UInt64(u16(8)) << 16 : 0))
    guard (try? q.validate(memory: memory)) != nil else { return 0 }
    var scratch = [UInt8](repeating: 0, count: 4096)
    for _ in 0 ..< 64 {
        let chain: DescriptorChain?
        do { chain = try q.popAvailable(memory: memory) } catch { break }
        guard let chain else { break }
        let readable = chain.readable.reduce(0) { $0 + Int($1.length) }
        _ = try? chain.readBytes(from: memory, offset: Int(input[10]), count: min(readable, 1 << 14))
        _ = try? scratch.withUnsafeMutableBytes { try chain.read(from: memory, offset: 0, into: $0) }
        _ = try? chain.writeBytes([UInt8](repeating: 0xA5, count: Int(u16(12) % 8192)), to: memory, offset: Int(input[11]))
        if input[14] & 1 != 0 { q.undoPop(); _ = try? q.popAvailable(memory: memory) }
        do { try q.addUsed(memory: memory, head: chain.head, length: UInt32(u16(12))) } catch { break }
        _ = try? q.needsInterrupt(memory: memory)
        _ = try? q.enableNotification(memory: memory)
    }
    _ = try? q.pendingCount(memory: memory)
    return 0
}
