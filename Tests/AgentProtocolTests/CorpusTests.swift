import Foundation
import Testing
@testable import AgentProtocol

/// Seed frames stored under Corpus/: `valid-*.bin` must decode to exactly one frame and
/// re-encode to the same bytes; `invalid-*.bin` must be rejected with an
/// AgentProtocolError. Regenerate with AGENTPROTOCOL_WRITE_CORPUS=1 swift test --filter Corpus.
@Suite struct CorpusTests {
    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Corpus")

    static func invalidSeeds() throws -> [(String, [UInt8])] {
        let exec = try AgentMessage.exec(Samples.exec).encode(id: 1)
        var badLength = exec
        badLength[12] = 0xFF; badLength[13] = 0xFF; badLength[14] = 0xFF
        var badUTF8 = try AgentMessage.readFile(path: "ab").encode()
        badUTF8[20] = 0xFF
        return [
            ("invalid-bad-magic", Samples.header(magic: 0x5341, type: 5, length: 0)),
            ("invalid-version-2", Samples.header(version: 2, type: 5, length: 0)),
            ("invalid-oversized", badLength),
            ("invalid-truncated-exec", Array(exec.dropLast(5))),
            ("invalid-unknown-type", Samples.frame(type: 0xEE, payload: [])),
            ("invalid-trailing-bytes", Samples.frame(type: MessageType.kill.rawValue, payload: [0])),
            ("invalid-utf8-path", badUTF8),
            ("invalid-argv-count", Samples.frame(type: MessageType.exec.rawValue, payload: [0xFF, 0xFF, 0, 0])),
        ]
    }

    /// Not a test: the corpus generator, run only on request (skipped otherwise).
    @Test(.enabled(if: ProcessInfo.processInfo.environment["AGENTPROTOCOL_WRITE_CORPUS"] == "1",
                   "writes the seed corpus only with AGENTPROTOCOL_WRITE_CORPUS=1"))
    func writeCorpusWhenAsked() throws {
        try FileManager.default.createDirectory(at: Self.directory, withIntermediateDirectories: true)
        for s in Samples.messages {
            try Data(try s.message.encode(id: s.id)).write(to: Self.directory.appendingPathComponent("valid-\(s.name).bin"))
        }
        for (name, bytes) in try Self.invalidSeeds() {
            try Data(bytes).write(to: Self.directory.appendingPathComponent("\(name).bin"))
        }
    }

    @Test func decodeEveryCorpusFile() throws {
        let names = try FileManager.default.contentsOfDirectory(atPath: Self.directory.path).sorted()
        #expect(names.filter { $0.hasPrefix("valid-") }.count == Samples.messages.count)
        #expect(names.filter { $0.hasPrefix("invalid-") }.count >= 8)
        for name in names where name.hasSuffix(".bin") {
            let bytes = [UInt8](try Data(contentsOf: Self.directory.appendingPathComponent(name)))
            if name.hasPrefix("valid-") {
                let frame = try Frame.decode(bytes)
                #expect(try frame.encode() == bytes, "\(name)")
                let sampleName = String(name.dropFirst("valid-".count).dropLast(".bin".count))
                let sample = try #require(Samples.messages.first { $0.name == sampleName }, "\(name)")
                #expect(frame == Frame(id: sample.id, sample.message), "\(name)")
            } else {
                #expect(throws: AgentProtocolError.self, "\(name)") { try Frame.decode(bytes) }
            }
        }
    }

    @Test func corpusFilesAsFuzzSeeds() throws {
        var rng = SplitMix64(seed: 7)
        let names = try FileManager.default.contentsOfDirectory(atPath: Self.directory.path)
        for name in names where name.hasSuffix(".bin") {
            let bytes = [UInt8](try Data(contentsOf: Self.directory.appendingPathComponent(name)))
            guard bytes.count >= 16 else { continue }
            for _ in 0..<200 { _ = FuzzTests.feed(FuzzTests.mutate(bytes, rng: &rng), rng: &rng) }
        }
    }
}
