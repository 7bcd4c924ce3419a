import MicroVM
import SandboxCore
import SystemShims
import VMMProtocol
import VirtIO

/// Boot mode (`sandbox boot`): boots the kernel (with an initramfs and/or a root disk),
/// streams the console to fd 1 when asked, and reports how the guest ended.
enum BootMode {
    static func run(_ config: VMMConfig, report: (VMMEvent) -> Void) throws {
        var mc = MachineConfiguration(kernelPath: config.kernelPath)
        mc.initrdPath = config.initrdPath
        mc.extraCommandLine = config.extraCommandLine
        var disk: BlockDevice?
        if let image = config.imagePath {
            let d = try RootDisk.open(imagePath: image, overlayDirectory: config.overlayDirectory, sizeBytes: config.diskSizeBytes)
            disk = d
            mc.virtioDevices.append(d)
            mc.extraCommandLine = "root=/dev/vda rw " + config.extraCommandLine
        }
        defer { disk?.close() }
        mc.memoryMiB = config.memoryMiB
        mc.cpus = config.cpus
        mc.timeoutSeconds = config.vmTimeoutSeconds
        if config.streamConsole {
            mc.consoleSink = { bytes in try? writeAll(1, bytes) }
        }
        let machine = try VMMMachine.make(mc)
        let capacity = (disk?.backend as? CopyOnWriteDisk)?.capacity ?? 0
        let jail = try Jail.apply(config, binds: Jail.binds(config), fileSizeLimit: Jail.fileSizeLimit(capacity: capacity, memoryMiB: config.memoryMiB))
        let result: MachineResult
        do { result = try machine.run() } catch { throw VMMMachine.error(error) }
        var e = StopReport.event(result)
        if result.console.totalBytes == 0, let where_ = result.shutdownState {
            // It died before printing anything: say where the vCPU was (as an agent run does).
            e.reason = (e.reason ?? "stopped") + "; vCPU at the shutdown: " + where_
        }
        e.jail = jail
        if let keep = config.keepDiskPath, let disk {
            do { try RootDisk.export(disk, to: keep) } catch { e.error = SandboxError(.host, "could not keep the disk at \(keep)", underlying: error) }
        }
        report(e)
    }
}
