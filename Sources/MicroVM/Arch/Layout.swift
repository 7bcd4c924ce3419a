import GuestMemory
import SandboxABI

/// The guest physical memory map (see Docs/MemoryMap.md). Everything the VMM places
/// in guest memory before the first instruction lives at one of these addresses.
public enum Layout {
    /// GDT used for the initial protected / long mode segments.
    public static let gdt = GuestAddress(0x500)
    /// Empty IDT (the kernel installs its own before enabling interrupts).
    public static let idt = GuestAddress(0x540)
    /// PVH `hvm_start_info`.
    public static let pvhStartInfo = GuestAddress(0x6000)
    /// PVH memory map table (up to `maxMemmapEntries` entries).
    public static let pvhMemmap = GuestAddress(0x6040)
    public static let maxMemmapEntries = 64
    /// PVH module list (the initrd).
    public static let pvhModlist = GuestAddress(0x6800)
    /// Linux boot protocol "zero page" (`struct boot_params`, 4 KiB).
    public static let zeroPage = GuestAddress(0x7000)
    /// Identity page tables for 64-bit entry: PML4, PDPT, then 4 PDs (first 4 GiB, 2 MiB pages).
    public static let pml4 = GuestAddress(0x9000)
    public static let pdpt = GuestAddress(0xA000)
    public static let pageDirectories = GuestAddress(0xB000)
    /// Kernel command line (NUL-terminated, at most `maxCommandLine` bytes including NUL).
    public static let commandLine = GuestAddress(0x20000)
    public static let maxCommandLine = 4096
    /// End of the first RAM range; [ebdaStart, 1 MiB) is reserved (MP table, legacy hole).
    public static let ebdaStart: UInt64 = 0x9FC00
    /// MP floating pointer and configuration table.
    public static let mpTable = GuestAddress(0x9FC00)
    /// Start of the RAM above the legacy hole.
    public static let highMemory: UInt64 = 0x10_0000
    /// Where a bzImage's protected-mode kernel is loaded.
    public static let bzImageLoad = GuestAddress(0x10_0000)
    /// The smallest guest RAM this VMM accepts.
    public static let minimumMemory: UInt64 = 32 << 20

    /// virtio-mmio windows: device `n` lives at `virtioMMIOBase + n * virtioMMIOSize`, IRQ `virtioFirstIRQ + n`.
    public static let virtioMMIOBase: UInt64 = 0xD000_0000
    public static let virtioMMIOSize: UInt64 = 0x1000
    public static let virtioFirstIRQ: UInt32 = 5
    public static let maxVirtioDevices = 8

    public static let ioapicAddress: UInt32 = 0xFEC0_0000
    public static let lapicAddress: UInt32 = 0xFEE0_0000

    /// Legacy I/O ports.
    public static let serialCOM1: UInt16 = 0x3F8
    public static let serialIRQ: UInt32 = 4
    /// The boot-timer port: the guest writes a byte here at milestones (1 = init started,
    /// 2 = agent ready); the VMM timestamps each write.
    public static let bootTimerPort: UInt16 = GuestABI.bootTimerPort
    /// i8042 command port: writing 0xFE resets the machine (`reboot=k`).
    public static let i8042Command: UInt16 = 0x64
}
