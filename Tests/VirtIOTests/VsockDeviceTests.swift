#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import SystemShims
import Testing
@testable import VirtIO

@Suite("virtio-vsock")
struct VsockDeviceTests {
    // MARK: Header and config

    @Test func headerRoundTrip() {
        let h = VsockHeader(srcCID: 3, dstCID: 2, srcPort: 1024, dstPort: 49152, len: 7, type: 1, op: VsockOp.rw,
                            flags: 3, bufAlloc: 0x12345678, fwdCnt: 0x9abcdef0)
        let bytes = h.bytes
        #expect(bytes.count == 44)
        #expect(bytes[0] == 3 && bytes[8] == 2 && bytes[16] == 0x00 && bytes[17] == 0x04)
        #expect(bytes[30] == 5 && bytes[36] == 0x78 && bytes[43] == 0x9a)
        #expect(VsockHeader(decoding: bytes) == h)
    }

    @Test func configSpaceAndTransport() throws {
        let memory = try GuestMemory(size: 1 << 20)
        let device = VsockDevice(guestCID: 7)
        let transport = try MMIOTransport(device: device, memory: memory, interrupt: CountingTrigger())
        #expect(transport.read32(VirtioMMIORegister.deviceID) == 19)
        #expect(transport.queueCount == 3)
        #expect(transport.read32(VirtioMMIORegister.config) == 7)
        #expect(transport.read32(VirtioMMIORegister.config + 4) == 0)
        #expect(transport.read32(VirtioMMIORegister.config + 8) == 0)
        #expect(device.deviceFeatures == VIRTIO_F_VERSION_1)
        #expect(throws: VsockError.notActive) { try device.connect(guestPort: 1024, timeoutMillis: 10) }
    }

    // MARK: Handshake and data

    @Test func connectHandshake() throws {
        let g = try VsockGuest()
        let pending = Background { () throws(VsockError) in try g.device.connect(guestPort: 1024, timeoutMillis: 5000) }
        let request = try #require(try g.next(op: VsockOp.request))
        let h = request.header
        #expect(h.srcCID == 2 && h.dstCID == 3 && h.dstPort == 1024 && h.type == VsockType.stream && h.len == 0)
        #expect(VsockConfiguration().ephemeralPorts.contains(h.srcPort))
        #expect(h.bufAlloc == 256 << 10 && h.fwdCnt == 0)
        #expect(!pending.isDone)
        try g.send(g.header(op: VsockOp.response, srcPort: 1024, dstPort: h.srcPort))
        let conn = try #require(try pending.wait()?.get())
        #expect(conn.localPort == h.srcPort && conn.peerPort == 1024 && conn.hostInitiated)
        #expect(conn.state.phase == .connected)
        #expect(g.trigger.value > 0)
        #expect(g.device.state.connections.count == 1)
    }

    @Test func smallDataBothWays() throws {
        let g = try VsockGuest()
        let (conn, req) = try g.establish()
        try conn.write(Array("hello guest".utf8), timeoutMillis: 2000)
        let p = try #require(try g.next(op: VsockOp.rw))
        #expect(p.payload == Array("hello guest".utf8))
        #expect(p.header.srcPort == req.header.srcPort && p.header.dstPort == 1024)

        try g.send(g.header(op: VsockOp.rw, srcPort: 1024, dstPort: conn.localPort), payload: Array("hello host".utf8))
        #expect(try conn.read(maxCount: 100, timeoutMillis: 2000) == Array("hello host".utf8))
        // Reading everything sends a credit update with the new fwd_cnt.
        let update = try #require(try g.next(op: VsockOp.creditUpdate))
        #expect(update.header.fwdCnt == 10)
    }

