import ArgumentParser
import Sandbox

struct Doctor: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "doctor", abstract: "Check this host: KVM kind and access, io_uring, guest kernel.")
    func run() throws {
        let report = HostReport.gather()
        print(report.text)
        // The sandbox server is the CLI's, not the library's: it is reported here.
        let socket = ServerWire.socketPath
        if let status = ServerClient.status(socket) {
            print("sandbox server: running on \(socket) (\(status)); `sandbox exec` hands it the runs it can take")
        } else {
            print("sandbox server: not running (`sandbox server start` keeps VMs restored ahead of `sandbox exec`)")
        }
        if !report.canRun { throw ExitCode(1) }
    }
}
