/// Wire format between the host and sandbox-init (see Docs/AgentProtocol.md).
///
/// Every message travels in one ``Frame``: a fixed 16-byte little-endian header
/// (``FrameHeader``) followed by a payload whose layout depends on the message type.
/// The module is Foundation-free so the guest agent can link it statically.
public enum AgentProtocolVersion {
    /// The version this build speaks; carried in every frame header and in ``Hello``.
    public static let current: UInt16 = 1
    /// Header versions a decoder accepts.
    public static let supported: ClosedRange<UInt16> = 1...1
}

/// Size limits enforced by both the encoder and the decoder.
public enum AgentProtocolLimits {
    /// Largest payload of one frame (1 MiB).
    public static let maxPayloadSize = 1 << 20
    /// Largest data chunk senders put in one StdinData, Output, WriteFile or FileData
    /// frame; leaves room for the other fields below ``maxPayloadSize``.
    public static let maxChunkSize = 256 * 1024
    /// Most argv entries in an ``Exec``.
    public static let maxArguments = 4096
    /// Most environment entries (`NAME=value`) in an ``Exec``.
    public static let maxEnvironment = 4096
    /// Longest argv or environment string in bytes (Linux MAX_ARG_STRLEN).
    public static let maxArgumentLength = 128 * 1024
    /// Longest path (workdir, WriteFile/ReadFile path) in bytes (Linux PATH_MAX).
    public static let maxPathLength = 4096
    /// Longest human-readable message (ExecFailed, FileError, Error) in bytes.
    public static let maxMessageLength = 4096
}
