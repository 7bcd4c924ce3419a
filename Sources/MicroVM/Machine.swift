import Bus
import GuestMemory
import KVM
import Synchronization
import SystemShims
import VirtIO
#if canImport(Glibc)
import Glibc
#endif

/// How to build one micro-VM.
public struct MachineConfiguration: Sendable {
    /// Path of the kernel (ELF vmlinux with a PVH note, or a bzImage).
    public var kernelPath: String
    /// Optional initramfs.
    public var initrdPath: String?
    /// Extra kernel command line parameters, appended after the VMM's own.
    public var extraCommandLine: String = ""
    /// Guest RAM in MiB.
    public var memoryMiB: UInt64 = 256
    /// Number of vCPUs.
    public var cpus: Int = 1
    /// Wall-clock limit for the whole run (nil = none).
    public var timeoutSeconds: Double?
    /// Called with console output as it arrives.
    public var consoleSink: (@Sendable (UnsafeRawBufferPointer) -> Void)?
    /// Bytes of console output kept for the result.
    public var consoleCapacity: Int = 256 * 1024
    /// virtio devices, each behind a virtio-mmio transport at consecutive windows from
    /// `Layout.virtioMMIOBase` (device `n` on IRQ `Layout.virtioFirstIRQ + n`). The first
    /// block device is the guest's /dev/vda.
    public var virtioDevices: [any VirtioDevice] = []
    /// Called when the guest writes a boot-timer milestone.
    public var onBootMark: (@Sendable (BootTimer.Mark) -> Void)?

    public init(kernelPath: String) { self.kernelPath = kernelPath }
}

/// Errors building a machine.
public enum MachineError: Error, Sendable, CustomStringConvertible {
    case kernel(String)
    case initrd(String)
    case invalidConfiguration(String)
    case kvm(KVMError)
    case setup(String)
    /// A snapshot could not be taken, or does not fit this configuration or host.
    case snapshot(String)

    public var description: String {
        switch self {
        case .kernel(let s): return "kernel: \(s)"
        case .initrd(let s): return "initrd: \(s)"
        case .invalidConfiguration(let s): return s
        case .kvm(let e): return e.description
        case .setup(let s): return s
        case .snapshot(let s): return "snapshot: \(s)"
        }
    }
}

/// What a finished run looked like.
public struct MachineResult: Sendable {
    public var reason: StopReason
    /// The console output kept (the tail, up to the configured capacity).
    public var console: ConsoleLog
    /// Boot-timer milestones, relative to `startNanos`.
    public var bootMarks: [BootTimer.Mark]
    /// When `Machine.init` began (monotonic ns): the VMM start.
    public var startNanos: UInt64
    /// When the vCPUs were first started.
    public var runNanos: UInt64
    /// When the VM stopped.
    public var stopNanos: UInt64
    /// The vCPU registers at a KVM shutdown exit (triple fault), when that ended the run.
    public var shutdownState: String?

    /// Milliseconds from VMM start to the first write of `value` to the boot-timer port.
    public func millis(toMark value: UInt8) -> Double? {
        bootMarks.first { $0.value == value }.map { Double($0.nanos - startNanos) / 1e6 }
    }
}

/// Edge-triggered interrupt through KVM_IRQFD.
final class IRQFDTrigger: InterruptTrigger {
    let event: EventFD
    init(event: EventFD) { self.event = event }
    func trigger() { event.signal() }
}

/// One micro-VM: guest memory, vCPUs, devices and the run loop. One use: build, `run()`, done.
public final class Machine: Sendable {
    public let configuration: MachineConfiguration
    public let memory: GuestMemory
    public let console: ConsoleLog
    public let bootTimer: BootTimer
    let system: KVMSystem
    /// This host as a snapshot records it; known from the start, so that a snapshot taken
    /// inside the VMM's jail (no /dev or /sys to look at) records the same.
    let host: HostIdentity
    let vm: VirtualMachine
    let vcpus: [VCPU]
    let bus: DeviceBus
    public let startNanos: UInt64
    private let irqEvents: [EventFD]
    private let transports: [MMIOTransport]
    private let serial: Serial
    private let stopEvent: EventFD
    /// Signalled by each vCPU thread once it has parked for a pause.
    private let pausedEvent: EventFD
    /// Signalled (once per vCPU) to let parked vCPU threads go on.
    private let resumeEvent: EventFD
    /// Whether this machine was restored from a snapshot (it does not boot).
    public let restored: Bool
    private struct State {
        var stopReason: StopReason?
        var threads: [NativeThread] = []
        var ran = false
        var runStart: UInt64 = 0
        var shutdownState: String?
        /// A pause is in progress: vCPU threads park and save their state.
        var pauseRequested = false
        var savedVCPUs: [Int: Result<VCPUState, KVMError>] = [:]
    }
    private let state = Mutex(State())

