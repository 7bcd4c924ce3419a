import CSystem
import Foundation
import MicroVM
import SystemShims
import VirtIO
#if canImport(Glibc)
import Glibc
#endif

/// The VMM process of one sandbox (`sandbox _vmm`): builds the VM, relays the agent
/// stream between fd 3 and the guest's vsock port, reports events on fd 4, and exits
/// when the VM stops. Running each VMM in its own process keeps a VMM crash away from
/// the caller (a test runner) and is where the jail will be applied.
public enum VMMChild {
    public static func main() -> Int32 {
        _ = csystem_set_parent_death_signal(SIGKILL)
        let control = FileDescriptor(owning: VMMFileDescriptors.control)
        func report(_ e: VMMEvent) {
            let line = VMMEvent.line(e)
            line.withUnsafeBytes { try? control.writeAll($0) }
        }
        guard let json = ProcessInfo.processInfo.environment["SANDBOX_VMM_CONFIG"],
              let config = try? JSONDecoder().decode(VMMConfig.self, from: Data(json.utf8)) else {
            report(VMMEvent(kind: .failed, error: "sandbox _vmm: missing or invalid SANDBOX_VMM_CONFIG"))
            return 2
        }
        do {
            return try run(config, control: control, report: report)
        } catch {
            report(VMMEvent(kind: .failed, error: "\(error)"))
            return 1
        }
    }

    static func run(_ config: VMMConfig, control: FileDescriptor, report: @escaping (VMMEvent) -> Void) throws -> Int32 {
        let agentReady = try EventFD()
        let disk = try RootDisk.open(imagePath: config.imagePath)
        defer { disk.close() }
        let vsock = VsockDevice(guestCID: 3)
        var mc = MachineConfiguration(kernelPath: config.kernelPath)
        mc.memoryMiB = config.memoryMiB
        mc.cpus = config.cpus
        mc.timeoutSeconds = config.vmTimeoutSeconds
        mc.extraCommandLine = "root=/dev/vda rw init=/sbin/sandbox-init quiet " + config.extraCommandLine
        mc.virtioDevices = [disk, vsock]
        mc.consoleCapacity = 64 * 1024
        if let fd = config.streamConsoleTo {
            mc.consoleSink = { bytes in try? writeAll(fd, bytes) }
        }
        mc.onBootMark = { mark in if mark.value == 2 { agentReady.signal() } }
        let machine = try Machine(mc)
        let stopped = try EventFD()
        let resultBox = ResultBox()
        let vmThread = try NativeThread(name: "vm") {
            do { resultBox.set(try machine.run()) } catch { resultBox.setError("\(error)") }
            stopped.signal()
            agentReady.signal()
        }

        // Connect to the agent over vsock as soon as it listens. The agent also writes the
        // boot-timer mark 2 when ready, which wakes us early; connection attempts before
        // that are refused by the guest at once, so polling costs little.
        let bootDeadline = monotonicNanos() + UInt64(max(0, min(config.bootTimeoutSeconds, config.vmTimeoutSeconds)) * 1e9)
        var connection: VsockConnection?
        var lastError = "no attempt"
        let debug = ProcessInfo.processInfo.environment["SANDBOX_DEBUG_VMM"] != nil
        while resultBox.isEmpty && monotonicNanos() < bootDeadline {
            _ = waitReadable(agentReady.fd.rawValue, timeoutMillis: 20)
            guard resultBox.isEmpty else { break }
            let attempt = monotonicNanos()
            do {
                connection = try vsock.connect(guestPort: 1024, timeoutMillis: 1000)
                if debug { FileHandle.standardError.write(Data("vmm: connected at \((monotonicNanos() - machine.startNanos) / 1_000_000) ms (attempt took \((monotonicNanos() - attempt) / 1_000_000) ms)\n".utf8)) }
                break
            } catch {
                lastError = "\(error)"
                if debug { FileHandle.standardError.write(Data("vmm: connect failed at \((monotonicNanos() - machine.startNanos) / 1_000_000) ms after \((monotonicNanos() - attempt) / 1_000_000) ms: \(error)\n".utf8)) }
            }
        }
        // A guest still booting at the limit is slow, not crashed: stop it and say so
        // (unless its console shows a crash, which the stop report then names).
        var bootTimedOut = false
        if connection == nil && resultBox.isEmpty {
            bootTimedOut = true
            machine.requestStop(.stopRequested)
        }
        if let connection {
            let marks = machine.bootTimer.recorded
            func ms(_ v: UInt8) -> Double? { marks.first { $0.value == v }.map { Double($0.nanos - machine.startNanos) / 1e6 } }
            var ready = VMMEvent(kind: .ready, initMillis: ms(1), agentMillis: ms(2),
                                 connectedMillis: Double(monotonicNanos() - machine.startNanos) / 1e6)
            ready.vcpuStartMillis = Double(machine.runStartNanos - machine.startNanos) / 1e6
            report(ready)
            relay(connection: connection, agentFD: VMMFileDescriptors.agent, control: control, stopped: stopped, machine: machine)
        }
        vmThread.join()
        connection?.close()
        vsock.shutdown()
        var keepError: String?
        if let keep = config.keepDiskPath {
            do { try RootDisk.export(disk, to: keep) } catch { keepError = "could not keep the disk at \(keep): \(error)" }
        }
        let (result, err) = resultBox.get()
        if let result {
            let tail = result.console.tail(16 * 1024)
            var kind: String
            switch result.reason {
            case .guestReset, .powerOff, .halted: kind = GuestCrashDetector.crashReason(consoleTail: tail) == nil ? "clean" : "crash"
            case .timeout: kind = "timeout"
            case .guestCrash: kind = "crash"
            case .stopRequested where bootTimedOut:
                kind = GuestCrashDetector.crashReason(consoleTail: tail) == nil ? "bootTimeout" : "crash"
            case .stopRequested: kind = "stopped"
            case .kvmError: kind = "kvm"
            }
            let reason = bootTimedOut
                ? "the guest agent did not accept a vsock connection on port 1024 within the boot limit of \(String(format: "%g", config.bootTimeoutSeconds)) s (last attempt: \(lastError))"
                : result.reason.description
            report(VMMEvent(kind: .stopped, reason: reason, reasonKind: kind, consoleTail: tail,
                            runMillis: Double(result.stopNanos - result.startNanos) / 1e6, error: keepError))
        } else {
            report(VMMEvent(kind: .failed, error: err ?? "the VM thread ended without a result"))
        }
        return 0
    }

