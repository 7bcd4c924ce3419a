import GuestMemory

/// An Intel MultiProcessor Specification 1.4 table, so that the guest finds its
/// vCPUs and the IOAPIC without ACPI (and without scanning for one, which is slow).
public enum MPTable {
    /// How many vCPUs fit in the space reserved for the table.
    public static let maxCPUs = 32
    public static let ioapicVersion: UInt8 = 0x11
    public static let apicVersion: UInt8 = 0x14
    /// Number of IOAPIC pins announced as ISA interrupts.
    public static let ioapicPins = 24

    public enum Error: Swift.Error, Equatable, CustomStringConvertible {
        case tooManyCPUs(Int)
        public var description: String {
            switch self { case .tooManyCPUs(let n): return "the MP table supports at most \(MPTable.maxCPUs) vCPUs, asked for \(n)" }
        }
    }

    /// Builds the floating pointer followed by the configuration table, to be placed at `address`.
    public static func build(cpus: Int, at address: GuestAddress = Layout.mpTable) throws -> [UInt8] {
        guard cpus >= 1, cpus <= maxCPUs else { throw Error.tooManyCPUs(cpus) }
        let ioapicID = UInt8(cpus)
        var entries: [UInt8] = []
        var count: UInt16 = 0
        for id in 0..<cpus {
            var e: [UInt8] = [0, UInt8(id), apicVersion, id == 0 ? 0x3 : 0x1]
            e += le(UInt32(0x600)) + le(UInt32(0x201)) + [UInt8](repeating: 0, count: 8)
            entries += e; count += 1
        }
        entries += [1, 0] + Array("ISA   ".utf8); count += 1
        entries += [2, ioapicID, ioapicVersion, 1] + le(Layout.ioapicAddress); count += 1
        for irq in 0..<ioapicPins {
            // type INT, flags: conforms to bus; source bus 0 irq -> IOAPIC pin irq
            entries += [3, 0] + le(UInt16(0)) + [0, UInt8(irq), ioapicID, UInt8(irq)]; count += 1
        }
        entries += [4, 3] + le(UInt16(0)) + [0, 0, 0xFF, 0]; count += 1 // ExtINT -> LINT0
        entries += [4, 1] + le(UInt16(0)) + [0, 0, 0xFF, 1]; count += 1 // NMI -> LINT1

        let configAddress = UInt32(address.rawValue + 16)
        var header: [UInt8] = Array("PCMP".utf8)
        header += le(UInt16(44 + entries.count)) + [4, 0]
        header += Array("SANDBOX ".utf8) + Array("MICROVM     ".utf8)
        header += le(UInt32(0)) + le(UInt16(0)) + le(count) + le(Layout.lapicAddress) + le(UInt16(0)) + [0, 0]
        var config = header + entries
        config[7] = checksum(config)

        var floating: [UInt8] = Array("_MP_".utf8) + le(configAddress) + [1, 4, 0, 0, 0, 0, 0, 0]
        floating[10] = checksum(floating)
        return floating + config
    }

    /// Writes the table into guest memory.
    public static func write(cpus: Int, to memory: GuestMemory, at address: GuestAddress = Layout.mpTable) throws {
        let bytes = try build(cpus: cpus, at: address)
        try memory.writeBytes(bytes, at: address)
    }

    /// The byte that makes the sum of `bytes` zero (mod 256).
    static func checksum(_ bytes: [UInt8]) -> UInt8 {
        0 &- bytes.reduce(UInt8(0), &+)
    }
}

@inline(__always) func le(_ v: UInt16) -> [UInt8] { [UInt8(v & 0xFF), UInt8(v >> 8)] }
@inline(__always) func le(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8((v >> ($0 * 8)) & 0xFF) } }
@inline(__always) func le(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8((v >> ($0 * 8)) & 0xFF) } }