    /// When `run()` started the vCPUs (monotonic ns), or 0 before that.
    public var runStartNanos: UInt64 { state.withLock { $0.runStart } }

    /// The signal used to kick vCPU threads out of KVM_RUN.
    static let kickSignal = SIGUSR2

    /// Builds the VM: opens KVM, allocates and fills guest memory, creates devices and
    /// vCPUs. With `restoring`, the VM is instead rebuilt from a snapshot: guest RAM is
    /// the memory file mapped copy-on-write, and the vCPUs, interrupt controllers, UART
    /// and virtio transports take their saved state (the configuration's devices must be
    /// the snapshot's, in the same order); nothing is loaded and the kernel file is not read.
    public init(_ config: MachineConfiguration, restoring: (snapshot: MachineSnapshot, memoryFD: Int32)? = nil) throws {
        startNanos = monotonicNanos()
        configuration = config
        restored = restoring != nil
        guard config.cpus >= 1 else { throw MachineError.invalidConfiguration("--cpus must be at least 1") }
        guard config.cpus <= MPTable.maxCPUs else {
            throw MachineError.invalidConfiguration("--cpus \(config.cpus) is more than this VMM supports (\(MPTable.maxCPUs))")
        }
        guard config.memoryMiB >= Layout.minimumMemory >> 20 else {
            throw MachineError.invalidConfiguration("--memory \(config.memoryMiB) MiB is too little; the minimum is \(Layout.minimumMemory >> 20) MiB")
        }
        guard config.memoryMiB <= 1 << 20 else {
            throw MachineError.invalidConfiguration("--memory \(config.memoryMiB) MiB is more than 1 TiB")
        }
        guard config.virtioDevices.count <= Layout.maxVirtioDevices else {
            throw MachineError.invalidConfiguration("at most \(Layout.maxVirtioDevices) virtio devices")
        }

        if let r = restoring { try r.snapshot.check(against: config) }

        // Inputs first: bad files fail before any KVM work.
        var kernelBytes: [UInt8] = []
        var image: KernelImage?
        var initrd: [UInt8]?
        if restoring == nil {
            do { kernelBytes = try readWholeFile(config.kernelPath) } catch { throw MachineError.kernel(error.description) }
            do { image = try KernelImage.parse(kernelBytes) } catch { throw MachineError.kernel("\(config.kernelPath): \(error.description)") }
            if let path = config.initrdPath {
                do { initrd = try readWholeFile(path) } catch { throw MachineError.initrd(error.description) }
            }
        }

        var cmdline = KernelCommandLine()
        do {
            try cmdline.append(contentsOf: "console=ttyS0 reboot=t panic=-1")
            for i in config.virtioDevices.indices {
                let base = Layout.virtioMMIOBase + UInt64(i) * Layout.virtioMMIOSize
                try cmdline.append("virtio_mmio.device=4K@0x\(String(base, radix: 16)):\(Layout.virtioFirstIRQ + UInt32(i))")
            }
            try cmdline.append(contentsOf: config.extraCommandLine)
        } catch {
            throw MachineError.invalidConfiguration(error.description)
        }

        // The CPUID leaves serve both the host's identity and every vCPU's CPUID.
        let supported: [kvm_cpuid_entry2]
        do {
            system = try KVMSystem()
            let maxVCPUs = Int(max(system.check(.maxVCPUs), system.check(.nrVCPUs)))
            if maxVCPUs > 0 && config.cpus > maxVCPUs {
                throw MachineError.invalidConfiguration("--cpus \(config.cpus) is more than this host's KVM allows (\(maxVCPUs))")
            }
            supported = try system.supportedCPUID()
            host = try HostIdentity.current(system, cpuid: supported)
            if let r = restoring {
                guard host == r.snapshot.host else {
                    throw MachineError.snapshot("taken on \(r.snapshot.host); this host is \(host)")
                }
            }
            vm = try system.createVM()
            if let r = restoring {
                do { memory = try GuestMemory(restoringFrom: r.memoryFD, size: config.memoryMiB << 20) } catch {
                    throw MachineError.snapshot("\(error)")
                }
            } else {
                memory = try GuestMemory(size: config.memoryMiB << 20)
            }
            try vm.setTSSAddress(0xFFFB_D000)
            try vm.mapMemory(memory)
            try vm.createIRQChip()
            try vm.createPIT()
        } catch let e as KVMError {
            throw MachineError.kvm(e)
        }

        // Guest memory contents (a restored VM's are in the memory file).
        var entry: BootEntry?
        if let image {
            entry = try BootLoader.load(kernel: image, kernelBytes: kernelBytes, initrd: initrd, commandLine: cmdline, memory: memory)
            try CPUSetup.writeDescriptorTables(memory)
            try CPUSetup.writeIdentityPageTables(memory)
            try MPTable.write(cpus: config.cpus, to: memory)
        }

        // Devices.
        console = ConsoleLog(capacity: config.consoleCapacity, sink: config.consoleSink)
        bootTimer = BootTimer(onMark: config.onBootMark)
        stopEvent = try EventFD()
        pausedEvent = try EventFD()
        resumeEvent = try EventFD(nonBlocking: true, semaphore: true)
        var bus = DeviceBus()
        var irqEvents: [EventFD] = []
        do {
            let serialIRQ = try EventFD()
            try vm.registerIRQFD(serialIRQ, gsi: Layout.serialIRQ)
            irqEvents.append(serialIRQ)
            let serial = Serial(output: console, interrupt: IRQFDTrigger(event: serialIRQ))
            if let r = restoring { serial.restore(r.snapshot.serial) }
            self.serial = serial
            try bus.addPorts(base: Layout.serialCOM1, count: 8, serial)
            try bus.addPorts(base: Layout.bootTimerPort, count: 1, bootTimer)
            let stopBox = WeakReference<Machine>()  // set at the end of init, before any vCPU runs
            try bus.addPorts(base: Layout.i8042Command, count: 1, I8042(onReset: { stopBox.object?.requestStop(.guestReset) }))
            var transports: [MMIOTransport] = []
            for (i, dev) in config.virtioDevices.enumerated() {
                let base = Layout.virtioMMIOBase + UInt64(i) * Layout.virtioMMIOSize
                let irq = try EventFD()
                try vm.registerIRQFD(irq, gsi: Layout.virtioFirstIRQ + UInt32(i))
                irqEvents.append(irq)
                let transport = try MMIOTransport(device: dev, memory: memory, interrupt: IRQFDTrigger(event: irq))
                // Queue notifications go straight from KVM to the device's worker thread;
                // without ioeventfd the MMIO exit signals the same eventfd.
                if system.check(.ioeventfd) > 0 {
                    for q in 0..<transport.queueCount {
                        if let event = transport.notifyEventFD(forQueue: q) {
                            try vm.registerIOEventFD(event, mmioAddress: base + MMIOTransport.queueNotifyOffset, length: 4, datamatch: UInt64(q))
                        }
                    }
                }
                if let r = restoring {
                    do { try transport.restore(r.snapshot.transports[i]) } catch {
                        throw MachineError.snapshot("virtio device \(i): \(error)")
                    }
                }
                try bus.addMMIO(base: base, size: Layout.virtioMMIOSize, transport)
                transports.append(transport)
            }
            self.bus = bus
            self.irqEvents = irqEvents
            self.transports = transports

            // vCPUs.
            var vcpus: [VCPU] = []
            for id in 0..<config.cpus {
                let vcpu = try vm.createVCPU(id: id)
                try vcpu.setCPUID(CPUIDPolicy.entries(from: supported, vcpuID: id, vcpuCount: config.cpus))
                if let r = restoring {
                    try vcpu.restoreState(r.snapshot.vcpus[id], xsaveSize: system.xsaveSize)
                } else if id == 0, let entry {
                    let base = try vcpu.specialRegisters()
                    let (regs, sregs): (Registers, SpecialRegisters)
                    switch entry {
                    case let .pvh(e, startInfo): (regs, sregs) = CPUSetup.pvhState(base: base, entry: e, startInfo: startInfo)
                    case let .linux64(e, zeroPage): (regs, sregs) = CPUSetup.longModeState(base: base, entry: e, rsi: zeroPage.rawValue)
                    }
                    try vcpu.setSpecialRegisters(sregs)
                    try vcpu.setRegisters(regs)
                    try vcpu.resetFPU()
                }
                vcpus.append(vcpu)
            }
            self.vcpus = vcpus
            if let r = restoring {
                try vm.restoreState(r.snapshot.vm)
                for v in vcpus { try v.tellGuestItWasPaused() }
            }
            stopBox.object = self
        } catch let e as KVMError {
            if case .invalidState(let why) = e { throw MachineError.snapshot(why) }
            throw MachineError.kvm(e)
        }
    }