    /// Copies bytes both ways until either side closes or the VM stops; a "stop" line or
    /// EOF on the control socket stops the VM.
    static func relay(connection: VsockConnection, agentFD: Int32, control: FileDescriptor, stopped: EventFD, machine: Machine) {
        let toGuest = try? NativeThread(name: "relay-in") {
            var buf = [UInt8](repeating: 0, count: 64 * 1024)
            while true {
                let n = buf.withUnsafeMutableBytes { read(agentFD, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { connection.shutdownWrite(); return }
                do { try connection.write(Array(buf[0..<n])) } catch { return }
            }
        }
        let toHost = try? NativeThread(name: "relay-out") {
            var buf = [UInt8](repeating: 0, count: 64 * 1024)
            while true {
                let n: Int
                do { n = try buf.withUnsafeMutableBytes { try connection.read(into: $0) } } catch { break }
                if n <= 0 { break }
                do { try buf.withUnsafeBytes { try writeAll(agentFD, UnsafeRawBufferPointer(rebasing: $0[0..<n])) } } catch { return }
            }
            shutdown(agentFD, Int32(SHUT_WR))
        }
        // Control: wait for "stop", EOF (the library went away) or the VM's end.
        var fds = [pollfd(fd: control.rawValue, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: stopped.fd.rawValue, events: Int16(POLLIN), revents: 0)]
        while true {
            let r = poll(&fds, 2, -1)
            if r < 0 && errno == EINTR { continue }
            if fds[1].revents != 0 { break }
            if fds[0].revents != 0 {
                var b = [UInt8](repeating: 0, count: 64)
                let n = b.withUnsafeMutableBytes { read(control.rawValue, $0.baseAddress, $0.count) }
                if n <= 0 || b[0..<n].contains(UInt8(ascii: "s")) {
                    machine.requestStop(.stopRequested)
                    break
                }
            }
        }
        connection.close()
        shutdown(agentFD, Int32(SHUT_RDWR))
        toGuest?.join()
        toHost?.join()
    }
}

private final class ResultBox: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = Lock()
    private var result: MachineResult?
    private var error: String?
    func set(_ r: MachineResult) { lock.withLock { result = r } }
    func setError(_ e: String) { lock.withLock { error = e } }
    var isEmpty: Bool { lock.withLock { result == nil && error == nil } }
    func get() -> (MachineResult?, String?) { lock.withLock { (result, error) } }
}
