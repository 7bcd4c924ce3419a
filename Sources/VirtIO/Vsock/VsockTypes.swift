import SystemShims

/// Why a vsock operation failed.
public enum VsockError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The guest answered the connection request with RST (nobody listens on the port).
    case connectionRefused(port: UInt32)
    /// The operation did not finish within its timeout.
    case timedOut
    /// The guest reset the connection (RST) while it was open; writes fail.
    case connectionReset
    /// The guest shut down its receive side; nothing more can be written.
    case brokenPipe
    /// The host already shut down writing, or closed the connection.
    case closed
    /// The guest broke the protocol on this connection; the host reset it.
    case protocolViolation(String)
    /// The guest driver reset the device (or the device was never activated).
    case deviceReset
    /// The device stopped after a driver error (DEVICE_NEEDS_RESET).
    case deviceFailed(String)
    /// The VMM shut the device down.
    case deviceShutdown
    /// The device is not active (the guest driver has not set DRIVER_OK yet).
    case notActive
    /// All ports of the ephemeral range are in use, or the connection limit is reached.
    case noFreePort
    /// A port is already in use (listen).
    case portInUse(UInt32)
    /// A system call failed (eventfd creation).
    case system(SystemError)

    public var description: String {
        switch self {
        case let .connectionRefused(p): return "vsock: connection refused (guest port \(p))"
        case .timedOut: return "vsock: timed out"
        case .connectionReset: return "vsock: connection reset by the guest"
        case .brokenPipe: return "vsock: the guest shut down its receive side"
        case .closed: return "vsock: connection closed (or write side shut down) by the host"
        case let .protocolViolation(r): return "vsock: guest protocol violation: \(r)"
        case .deviceReset: return "vsock: device reset by the guest driver"
        case let .deviceFailed(r): return "vsock: device failed: \(r)"
        case .deviceShutdown: return "vsock: device shut down"
        case .notActive: return "vsock: device not active (no guest driver)"
        case .noFreePort: return "vsock: no free local port"
        case let .portInUse(p): return "vsock: port \(p) already in use"
        case let .system(e): return "vsock: \(e)"
        }
    }
}

/// Tunables of a `VsockDevice`.
public struct VsockConfiguration: Sendable, Equatable {
    /// The host receive buffer per connection, advertised to the guest as buf_alloc.
    public var bufferSize: UInt32 = 256 << 10
    /// Host-to-guest bytes per connection that may wait for guest rx buffers; writers
    /// block beyond this even if the guest advertises more credit.
    public var maxBacklogBytes: Int = 256 << 10
    /// Largest payload of one packet in either direction (Linux:
    /// VIRTIO_VSOCK_MAX_PKT_BUF_SIZE). Bigger guest packets are dropped and reset.
    public var maxPacketPayload: Int = 64 << 10
    /// Most connections at once (host- and guest-initiated).
    public var maxConnections: Int = 1024
    /// Local ports for host-initiated connections.
    public var ephemeralPorts: ClosedRange<UInt32> = 49152 ... 65535
    /// Most RST replies to packets for unknown connections that may wait for rx
    /// buffers; at the limit the device takes no more tx packets until the guest posts
    /// rx buffers (a flooding guest stalls itself; no answer is lost).
    public var maxPendingResets: Int = 256

    public init() {}
}

/// Where a connection is in its life (see Docs/Vsock.md).
public enum VsockConnectionPhase: String, Sendable, Equatable {
    /// The host sent REQUEST and waits for RESPONSE.
    case connecting
    /// Data may flow (each direction may be shut down separately).
    case connected
    /// The host queued RST (close, timeout or guest protocol violation); the
    /// connection stays in the table until the RST reaches the guest.
    case closing
    /// Gone from the table.
    case closed
}

/// A connection as plain values (diagnostics, snapshots).
public struct VsockConnectionState: Sendable, Equatable {
    public var localPort: UInt32
    public var peerPort: UInt32
    public var phase: VsockConnectionPhase
    public var hostInitiated: Bool
    /// Our receive buffer size (buf_alloc we advertise).
    public var bufAlloc: UInt32
    /// Bytes received from the guest (free-running).
    public var rxCount: UInt32
    /// Bytes the host application consumed (fwd_cnt we advertise).
    public var fwdCount: UInt32
    /// The fwd_cnt in the last packet we delivered to the guest.
    public var advertisedFwdCount: UInt32
    /// Bytes sent (queued) to the guest (free-running tx_cnt).
    public var txCount: UInt32
    /// The guest's receive buffer size and consumed count, from its last packet.
    public var peerBufAlloc: UInt32
    public var peerFwdCount: UInt32
    /// Received bytes not yet read by the host.
    public var bufferedBytes: Int
    /// Host-to-guest bytes waiting for rx buffers.
    public var backlogBytes: Int
    /// SHUTDOWN flags received from the guest.
    public var peerShutdown: UInt32
    /// The host shut down its sending side.
    public var localShutdownSend: Bool
}

/// Counters, for diagnostics and tests.
public struct VsockStatistics: Sendable, Equatable {
    /// Packets taken from the tx queue.
    public var packetsFromGuest = 0
    /// Packets written into rx buffers.
    public var packetsToGuest = 0
    /// Guest packets refused by validation or the connection state machine.
    public var rejectedPackets = 0
    /// RST packets queued for the guest.
    public var resetsSent = 0
    /// RST replies dropped because too many were pending (none since tx waits for rx
    /// buffers instead; kept so that a regression shows).
    public var resetsDropped = 0
}

/// The device as plain values (diagnostics, snapshots).
public struct VsockDeviceState: Sendable, Equatable {
    public var guestCID: UInt64
    public var active: Bool
    public var failed: Bool
    public var shutDown: Bool
    public var connections: [VsockConnectionState]
    public var listeningPorts: [UInt32]
    public var nextEphemeralPort: UInt32
    public var pendingResets: Int
    public var statistics: VsockStatistics
}