    /// Boots the guest and blocks until it stops (guest reset/power-off, crash, timeout,
    /// KVM error, or `requestStop`). Call once.
    public func run() throws -> MachineResult {
        let ran = state.withLock { s in
            defer { s.ran = true }
            return s.ran
        }
        precondition(!ran, "Machine.run() may only be called once")
        installKickSignalHandler(Self.kickSignal)
        for t in transports { try t.start() }
        defer { for t in transports { t.stop() } }
        if restored {
            // A doorbell the guest rang just before the snapshot may not have been served:
            // one spurious notification per queue is always allowed, and serves it.
            for t in transports { for q in 0..<t.queueCount { t.notifyEventFD(forQueue: q)?.signal() } }
        }
        let runNanos = monotonicNanos()
        state.withLock { $0.runStart = runNanos }
        let bus = self.bus
        for vcpu in vcpus {
            let t = try NativeThread(name: "vcpu\(vcpu.id)") { [self] in
                self.runLoop(vcpu, bus: bus)
            }
            state.withLock { $0.threads.append(t) }
        }
        // Wait for the first stop or the deadline.
        let timeoutMillis: Int32 = configuration.timeoutSeconds.map { Int32(min(max($0 * 1000, 1), Double(Int32.max))) } ?? -1
        if !waitReadable(stopEvent.fd.rawValue, timeoutMillis: timeoutMillis) {
            requestStop(.timeout)
        }
        let all = state.withLock { $0.threads }
        for t in all { t.join() }
        let (reason, shutdownState) = state.withLock { ($0.stopReason ?? .stopRequested, $0.shutdownState) }
        var result = MachineResult(reason: reason, console: console, bootMarks: bootTimer.recorded,
                                   startNanos: startNanos, runNanos: runNanos, stopNanos: monotonicNanos())
        result.shutdownState = shutdownState
        return result
    }

