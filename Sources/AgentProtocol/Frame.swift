/// The fixed 16-byte frame header, little-endian:
///
/// ```
///  0       2       4    5    6       8               12              16
///  +-------+-------+----+----+-------+---------------+---------------+
///  | magic |version|type|flag|reservd|  request id   | payload length|
///  | 'S''A'|  u16  | u8 | u8 |  u16  |      u32      |      u32      |
///  +-------+-------+----+----+-------+---------------+---------------+
/// ```
public struct FrameHeader: Equatable, Sendable {
    /// Size of the encoded header in bytes.
    public static let size = 16
    /// `'S'`, `'A'` on the wire (0x4153 read little-endian).
    public static let magic: UInt16 = 0x4153

    public var version: UInt16
    public var type: UInt8
    public var flags: UInt8
    public var id: UInt32
    public var payloadLength: UInt32

    public init(version: UInt16 = AgentProtocolVersion.current, type: UInt8, flags: UInt8 = 0, id: UInt32, payloadLength: UInt32) {
        self.version = version
        self.type = type
        self.flags = flags
        self.id = id
        self.payloadLength = payloadLength
    }

    /// The 16 header bytes.
    public func encode() -> [UInt8] {
        var w = ByteWriter(capacity: FrameHeader.size + Int(payloadLength))
        w.u16(FrameHeader.magic); w.u16(version); w.u8(type); w.u8(flags); w.u16(0); w.u32(id); w.u32(payloadLength)
        return w.bytes
    }

    /// Parses and validates a header: magic, version, flags, reserved field and the
    /// payload length against `maxPayloadSize`. The type byte is checked later, with
    /// the payload, so a frame of unknown type is reported as such.
    /// - Parameter bytes: at least ``size`` bytes; only the first ``size`` are read.
    /// - Throws: ``AgentProtocolError``.
    public static func decode(_ bytes: [UInt8], maxPayloadSize: Int = AgentProtocolLimits.maxPayloadSize) throws(AgentProtocolError) -> FrameHeader {
        var r = ByteReader(Array(bytes.prefix(size)))
        let magic = try r.u16("header.magic")
        guard magic == FrameHeader.magic else { throw .badMagic(magic) }
        let version = try r.u16("header.version")
        guard AgentProtocolVersion.supported.contains(version) else { throw .unsupportedVersion(version) }
        let type = try r.u8("header.type")
        let flags = try r.u8("header.flags")
        guard flags == 0 else { throw .unsupportedFlags(flags) }
        let reserved = try r.u16("header.reserved")
        guard reserved == 0 else { throw .reservedNotZero(reserved) }
        let id = try r.u32("header.id")
        let length = try r.u32("header.payloadLength")
        guard Int(length) <= maxPayloadSize else { throw .payloadTooLarge(length: Int(length), limit: maxPayloadSize) }
        return FrameHeader(version: version, type: type, flags: flags, id: id, payloadLength: length)
    }
}

/// One decoded frame: a message and the request id it belongs to.
public struct Frame: Equatable, Sendable {
    public var id: UInt32
    public var message: AgentMessage
    public init(id: UInt32 = 0, _ message: AgentMessage) { self.id = id; self.message = message }

    /// Header + payload bytes.
    /// - Throws: ``AgentProtocolError`` if a field exceeds its limit.
    public func encode() throws(AgentProtocolError) -> [UInt8] { try message.encode(id: id) }

    /// Decodes exactly one frame that fills `bytes` completely.
    /// - Throws: ``AgentProtocolError``; `.truncated(field: "frame")` if `bytes` holds
    ///   less than one frame, `.trailingBytes` if it holds more.
    public static func decode(_ bytes: [UInt8]) throws(AgentProtocolError) -> Frame {
        var decoder = FrameDecoder()
        decoder.append(bytes)
        guard let frame = try decoder.next() else { throw .truncated(field: "frame") }
        let extra = decoder.bufferedByteCount
        guard extra == 0 else { throw .trailingBytes(messageType: frame.message.type.rawValue, count: extra) }
        return frame
    }
}

/// Streaming frame decoder: feed it byte chunks of any size with ``append(_:)`` and
/// pull complete frames with ``next()``.
///
/// The header is validated as soon as its 16 bytes arrive, so an oversized length is
/// rejected before the payload is buffered. After an error the decoder stays failed
/// and rethrows the same error: framing is lost and the connection should be closed.
public struct FrameDecoder: Sendable {
    private var buffer: [UInt8] = []
    private var start = 0
    private var header: FrameHeader?
    private var failure: AgentProtocolError?
    /// The payload limit this decoder enforces.
    public let maxPayloadSize: Int

    /// - Parameter maxPayloadSize: clamped to ``AgentProtocolLimits/maxPayloadSize``.
    public init(maxPayloadSize: Int = AgentProtocolLimits.maxPayloadSize) {
        self.maxPayloadSize = min(max(0, maxPayloadSize), AgentProtocolLimits.maxPayloadSize)
    }

    /// Bytes received but not yet returned as frames.
    public var bufferedByteCount: Int { buffer.count - start }

    /// Adds received bytes.
    public mutating func append<C: Collection>(_ bytes: C) where C.Element == UInt8 {
        if start > 0 && start >= buffer.count / 2 {
            buffer.removeSubrange(0..<start)
            start = 0
        }
        buffer.append(contentsOf: bytes)
    }

    /// Returns the next complete frame, or nil if more bytes are needed.
    /// - Throws: ``AgentProtocolError`` for malformed input (and on every later call).
    public mutating func next() throws(AgentProtocolError) -> Frame? {
        if let failure { throw failure }
        do {
            return try decodeNext()
        } catch {
            failure = error
            throw error
        }
    }

    /// Call when the stream ends.
    /// - Throws: `.truncated(field: "frame")` if a partial frame is buffered.
    public func finish() throws(AgentProtocolError) {
        if let failure { throw failure }
        guard bufferedByteCount == 0 else { throw .truncated(field: "frame") }
    }

    private mutating func decodeNext() throws(AgentProtocolError) -> Frame? {
        if header == nil {
            guard bufferedByteCount >= FrameHeader.size else { return nil }
            header = try FrameHeader.decode(Array(buffer[start..<start + FrameHeader.size]), maxPayloadSize: maxPayloadSize)
            start += FrameHeader.size
        }
        guard let h = header else { return nil }
        let length = Int(h.payloadLength)
        guard bufferedByteCount >= length else { return nil }
        let payload = Array(buffer[start..<start + length])
        start += length
        header = nil
        if start == buffer.count { buffer.removeAll(keepingCapacity: buffer.capacity <= 4 * AgentProtocolLimits.maxPayloadSize); start = 0 }
        return Frame(id: h.id, try AgentMessage.decode(type: h.type, payload: payload))
    }
}
