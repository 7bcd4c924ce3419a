/// Wire format between the host and sandbox-init (see Docs/AgentProtocol.md).
public enum AgentProtocolVersion {
    public static let current: UInt16 = 1
}