    /// Asks the VM to stop; the first reason wins. Safe from any thread.
    public func requestStop(_ reason: StopReason) {
        let toKick: [NativeThread] = state.withLock { s in
            if s.stopReason == nil { s.stopReason = reason }
            return s.threads
        }
        for v in vcpus { v.requestExit() }
        for t in toKick { t.kill(Self.kickSignal) }
        stopEvent.signal()
    }

    private var stopping: Bool { state.withLock { $0.stopReason != nil } }

    /// Where a vCPU was when KVM reported a shutdown (triple fault): every run of ours
    /// ends that way (`reboot=t`), and one that happens early says where the guest died.
    private func recordShutdownState(_ vcpu: VCPU) {
        guard let r = try? vcpu.registers(), let s = try? vcpu.specialRegisters() else { return }
        func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
        let text = "RIP \(hex(r.rip)), RSP \(hex(r.rsp)), CR0 \(hex(s.cr0)), CR2 \(hex(s.cr2)), CR3 \(hex(s.cr3)), CR4 \(hex(s.cr4)), EFER \(hex(s.efer))"
        state.withLock { if $0.shutdownState == nil { $0.shutdownState = text } }
    }

    private func runLoop(_ vcpu: VCPU, bus: DeviceBus) {
        unblockSignalInCurrentThread(Self.kickSignal)
        while !stopping {
            if state.withLock({ $0.pauseRequested }) {
                park(vcpu)
                continue
            }
            let exit: VCPUExit
            do { exit = try vcpu.run() } catch {
                requestStop(.kvmError(error.description))
                return
            }
            if case .stop(let reason) = ExitHandler.handle(exit, bus: bus) {
                if case .shutdown = exit { recordShutdownState(vcpu) }
                requestStop(reason)
                return
            }
        }
    }
}

