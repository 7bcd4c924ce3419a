import Testing
@testable import AgentProtocol

/// Property: whatever bytes arrive, the decoder never crashes and reports problems
/// only as AgentProtocolError (guaranteed by typed throws; checked by running).
@Suite struct FuzzTests {
    static let seeds: [[UInt8]] = Samples.messages.compactMap { try? $0.message.encode(id: $0.id) }

    /// Applies one random mutation to a valid frame.
    static func mutate(_ input: [UInt8], rng: inout SplitMix64) -> [UInt8] {
        var bytes = input
        // Mutations below index into the header; pad short inputs with random bytes.
        while bytes.count < 16 { bytes.append(UInt8(truncatingIfNeeded: rng.next())) }
        switch rng.next() % 8 {
        case 0: // bit flips
            for _ in 0...(rng.next() % 4) where !bytes.isEmpty {
                let i = Int(rng.next() % UInt64(bytes.count))
                bytes[i] ^= UInt8(1) << UInt8(rng.next() % 8)
            }
        case 1: // truncation
            bytes = Array(bytes.prefix(Int(rng.next() % UInt64(bytes.count + 1))))
        case 2: // payload length corruption
            let v = UInt32(truncatingIfNeeded: rng.next() % 3 == 0 ? rng.next() : rng.next() % 64)
            for k in 0..<4 { bytes[12 + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(k))) }
        case 3: // inner length/count corruption: overwrite 4 bytes inside the payload
            if bytes.count > 20 {
                let i = 16 + Int(rng.next() % UInt64(bytes.count - 19))
                let v = UInt32(truncatingIfNeeded: rng.next())
                for k in 0..<4 { bytes[i + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(k))) }
            }
        case 4: // random type byte
            bytes[4] = UInt8(truncatingIfNeeded: rng.next())
        case 5: // appended garbage (also a following partial frame)
            bytes += (0..<(rng.next() % 40)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        case 6: // random insert/delete inside the payload
            if bytes.count > 16 {
                let i = 16 + Int(rng.next() % UInt64(bytes.count - 15))
                if rng.next() % 2 == 0 { bytes.insert(UInt8(truncatingIfNeeded: rng.next()), at: i) }
                else if i < bytes.count { bytes.remove(at: i) }
            }
        default: // entirely random bytes, sometimes behind a valid header
            let n = Int(rng.next() % 64)
            let random = (0..<n).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            bytes = rng.next() % 2 == 0 ? random : Samples.header(type: bytes[4], length: UInt32(n)) + random
        }
        return bytes
    }

    /// Feeds bytes in random chunks; returns frames decoded before any error.
    static func feed(_ bytes: [UInt8], rng: inout SplitMix64) -> (frames: [Frame], error: AgentProtocolError?) {
        var decoder = FrameDecoder()
        var frames: [Frame] = []
        var i = 0
        do throws(AgentProtocolError) {
            while i < bytes.count {
                let n = 1 + Int(rng.next() % 37)
                decoder.append(bytes[i..<min(i + n, bytes.count)])
                i += n
                while let f = try decoder.next() { frames.append(f) }
            }
            try decoder.finish()
            return (frames, nil)
        } catch {
            return (frames, error)
        }
    }

    @Test func twentyThousandMutatedFrames() throws {
        var rng = SplitMix64(seed: 0x5A4E_D0C5)
        var decodedCount = 0, errorCount = 0
        for iteration in 0..<20_000 {
            let seed = Self.seeds[Int(rng.next() % UInt64(Self.seeds.count))]
            var bytes = Self.mutate(seed, rng: &rng)
            if rng.next() % 4 == 0 { bytes = Self.mutate(bytes, rng: &rng) }
            // Sometimes put a valid frame in front, so errors hit mid-stream.
            if rng.next() % 3 == 0 { bytes = Self.seeds[0] + bytes }
            let result = Self.feed(bytes, rng: &rng)
            if result.error == nil { decodedCount += 1 } else { errorCount += 1 }
            // Anything that decoded must re-encode to a frame that decodes to itself.
            for frame in result.frames {
                let again = try Frame.decode(try frame.encode())
                #expect(again == frame, "iteration \(iteration)")
            }
        }
        // Both outcomes must be exercised for the property to mean anything.
        #expect(decodedCount > 500 && errorCount > 5000, "decoded \(decodedCount), errors \(errorCount)")
    }

    @Test func purelyRandomStreams() {
        var rng = SplitMix64(seed: 42)
        for _ in 0..<2_000 {
            let bytes = (0..<Int(rng.next() % 512)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            _ = Self.feed(bytes, rng: &rng)
            // And with a valid magic/version so decoding goes past the header.
            var framed = bytes
            if framed.count >= 16 { framed[0] = 0x53; framed[1] = 0x41; framed[2] = 1; framed[3] = 0; framed[5] = 0; framed[6] = 0; framed[7] = 0 }
            _ = Self.feed(framed, rng: &rng)
        }
    }
}
