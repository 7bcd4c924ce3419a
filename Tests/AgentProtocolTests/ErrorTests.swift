import Testing
@testable import AgentProtocol

@Suite struct DecodeErrorTests {
    func decodeError(_ bytes: [UInt8]) -> AgentProtocolError? {
        do { _ = try Frame.decode(bytes); return nil } catch { return error }
    }

    func decodeError(type: MessageType, _ build: (inout ByteWriter) throws -> Void) -> AgentProtocolError? {
        var w = ByteWriter()
        do { try build(&w) } catch { Issue.record(error); return nil }
        return decodeError(Samples.frame(type: type.rawValue, payload: w.bytes))
    }

    @Test func badMagic() {
        #expect(decodeError(Samples.header(magic: 0x4153 ^ 0x0100, type: 5, length: 0)) == .badMagic(0x4053))
    }

    @Test func unsupportedVersion() {
        #expect(decodeError(Samples.header(version: 2, type: 5, length: 0)) == .unsupportedVersion(2))
        #expect(decodeError(Samples.header(version: 0, type: 5, length: 0)) == .unsupportedVersion(0))
    }

    @Test func flagsAndReserved() {
        #expect(decodeError(Samples.header(type: 5, flags: 1, length: 0)) == .unsupportedFlags(1))
        #expect(decodeError(Samples.header(type: 5, reserved: 7, length: 0)) == .reservedNotZero(7))
    }