    @Test(arguments: [false, true])
    func oneMiBHostToGuest(splitRx: Bool) throws {
        let g = try VsockGuest(splitRx: splitRx)
        let guestBuf: UInt32 = 64 << 10
        let (conn, _) = try g.establish(guestBufAlloc: guestBuf)
        let data = randomBytes(1 << 20, seed: 42)
        let writer = Background { () throws(VsockError) in try conn.write(data, timeoutMillis: 20_000) }
        var got: [UInt8] = []
        var guestFwd: UInt32 = 0
        var creditRequests = 0
        let end = monotonicNanos() + 20_000_000_000
        while got.count < data.count, monotonicNanos() < end {
            guard let p = try g.next(timeoutMillis: 2000) else { break }
            switch p.op {
            case VsockOp.rw:
                got += p.payload
                // The host never sends beyond our advertised window.
                #expect(UInt32(got.count) &- guestFwd <= guestBuf)
                if UInt32(got.count) &- guestFwd >= 16 << 10 {
                    guestFwd = UInt32(got.count)
                    try g.send(g.header(op: VsockOp.creditUpdate, srcPort: 1024, dstPort: conn.localPort,
                                        bufAlloc: guestBuf, fwdCnt: guestFwd))
                }
            case VsockOp.creditRequest:
                creditRequests += 1
                guestFwd = UInt32(got.count)
                try g.send(g.header(op: VsockOp.creditUpdate, srcPort: 1024, dstPort: conn.localPort,
                                    bufAlloc: guestBuf, fwdCnt: guestFwd))
            default:
                Issue.record("unexpected \(p.header)")
            }
        }
        #expect(got.count == data.count)
        #expect(got == data)
        let result = try #require(writer.wait())
        #expect((try? result.get()) != nil)
        #expect(conn.state.txCount == UInt32(data.count))
    }

    @Test func oneMiBGuestToHost() throws {
        var config = VsockConfiguration()
        config.bufferSize = 128 << 10
        let g = try VsockGuest(configuration: config)
        let (conn, req) = try g.establish()
        let data = randomBytes(1 << 20, seed: 7)
        let reader = Background { () throws(VsockError) -> [UInt8] in
            var out: [UInt8] = []
            while true {
                let chunk = try conn.read(maxCount: 50_000, timeoutMillis: 10_000)
                if chunk.isEmpty { return out }
                out += chunk
            }
        }
        var hostBuf = req.header.bufAlloc
        var hostFwd = req.header.fwdCnt
        #expect(hostBuf == 128 << 10)
        var sent = 0
        var updates = 0
        let end = monotonicNanos() + 20_000_000_000
        func absorb(_ p: VsockTestPacket) {
            if p.op == VsockOp.creditUpdate { updates += 1 }
            hostBuf = p.header.bufAlloc
            hostFwd = p.header.fwdCnt
        }
        while sent < data.count, monotonicNanos() < end {
            let inFlight = UInt32(sent) &- hostFwd
            let credit = Int(hostBuf) - Int(inFlight)
            if credit > 0 {
                let n = min(credit, 4096, data.count - sent)
                try g.send(g.header(op: VsockOp.rw, srcPort: 1024, dstPort: conn.localPort),
                           payload: Array(data[sent ..< sent + n]))
                sent += n
                try g.collect()
                while let p = try g.next(timeoutMillis: 0) { absorb(p) }
            } else if let p = try g.next(timeoutMillis: 2000) {
                absorb(p)
            }
        }
        #expect(sent == data.count)
        try g.send(g.header(op: VsockOp.shutdown, srcPort: 1024, dstPort: conn.localPort, flags: VsockShutdown.send))
        let got = try #require(try reader.wait(timeoutMillis: 10_000)?.get())
        #expect(got.count == data.count)
        #expect(got == data)
        #expect(updates >= 4)
    }

    // MARK: Connection lifecycle

    @Test func guestResetRefusesConnect() throws {
        let g = try VsockGuest()
        let pending = Background { () throws(VsockError) in try g.device.connect(guestPort: 1024, timeoutMillis: 5000) }
        let request = try #require(try g.next(op: VsockOp.request))
        try g.send(g.header(op: VsockOp.rst, srcPort: 1024, dstPort: request.header.srcPort))
        let result = try #require(pending.wait())
        #expect(throws: VsockError.connectionRefused(port: 1024)) { try result.get() }
        #expect(g.device.state.connections.isEmpty)
        // No RST answers an RST.
        #expect(try g.drain(quietMillis: 50).isEmpty)
    }

