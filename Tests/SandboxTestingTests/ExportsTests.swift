import SandboxTesting
import Testing

@Test func outcomeExitStatusMapping() {
    #expect(Outcome.exited(3).exitStatus == 3)
    #expect(Outcome.signalled(9).exitStatus == 137)
    #expect(Outcome.timedOut.exitStatus == 124)
    #expect(Outcome.infrastructureError(.internal("x")).exitStatus == 125)
}
