import AgentProtocol
import Foundation
import SandboxCore
import SandboxImages
import SystemShims
import VMMProtocol

/// Makes snapshots: a sandbox booted once, stopped with its agent listening, written to a
/// directory from which any number of later sandboxes start in milliseconds
/// (`SandboxConfiguration.snapshot`). See Docs/SnapshotFormat.md.
public enum SnapshotMaker {
    /// What making a snapshot cost.
    public struct Result: Sendable {
        /// The snapshot directory.
        public var directory: String
        /// Milliseconds from the call to the agent answering in the booted (or restored) VM.
        public var bootMillis: Double
        /// Milliseconds the VMM took to pause the VM and write the files.
        public var snapshotMillis: Double
        /// Milliseconds for the whole call.
        public var totalMillis: Double
    }

    /// Boots a sandbox from `configuration` (its image, kernel, memory, vCPUs and disk
    /// size), waits until its agent answers, and writes a snapshot of it to `directory`,
    /// which must not exist yet. The files are written to a temporary sibling first and
    /// renamed into place, so `directory` either holds a whole snapshot or does not exist.
    public static func create(directory: String, configuration config: SandboxConfiguration,
                              progress: (String) -> Void = { _ in }) throws(SandboxError) -> Result {
        guard config.snapshot == nil else {
            throw SandboxError.invalidInput("a snapshot is made by booting; the configuration must not itself start from a snapshot")
        }
        do { return try make(directory: directory, config: config, start: nil, setup: nil, onOutput: { _ in }, progress: progress) } catch {
            throw .from(error, code: .snapshot)
        }
    }

    /// Starts a sandbox from `configuration` the way a run does (from `snapshot` when it
    /// is set, else the cached start snapshot unless `cold`), runs `setup` in it, and, if
    /// that exits 0, writes a snapshot of the VM as the setup left it (memory, processes,
    /// disk) to `directory`. The setup's output goes to `onOutput`; its environment,
    /// working directory and timeout are the configuration's. A setup that fails makes no
    /// snapshot and throws an error with its status.
    public static func create(directory: String, configuration config: SandboxConfiguration, setup: [String],
                              onOutput: (OutputEvent) -> Void = { _ in },
                              progress: (String) -> Void = { _ in }) throws(SandboxError) -> Result {
        guard !setup.isEmpty else { throw SandboxError.invalidInput("the setup command is empty") }
        do {
            var start = config.snapshot
            if start == nil && SnapshotCache.coldReason(config) == nil {
                let (kernel, image) = try SandboxRunner.bootInputs(config, progress: progress)
                do { start = try SnapshotCache.entry(for: config, kernel: kernel, image: image, progress: progress) } catch {
                    progress("sandbox: booting instead of restoring: no start snapshot could be made: \(error)")
                }
            }
            return try make(directory: directory, config: config, start: start, setup: setup, onOutput: onOutput, progress: progress)
        } catch {
            throw .from(error, code: .snapshot)
        }
    }

    private static func make(directory: String, config: SandboxConfiguration, start: String?, setup: [String]?,
                             onOutput: (OutputEvent) -> Void, progress: (String) -> Void) throws -> Result {
        let t0 = monotonicNanos()
        func ms(_ from: UInt64, _ to: UInt64 = monotonicNanos()) -> Double { Double(to &- from) / 1e6 }
        guard !FileManager.default.fileExists(atPath: directory) else {
            throw SandboxError.invalidInput("\(directory) already exists; a snapshot is written to a new directory")
        }
        try InputCheck.check(config)
        var kernel = "", image = ""
        if start == nil { (kernel, image) = try SandboxRunner.bootInputs(config, progress: progress) }
        let parent = (directory as NSString).deletingLastPathComponent
        let partial = (parent.isEmpty ? "." : parent) + "/." + (directory as NSString).lastPathComponent + ".partial-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        do { try FileManager.default.createDirectory(atPath: partial, withIntermediateDirectories: true) } catch {
            throw SandboxError(.host, "cannot create the snapshot directory \(partial)", underlying: error)
        }
        var done = false
        defer { if !done { try? FileManager.default.removeItem(atPath: partial) } }

