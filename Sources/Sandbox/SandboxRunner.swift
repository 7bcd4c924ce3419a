import AgentProtocol
import Foundation
import SandboxABI
import SandboxCore
import SandboxImages
import Synchronization
import SystemShims
import TreeArchive
import VMMProtocol
#if canImport(Glibc)
import Glibc
#endif

/// Runs one command in one throwaway VM: spawns the VMM process, talks to the guest
/// agent through it, tears everything down. Blocking: call from a dedicated thread
/// (the async API does that for you).
public enum SandboxRunner {
    /// What a boot needs, resolved and checked: the kernel (the cached one unless the
    /// configuration names one), the image's path, and the disk size against the image.
    static func bootInputs(_ config: SandboxConfiguration, progress: (String) -> Void) throws -> (kernel: String, image: String) {
        let kernel = try config.kernel ?? KernelStore.defaultKernelPath(progress: progress)
        let image = try RootImage.resolve(config.image, progress: { line in
            if !line.contains("is up to date") { progress(line) }
        })
        if let d = config.diskSizeMiB {
            let size = (try? FileManager.default.attributesOfItem(atPath: image)[.size] as? NSNumber)?.uint64Value
            try InputCheck.diskSize(d, imageBytes: size, imageName: "the image \(config.image)")
        }
        return (kernel, image)
    }

    /// `config` with its template (if it names one) resolved: the template's snapshot,
    /// image and shape.
    static func resolvingTemplate(_ config: SandboxConfiguration) throws -> SandboxConfiguration {
        guard let name = config.template else { return config }
        guard config.snapshot == nil else { throw SandboxError.invalidInput("template and snapshot cannot both be set: a template is a snapshot") }
        guard !config.cold else { throw SandboxError.invalidInput("template and cold cannot both be set: a template starts from its snapshot") }
        guard config.diskSizeMiB == nil else { throw SandboxError.invalidInput("diskSize cannot be set on a run from a template: the disk is the template's") }
        let info = try Templates.info(name)
        var c = config
        c.template = nil  // resolved: what follows sees a snapshot of the template's shape
        c.snapshot = try Templates.path(name)
        c.image = info.image
        c.memoryMiB = info.memoryMiB
        c.cpus = info.cpus
        return c
    }

    /// Keeps `count` VMs of `configuration`'s start restored and waiting (agent greeted
    /// and seeded), refilled in the background as runs take them, so that a run only
    /// sends its command. Makes the start snapshot first if needed. Returns false, keeping
    /// nothing, when runs of the configuration boot (cold, a console) or keep their disk.
    /// `count` 0 stops refilling. The VMs die with this process; `drainWarm()` stops them.
    @discardableResult
    public static func keepWarm(_ config: SandboxConfiguration, count: Int, progress: (String) -> Void = { _ in }) throws(SandboxError) -> Bool {
        let resolved: SandboxConfiguration
        do { resolved = try resolvingTemplate(config) } catch { throw .from(error, code: .snapshot) }
        guard resolved.keepDiskPath == nil, resolved.consoleFD == nil, let dir = try prepare(resolved, progress: progress).snapshot else { return false }
        let bootTimeout: Double
        do { bootTimeout = try SandboxConfiguration.resolvedBootTimeout(resolved.bootTimeout) } catch { throw .from(error, code: .invalidInput) }
        var vmConfig = VMMConfig(mode: .agent, kernelPath: "", imagePath: "", overlayDirectory: SandboxPaths.overlayDirectory,
                                 memoryMiB: resolved.memoryMiB, cpus: resolved.cpus,
                                 vmTimeoutSeconds: 7 * 86_400, bootTimeoutSeconds: bootTimeout)
        vmConfig.restoreDirectory = dir
        vmConfig.jail = resolved.jail
        WarmPool.shared.keep(WarmPool.Key(snapshot: dir, memoryMiB: resolved.memoryMiB, cpus: resolved.cpus, vmmExecutable: resolved.vmmExecutable,
                                          jail: resolved.jail),
                             count: count, config: vmConfig)
        return true
    }

    /// Stops every VM waiting in the warm pool and stops refilling it.
    public static func drainWarm() { WarmPool.shared.drain() }

