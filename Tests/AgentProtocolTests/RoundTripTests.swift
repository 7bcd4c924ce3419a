import Testing
@testable import AgentProtocol

@Suite struct RoundTripTests {
    @Test(arguments: Samples.messages.map { $0.name })
    func roundTrip(_ name: String) throws {
        let sample = try #require(Samples.messages.first { $0.name == name })
        let bytes = try sample.message.encode(id: sample.id)
        #expect(bytes.count == FrameHeader.size + (try sample.message.encodePayload().count))
        #expect(bytes[0] == UInt8(ascii: "S") && bytes[1] == UInt8(ascii: "A"))
        #expect(bytes[4] == sample.message.type.rawValue)
        let frame = try Frame.decode(bytes)
        #expect(frame == Frame(id: sample.id, sample.message))
        #expect(try frame.encode() == bytes)
    }

    @Test func everyMessageTypeHasASample() {
        let covered = Set(Samples.messages.map { $0.message.type })
        #expect(covered == Set(MessageType.allCases))
    }

    @Test func headerLayoutIsLittleEndian() throws {
        let bytes = try AgentMessage.exited(0x0102_0304).encode(id: 0xA1B2_C3D4)
        #expect(Array(bytes[0..<16]) == [0x53, 0x41, 0x01, 0x00, 0x21, 0x00, 0x00, 0x00,
                                        0xD4, 0xC3, 0xB2, 0xA1, 0x04, 0x00, 0x00, 0x00])
        #expect(Array(bytes[16...]) == [0x04, 0x03, 0x02, 0x01])
    }

    @Test func streamingDecoderAcceptsAnyChunking() throws {
        var stream: [UInt8] = []
        var expected: [Frame] = []
        for s in Samples.messages {
            stream += try s.message.encode(id: s.id)
            expected.append(Frame(id: s.id, s.message))
        }
        for chunkSize in [1, 2, 3, 7, 16, 17, 64, 1000, stream.count] {
            var decoder = FrameDecoder()
            var frames: [Frame] = []
            var i = 0
            while i < stream.count {
                decoder.append(stream[i..<min(i + chunkSize, stream.count)])
                while let f = try decoder.next() { frames.append(f) }
                i += chunkSize
            }
            try decoder.finish()
            #expect(frames == expected, "chunk size \(chunkSize)")
            #expect(decoder.bufferedByteCount == 0)
        }
    }

    @Test func maximumSizedPayloadsRoundTrip() throws {
        let data = [UInt8](repeating: 0xAB, count: AgentProtocolLimits.maxPayloadSize - 10)
        let message = AgentMessage.output(Output(stream: .stdout, sequence: 1, data: data))
        #expect(try Frame.decode(try message.encode(id: 1)) == Frame(id: 1, message))
        let args = [String](repeating: "a", count: AgentProtocolLimits.maxArguments)
        let exec = AgentMessage.exec(Exec(arguments: args, environment: args))
        #expect(try Frame.decode(try exec.encode()) == Frame(exec))
        let path = String(repeating: "p", count: AgentProtocolLimits.maxPathLength)
        #expect(try Frame.decode(try AgentMessage.readFile(path: path).encode()) == Frame(.readFile(path: path)))
    }
}
