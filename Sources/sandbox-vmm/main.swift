// sandbox-vmm: the VMM process of one sandbox. The library starts one per VM and
// hands it a configuration; nothing else of the library runs in this process, so a VMM
// crash (or, once the jail lands, a compromised VMM) cannot reach the caller.
//
//   sandbox-vmm run     the VM described by $SANDBOX_VMM_CONFIG (JSON, VMMConfig);
//                       control events as JSON lines on fd 4, the agent stream on fd 3
//   sandbox-vmm probe   what this host offers (JSON, HostProbe) on stdout
import CSystem
import Foundation
import SandboxCore
import SystemShims
import VMMProtocol
#if canImport(Glibc)
import Glibc
#endif

func runVM() -> Int32 {
    _ = csystem_set_parent_death_signal(SIGKILL)
    let control = FileDescriptor(owning: VMMFileDescriptors.control)
    let report: @Sendable (VMMEvent) -> Void = { e in
        VMMEvent.line(e).withUnsafeBytes { try? control.writeAll($0) }
    }
    func fail(_ error: SandboxError) -> Int32 {
        var e = VMMEvent(kind: .failed)
        e.error = error
        report(e)
        return 1
    }
    guard let json = ProcessInfo.processInfo.environment[VMMConfig.environmentKey] else {
        return fail(.internal("sandbox-vmm: \(VMMConfig.environmentKey) is not set"))
    }
    let config: VMMConfig
    do { config = try JSONDecoder().decode(VMMConfig.self, from: Data(json.utf8)) } catch {
        return fail(SandboxError(.internal, "sandbox-vmm: \(VMMConfig.environmentKey) is not a valid configuration", underlying: ErrorText(error)))
    }
    do {
        // Resource limits first: every page and thread of the VM is then counted.
        if let cgroup = config.cgroup { try Jail.joinCgroup(cgroup) }
        switch config.mode {
        case .agent: try AgentMode.run(config, control: control, report: report)
        case .boot: try BootMode.run(config, report: report)
        case .jailCheck:
            try FileManager.default.createDirectory(atPath: config.overlayDirectory, withIntermediateDirectories: true)
            var e = VMMEvent(kind: .ready)
            e.jail = try Jail.apply(config, binds: [], fileSizeLimit: 1 << 30)
            report(e)
        }
        return 0
    } catch {
        return fail(VMMMachine.error(error))
    }
}

let args = CommandLine.arguments.dropFirst()
switch args.first {
case "run": exit(runVM())
case "probe": exit(Probe.run())
default:
    let usage = "usage: sandbox-vmm run | probe (started by the sandbox library, not by hand)\n"
    FileHandle.standardError.write(Data(usage.utf8))
    exit(2)
}