    /// A command's environment: the defaults (PATH, HOME, TERM), then the configuration's.
    static func environment(_ config: SandboxConfiguration) -> [String] {
        var env = ["PATH=" + GuestABI.defaultPath, "HOME=/root", "TERM=dumb"]
        for (k, v) in config.environment.sorted(by: { $0.key < $1.key }) {
            env.removeAll { $0.hasPrefix(k + "=") }
            env.append("\(k)=\(v)")
        }
        return env
    }

    /// Gets `configuration`'s start ready before any run needs it: its kernel and image,
    /// and its cached start snapshot (made now if there is none, with progress lines).
    /// Returns the snapshot directory runs of it will restore, or nil when they boot
    /// (then `coldReason` says why). Runs do all this themselves on first use; this is
    /// for callers that want the cost up front (a batch, a test suite's set-up).
    public static func prepare(_ config: SandboxConfiguration, progress: (String) -> Void = { _ in }) throws(SandboxError) -> (snapshot: String?, coldReason: String?) {
        do {
            let config = try resolvingTemplate(config)
            try InputCheck.check(config)
            if let dir = config.snapshot { return (dir, nil) }
            let (kernel, image) = try bootInputs(config, progress: progress)
            if let reason = SnapshotCache.coldReason(config) { return (nil, reason) }
            return (try SnapshotCache.entry(for: config, kernel: kernel, image: image, progress: progress), nil)
        } catch {
            throw .from(error, code: .snapshot)
        }
    }

