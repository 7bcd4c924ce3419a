import ArgumentParser
import Sandbox

struct Doctor: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "doctor", abstract: "Check this host: KVM kind and access, io_uring, guest kernel.")
    func run() throws {
        let report = HostReport.gather()
        print(report.text)
        if !report.canRun { throw ExitCode(1) }
    }
}
