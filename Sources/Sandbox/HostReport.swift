import Foundation
import SandboxCore
import SandboxImages
import SystemShims
import VMMProtocol

/// What `sandbox doctor` reports about this host. The KVM facts come from the VMM
/// executable (`sandbox-vmm probe`), the only process of ours that opens /dev/kvm.
public struct HostReport: Sendable {
    public var lines: [String] = []
    /// Whether sandboxes can run here.
    public var canRun = true
    public var text: String { lines.joined(separator: "\n") }

    public static func gather(vmmExecutable: String? = nil) -> HostReport {
        var r = HostReport()
        let host = HostKind.detect()
        r.lines.append("host kind:      \(host)")
        var probe: HostProbe?
        var vmm: String?
        do {
            let exe = try VMMExecutable.locate(explicit: vmmExecutable)
            vmm = exe
            r.lines.append("VMM:            \(exe)")
            probe = try Self.probe(exe)
        } catch {
            r.canRun = false
            r.lines.append("VMM:            \(error)")
        }
        switch host {
        case .none:
            r.canRun = false
            r.lines.append("/dev/kvm:       missing. Fix: enable VT-x/AMD-V (or nested virtualization) and load kvm_intel/kvm_amd.")
        case .hardware, .pvm:
            if let probe {
                if !probe.kvmUsable { r.canRun = false }
                r.lines.append("/dev/kvm:       \(probe.kvmUsable ? "ok (\(probe.kvmDetail))" : probe.kvmDetail)")
            }
        }
        if let probe, let vmm {
            r.lines.append("block I/O:      \(probe.blockEngine) engine (\(probe.blockEngineReason))")
            r.lines.append("libseccomp:     \(probe.libseccomp ?? "unavailable")")
            do {
                let jail = try VMMProcess.checkJail(executable: vmm)
                for line in jail.applied { r.lines.append("jail:           " + line) }
                for line in jail.missing { r.lines.append("jail, missing:  " + line) }
            } catch {
                r.lines.append("jail:           could not be checked: \(error)")
            }
        }
        let flavor = KernelFlavor.forHost(host)
        if let k = ProcessInfo.processInfo.environment["SANDBOX_KERNEL"], !k.isEmpty {
            r.lines.append("guest kernel:   \(k) (from SANDBOX_KERNEL); this host needs the \(flavor.rawValue) flavor")
        } else {
            do {
                let p = try KernelStore.cachedPath(flavor: flavor)
                let built = FileManager.default.fileExists(atPath: p)
                r.lines.append("guest kernel:   \(flavor.rawValue) flavor (the one that boots on this host), \(built ? "cached at \(p)" : "not built yet: run `sandbox kernel build` (about 6 minutes on 2 cores) or let the first run build it")")
            } catch {
                r.lines.append("guest kernel:   \(flavor.rawValue) flavor; \(error)")
            }
        }
        var defaults = SandboxConfiguration()
        defaults.vmmExecutable = vmmExecutable
        let entries = SnapshotCache.entries()
        let cacheNote = "\(SnapshotCache.directory): \(entries.isEmpty ? "none made yet; the first run of each image and shape makes its own" : "\(entries.count) (\(entries.prefix(4).joined(separator: ", "))\(entries.count > 4 ? ", …" : ""))")"
        if let reason = SnapshotCache.coldReason(defaults) {
            r.lines.append("start path:     cold boot for every run: \(reason)")
        } else {
            r.lines.append("start path:     restore from the cached start snapshot (made on first use; --cold boots instead)")
        }
        r.lines.append("start snapshots: \(cacheNote)")
        for failed in SnapshotCache.recentFailures() {
            r.lines.append("note:           a start snapshot could not be made, so runs of its shape boot instead: \(failed)")
        }
        if host == .pvm {
            r.lines.append("note:           PVM host: only the pvm kernel flavor boots natively here; a standard kernel falls into emulation and dies.")
        }
        return r
    }

    /// Runs `sandbox-vmm probe` and decodes its report.
    static func probe(_ exe: String) throws -> HostProbe {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = ["probe"]
        let pipe = Pipe()
        p.standardOutput = pipe
        do { try p.run() } catch { throw SandboxError(.vmm, "cannot run \(exe) probe", underlying: SandboxError.Described(description: "\(error)")) }
        let out = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0, let probe = try? JSONDecoder().decode(HostProbe.self, from: out) else {
            throw SandboxError(.vmm, "\(exe) probe failed (exit status \(p.terminationStatus))")
        }
        return probe
    }
}
