import AgentProtocol
import CInit
print("sandbox-init: protocol \(AgentProtocolVersion.current)")
