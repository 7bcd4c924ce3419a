/// Why bytes could not be decoded into a frame, or a message could not be encoded.
///
/// A decoder that has thrown stays failed: the stream has lost framing and the
/// connection should be closed after (optionally) reporting the error to the peer.
public enum AgentProtocolError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The first two header bytes are not `SA`.
    case badMagic(UInt16)
    /// The header carries a version outside ``AgentProtocolVersion/supported``.
    case unsupportedVersion(UInt16)
    /// Header flags are defined per version; version 1 defines none.
    case unsupportedFlags(UInt8)
    /// The reserved header field is not zero.
    case reservedNotZero(UInt16)
    /// The payload length exceeds the decoder's limit (or an encoded payload would).
    case payloadTooLarge(length: Int, limit: Int)
    /// The header's type byte names no known message.
    case unknownMessageType(UInt8)
    /// The payload ended inside `field` (or the stream ended inside a frame: field `frame`).
    case truncated(field: String)
    /// A string field is not valid UTF-8.
    case invalidUTF8(field: String)
    /// A string field is longer than its limit.
    case stringTooLong(field: String, length: Int, limit: Int)
    /// An array field has more elements than its limit.
    case countOverCap(field: String, count: Int, limit: Int)
    /// An enumerated or boolean field holds a value outside its domain.
    case invalidValue(field: String, value: UInt64)
    /// The payload has bytes left after the last field of its message.
    case trailingBytes(messageType: UInt8, count: Int)

    public var description: String {
        switch self {
        case .badMagic(let m): "bad frame magic 0x\(String(m, radix: 16))"
        case .unsupportedVersion(let v): "unsupported protocol version \(v)"
        case .unsupportedFlags(let f): "unsupported frame flags 0x\(String(f, radix: 16))"
        case .reservedNotZero(let r): "reserved header field is 0x\(String(r, radix: 16)), expected 0"
        case .payloadTooLarge(let l, let lim): "payload of \(l) bytes exceeds limit \(lim)"
        case .unknownMessageType(let t): "unknown message type 0x\(String(t, radix: 16))"
        case .truncated(let f): "truncated \(f)"
        case .invalidUTF8(let f): "invalid UTF-8 in \(f)"
        case .stringTooLong(let f, let l, let lim): "\(f) is \(l) bytes, limit \(lim)"
        case .countOverCap(let f, let c, let lim): "\(f) has \(c) entries, limit \(lim)"
        case .invalidValue(let f, let v): "invalid value \(v) for \(f)"
        case .trailingBytes(let t, let c): "\(c) trailing bytes in payload of message type 0x\(String(t, radix: 16))"
        }
    }
}
