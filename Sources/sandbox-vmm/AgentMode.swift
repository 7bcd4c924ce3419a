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
        // A restore takes its disk, RAM and device state from the snapshot directory.
        var restoring: (snapshot: MachineSnapshot, memory: FileDescriptor)?
        var workingSet: (set: WorkingSet?, note: String?) = (nil, nil)
        var layer: DiskLayer?
        var imagePath = config.imagePath
        if let dir = config.restoreDirectory {
            guard config.diskSizeBytes == nil else {
                throw SandboxError.invalidInput("a restored sandbox's disk size is the snapshot's; set the disk size when the snapshot is made")
            }
            let (manifest, machine) = try SnapshotFiles.readState(from: dir)
            (imagePath, layer) = try SnapshotFiles.readDisk(manifest.disk, in: dir)
            restoring = (machine, try SnapshotFiles.openMemory(in: dir, expected: machine.memoryBytes))
            if config.prefault { workingSet = SnapshotFiles.readWorkingSet(in: dir, memoryBytes: machine.memoryBytes) }
        }
        defer { restoring?.memory.close() }
        // Opened before the jail hides /proc: read when the VM has stopped.
        let pagemap = config.recordWorkingSet && restoring != nil ? try FileDescriptor.open("/proc/self/pagemap", O_RDONLY) : nil
        defer { pagemap?.close() }
        guard let imagePath else {
            throw SandboxError.invalidInput("agent mode needs a root image")
        }
        let agentReady = try EventFD()
        let disk = try RootDisk.open(imagePath: imagePath, overlayDirectory: config.overlayDirectory, sizeBytes: config.diskSizeBytes,
                                     layer: layer)
        defer { disk.close() }
        // What a snapshot records of the base image, read while its path is reachable.
        let baseIdentity = config.snapshotDirectory == nil ? nil : SnapshotFiles.identity(of: imagePath)
        let vsock = VsockDevice(guestCID: UInt64(GuestABI.guestCID))
        var mc = MachineConfiguration(kernelPath: config.kernelPath)
        mc.initrdPath = config.initrdPath
        mc.memoryMiB = config.memoryMiB
        mc.cpus = config.cpus
        mc.timeoutSeconds = config.vmTimeoutSeconds
        let grown = (disk.backend as? CopyOnWriteDisk).map { $0.capacity > $0.baseCapacity } ?? false
        mc.extraCommandLine = "root=/dev/vda rw init=/sbin/sandbox-init quiet "
            + (grown ? GuestABI.growRootParameter + " " : "") + config.extraCommandLine
        // The guest's hardware RNG: host entropy for every VM, restored ones included.
        mc.virtioDevices = [disk, vsock, EntropyDevice()]
        mc.consoleCapacity = 64 * 1024
        if config.streamConsole {
            mc.consoleSink = { bytes in try? writeAll(2, bytes) }
        }
        mc.onBootMark = { mark in if mark.value == GuestABI.BootMark.agentReady.rawValue { agentReady.signal() } }
        let machine = try VMMMachine.make(mc, restoring: restoring.map { ($0.snapshot, $0.memory.rawValue) })
        let restoredNanos = restoring == nil ? nil : monotonicNanos()
        let prefaulted = Mutex<(pages: UInt64, errno: Int32)?>(nil)
        var prefaultThread: NativeThread?
        func joinPrefault() {
            prefaultThread?.join()
            prefaultThread = nil
        }
        let capacity = (disk.backend as? CopyOnWriteDisk)?.capacity ?? 0
        let jail = try Jail.apply(config, binds: Jail.binds(config), fileSizeLimit: Jail.fileSizeLimit(capacity: capacity, memoryMiB: config.memoryMiB))
        // The pages the restored guest is about to write, copied in on a thread of their
        // own while its vCPUs start (each would otherwise be a copy-on-write fault taken
        // through KVM, one page at a time). Started after the jail, which needs the VMM
        // single-threaded.
        if let set = workingSet.set {
            let ranges = set.ranges.map { (first: $0.first, count: $0.count) }
            prefaultThread = try? NativeThread(name: "prefault") { [memory = machine.memory] in
                let r = memory.populateForWrite(ranges)
                prefaulted.withLock { $0 = r }
            }
            if prefaultThread == nil { workingSet.note = "no thread could be started to copy the working set in" }
        }
        // A restored guest may think it has vsock connections (the snapshot's): tell it
        // every connection is gone. Its agent's listening socket stays.
        if restoring != nil { vsock.sendTransportReset() }
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
            if restoring != nil {
                // The restored guest is up at once; connect only after it has dropped the
                // snapshot's connections (the transport reset), or it drops ours too.
                if !vsock.transportResetHandled { usleep(200); continue }
            } else {
                _ = waitReadable(agentReady.fd.rawValue, timeoutMillis: 20)
            }
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
            ready.restoreMillis = restoredNanos.map { Double($0 - machine.startNanos) / 1e6 }
            if restoring != nil {
                joinPrefault()  // done long before the agent answers
                let done = prefaulted.withLock { $0 }
                ready.prefaultPages = done?.pages ?? 0
                if !config.prefault {
                    ready.prefaultNote = "not asked for"
                } else if let set = workingSet.set {
                    ready.prefaultNote = workingSet.note ?? done.flatMap { d in
                        d.errno == 0 ? nil : "copying the working set in stopped after \(d.pages) of \(set.pages) pages: \(String(cString: strerror(d.errno)))"
                    }
                } else {
                    ready.prefaultNote = workingSet.note ?? "the snapshot has no working set"
                }
            }
            ready.jail = jail
            report(ready)
            let ask = Relay.run(connection: connection, agentFD: VMMFileDescriptors.agent, control: control, stopped: stopped, machine: machine)
            if ask == .snapshot {
                var e = VMMEvent(kind: .snapshotted)
                do {
                    e.snapshotMillis = try takeSnapshot(config, machine: machine, connection: connection, disk: disk, base: baseIdentity)
                } catch {
                    e = VMMEvent(kind: .failed)
                    e.error = VMMMachine.error(error)
                }
                report(e)
                machine.requestStop(.stopRequested)
            }
        }
        vmThread.join()
        joinPrefault()
        connection?.close()
        vsock.shutdown()
        var keepError: SandboxError?
        if let keep = config.keepDiskPath {
            do { try RootDisk.export(disk, to: keep) } catch { keepError = SandboxError(.host, "could not keep the disk at \(keep)", underlying: error) }
        }
        switch outcome.withLock({ $0 }) {
        case .success(let result)?:
            var e = StopReport.event(result)
            if !bootTimedOut, result.reason == .guestReset, let where_ = result.shutdownState {
                // The guest reset on its own (before its agent answered, or during a
                // command): say where the vCPU was.
                e.reason = (e.reason ?? "stopped") + "; vCPU at the shutdown: " + where_
            }
            if bootTimedOut {
                e.stop = e.crashLine == nil ? .bootTimeout : .crash
                e.reason = "the guest agent did not accept a vsock connection on port \(GuestABI.agentVsockPort) within the boot limit of \(String(format: "%g", config.bootTimeoutSeconds)) s (last attempt: \(lastError))"
            }
            e.error = keepError
            if let pagemap {
                do { e.writtenPages = try machine.memory.privatePageRanges(pagemap: pagemap.rawValue).flatMap { [$0.first, $0.count] } } catch {
                    e.error = e.error ?? SandboxError(.host, "could not read which pages the guest wrote", underlying: error)
                }
            }
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

    /// Writes a snapshot of the running VM into `config.snapshotDirectory`: closes the
    /// agent connection (the guest's agent goes back to accept()), pauses the VM, and
    /// writes the memory file, the disk's layer above its base, and the state file (last).
    /// Returns how long it took in milliseconds.
    static func takeSnapshot(_ config: VMMConfig, machine: Machine, connection: VsockConnection, disk: BlockDevice,
                             base: (bytes: UInt64, modified: String)?) throws -> Double {
        guard let dir = config.snapshotDirectory else {
            throw SandboxError.invalidInput("a snapshot was asked for, but the VMM was started without a snapshot directory")
        }
        connection.close()
        // Let the guest take the close in (its RST reply) before the VM stops.
        let closeDeadline = monotonicNanos() + 1_000_000_000
        while connection.state.phase != .closed && monotonicNanos() < closeDeadline { usleep(1000) }
        let started = monotonicNanos()
        try machine.pause()
        let memory = try SnapshotFiles.createMemory(in: dir)
        defer { memory.close() }
        let state = try machine.snapshot(memoryFD: memory.rawValue)
        guard let cow = disk.backend as? CopyOnWriteDisk else { throw SandboxError.internal("the root disk is not a copy-on-write disk") }
        let diskRecord = try SnapshotFiles.writeDisk(cow, base: base, to: dir)
        try SnapshotFiles.writeState(state, disk: diskRecord, to: dir)
        return Double(monotonicNanos() - started) / 1e6
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
    /// What ended the relay at the library's request.
    enum Ask { case none, stop, snapshot }

    /// Control lines from the library: "stop" stops the VM; "snapshot" ends the relay so
    /// the VMM can take a snapshot (the agent connection is closed for it).
    @discardableResult
    static func run(connection: VsockConnection, agentFD: Int32, control: FileDescriptor, stopped: EventFD, machine: Machine) -> Ask {
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
        // Control: wait for a line ("stop", "snapshot"), EOF (the library went away) or
        // the VM's end. Lines are short; anything unknown or malformed stops the VM.
        var fds = [pollfd(fd: control.rawValue, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: stopped.fd.rawValue, events: Int16(POLLIN), revents: 0)]
        var pending: [UInt8] = []
        var ask = Ask.none
        loop: while true {
            let r = poll(&fds, 2, -1)
            if r < 0 && errno == EINTR { continue }
            if fds[1].revents != 0 { break }
            if fds[0].revents != 0 {
                var b = [UInt8](repeating: 0, count: 256)
                let n = (try? b.withUnsafeMutableBytes { try readSome(control.rawValue, into: $0) }) ?? 0
                if n <= 0 { ask = .stop; break }
                pending += b[0..<n]
                while let nl = pending.firstIndex(of: UInt8(ascii: "\n")) {
                    let line = String(decoding: pending[..<nl], as: UTF8.self)
                    pending.removeSubrange(...nl)
                    ask = line == "snapshot" ? .snapshot : .stop
                    break loop
                }
                if pending.count > 1024 { ask = .stop; break }
            }
        }
        if ask != .snapshot {
            machine.requestStop(.stopRequested)
            connection.close()
        }
        shutdown(agentFD, Int32(SHUT_RDWR))
        toGuest?.join()
        toHost?.join()
        return ask
    }
}