    /// Runs `command`. Output chunks go to `onOutput` as they arrive (and are collected
    /// into the result up to `configuration.outputLimit`).
    public static func run(_ command: [String], configuration: SandboxConfiguration,
                           stdin: [UInt8]? = nil, stdinFD: Int32? = nil, terminalSize: TerminalSize? = nil,
                           progress: (String) -> Void = { _ in },
                           cancel: CancelToken? = nil,
                           onOutput: (OutputEvent) -> Void = { _ in }) -> ExecResult {
        let t0 = monotonicNanos()
        var result = ExecResult(command: command, outcome: .infrastructureError(.internal("not started")), stdout: [], stderr: [],
                                timings: PhaseTimings(), consoleTail: "")
        func ms(_ from: UInt64, _ to: UInt64 = monotonicNanos()) -> Double { Double(to &- from) / 1e6 }
        guard !command.isEmpty else {
            result.outcome = .infrastructureError(.invalidInput("no command given"))
            return result
        }
        let config: SandboxConfiguration
        do { config = try resolvingTemplate(configuration) } catch {
            result.outcome = .infrastructureError(.from(error, code: .snapshot))
            return result
        }
        // Check and resolve inputs before starting anything.
        var kernel = "", image = ""
        // The cached start snapshot this run restores (nil: the configuration's, or a boot).
        var cached: String?
        do {
            try InputCheck.check(config)
            if let dir = config.snapshot {
                // A restore brings its own kernel state, RAM and disk.
                if config.diskSizeMiB != nil {
                    throw SandboxError.invalidInput("diskSize cannot be set on a run from a snapshot: the disk is the snapshot's (set it when making the snapshot)")
                }
                guard FileManager.default.fileExists(atPath: dir) else {
                    throw SandboxError(.snapshot, "\(dir): no such snapshot directory")
                }
            } else {
                (kernel, image) = try bootInputs(config, progress: progress)
                if let reason = SnapshotCache.coldReason(config) {
                    result.timings.coldReason = reason
                } else {
                    do { cached = try SnapshotCache.entry(for: config, kernel: kernel, image: image, progress: progress) } catch {
                        // Booting still works: do that, and say why.
                        result.timings.coldReason = "no start snapshot could be made: \(SandboxError.from(error, code: .snapshot))"
                        progress("sandbox: booting instead of restoring: \(result.timings.coldReason!)")
                    }
                }
            }
            try checkCopyIn(config.copyIn)
        } catch {
            result.outcome = .infrastructureError(.from(error, code: .host))
            return result
        }
        let commandTimeout = config.timeout.map(seconds)
        let bootTimeout: Double
        do { bootTimeout = try SandboxConfiguration.resolvedBootTimeout(config.bootTimeout) } catch {
            result.outcome = .infrastructureError(.from(error, code: .invalidInput))
            return result
        }
        var vmConfig = VMMConfig(mode: .agent, kernelPath: kernel, imagePath: image, overlayDirectory: SandboxPaths.overlayDirectory,
                                 memoryMiB: config.memoryMiB, cpus: config.cpus,
                                 vmTimeoutSeconds: bootTimeout + (commandTimeout ?? 86_400) + 30,
                                 bootTimeoutSeconds: bootTimeout, keepDiskPath: config.keepDiskPath,
                                 streamConsole: config.consoleFD != nil, diskSizeBytes: config.diskSizeMiB.map { $0 << 20 })
        vmConfig.jail = config.jail
        // A jailed VMM writes a kept disk into a staging directory of its own (the only
        // place it can reach); it is moved into place once the VMM has stopped.
        var keepStaging: KeepDiskStaging?
        if let keep = config.keepDiskPath {
            do { keepStaging = try KeepDiskStaging(for: keep) } catch {
                result.outcome = .infrastructureError(error)
                return result
            }
            vmConfig.keepDiskPath = keepStaging?.stagedPath
        }
        defer { keepStaging?.remove() }
        var vmm: VMMProcess
        var spawned: UInt64
        var first: VMMEvent?
        var healed = false
        // A VM restored ahead of time and waiting in the warm pool, when one is kept for
        // this start (`keepWarm`): its agent is already greeted and seeded.
        var warm: WarmPool.VM?
        var releaseKey: WarmPool.Key?
        defer { if let releaseKey { WarmPool.shared.release(releaseKey) } }
        if config.keepDiskPath == nil && config.consoleFD == nil, let dir = config.snapshot ?? cached {
            let key = WarmPool.Key(snapshot: dir, memoryMiB: config.memoryMiB, cpus: config.cpus,
                                   vmmExecutable: config.vmmExecutable, jail: config.jail)
            warm = WarmPool.shared.take(key)
            // Its replacement is restored once this run has ended (or has run a while).
            if warm != nil { releaseKey = key }
        }
        if let warm {
            (vmm, spawned, first) = (warm.vmm, warm.spawnedNanos, warm.ready)
            result.timings.snapshot = config.snapshot ?? cached
        } else { while true {
            let restoreFrom = config.snapshot ?? cached
            vmConfig.restoreDirectory = restoreFrom
            // A restored disk has the snapshot's size (the start snapshot was made with it).
            vmConfig.diskSizeBytes = restoreFrom == nil ? config.diskSizeMiB.map { $0 << 20 } : nil
            result.timings.snapshot = restoreFrom
            do { vmm = try VMMProcess.spawn(vmConfig, executable: config.vmmExecutable, stderr: config.consoleFD) } catch {
                result.outcome = .infrastructureError(error)
                return result
            }
            spawned = monotonicNanos()
            // Wait for the agent (or the VM's end).
            // The VMM enforces the boot limit itself; the host's own bound, a little later,
            // holds even if the VMM is stopped or hung.
            let bootWait = bootTimeout + 10
            first = vmm.nextEvent(timeoutMillis: Int32(min(bootWait * 1000, Double(Int32.max))))
            if first == nil && vmm.isAlive {
                vmm.kill()
                vmm.reap(patienceMillis: 3000)
                result.outcome = .infrastructureError(.vmm("the VMM process did not report within \(InputCheck.format(bootWait)) s of starting (stopped or hung); it was killed"))
                result.timings.total = ms(t0)
                return result
            }
            // A cached snapshot the VMM refuses (damaged, or another build's) heals: it is
            // made again, once, and this run restores the new one. So does one whose
            // restored guest dies before its agent answers (a reset or a crash at once):
            // its memory or disk is damaged in a way the checks do not see, e.g. a memory
            // file whose pages a crashed machine never wrote out (the memory file is not
            // hashed; it would cost more than the restore). Seen in the lab: a snapshot
            // published just before the lab's kernel panicked restored into a guest reset,
            // every time, until it was removed by hand.
            guard let dir = cached, !healed, let f = first, f.kind != .ready else { break }
            let why: String
            if f.kind == .failed, let e = f.error, e.code == .snapshot {
                why = "the cached start snapshot was refused (\(e.message))"
            } else if f.kind == .stopped, f.stop == .crash || f.stop == .clean {
                why = "the guest restored from the cached start snapshot ended before its agent answered (\(f.reason ?? "no reason given"))"
            } else {
                break
            }
            healed = true
            vmm.reap(patienceMillis: 3000)
            progress("sandbox: \(why); making it again")
            SnapshotCache.discard(dir)
            do { cached = try SnapshotCache.entry(for: config, kernel: kernel, image: image, progress: progress) } catch {
                cached = nil
                result.timings.coldReason = "the start snapshot could not be made again: \(SandboxError.from(error, code: .snapshot))"
            }
            vmConfig.restoreDirectory = nil
        } }
        cancel?.onCancel { [vmm] in vmm.requestStop() }
        var handedOff = false
        defer { if !handedOff { vmm.reap(patienceMillis: config.keepDiskPath == nil ? 3000 : 600_000) } }
        guard let ready = first, ready.kind == .ready else {
            result.outcome = vmm.outcomeForEarlyEnd(first)
            result.consoleTail = vmm.lastStopped?.consoleTail ?? ""
            result.timings.total = ms(t0)
            return result
        }
        let client = warm?.client ?? AgentClient(fd: vmm.agent)
        var status: CommandStatus?
        var failure: SandboxError?
        var copyOutError: SandboxError?
        var tExec = monotonicNanos()
        // Host-side deadlines: the session set-up must answer within 30 s, and the command
        // may run its timeout plus 2 s (the guest agent stops it at the timeout itself);
        // past either, the VMM is killed, whatever it or the guest is doing.
        let hostGrace = 2.0
        let setupDeadline = try? Watchdog(after: 30) { [vmm] in vmm.kill() }
        var deadline: Watchdog?
        var commandDeadlineFired = false
        defer { setupDeadline?.cancel(); deadline?.cancel() }
        var keeper = OutputKeeper(limit: config.outputLimit, keep: config.keepOutput)
        do {
            var pong: Pong?
            if warm == nil {
                // A restored guest has the snapshot's random state and clock: renew both
                // (the Ping after the Seed confirms it, or fails the run with the agent's
                // error). Phase times: the VMM reports when the vCPUs started; the agent
                // reports, on the guest's boot clock, when init started and what the clock
                // read when it answered, which places init's start on the host clock (to
                // within the Ping's latency).
                pong = try client.greet(seed: ready.restoreMillis != nil)
            }
            setupDeadline?.cancel()  // set-up answered; copy-in and the command have their own bounds
            let connected = monotonicNanos()
            let vcpuStart = ms(t0, spawned) + (ready.vcpuStartMillis ?? 0)
            if warm != nil {
                // Restored, greeted and seeded before this run asked: only the hand-over.
                result.timings.vmmStart = ms(t0, connected)
                result.timings.restore = ready.restoreMillis ?? 0
                result.timings.restored = true
                result.timings.warm = true
                result.timings.prefaultPages = ready.prefaultPages ?? 0
                result.timings.prefaultNote = ready.prefaultNote
            } else if let restore = ready.restoreMillis {
                // Restored: no boot; the VM was built from the snapshot, then the agent
                // (already listening in the snapshot) took the new connection.
                result.timings.vmmStart = ms(t0, spawned)
                result.timings.restore = restore
                result.timings.agentReady = ms(t0, connected) - ms(t0, spawned) - restore
                result.timings.restored = true
                result.timings.prefaultPages = ready.prefaultPages ?? 0
                result.timings.prefaultNote = ready.prefaultNote
            } else if let pong {
                let sinceInit = Double(pong.guestNowNanos &- pong.initStartedNanos) / 1e6
                let initStart = max(vcpuStart, ms(t0, connected) - sinceInit)
                result.timings.vmmStart = vcpuStart
                result.timings.kernelBoot = initStart - vcpuStart
                result.timings.agentReady = ms(t0, connected) - initStart
                result.timings.agentStartup = Double(pong.agentReadyNanos &- pong.initStartedNanos) / 1e6
            }
            tExec = connected
            try copyIn(config.copyIn, with: client)
            let exec = Exec(arguments: command, environment: environment(config), workingDirectory: config.workingDirectory,
                            timeoutMillis: commandTimeout.map { UInt64($0 * 1000) } ?? 0,
                            stdoutCap: config.outputLimit, stderrCap: config.outputLimit)
            if let commandTimeout { deadline = try? Watchdog(after: commandTimeout + hostGrace) { [vmm] in vmm.kill() } }
            defer { terminalSize?.follow(nil) }
            status = try client.exec(exec, stdin: stdin, stdinFD: stdinFD, terminal: config.terminal, onStarted: { id in
                guard config.terminal else { return }
                terminalSize?.follow { rows, columns in try? client.send(.resize(rows: rows, columns: columns), id: id) }
            }) { stream, bytes in
                let event: OutputEvent = stream == .stdout ? .stdout(bytes) : .stderr(bytes)
                onOutput(event)
                keeper.add(event)
            }
            deadline?.cancel()
            deadline = nil
            // A lost artefact is an error, never a silent success: the first copy-out
            // that fails decides the outcome (the command's status is then only in the
            // message), and the guest is still shut down cleanly.
            // Bounded like the command: a guest that stalls its copy-out does not stall
            // this process (the VM is killed, and the copy-out fails saying so).
            let copyLimit = transferSeconds(config)
            let copyDeadline = config.copyOut.isEmpty ? nil : try? Watchdog(after: copyLimit) { [vmm] in vmm.kill() }
            for c in config.copyOut where copyOutError == nil {
                do throws(SandboxError) { try copyOut(c, limit: config.copyOutLimit, with: client) } catch {
                    copyOutError = copyDeadline?.fired == true
                        ? SandboxError(.guest, "copy-out \(c.guestPath) -> \(c.hostPath) did not finish within \(InputCheck.format(copyLimit)) s; the host stopped the VM", underlying: error)
                        : error
                }
            }
            copyDeadline?.cancel()
            if config.keepDiskPath == nil {
                // Nothing of the guest outlives the run (its overlay is discarded), so
                // there is nothing to sync: the VMM stops the VM at once, which is
                // faster than the guest's own shutdown.
                vmm.requestStop()
            } else {
                client.shutdown()  // the guest syncs, then the VMM writes the kept disk
            }
        } catch {
            failure = .from(error, code: .agent, context: "talking to the guest agent failed")
            // A guest that breaks the protocol is still running and will not stop by
            // itself: stop it now. (A closed connection may be a guest on its way down;
            // its own stop report, with the console tail, is worth the wait below.)
            if case AgentClient.Error.protocolError? = error as? AgentClient.Error { vmm.requestStop() }
        }
        (result.stdout, result.stderr) = (keeper.stdout, keeper.stderr)
        commandDeadlineFired = deadline?.fired ?? false
        deadline?.cancel()
        if setupDeadline?.fired == true, status == nil {
            failure = SandboxError(.agent, "the guest agent did not answer Hello and Ping within 30 s of the VM being ready; the host stopped the VM", underlying: failure)
        }
        result.timings.exec = ms(tExec)
        let tDown = monotonicNanos()
        // A command that exited 0, with nothing left to fetch from the VM: the result is
        // complete, so the VM is stopped and reaped off the caller's path (a thread of
        // its own; if this process exits first, the VMM dies with it). Other outcomes
        // wait for the stop report, whose console tail explains them.
        if case .exited(0)? = status, copyOutError == nil, config.keepDiskPath == nil, !commandDeadlineFired,
           cancel?.isCancelled != true {
            handedOff = (try? NativeThread(name: "vmm-teardown") { [vmm] in
                _ = vmm.waitStopped(timeoutMillis: 3000)
                vmm.reap(patienceMillis: 3000)
            })?.detach() != nil
            if handedOff {
                result.outcome = .exited(0)
                result.timings.teardown = ms(tDown)
                result.timings.total = ms(t0)
                return result
            }
        }
        // The guest powers off after Shutdown; give it a moment, then stop it.
        // Exporting a kept disk happens before the VMM reports; give it time.
        let patience: Int32 = config.keepDiskPath == nil ? 3000 : 600_000
        let stopped = vmm.waitStopped(timeoutMillis: patience)
        result.consoleTail = stopped?.consoleTail ?? ""
        if commandDeadlineFired && status == nil {
            result.outcome = .timedOut
            let note = "sandbox: the command did not end within its timeout + \(InputCheck.format(hostGrace)) s; the host stopped the VM\n"
            result.stderr += Array(note.utf8)
            onOutput(.stderr(Array(note.utf8)))
        } else if cancel?.isCancelled == true {
            result.outcome = .infrastructureError(.cancelled)
        } else if let status {
            apply(status, to: &result, onOutput: onOutput)
        } else if let stopped, stopped.stop == .crash {
            result.outcome = .guestCrashed(consoleTail: stopped.consoleTail ?? "")
        } else if let stopped, stopped.stop == .timeout {
            result.outcome = .timedOut
        } else if let stopped {
            // The VM ended on its own (the guest powered off or reset) before the command did.
            let why = "the VM stopped before the command finished (\(stopped.reason ?? "no reason given"))"
            result.outcome = .infrastructureError(SandboxError(.guest, why, underlying: failure))
        } else {
            // No stop report: the VMM process itself went away.
            let how = vmm.reap(patienceMillis: 1000).map(Self.describeExit) ?? "ended"
            result.outcome = .infrastructureError(SandboxError(.vmm, "the VMM process \(how) before the command finished", underlying: failure))
        }
        if let copyOutError, status != nil {
            var e = copyOutError
            e.message += " (the command itself \(result.outcome))"
            result.outcome = .infrastructureError(e)
        }
        if let keepError = stopped?.error {
            // The command ran, but what the caller asked to keep is missing: say so loudly.
            result.outcome = .infrastructureError(keepError)
        }
        vmm.reap(patienceMillis: config.keepDiskPath == nil ? 3000 : 600_000)
        if let keepStaging, stopped?.error == nil, stopped != nil {
            do { try keepStaging.finish() } catch { result.outcome = .infrastructureError(error) }
        }
        result.timings.teardown = ms(tDown)
        result.timings.total = ms(t0)
        return result
    }
}

