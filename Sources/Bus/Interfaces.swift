/// Raises the device's interrupt line in the guest (irqfd or KVM_IRQ_LINE behind it).
public protocol InterruptTrigger: Sendable {
    func trigger()
}

/// A device on the MMIO bus. Offsets are relative to the device's base address.
/// Called from vCPU threads; implementations synchronise internally.
public protocol MMIODevice: AnyObject, Sendable {
    /// Fills `data` (1, 2, 4 or 8 bytes) for a guest read at `offset`.
    func mmioRead(offset: UInt64, data: UnsafeMutableRawBufferPointer)
    /// Handles a guest write of `data` at `offset`.
    func mmioWrite(offset: UInt64, data: UnsafeRawBufferPointer)
}
