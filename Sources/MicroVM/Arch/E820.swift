import GuestMemory

/// One entry of the guest's physical memory map (E820 / PVH memmap).
public struct MemoryMapEntry: Equatable, Sendable {
    public enum Kind: UInt32, Sendable { case ram = 1, reserved = 2 }
    public var address: UInt64
    public var size: UInt64
    public var kind: Kind
    public init(address: UInt64, size: UInt64, kind: Kind) {
        self.address = address; self.size = size; self.kind = kind
    }
}

extension Layout {
    /// The memory map the guest sees: RAM below the EBDA, the EBDA/MP table and the
    /// legacy hole reserved, RAM from 1 MiB to the MMIO hole, and RAM above 4 GiB.
    public static func memoryMap(for memory: GuestMemory) -> [MemoryMapEntry] {
        var map: [MemoryMapEntry] = [
            MemoryMapEntry(address: 0, size: ebdaStart, kind: .ram),
            MemoryMapEntry(address: ebdaStart, size: highMemory - ebdaStart, kind: .reserved),
        ]
        for region in memory.regions {
            let start = max(region.start.rawValue, highMemory)
            if region.end > start {
                map.append(MemoryMapEntry(address: start, size: region.end - start, kind: .ram))
            }
        }
        return map
    }
}