    @Test func connectTimesOutAndResets() throws {
        let g = try VsockGuest()
        let start = monotonicNanos()
        #expect(throws: VsockError.timedOut) { try g.device.connect(guestPort: 1024, timeoutMillis: 150) }
        #expect(monotonicNanos() - start < 3_000_000_000)
        let packets = try g.drain(quietMillis: 50)
        #expect(packets.map(\.op) == [VsockOp.request, VsockOp.rst])
        #expect(g.device.state.connections.isEmpty)
    }

    @Test func closeSendsShutdownThenReset() throws {
        let g = try VsockGuest()
        let (conn, _) = try g.establish()
        try conn.write([1, 2, 3])
        conn.close()
        let packets = try g.drain(quietMillis: 50)
        #expect(packets.map(\.op) == [VsockOp.rw, VsockOp.shutdown, VsockOp.rst])
        #expect(packets[1].header.flags == VsockShutdown.both)
        #expect(throws: VsockError.closed) { try conn.read(maxCount: 10, timeoutMillis: 100) }
        #expect(throws: VsockError.closed) { try conn.write([1]) }
        #expect(g.device.state.connections.isEmpty)
        // A late guest packet for the closed connection is answered with RST.
        try g.send(g.header(op: VsockOp.rw, srcPort: 1024, dstPort: conn.localPort), payload: [9])
        #expect(try g.next(op: VsockOp.rst, timeoutMillis: 1000) != nil)
    }

    @Test func shutdownBothWaysEndsWithEOF() throws {
        let g = try VsockGuest()
        let (conn, _) = try g.establish()
        conn.shutdownWrite()
        let sd = try #require(try g.next(op: VsockOp.shutdown))
        #expect(sd.header.flags == VsockShutdown.send)
        #expect(throws: VsockError.closed) { try conn.write([1]) }
        try g.send(g.header(op: VsockOp.rw, srcPort: 1024, dstPort: conn.localPort), payload: Array("bye".utf8))
        try g.send(g.header(op: VsockOp.shutdown, srcPort: 1024, dstPort: conn.localPort, flags: VsockShutdown.send))
        #expect(try conn.read(maxCount: 10, timeoutMillis: 1000) == Array("bye".utf8))
        #expect(try conn.read(maxCount: 10, timeoutMillis: 1000) == [])
        #expect(try g.next(op: VsockOp.rst) != nil)
        #expect(g.device.state.connections.isEmpty)
    }

    @Test func guestShutdownReceiveBreaksWrites() throws {
        let g = try VsockGuest()
        let (conn, _) = try g.establish()
        try g.send(g.header(op: VsockOp.shutdown, srcPort: 1024, dstPort: conn.localPort, flags: VsockShutdown.receive))
        #expect(throws: VsockError.brokenPipe) { try conn.write([1], timeoutMillis: 500) }
    }

    @Test func guestResetWhileOpen() throws {
        let g = try VsockGuest()
        let (conn, _) = try g.establish()
        try g.send(g.header(op: VsockOp.rw, srcPort: 1024, dstPort: conn.localPort), payload: [5, 6])
        try g.send(g.header(op: VsockOp.rst, srcPort: 1024, dstPort: conn.localPort))
        // Data received before the RST is still readable, then end of stream.
        #expect(try conn.read(maxCount: 10, timeoutMillis: 1000) == [5, 6])
        #expect(try conn.read(maxCount: 10, timeoutMillis: 1000) == [])
        #expect(throws: VsockError.connectionReset) { try conn.write([1]) }
        #expect(g.device.state.connections.isEmpty)
    }