/// An error kept as its description (for errors that are not `Sendable`).
struct ErrorDescription: Error, Sendable, CustomStringConvertible {
    let description: String
    init(_ e: any Error) {
        if let s = e as? SystemError { description = "\(s.call): \(s.message)"; return }
        if let s = e as? SandboxError { description = s.description; return }
        if let s = e as? AgentClient.Error { description = s.description; return }
        var ns = e as NSError
        if ns.domain == NSCocoaErrorDomain, let inner = ns.userInfo[NSUnderlyingErrorKey] as? NSError { ns = inner }
        description = ns.domain == NSPOSIXErrorDomain ? String(cString: strerror(Int32(ns.code))) : ns.localizedDescription
    }
}

extension SandboxRunner {
    /// The least time copy-out of a run may take before the host stops the VM (more when
    /// the command's timeout is longer).
    static let copyOutSeconds: Double = 300

    /// The configuration's bound on one file transfer, in seconds.
    static func transferSeconds(_ config: SandboxConfiguration) -> Double {
        if let t = config.transferTimeout { return max(0.001, seconds(t)) }
        return max(copyOutSeconds, config.timeout.map(seconds) ?? 0)
    }

    /// A `Duration` in seconds.
    static func seconds(_ d: Duration) -> Double { Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18 }

