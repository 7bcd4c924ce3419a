/// The numbers the host side (the VMM and the library) and the guest agent
/// (`sandbox-init`) must agree on. Both sides import this one definition; nothing
/// else spells them out.
public enum GuestABI {
    /// The vsock port `sandbox-init` listens on.
    public static let agentVsockPort: UInt32 = 1024
    /// The guest's vsock context id, as the VMM configures its vsock device.
    public static let guestCID: UInt32 = 3
    /// The host's vsock context id (VMADDR_CID_HOST).
    public static let hostCID: UInt32 = 2
    /// The boot-timer I/O port: a guest byte written here is timestamped by the VMM.
    public static let bootTimerPort: UInt16 = 0x440

    /// PATH for guest commands when the caller sets none (the host sends it; the agent
    /// falls back to it).
    public static let defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    /// On the kernel command line when the VMM made the root disk larger than its image:
    /// the agent grows the root file system (ext4, online) to the disk's size at boot.
    public static let growRootParameter = "sandbox.grow_root=1"

    /// The milestones a guest writes to ``bootTimerPort``.
    public enum BootMark: UInt8, Sendable, CaseIterable {
        /// PID 1 (`sandbox-init`) started.
        case initStarted = 1
        /// The agent listens on ``GuestABI/agentVsockPort``.
        case agentReady = 2
    }
}