    @Test func readinessFDFollowsData() throws {
        let g = try VsockGuest()
        let (conn, _) = try g.establish()
        let fd = conn.readinessFD.fd.rawValue
        #expect(!waitReadable(fd, timeoutMillis: 0))
        #expect(try conn.tryRead(into: UnsafeMutableRawBufferPointer.allocate(byteCount: 1, alignment: 1)) == nil)
        try g.send(g.header(op: VsockOp.rw, srcPort: 1024, dstPort: conn.localPort), payload: [1, 2, 3])
        #expect(waitReadable(fd, timeoutMillis: 0))
        #expect(try conn.read(maxCount: 2) == [1, 2])
        #expect(waitReadable(fd, timeoutMillis: 0))
        #expect(try conn.read(maxCount: 2) == [3])
        #expect(!waitReadable(fd, timeoutMillis: 0))
        try g.send(g.header(op: VsockOp.shutdown, srcPort: 1024, dstPort: conn.localPort, flags: VsockShutdown.send))
        #expect(waitReadable(fd, timeoutMillis: 0))
        #expect(try conn.read(maxCount: 2) == [])
    }

    @Test func guestInitiatedConnection() throws {
        let g = try VsockGuest()
        let accepted = AcceptBox()
        try g.device.listen(port: 5000) { accepted.put($0) }
        #expect(throws: VsockError.portInUse(5000)) { try g.device.listen(port: 5000) { _ in } }
        try g.send(g.header(op: VsockOp.request, srcPort: 3333, dstPort: 5000))
        let response = try #require(try g.next(op: VsockOp.response))
        #expect(response.header.srcPort == 5000 && response.header.dstPort == 3333)
        let conn = try #require(accepted.take())
        #expect(!conn.hostInitiated && conn.localPort == 5000 && conn.peerPort == 3333)
        try g.send(g.header(op: VsockOp.rw, srcPort: 3333, dstPort: 5000), payload: [42])
        #expect(try conn.read(maxCount: 4, timeoutMillis: 1000) == [42])
        try conn.write([43], timeoutMillis: 1000)
        #expect(try g.next(op: VsockOp.rw)?.payload == [43])
        // Nobody listens on 5001.
        try g.send(g.header(op: VsockOp.request, srcPort: 3334, dstPort: 5001))
        let rst = try #require(try g.next(op: VsockOp.rst))
        #expect(rst.header.srcPort == 5001 && rst.header.dstPort == 3334)
    }

    @Test func manyConcurrentStreams() throws {
        let g = try VsockGuest()
        var conns: [VsockConnection] = []
        for _ in 0 ..< 8 { conns.append(try g.establish().0) }
        #expect(Set(conns.map(\.localPort)).count == 8)
        for (i, c) in conns.enumerated() {
            try g.send(g.header(op: VsockOp.rw, srcPort: 1024, dstPort: c.localPort), payload: [UInt8(i)])
            try c.write([UInt8(100 + i)])
        }
        for (i, c) in conns.enumerated() {
            #expect(try c.read(maxCount: 4, timeoutMillis: 1000) == [UInt8(i)])
        }
        let rws = try g.drain(quietMillis: 50).filter { $0.op == VsockOp.rw }
        #expect(rws.count == 8)
        for p in rws {
            let i = try #require(conns.firstIndex { $0.localPort == p.header.srcPort })
            #expect(p.payload == [UInt8(100 + i)])
        }
    }

    // MARK: Flow control