    @Test func oversizedPayloadIsRejectedFromTheHeaderAlone() {
        var decoder = FrameDecoder()
        decoder.append(Samples.header(type: 0x11, length: UInt32(AgentProtocolLimits.maxPayloadSize + 1)))
        #expect(throws: AgentProtocolError.payloadTooLarge(length: AgentProtocolLimits.maxPayloadSize + 1,
                                                            limit: AgentProtocolLimits.maxPayloadSize)) { try decoder.next() }
        var small = FrameDecoder(maxPayloadSize: 8)
        small.append(Samples.frame(type: 0x11, payload: Array(repeating: 0, count: 9)))
        #expect(throws: AgentProtocolError.payloadTooLarge(length: 9, limit: 8)) { try small.next() }
        #expect(decodeError(Samples.header(type: 0x11, length: .max)) == .payloadTooLarge(length: Int(UInt32.max), limit: AgentProtocolLimits.maxPayloadSize))
    }

    @Test func unknownType() {
        #expect(decodeError(Samples.frame(type: 0x7F, payload: [])) == .unknownMessageType(0x7F))
        #expect(decodeError(Samples.frame(type: 0x00, payload: [1, 2])) == .unknownMessageType(0))
    }

    @Test func truncatedFields() {
        #expect(decodeError(Samples.frame(type: MessageType.exited.rawValue, payload: [1, 2])) == .truncated(field: "exited.code"))
        #expect(decodeError(Samples.frame(type: MessageType.hello.rawValue, payload: [1, 0, 0])) == .truncated(field: "hello.capabilities"))
        // A string whose length runs past the payload.
        #expect(decodeError(type: .readFile) { $0.u32(10); $0.raw([0x41]) } == .truncated(field: "readFile.path"))
        // Exec cut right after argv.
        #expect(decodeError(type: .exec) { w in try w.strings(["ls"], field: "", countLimit: 9, lengthLimit: 9) } == .truncated(field: "exec.env"))
        // An array count that cannot fit the remaining bytes.
        #expect(decodeError(type: .exec) { $0.u32(1000); $0.u32(0) } == .truncated(field: "exec.argv"))
    }

    @Test func truncatedStream() {
        var decoder = FrameDecoder()
        let bytes = (try? AgentMessage.ping(1).encode()) ?? []
        decoder.append(bytes.dropLast())
        #expect((try? decoder.next()) == .some(nil))
        #expect(throws: AgentProtocolError.truncated(field: "frame")) { try decoder.finish() }
        #expect(decodeError(Array(bytes.prefix(10))) == .truncated(field: "frame"))
    }

    @Test func invalidUTF8() {
        #expect(decodeError(type: .readFile) { $0.u32(2); $0.raw([0xC3, 0x28]) } == .invalidUTF8(field: "readFile.path"))
        #expect(decodeError(type: .error) { $0.u16(1); $0.u32(1); $0.raw([0xFF]) } == .invalidUTF8(field: "error.message"))
    }

    @Test func stringAndCountCaps() {
        let tooLongPath = UInt32(AgentProtocolLimits.maxPathLength + 1)
        #expect(decodeError(type: .readFile) { $0.u32(tooLongPath) } ==
            .stringTooLong(field: "readFile.path", length: Int(tooLongPath), limit: AgentProtocolLimits.maxPathLength))
        let tooMany = UInt32(AgentProtocolLimits.maxArguments + 1)
        #expect(decodeError(type: .exec) { $0.u32(tooMany) } ==
            .countOverCap(field: "exec.argv", count: Int(tooMany), limit: AgentProtocolLimits.maxArguments))
        #expect(decodeError(type: .exec) { w in
            try w.strings(["sh"], field: "", countLimit: 9, lengthLimit: 9); w.u32(UInt32.max)
        } == .countOverCap(field: "exec.env", count: Int(UInt32.max), limit: AgentProtocolLimits.maxEnvironment))
    }

    @Test func invalidEnumValues() {
        #expect(decodeError(type: .output) { $0.u8(3); $0.u64(0); $0.u8(0) } == .invalidValue(field: "output.stream", value: 3))
        #expect(decodeError(type: .output) { $0.u8(1); $0.u64(0); $0.u8(2) } == .invalidValue(field: "output.truncated", value: 2))
        #expect(decodeError(type: .exec) { w in
            try w.strings(["sh"], field: "", countLimit: 9, lengthLimit: 9)
            w.u32(0); w.u32(0); w.u32(0); w.u32(0); w.u8(9)
        } == .invalidValue(field: "exec.stdin", value: 9))
        #expect(decodeError(type: .exec) { $0.u32(0) } == .invalidValue(field: "exec.argv.count", value: 0))
    }

    @Test func trailingBytesInsideAPayload() {
        #expect(decodeError(Samples.frame(type: MessageType.shutdown.rawValue, payload: [0])) ==
            .trailingBytes(messageType: MessageType.shutdown.rawValue, count: 1))
        #expect(decodeError(Samples.frame(type: MessageType.exited.rawValue, payload: [0, 0, 0, 0, 9, 9])) ==
            .trailingBytes(messageType: MessageType.exited.rawValue, count: 2))
    }

    @Test func trailingBytesAfterASingleFrame() throws {
        let bytes = try AgentMessage.kill.encode() + [0x53]
        #expect(decodeError(bytes) == .trailingBytes(messageType: MessageType.kill.rawValue, count: 1))
    }

    @Test func decoderStaysFailed() throws {
        var decoder = FrameDecoder()
        decoder.append(Samples.header(magic: 0, type: 5, length: 0))
        #expect(throws: AgentProtocolError.badMagic(0)) { try decoder.next() }
        decoder.append(try AgentMessage.shutdown.encode())
        #expect(throws: AgentProtocolError.badMagic(0)) { try decoder.next() }
        #expect(throws: AgentProtocolError.badMagic(0)) { try decoder.finish() }
    }

    @Test func encoderEnforcesTheSameLimits() {
        let L = AgentProtocolLimits.self
        #expect(throws: AgentProtocolError.invalidValue(field: "exec.argv.count", value: 0)) {
            try AgentMessage.exec(Exec(arguments: [])).encode()
        }
        #expect(throws: AgentProtocolError.countOverCap(field: "exec.argv", count: L.maxArguments + 1, limit: L.maxArguments)) {
            try AgentMessage.exec(Exec(arguments: Array(repeating: "x", count: L.maxArguments + 1))).encode()
        }
        #expect(throws: AgentProtocolError.stringTooLong(field: "writeFile.path", length: L.maxPathLength + 1, limit: L.maxPathLength)) {
            try AgentMessage.writeFile(WriteFile(path: String(repeating: "a", count: L.maxPathLength + 1), data: [])).encode()
        }
        #expect(throws: AgentProtocolError.payloadTooLarge(length: L.maxPayloadSize + 1, limit: L.maxPayloadSize)) {
            try AgentMessage.stdinData(Array(repeating: 0, count: L.maxPayloadSize + 1)).encode()
        }
        #expect(throws: AgentProtocolError.stringTooLong(field: "error.message", length: L.maxMessageLength + 1, limit: L.maxMessageLength)) {
            try AgentMessage.error(ErrorMessage(code: .internal, message: String(repeating: "m", count: L.maxMessageLength + 1))).encode()
        }
    }

    @Test func errorsDescribeThemselves() {
        #expect(AgentProtocolError.badMagic(0x1234).description == "bad frame magic 0x1234")
        #expect(AgentProtocolError.truncated(field: "exec.env").description == "truncated exec.env")
    }
}
