import Foundation
import MicroVM
import SandboxABI
import SandboxCore
import Synchronization
import SystemShims
import VMMProtocol
import VirtIO
#if canImport(Glibc)
import Glibc
#endif

/// Agent mode, the VMM of one sandbox: builds the VM with its root disk and vsock,
/// connects to the guest agent, relays the agent stream between fd 3 and the guest's
/// vsock port, reports events on fd 4, and returns when the VM stops.
enum AgentMode {
    static func run(_ config: VMMConfig, control: FileDescriptor, report: @escaping @Sendable (VMMEvent) -> Void) throws {
        guard let imagePath = config.imagePath else { throw SandboxError.invalidInput("agent mode needs a root image") }
        let agentReady = try EventFD()
        let disk = try RootDisk.open(imagePath: imagePath, overlayDirectory: config.overlayDirectory, sizeBytes: config.diskSizeBytes)
        defer { disk.close() }
        let vsock = VsockDevice(guestCID: UInt64(GuestABI.guestCID))
        var mc = MachineConfiguration(kernelPath: config.kernelPath)
        mc.initrdPath = config.initrdPath
        mc.memoryMiB = config.memoryMiB
        mc.cpus = config.cpus
        mc.timeoutSeconds = config.vmTimeoutSeconds
        let grown = (disk.backend as? CopyOnWriteDisk).map { $0.capacity > $0.baseCapacity } ?? false
        mc.extraCommandLine = "root=/dev/vda rw init=/sbin/sandbox-init quiet "
            + (grown ? GuestABI.growRootParameter + " " : "") + config.extraCommandLine
        mc.virtioDevices = [disk, vsock]
        mc.consoleCapacity = 64 * 1024
        if config.streamConsole {
            mc.consoleSink = { bytes in try? writeAll(2, bytes) }
        }
        mc.onBootMark = { mark in if mark.value == GuestABI.BootMark.agentReady.rawValue { agentReady.signal() } }
        let machine = try VMMMachine.make(mc)
        let stopped = try EventFD()
        let outcome = Mutex<Result<MachineResult, SandboxError>?>(nil)
        let vmThread = try NativeThread(name: "vm") {
            let r: Result<MachineResult, SandboxError>
            do { r = .success(try machine.run()) } catch { r = .failure(VMMMachine.error(error)) }
            outcome.withLock { $0 = r }
            stopped.signal()
            agentReady.signal()
        }
        func running() -> Bool { outcome.withLock { $0 == nil } }

        // Connect to the agent as soon as it listens. The agent also writes the
        // agent-ready boot mark, which wakes us early; connection attempts before that are
        // refused by the guest at once, so polling costs little.
        let bootDeadline = monotonicNanos() + UInt64(max(0, min(config.bootTimeoutSeconds, config.vmTimeoutSeconds ?? .infinity)) * 1e9)
        var connection: VsockConnection?
        var lastError = "no attempt"
        let debug = ProcessInfo.processInfo.environment["SANDBOX_DEBUG_VMM"] != nil
        while running() && monotonicNanos() < bootDeadline {
            _ = waitReadable(agentReady.fd.rawValue, timeoutMillis: 20)
            guard running() else { break }
            let attempt = monotonicNanos()
            do {
                connection = try vsock.connect(guestPort: GuestABI.agentVsockPort, timeoutMillis: 1000)
                if debug { log("connected at \((monotonicNanos() - machine.startNanos) / 1_000_000) ms (attempt took \((monotonicNanos() - attempt) / 1_000_000) ms)") }
                break
            } catch {
                lastError = "\(error)"
                if debug { log("connect failed at \((monotonicNanos() - machine.startNanos) / 1_000_000) ms after \((monotonicNanos() - attempt) / 1_000_000) ms: \(error)") }
            }
        }
        // A guest still booting at the limit is slow, not crashed: stop it and say so
        // (unless its console shows a crash, which the stop report then names).
        var bootTimedOut = false
        if connection == nil && running() {
            bootTimedOut = true
            machine.requestStop(.stopRequested)
        }
        if let connection {
            let marks = machine.bootTimer.recorded
            func ms(_ mark: GuestABI.BootMark) -> Double? {
                marks.first { $0.value == mark.rawValue }.map { Double($0.nanos - machine.startNanos) / 1e6 }
            }
            var ready = VMMEvent(kind: .ready)
            ready.initMillis = ms(.initStarted)
            ready.agentMillis = ms(.agentReady)
            ready.connectedMillis = Double(monotonicNanos() - machine.startNanos) / 1e6
            ready.vcpuStartMillis = Double(machine.runStartNanos - machine.startNanos) / 1e6
            report(ready)
            Relay.run(connection: connection, agentFD: VMMFileDescriptors.agent, control: control, stopped: stopped, machine: machine)
        }
        vmThread.join()
        connection?.close()
        vsock.shutdown()
        var keepError: SandboxError?
        if let keep = config.keepDiskPath {
            do { try RootDisk.export(disk, to: keep) } catch { keepError = SandboxError(.host, "could not keep the disk at \(keep)", underlying: error) }
        }
        switch outcome.withLock({ $0 }) {
        case .success(let result)?:
            var e = StopReport.event(result)
            if connection == nil && !bootTimedOut, let where_ = result.shutdownState {
                // It died before its agent answered: say where the vCPU was.
                e.reason = (e.reason ?? "stopped") + "; vCPU at the shutdown: " + where_
            }
            if bootTimedOut {
                e.stop = e.crashLine == nil ? .bootTimeout : .crash
                e.reason = "the guest agent did not accept a vsock connection on port \(GuestABI.agentVsockPort) within the boot limit of \(String(format: "%g", config.bootTimeoutSeconds)) s (last attempt: \(lastError))"
            }
            e.error = keepError
            report(e)
        case .failure(let error)?:
            var e = VMMEvent(kind: .failed)
            e.error = error
            report(e)
        case nil:
            var e = VMMEvent(kind: .failed)
            e.error = .internal("the VM thread ended without a result")
            report(e)
        }
    }

    static func log(_ line: String) {
        var s = "sandbox-vmm: " + line + "\n"
        s.withUTF8 { try? writeAll(2, UnsafeRawBufferPointer($0)) }
    }
}

/// Copies the agent stream both ways between fd 3 and the guest connection.
enum Relay {
    /// Runs until either side closes or the VM stops; a "stop" line or EOF on the control
    /// socket stops the VM.
    static func run(connection: VsockConnection, agentFD: Int32, control: FileDescriptor, stopped: EventFD, machine: Machine) {
        let toGuest = try? NativeThread(name: "relay-in") {
            var buf = [UInt8](repeating: 0, count: 64 * 1024)
            while true {
                let n: Int
                do { n = try buf.withUnsafeMutableBytes { try readSome(agentFD, into: $0) } } catch { connection.shutdownWrite(); return }
                if n == 0 { connection.shutdownWrite(); return }
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
                let n = (try? b.withUnsafeMutableBytes { try readSome(control.rawValue, into: $0) }) ?? 0
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