    @Test func hostRespectsGuestCredit() throws {
        let g = try VsockGuest()
        let (conn, _) = try g.establish(guestBufAlloc: 8192)
        let data = randomBytes(20_000, seed: 3)
        let writer = Background { () throws(VsockError) in try conn.write(data, timeoutMillis: 10_000) }
        var got: [UInt8] = []
        var ops: [UInt16] = []
        for p in try g.drain(quietMillis: 150) { ops.append(p.op); got += p.payload }
        #expect(got.count == 8192)
        #expect(ops.contains(VsockOp.creditRequest))
        #expect(!writer.isDone)
        try g.send(g.header(op: VsockOp.creditUpdate, srcPort: 1024, dstPort: conn.localPort, bufAlloc: 8192, fwdCnt: 8192))
        for p in try g.drain(quietMillis: 150) where p.op == VsockOp.rw { got += p.payload }
        #expect(got.count == 16384)
        try g.send(g.header(op: VsockOp.creditUpdate, srcPort: 1024, dstPort: conn.localPort, bufAlloc: 8192, fwdCnt: 16384))
        let result = try #require(writer.wait(timeoutMillis: 5000))
        #expect((try? result.get()) != nil)
        for p in try g.drain(quietMillis: 50) where p.op == VsockOp.rw { got += p.payload }
        #expect(got == data)
    }

    @Test func backlogIsBoundedWithoutRxBuffers() throws {
        let g = try VsockGuest()
        let (conn, _) = try g.establish(guestBufAlloc: UInt32.max)
        _ = try g.drain(quietMillis: 20)
        // The guest stops posting rx buffers (collect without reposting drains them).
        let blocked = Background { () throws(VsockError) in try conn.write(randomBytes(1 << 20, seed: 1), timeoutMillis: 300) }
        usleep(100_000)
        try g.collect(repost: false)
        let result = try #require(blocked.wait(timeoutMillis: 5000))
        #expect(throws: VsockError.timedOut) { try result.get() }
        #expect(conn.state.backlogBytes <= VsockConfiguration().maxBacklogBytes)
    }

    @Test func hostSendsCreditUpdatesAsItReads() throws {
        var config = VsockConfiguration()
        config.bufferSize = 16384
        let g = try VsockGuest(configuration: config)
        let (conn, _) = try g.establish()
        try g.send(g.header(op: VsockOp.rw, srcPort: 1024, dstPort: conn.localPort), payload: randomBytes(16384, seed: 9))
        // The guest asks for credit; the host answers with its current fwd_cnt.
        try g.send(g.header(op: VsockOp.creditRequest, srcPort: 1024, dstPort: conn.localPort))
        #expect(try g.next(op: VsockOp.creditUpdate)?.header.fwdCnt == 0)
        #expect(try conn.read(maxCount: 16384, timeoutMillis: 1000).count == 16384)
        let update = try #require(try g.next(op: VsockOp.creditUpdate))
        #expect(update.header.fwdCnt == 16384 && update.header.bufAlloc == 16384)
    }

    // MARK: Hostile guest

    /// Sends `bad` on the first of two connections: the first must be reset (RST on
    /// rx, reads fail), the second must keep working.
    private func expectResetOnlyFirst(_ g: VsockGuest, _ send: (VsockConnection) throws -> Void) throws {
        let (a, _) = try g.establish()
        let (b, _) = try g.establish()
        _ = try g.drain(quietMillis: 20)
        try send(a)
        let rst = try #require(try g.next(op: VsockOp.rst, timeoutMillis: 1000))
        #expect(rst.header.srcPort == a.localPort && rst.header.dstPort == 1024)
        #expect(throws: VsockError.self) { try a.read(maxCount: 4, timeoutMillis: 500) }
        #expect(throws: VsockError.self) { try a.write([1], timeoutMillis: 500) }
        #expect(g.device.state.connections.map(\.localPort) == [b.localPort])
        try b.write([7], timeoutMillis: 1000)
        #expect(try g.next(op: VsockOp.rw)?.payload == [7])
        try g.send(g.header(op: VsockOp.rw, srcPort: 1024, dstPort: b.localPort), payload: [8])
        #expect(try b.read(maxCount: 4, timeoutMillis: 1000) == [8])
        #expect(g.device.lastError == nil)
    }

    @Test func wrongSourceCIDResetsConnection() throws {
        let g = try VsockGuest()
        try expectResetOnlyFirst(g) { a in
            var h = g.header(op: VsockOp.rw, srcPort: 1024, dstPort: a.localPort)
            h.srcCID = 4
            try g.send(h, payload: [1])
        }
        #expect(g.device.statistics.rejectedPackets == 1)
    }

