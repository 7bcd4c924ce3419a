// libFuzzer target: the agent wire format (AgentProtocol), as both ends decode it: the
// library reads what the guest agent sends, sandbox-init reads what the host sends.
// The input is fed to a FrameDecoder in chunks (sizes from the input itself) and decoded
// whole with Frame.decode; every failure must be an AgentProtocolError, every frame that
// decodes must encode again, and the buffered bytes stay bounded by the frame limit.
@testable import AgentProtocol

func one(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let data, size > 0 else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    if let frame = try? Frame.decode(bytes) {
        guard (try? frame.encode()) != nil else { fatalError("a decoded frame does not encode: \(frame)") }
    }
    var decoder = FrameDecoder(maxPayloadSize: bytes[0] & 1 == 0 ? AgentProtocolLimits.maxPayloadSize : 4096)
    var at = 0
    var chunk = Int(bytes[0] >> 1) + 1
    loop: while at < bytes.count {
        let end = min(bytes.count, at + chunk)
        decoder.append(bytes[at..<end])
        at = end
        chunk = chunk * 3 % 97 + 1
        while true {
            do {
                guard let f = try decoder.next() else { break }
                _ = try? f.encode()
            } catch { break loop }
        }
        if decoder.bufferedByteCount > AgentProtocolLimits.maxPayloadSize + 64 {
            fatalError("the decoder holds \(decoder.bufferedByteCount) bytes without a frame")
        }
    }
    _ = try? decoder.finish()
    return 0
}
