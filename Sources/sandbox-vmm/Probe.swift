import CJail
import Foundation
import KVM
import SystemShims
import VMMProtocol
import VirtIO

/// `sandbox-vmm probe`: what this host offers the VMM, as one JSON object on stdout
/// (``HostProbe``); `sandbox doctor` reports it.
enum Probe {
    static func run() -> Int32 {
        var p = HostProbe(hostKind: HostKind.detect().rawValue)
        do {
            let kvm = try KVMSystem()
            p.kvmUsable = true
            p.kvmDetail = "API 12, irqchip, irqfd, ioeventfd \(kvm.check(.ioeventfd) > 0 ? "yes" : "no"), max vCPUs \(max(kvm.check(.maxVCPUs), kvm.check(.nrVCPUs)))"
        } catch {
            p.kvmUsable = false
            p.kvmDetail = "\(error)"
        }
        let engine = BlockEngineKind.auto
        p.blockEngine = "\(engine.kind)"
        p.blockEngineReason = engine.reason
        let sv = cjail_seccomp_version()
        p.libseccomp = sv > 0 ? "\(sv / 10000).\(sv / 100 % 100).\(sv % 100)" : nil
        guard let data = try? JSONEncoder().encode(p) else { return 1 }
        var out = data
        out.append(0x0A)
        out.withUnsafeBytes { try? writeAll(1, $0) }
        return 0
    }
}
