import CJail
import Foundation
import KVM
import VirtIO

/// What `sandbox doctor` reports about this host.
public struct HostReport: Sendable {
    public var lines: [String] = []
    /// Whether sandboxes can run here.
    public var canRun = true
    public var text: String { lines.joined(separator: "\n") }

    public static func gather() -> HostReport {
        var r = HostReport()
        let host = HostKind.detect()
        r.lines.append("host kind:      \(host)")
        switch host {
        case .none:
            r.canRun = false
            r.lines.append("/dev/kvm:       missing. Fix: enable VT-x/AMD-V (or nested virtualization) and load kvm_intel/kvm_amd.")
        case .hardware, .pvm:
            do {
                let kvm = try KVMSystem()
                r.lines.append("/dev/kvm:       ok (API 12, irqchip, irqfd, ioeventfd \(kvm.check(.ioeventfd) > 0 ? "yes" : "no"), max vCPUs \(max(kvm.check(.maxVCPUs), kvm.check(.nrVCPUs))))")
            } catch {
                r.canRun = false
                r.lines.append("/dev/kvm:       \(error)")
            }
        }
        let engine = BlockEngineKind.auto
        r.lines.append("block I/O:      \(engine.kind) engine (\(engine.reason))")
        let sv = cjail_seccomp_version()
        r.lines.append("libseccomp:     \(sv > 0 ? "\(sv / 10000).\(sv / 100 % 100).\(sv % 100)" : "unavailable")")
        let flavor = KernelFlavor.forHost(host)
        if let k = ProcessInfo.processInfo.environment["SANDBOX_KERNEL"], !k.isEmpty {
            r.lines.append("guest kernel:   \(k) (from SANDBOX_KERNEL); this host needs the \(flavor.rawValue) flavor")
        } else if let p = try? KernelStore.cachedPath(flavor: flavor) {
            let built = FileManager.default.fileExists(atPath: p)
            r.lines.append("guest kernel:   \(flavor.rawValue) flavor (the one that boots on this host), \(built ? "cached at \(p)" : "not built yet: run `sandbox kernel build` (about 10 minutes on 2 cores) or let the first run build it")")
        } else {
            r.lines.append("guest kernel:   \(flavor.rawValue) flavor; the recipes folder was not found (set SANDBOX_RESOURCES)")
        }
        if host == .pvm {
            r.lines.append("note:           PVM host: only the pvm kernel flavor boots natively here; a standard kernel falls into emulation and dies.")
        }
        return r
    }
}