    /// Refuses copy-in sources that are missing or unreadable, before anything starts.
    static func checkCopyIn(_ copies: [FileCopy]) throws(SandboxError) {
        for c in copies {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: c.hostPath, isDirectory: &isDirectory) else {
                throw SandboxError.invalidInput("copy-in \(c.hostPath): no such file or directory")
            }
            guard FileManager.default.isReadableFile(atPath: c.hostPath) else {
                throw SandboxError.invalidInput("copy-in \(c.hostPath): not a readable \(isDirectory.boolValue ? "directory" : "file")")
            }
        }
    }

    /// Copies each copy-in source into the guest: a file with its host mode, a
    /// directory's tree (files, directories, links, modes) into the guest directory.
    static func copyIn(_ copies: [FileCopy], with client: AgentClient) throws {
        for c in copies {
            var isDirectory: ObjCBool = false
            if FileManager.default.fileExists(atPath: c.hostPath, isDirectory: &isDirectory), isDirectory.boolValue {
                // What the host tree holds that cannot be copied is the caller's error.
                do { try client.writeTree(path: c.guestPath, from: c.hostPath) } catch let e as TarError {
                    throw SandboxError.invalidInput("copy-in \(c.hostPath): \(e)")
                }
                continue
            }
            let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: c.hostPath)))
            let mode = ((try? FileManager.default.attributesOfItem(atPath: c.hostPath)[.posixPermissions]) as? NSNumber)?.uint32Value ?? 0o644
            try client.writeFile(path: c.guestPath, mode: mode, contents: bytes)
        }
    }

    /// Copies the guest file or directory tree at `c.guestPath` to `c.hostPath`, at most
    /// `limit` bytes of file data (a tree also at most a million entries).
    /// - Throws: `SandboxError` with code `.guest` when the guest side fails (no such
    ///   file, a refused tree), `.host` when the host file cannot be written.
    static func copyOut(_ c: FileCopy, limit: UInt64, with client: AgentClient) throws(SandboxError) {
        do { try copyOutRaw(c, limit: limit, with: client, guestFailure: { what, error in
            SandboxError(.guest, "copy-out \(c.guestPath) -> \(c.hostPath): the guest \(what)", underlying: ErrorDescription(error))
        }) } catch let e as SandboxError { throw e } catch {
            throw SandboxError(.guest, "copy-out \(c.guestPath) -> \(c.hostPath)", underlying: ErrorDescription(error))
        }
    }

    /// `copyOut` whose guest-side failures go through `guestFailure` (what failed, the
    /// agent client's error); nil keeps the client's error (a running sandbox tells a
    /// refusal from a broken connection by it).
    static func copyOutRaw(_ c: FileCopy, limit: UInt64, with client: AgentClient,
                           guestFailure: ((String, Swift.Error) -> SandboxError)? = nil) throws {
        let file: [UInt8]?
        do { file = try client.readFileUnlessDirectory(path: c.guestPath, limit: limit) } catch {
            throw guestFailure?("file could not be read", error) ?? error
        }
        guard let bytes = file else {
            var limits = TarLimits()
            limits.maxTotalBytes = limit
            do { try client.readTree(path: c.guestPath, into: c.hostPath, limits: limits) } catch {
                throw guestFailure?("directory could not be copied", error) ?? error
            }
            return
        }
        do {
            let fd = try FileDescriptor.open(c.hostPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode: 0o644)
            defer { fd.close() }
            try writeAll(fd.rawValue, bytes)
        } catch {
            throw SandboxError(.host, "copy-out \(c.guestPath) -> \(c.hostPath): the host file could not be written", underlying: ErrorDescription(error))
        }
    }

    /// The outcome of a command the agent reported on (`status`), into `result`: a
    /// command that could not start is 127/126 with a line on stderr (as a shell says it),
    /// or the caller's error when it is not the command's fault; SIGKILL by the guest's
    /// OOM killer (seen in the console) is `outOfMemory`.
    static func apply(_ status: CommandStatus, to result: inout ExecResult, onOutput: (OutputEvent) -> Void) {
        switch status {
        case .exited(let c): result.outcome = .exited(c)
        case .signalled(let s):
            result.outcome = (s == SIGKILL && result.consoleTail.contains("Out of memory")) ? .outOfMemory : .signalled(s)
        case .timedOut: result.outcome = .timedOut
        case .failedToStart(_, let message) where !message.hasPrefix("execve "):
            // Not the command's fault (its working directory, its user): say which.
            result.outcome = .infrastructureError(.invalidInput("the command could not be started: \(message)"))
        case .failedToStart(let e, let message):
            result.outcome = .exited(e == ENOENT ? 127 : 126)
            let line = "sandbox: \(result.command[0]): \(e == ENOENT ? "command not found" : message)\n"
            result.stderr += Array(line.utf8)
            onOutput(.stderr(Array(line.utf8)))
        }
    }

    /// "exited with status N" / "was killed by signal N" for a `waitpid` status.
    static func describeExit(_ status: Int32) -> String {
        let signal = status & 0x7f
        if signal == 0 { return "exited with status \((status >> 8) & 0xff)" }
        return "was killed by signal \(signal)"
    }
}

/// Cooperative cancellation for a blocking run: `cancel()` stops the VM.
public final class CancelToken: Sendable {
    private struct State {
        var cancelled = false
        var handlers: [@Sendable () -> Void] = []
    }
    private let state = Mutex(State())
    public init() {}
    public var isCancelled: Bool { state.withLock { $0.cancelled } }
    public func cancel() {
        let hs: [@Sendable () -> Void] = state.withLock { s in
            if s.cancelled { return [] }
            s.cancelled = true
            defer { s.handlers = [] }
            return s.handlers
        }
        for h in hs { h() }
    }
    func onCancel(_ h: @escaping @Sendable () -> Void) {
        let now: Bool = state.withLock { s in
            if s.cancelled { return true }
            s.handlers.append(h)
            return false
        }
        if now { h() }
    }
}