    @Test func wrongDestinationCIDResetsConnection() throws {
        let g = try VsockGuest()
        try expectResetOnlyFirst(g) { a in
            var h = g.header(op: VsockOp.rw, srcPort: 1024, dstPort: a.localPort)
            h.dstCID = 1
            try g.send(h, payload: [1])
        }
    }

    @Test func unknownTypeResetsConnection() throws {
        let g = try VsockGuest()
        try expectResetOnlyFirst(g) { a in
            var h = g.header(op: VsockOp.rw, srcPort: 1024, dstPort: a.localPort)
            h.type = 2
            try g.send(h, payload: [1])
        }
    }

    @Test func unknownOpResetsConnection() throws {
        let g = try VsockGuest()
        try expectResetOnlyFirst(g) { a in
            try g.send(g.header(op: 99, srcPort: 1024, dstPort: a.localPort))
        }
    }

    @Test func lengthBeyondChainResetsConnection() throws {
        let g = try VsockGuest()
        try expectResetOnlyFirst(g) { a in
            // len says 100, the chain carries 10 payload bytes.
            try g.send(g.header(op: VsockOp.rw, srcPort: 1024, dstPort: a.localPort, len: 100), payload: Array(repeating: 1, count: 10))
        }
        #expect(g.device.state.connections.allSatisfy { $0.bufferedBytes == 0 })
    }

    @Test func lengthAboveCapResetsConnection() throws {
        let g = try VsockGuest()
        try expectResetOnlyFirst(g) { a in
            try g.send(g.header(op: VsockOp.rw, srcPort: 1024, dstPort: a.localPort), payload: Array(repeating: 1, count: (64 << 10) + 1))
        }
    }

    @Test func dataBeyondCreditResetsConnection() throws {
        var config = VsockConfiguration()
        config.bufferSize = 4096
        let g = try VsockGuest(configuration: config)
        try expectResetOnlyFirst(g) { a in
            try g.send(g.header(op: VsockOp.rw, srcPort: 1024, dstPort: a.localPort), payload: Array(repeating: 1, count: 4000))
            try g.send(g.header(op: VsockOp.rw, srcPort: 1024, dstPort: a.localPort), payload: Array(repeating: 2, count: 97))
            #expect(a.state.bufferedBytes == 4000)
        }
    }

    @Test func unexpectedOpsInStates() throws {
        let g = try VsockGuest()
        // RESPONSE on an open connection.
        try expectResetOnlyFirst(g) { a in
            try g.send(g.header(op: VsockOp.response, srcPort: 1024, dstPort: a.localPort))
        }
        // RW while the host still waits for RESPONSE.
        let pending = Background { () throws(VsockError) in try g.device.connect(guestPort: 1024, timeoutMillis: 5000) }
        let request = try #require(try g.next(op: VsockOp.request))
        try g.send(g.header(op: VsockOp.rw, srcPort: 1024, dstPort: request.header.srcPort), payload: [1])
        let result = try #require(pending.wait())
        #expect(throws: VsockError.self) { try result.get() }
        #expect(try g.next(op: VsockOp.rst) != nil)
    }

    @Test func packetsForUnknownConnections() throws {
        var config = VsockConfiguration()
        config.maxPendingResets = 16
        let g = try VsockGuest(configuration: config, rxBuffers: 0)
        // With no rx buffers, RST replies pile up only to the limit; then the device
        // stops taking tx packets (they wait in the ring) instead of dropping answers.
        for port in 0 ..< UInt32(40) {
            try g.send(g.header(op: VsockOp.rw, srcPort: 4000 + port, dstPort: 6000), payload: [1])
        }
        // RST, CREDIT_UPDATE etc. for nothing: RST is never answered.
        try g.send(g.header(op: VsockOp.rst, srcPort: 4000, dstPort: 6000))
        #expect(g.device.state.pendingResets == 16)
        #expect(g.device.statistics.resetsDropped == 0)
        // Rx buffers: every packet is answered, in order, none dropped.
        try g.postRx(count: 64)
        let packets = try g.drain(quietMillis: 50)
        #expect(packets.count == 40)
        #expect(packets.allSatisfy { $0.op == VsockOp.rst && $0.header.srcPort == 6000 && $0.header.dstCID == 3 })
        #expect(packets.map(\.header.dstPort) == (0 ..< 40).map { 4000 + $0 })
        #expect(g.device.statistics.resetsDropped == 0)
        #expect(g.device.state.connections.isEmpty && g.device.lastError == nil)
    }