// MARK: - Pause, snapshot, resume

extension Machine {
    /// On a vCPU's own thread: saves its state for the snapshot, says it is parked, and
    /// waits to be resumed (or for the VM to stop).
    private func park(_ vcpu: VCPU) {
        let saved: Result<VCPUState, KVMError>
        do throws(KVMError) {
            saved = .success(try vcpu.saveState(msrIndices: try system.msrIndexList(), xsaveSize: system.xsaveSize))
        } catch { saved = .failure(error) }
        state.withLock { $0.savedVCPUs[vcpu.id] = saved }
        pausedEvent.signal()
        while true {
            var fds = [pollfd(fd: resumeEvent.fd.rawValue, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: stopEvent.fd.rawValue, events: Int16(POLLIN), revents: 0)]
            let r = poll(&fds, 2, -1)
            if r < 0 && errno == EINTR { continue }
            if fds[0].revents != 0 && resumeEvent.wait() > 0 { break }
            if fds[1].revents != 0 { break }
        }
        if !stopping { vcpu.clearExitRequest() }
    }

    /// Stops every vCPU where it is (each saves its own state) and the device workers
    /// (each finishes the request it is serving), so the VM is quiescent. Blocks until
    /// then. Call from any thread but a vCPU's, while `run()` is running.
    public func pause() throws {
        let threads: [NativeThread] = state.withLock { s in
            s.pauseRequested = true
            s.savedVCPUs = [:]
            return s.threads
        }
        for v in vcpus { v.requestExit() }
        for t in threads { t.kill(Self.kickSignal) }
        var parked = 0
        while parked < vcpus.count {
            guard waitReadable(pausedEvent.fd.rawValue, timeoutMillis: 10_000) else {
                throw MachineError.snapshot("the vCPUs did not stop within 10 s for the snapshot (\(parked) of \(vcpus.count) did)")
            }
            parked += Int(pausedEvent.wait())
        }
        for t in transports { t.stop() }
    }

    /// The paused VM's state; with `memoryFD`, guest RAM is written to it too (the memory
    /// file; see `GuestMemory.write(to:)`). Call between `pause()` and `resume()`.
    public func snapshot(memoryFD: Int32?) throws -> MachineSnapshot {
        let saved = state.withLock { $0.savedVCPUs }
        var vcpuStates: [VCPUState] = []
        for v in vcpus {
            switch saved[v.id] {
            case .success(let s)?: vcpuStates.append(s)
            case .failure(let e)?: throw MachineError.snapshot("vCPU \(v.id): \(e)")
            case nil: throw MachineError.snapshot("vCPU \(v.id) is not paused")
            }
        }
        for t in transports { t.settle() }
        let vmState: VMState
        do { vmState = try vm.saveState() } catch { throw MachineError.kvm(error) }
        if let memoryFD { try memory.write(to: memoryFD) }
        return MachineSnapshot(host: host, memoryBytes: memory.size, cpus: vcpus.count, vcpus: vcpuStates, vm: vmState,
                               serial: serial.snapshot, transports: transports.map(\.state),
                               deviceTypes: transports.map(\.device.deviceType))
    }

    /// Lets a paused VM go on.
    public func resume() throws {
        for t in transports { try t.start() }
        state.withLock { $0.pauseRequested = false }
        resumeEvent.signal(UInt64(vcpus.count))
    }
}