        let bootTimeout = try SandboxConfiguration.resolvedBootTimeout(config.bootTimeout)
        let setupTimeout = config.timeout.map(SandboxRunner.seconds)
        var vmConfig = VMMConfig(mode: .agent, kernelPath: kernel, imagePath: image, overlayDirectory: SandboxPaths.overlayDirectory,
                                 memoryMiB: config.memoryMiB, cpus: config.cpus,
                                 vmTimeoutSeconds: bootTimeout + 120 + (setup == nil ? 0 : setupTimeout ?? 86_400),
                                 bootTimeoutSeconds: bootTimeout, streamConsole: config.consoleFD != nil,
                                 diskSizeBytes: start == nil ? config.diskSizeMiB.map { $0 << 20 } : nil)
        vmConfig.snapshotDirectory = partial
        vmConfig.jail = config.jail
        vmConfig.restoreDirectory = start
        let vmm = try VMMProcess.spawn(vmConfig, executable: config.vmmExecutable, stderr: config.consoleFD)
        defer { vmm.reap(patienceMillis: 10_000) }
        let first = vmm.nextEvent(timeoutMillis: Int32(min((bootTimeout + 10) * 1000, Double(Int32.max))))
        guard let ready = first, ready.kind == .ready else {
            if first == nil { vmm.kill() }
            throw SandboxError(.snapshot, "the VM to snapshot did not come up: \(vmm.outcomeForEarlyEnd(first))")
        }
        // The agent must answer before the VM is frozen with it.
        let client = AgentClient(fd: vmm.agent)
        let watchdog = try? Watchdog(after: 30) { [vmm] in vmm.kill() }
        do {
            _ = try client.greet(seed: ready.restoreMillis != nil)
        } catch {
            watchdog?.cancel()
            vmm.requestStop()
            // The VMM's stop report says what the VM did (a reset, a crash) when it did.
            let stopped = vmm.waitStopped(timeoutMillis: 3000)
            let why = stopped.map { " (the VM stopped: \($0.reason ?? $0.stop?.rawValue ?? "no reason given"))" } ?? ""
            throw SandboxError.from(error, code: .snapshot, context: "the guest agent of the VM to snapshot did not answer" + why)
        }
        // Warm-up: the first command in a fresh VM reads its binaries from the disk into
        // the guest's page cache and runs the agent's exec path for the first time. Paid
        // once here, it is in the snapshot, and no restored sandbox pays it again.
        do { try warmUp(client, config) } catch {
            watchdog?.cancel()
            vmm.requestStop()
            throw SandboxError.from(error, code: .snapshot, context: "the guest agent of the VM to snapshot failed its warm-up command")
        }
        watchdog?.cancel()
        let booted = ms(t0)
        if let setup {
            let exec = Exec(arguments: setup, environment: SandboxRunner.environment(config), workingDirectory: config.workingDirectory,
                            timeoutMillis: setupTimeout.map { UInt64($0 * 1000) } ?? 0,
                            stdoutCap: config.outputLimit, stderrCap: config.outputLimit)
            let deadline = setupTimeout.flatMap { t in try? Watchdog(after: t + 2) { [vmm] in vmm.kill() } }
            let status: CommandStatus
            do {
                status = try client.exec(exec) { stream, bytes in onOutput(stream == .stdout ? .stdout(bytes) : .stderr(bytes)) }
            } catch {
                deadline?.cancel()
                vmm.requestStop()
                throw SandboxError.from(error, code: .snapshot, context: "the setup command \(setup.joined(separator: " ")) did not finish")
            }
            deadline?.cancel()
            guard case .exited(0) = status else {
                vmm.requestStop()
                throw SandboxError(.snapshot, "the setup command \(setup.joined(separator: " ")) \(Self.describe(status)); nothing was snapshotted")
            }
        }
        vmm.requestSnapshot()
        guard let e = vmm.nextEvent(timeoutMillis: 120_000) else {
            vmm.kill()
            throw SandboxError(.snapshot, "the VMM did not report the snapshot within 120 s; it was killed")
        }
        guard e.kind == .snapshotted, let took = e.snapshotMillis else {
            throw e.error ?? SandboxError(.snapshot, "the VMM did not write the snapshot (event \(e.kind.rawValue))")
        }
        _ = vmm.waitStopped(timeoutMillis: 10_000)
        do { try recordWorkingSet(in: partial, config: config, bootTimeout: bootTimeout) } catch {
            progress("sandbox: no working set recorded for the snapshot (restores still work; each takes its pages as it touches them): \(error)")
        }
        guard rename(partial, directory) == 0 else {
            throw SandboxError(.host, "cannot move the snapshot into place at \(directory): \(String(cString: strerror(errno)))")
        }
        done = true
        return Result(directory: directory, bootMillis: booted, snapshotMillis: took, totalMillis: ms(t0))
    }

    /// Restores the snapshot just written to `dir` once, runs in it what a first run does
    /// (the agent's greeting, the warm-up commands), and writes the pages that guest wrote
    /// to `dir`/working-set (``WorkingSet``): every later restore copies them in ahead of
    /// its guest. About one restored run's time, paid once per snapshot.
    static func recordWorkingSet(in dir: String, config: SandboxConfiguration, bootTimeout: Double) throws {
        var vmConfig = VMMConfig(mode: .agent, kernelPath: "", imagePath: nil, overlayDirectory: SandboxPaths.overlayDirectory,
                                 memoryMiB: config.memoryMiB, cpus: config.cpus, vmTimeoutSeconds: bootTimeout + 60,
                                 bootTimeoutSeconds: bootTimeout)
        vmConfig.restoreDirectory = dir
        vmConfig.jail = config.jail
        vmConfig.prefault = false
        vmConfig.recordWorkingSet = true
        let vmm = try VMMProcess.spawn(vmConfig, executable: config.vmmExecutable)
        defer { vmm.reap(patienceMillis: 10_000) }
        let first = vmm.nextEvent(timeoutMillis: Int32(min((bootTimeout + 10) * 1000, Double(Int32.max))))
        guard let ready = first, ready.kind == .ready else {
            if first == nil { vmm.kill() }
            throw SandboxError(.snapshot, "the snapshot did not restore: \(vmm.outcomeForEarlyEnd(first))")
        }
        let client = AgentClient(fd: vmm.agent)
        let watchdog = try? Watchdog(after: 30) { [vmm] in vmm.kill() }
        defer { watchdog?.cancel() }
        _ = try client.greet(seed: true)
        try warmUp(client, config)
        vmm.requestStop()
        guard let stopped = vmm.waitStopped(timeoutMillis: 10_000) else {
            vmm.kill()
            throw SandboxError(.snapshot, "the restored VM did not report its stop within 10 s")
        }
        guard let flat = stopped.writtenPages, flat.count % 2 == 0 else {
            throw stopped.error ?? SandboxError(.snapshot, "the VMM's stop report has no written pages")
        }
        let memoryBytes = config.memoryMiB << 20
        let set = WorkingSet(memoryPages: UInt32(memoryBytes / WorkingSet.pageSize),
                             ranges: stride(from: 0, to: flat.count, by: 2).map { WorkingSet.Range(first: flat[$0], count: flat[$0 + 1]) })
        // Written only as the VMM will accept it.
        let bytes = set.encoded()
        do { _ = try WorkingSet.decode(bytes, memoryBytes: memoryBytes) } catch {
            throw SandboxError(.snapshot, "the recorded working set is not usable: \(error)")
        }
        do { try Data(bytes).write(to: URL(fileURLWithPath: dir + "/" + WorkingSet.fileName)) } catch {
            throw SandboxError(.host, "cannot write \(dir)/\(WorkingSet.fileName)", underlying: error)
        }
    }

    /// What `warmUp` runs: the image's shell and `true`, the commands a first run is most
    /// likely to start (an image without one of them is fine: it fails to start, harmlessly).
    static let warmUpCommands: [[String]] = [["sh", "-c", ":"], ["true"]]

    /// Runs `warmUpCommands` in the VM about to be snapshotted, their output discarded and
    /// their status not judged (they only bring pages in); a broken agent connection throws.
    static func warmUp(_ client: AgentClient, _ config: SandboxConfiguration) throws {
        for command in warmUpCommands {
            let exec = Exec(arguments: command, environment: SandboxRunner.environment(config), workingDirectory: "/",
                            timeoutMillis: 10_000, stdoutCap: 4096, stderrCap: 4096)
            _ = try client.exec(exec) { _, _ in }
        }
    }

    static func describe(_ status: CommandStatus) -> String {
        switch status {
        case .exited(let c): return "exited with status \(c)"
        case .signalled(let s): return "was killed by signal \(s)"
        case .timedOut: return "timed out"
        case .failedToStart(_, let message): return "could not be started (\(message))"
        }
    }
}