    @Test func hostileCreditCountersDoNotOverflow() throws {
        let g = try VsockGuest()
        let (conn, _) = try g.establish(guestBufAlloc: 4096)
        // fwd_cnt far ahead of what the host sent: no credit, not 4 GiB of it.
        try g.send(g.header(op: VsockOp.creditUpdate, srcPort: 1024, dstPort: conn.localPort, bufAlloc: 4096, fwdCnt: 0x8000_0000))
        #expect(conn.state.peerBufAlloc == 4096)
        #expect(throws: VsockError.timedOut) { try conn.write([1], timeoutMillis: 100) }
    }

    @Test func zeroCreditSpamDoesNotGrowTheOutbox() throws {
        let g = try VsockGuest()
        let (conn, _) = try g.establish(guestBufAlloc: 64 * 4096)
        // Fill all 64 rx buffers and do not repost them: nothing more can be delivered.
        try conn.write(randomBytes(64 * 4096, seed: 5), timeoutMillis: 2000)
        try g.collect(repost: false)
        #expect(g.device.state.connections.first?.backlogBytes == 0)
        let writer = Background { () throws(VsockError) in try conn.write([1], timeoutMillis: 1000) }
        usleep(20_000)
        for _ in 0 ..< 500 {
            try g.send(g.header(op: VsockOp.creditUpdate, srcPort: 1024, dstPort: conn.localPort, bufAlloc: 0))
            usleep(50)
        }
        // At most one CREDIT_REQUEST waits in the outbox.
        #expect(g.device.lock.withLock { conn.outbox.count } == 1)
        let result = try #require(writer.wait(timeoutMillis: 5000))
        #expect(throws: VsockError.timedOut) { try result.get() }
    }

    // MARK: Driver errors, reset and shutdown

    @Test func transportResetEvent() throws {
        let g = try VsockGuest()
        let (conn, _) = try g.establish()
        try g.memory.writeBytes([0xff, 0xff, 0xff, 0xff], at: GuestAddress(0x700000))
        try g.event.setDescriptor(0, address: 0x700000, length: 8, flags: VIRTQ_DESC_F_WRITE)
        try g.event.publish(head: 0)
        g.device.queueNotify(VsockDevice.eventQueue)
        #expect(try g.event.usedIdx == 0)
        g.device.sendTransportReset()
        #expect(try g.event.usedIdx == 1)
        #expect(try g.event.usedElement(0).length == 4)
        #expect(try g.memory.readBytes(at: GuestAddress(0x700000), count: 4) == [0, 0, 0, 0])
        #expect(throws: VsockError.deviceReset) { try conn.read(maxCount: 1, timeoutMillis: 100) }
        // The device keeps working: new connections succeed.
        _ = try g.establish()
    }

    @Test func malformedTxChainStopsDevice() throws {
        let g = try VsockGuest()
        let (conn, _) = try g.establish()
        let reader = Background { () throws(VsockError) in try conn.read(maxCount: 10, timeoutMillis: 10_000) }
        usleep(20_000)
        // A tx chain with a device-writable descriptor.
        try g.sendRaw([(g.header(op: VsockOp.rw, srcPort: 1024, dstPort: conn.localPort).bytes, false), ([0, 0], true)])
        #expect(g.interrupt.needsReset)
        #expect(g.device.lastError != nil)
        let result = try #require(reader.wait(timeoutMillis: 2000))
        guard case .failure(.deviceFailed) = result else {
            Issue.record("reader got \(result)")
            return
        }
        #expect(throws: VsockError.self) { try g.device.connect(guestPort: 1024, timeoutMillis: 100) }
    }

