import AgentProtocol
import CInit
import SandboxABI
import Glibc
import SystemShims

/// What PID 1 does before serving: file systems, loopback, boot markers.
enum Boot {
    /// Mounts the pseudo file systems a command expects. Failures are logged, not
    /// fatal: a missing /dev/pts should not keep the agent from serving.
    static func setUpSystem() {
        if cinit_proc_mount_errno() != 0 {
            log("mount /proc: \(errnoDescription(cinit_proc_mount_errno()))")
        }
        let nosuid = cinit_ms_nosuid(), nodev = cinit_ms_nodev(), noexec = cinit_ms_noexec()
        let mounts: [(source: String, target: String, type: String, flags: UInt, data: String?)] = [
            ("sysfs", "/sys", "sysfs", nosuid | nodev | noexec, nil),
            ("devtmpfs", "/dev", "devtmpfs", nosuid, "mode=0755"),
            ("devpts", "/dev/pts", "devpts", nosuid | noexec, "mode=0620,ptmxmode=0666"),
            ("tmpfs", "/dev/shm", "tmpfs", nosuid | nodev, "mode=1777"),
            ("tmpfs", "/tmp", "tmpfs", nosuid | nodev, "mode=1777"),
            ("tmpfs", "/run", "tmpfs", nosuid | nodev, "mode=0755"),
        ]
        for m in mounts {
            let rc: Int32 = if let data = m.data {
                cinit_mount(m.source, m.target, m.type, m.flags, data)
            } else {
                cinit_mount(m.source, m.target, m.type, m.flags, nil)
            }
            if rc < 0 && -rc != EBUSY { log("mount \(m.type) on \(m.target): \(errnoDescription(-rc))") }
        }
        // What a Linux userland expects in /dev beyond devtmpfs' nodes: /dev/fd (process
        // substitution, `echo x > /dev/stderr`) and the standard stream links.
        for (link, target) in [("/dev/fd", "/proc/self/fd"), ("/dev/stdin", "/proc/self/fd/0"),
                               ("/dev/stdout", "/proc/self/fd/1"), ("/dev/stderr", "/proc/self/fd/2")] {
            if symlink(target, link) != 0 && errno != EEXIST { log("symlink \(link): \(errnoDescription(errno))") }
        }
        setHostname()
        growRootIfAsked()
        // The kernel gives init /dev/console only if the initramfs has the node.
        let stdio = cinit_ensure_stdio()
        if stdio < 0 { log("stdio: \(errnoDescription(-stdio))") }
        let lo = cinit_loopback_up()
        if lo < 0 { log("loopback up: \(errnoDescription(-lo))") }
        if getenv("PATH") == nil { setenv("PATH", GuestABI.defaultPath, 1) }
    }

    /// Grows the root file system to its disk when the VMM made the disk larger than the
    /// image (`GuestABI.growRootParameter` on the command line). A failure is logged on
    /// the console; the command still runs, on the image's own size.
    static func growRootIfAsked() {
        guard let bytes = try? readWholeFile("/proc/cmdline", limit: 65536) else { return }
        let words = String(decoding: bytes, as: UTF8.self).split(whereSeparator: { $0 == " " || $0 == "\n" })
        guard words.contains(Substring(GuestABI.growRootParameter)) else { return }
        let rc = cinit_grow_ext4("/")
        if rc < 0 { log("growing the root file system: \(errnoDescription(Int32(-rc)))") }
    }

    /// Sets the kernel hostname from the image's /etc/hostname (first line), else
    /// "sandbox"; the kernel's own default is "(none)".
    static func setHostname() {
        var name = "sandbox"
        if let bytes = try? readWholeFile("/etc/hostname", limit: 4096),
           let line = String(decoding: bytes, as: UTF8.self).split(whereSeparator: \.isNewline).first {
            let trimmed = String(line.filter { $0 != " " && $0 != "\t" })
            if !trimmed.isEmpty && trimmed.utf8.count <= 64 { name = trimmed }
        }
        let rc = name.withCString { sethostname($0, strlen($0)) }
        if rc != 0 { log("sethostname \(name): \(errnoDescription(errno))") }
    }

    /// Writes a boot-timer mark to the boot-timer port; silently does nothing without
    /// ioperm (the kernel config has CONFIG_X86_IOPL_IOPERM off).
    static func marker(_ mark: GuestABI.BootMark) {
        _ = cinit_boot_marker(GuestABI.bootTimerPort, mark.rawValue)
    }

    /// Syncs and ends the VM (PID 1 only): reboot(RB_AUTOBOOT) with the guest's
    /// `reboot=t` becomes a triple fault the VMM treats as the end of the VM (see
    /// cinit_end_vm for why not RB_POWER_OFF).
    static func powerOff() -> Never {
        let rc = cinit_end_vm()
        log("reboot: \(errnoDescription(-rc))")
        while true { pause() }
    }
}
