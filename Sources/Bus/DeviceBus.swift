/// A device on the x86 I/O port bus. Offsets are relative to the device's base port.
public protocol PortIODevice: AnyObject, Sendable {
    func portRead(offset: UInt16, data: UnsafeMutableRawBufferPointer)
    func portWrite(offset: UInt16, data: UnsafeRawBufferPointer)
}

/// Routes port and MMIO accesses to devices. Immutable once built, so vCPU threads
/// read it without locking.
public struct DeviceBus: Sendable {
    public struct PortRange: Sendable { let base: UInt16; let count: UInt16; let device: any PortIODevice }
    public struct MMIORange: Sendable { let base: UInt64; let size: UInt64; let device: any MMIODevice }

    public private(set) var ports: [PortRange] = []
    public private(set) var mmio: [MMIORange] = []

    public init() {}

    public enum Error: Swift.Error, Equatable { case overlap(String) }

    public mutating func addPorts(base: UInt16, count: UInt16, _ device: any PortIODevice) throws {
        guard count > 0, UInt32(base) + UInt32(count) <= 0x1_0000 else {
            throw Error.overlap("ports 0x\(String(base, radix: 16))+\(count) run past 0xffff")
        }
        let end = UInt32(base) + UInt32(count)
        for r in ports where UInt32(base) < UInt32(r.base) + UInt32(r.count) && UInt32(r.base) < end {
            throw Error.overlap("ports 0x\(String(base, radix: 16))+\(count)")
        }
        ports.append(PortRange(base: base, count: count, device: device))
    }

    public mutating func addMMIO(base: UInt64, size: UInt64, _ device: any MMIODevice) throws {
        guard size > 0, !base.addingReportingOverflow(size).overflow else {
            throw Error.overlap("mmio 0x\(String(base, radix: 16))+\(size) wraps around the address space")
        }
        for r in mmio where base < r.base + r.size && r.base < base + size {
            throw Error.overlap("mmio 0x\(String(base, radix: 16))+\(size)")
        }
        mmio.append(MMIORange(base: base, size: size, device: device))
    }

    @inline(__always)
    public func port(_ port: UInt16) -> (any PortIODevice, UInt16)? {
        for r in ports where port >= r.base && port - r.base < r.count { return (r.device, port - r.base) }
        return nil
    }

    @inline(__always)
    public func mmio(_ address: UInt64) -> (any MMIODevice, UInt64)? {
        for r in mmio where address >= r.base && address - r.base < r.size { return (r.device, address - r.base) }
        return nil
    }
}