    @Test func shortTxHeaderStopsDevice() throws {
        let g = try VsockGuest()
        try g.sendRaw([(Array(repeating: 0, count: 20), false)])
        #expect(g.interrupt.needsReset)
    }

    @Test func malformedRxChainStopsDevice() throws {
        let g = try VsockGuest(rxBuffers: 0)
        // An rx buffer that is device-readable.
        try g.rx.setDescriptor(0, address: VsockGuest.rxBase, length: 4140, flags: 0)
        try g.rx.publish(head: 0)
        #expect(throws: VsockError.self) { try g.device.connect(guestPort: 1024, timeoutMillis: 500) }
        #expect(g.interrupt.needsReset)
    }

    @Test func availIndexJumpStopsDevice() throws {
        let g = try VsockGuest()
        try g.tx.setAvailIndex(1000)
        g.device.queueNotify(VsockDevice.txQueue)
        #expect(g.interrupt.needsReset)
        #expect(g.device.lastError?.contains("jumped") == true)
    }

    @Test func deviceResetWakesBlockedReadersAndWriters() throws {
        let g = try VsockGuest()
        let (a, _) = try g.establish()
        let (b, _) = try g.establish(guestBufAlloc: 0)
        let reader = Background { () throws(VsockError) in try a.read(maxCount: 10, timeoutMillis: 10_000) }
        let writer = Background { () throws(VsockError) in try b.write([1, 2, 3], timeoutMillis: 10_000) }
        usleep(50_000)
        #expect(!reader.isDone && !writer.isDone)
        let start = monotonicNanos()
        g.device.reset()
        let r = try #require(reader.wait(timeoutMillis: 2000))
        let w = try #require(writer.wait(timeoutMillis: 2000))
        #expect(monotonicNanos() - start < 2_000_000_000)
        #expect(throws: VsockError.deviceReset) { try r.get() }
        #expect(throws: VsockError.deviceReset) { try w.get() }
        #expect(waitReadable(a.readinessFD.fd.rawValue, timeoutMillis: 0))
        #expect(throws: VsockError.notActive) { try g.device.connect(guestPort: 1024, timeoutMillis: 10) }
        #expect(g.device.state.connections.isEmpty)
    }

    @Test func resetDuringConnectFails() throws {
        let g = try VsockGuest()
        let pending = Background { () throws(VsockError) in try g.device.connect(guestPort: 1024, timeoutMillis: 10_000) }
        _ = try #require(try g.next(op: VsockOp.request))
        g.device.reset()
        let result = try #require(pending.wait(timeoutMillis: 2000))
        #expect(throws: VsockError.deviceReset) { try result.get() }
    }

    @Test func shutdownFailsEverything() throws {
        let g = try VsockGuest()
        let (conn, _) = try g.establish()
        let reader = Background { () throws(VsockError) in try conn.read(maxCount: 10, timeoutMillis: 10_000) }
        usleep(20_000)
        g.device.shutdown()
        let r = try #require(reader.wait(timeoutMillis: 2000))
        #expect(throws: VsockError.deviceShutdown) { try r.get() }
        #expect(throws: VsockError.deviceShutdown) { try g.device.connect(guestPort: 1024, timeoutMillis: 10) }
        #expect(g.device.queueStates() == nil)
    }
}

/// Hands accepted connections from the worker to the test.
final class AcceptBox: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = Lock()
    private var items: [VsockConnection] = []
    func put(_ c: VsockConnection) { lock.withLock { items.append(c) } }
    func take() -> VsockConnection? { lock.withLock { items.isEmpty ? nil : items.removeFirst() } }
}
