/// Little-endian field writer used by the message encoders.
struct ByteWriter {
    private(set) var bytes: [UInt8] = []

    init(capacity: Int = 64) { bytes.reserveCapacity(capacity) }

    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func bool(_ v: Bool) { bytes.append(v ? 1 : 0) }
    mutating func u16(_ v: UInt16) { bytes.append(UInt8(truncatingIfNeeded: v)); bytes.append(UInt8(truncatingIfNeeded: v >> 8)) }
    mutating func u32(_ v: UInt32) { for s in stride(from: 0, to: 32, by: 8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt32(s))) } }
    mutating func u64(_ v: UInt64) { for s in stride(from: 0, to: 64, by: 8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt64(s))) } }
    mutating func i32(_ v: Int32) { u32(UInt32(bitPattern: v)) }

    /// Writes `u32 length` + UTF-8 bytes, enforcing `limit`.
    mutating func string(_ s: String, field: String, limit: Int) throws(AgentProtocolError) {
        let utf8 = s.utf8
        guard utf8.count <= limit else { throw .stringTooLong(field: field, length: utf8.count, limit: limit) }
        u32(UInt32(utf8.count))
        bytes.append(contentsOf: utf8)
    }

    /// Writes `u32 count` + each string, enforcing both limits.
    mutating func strings(_ list: [String], field: String, countLimit: Int, lengthLimit: Int) throws(AgentProtocolError) {
        guard list.count <= countLimit else { throw .countOverCap(field: field, count: list.count, limit: countLimit) }
        u32(UInt32(list.count))
        for s in list { try string(s, field: field, limit: lengthLimit) }
    }

    /// Appends raw bytes (the trailing data field of data-carrying messages).
    mutating func raw(_ data: [UInt8]) { bytes.append(contentsOf: data) }
}

/// Bounds-checked little-endian reader over one frame payload. Every read checks the
/// remaining length first and throws ``AgentProtocolError/truncated(field:)``.
struct ByteReader {
    private let bytes: [UInt8]
    private var index: Int
    private let end: Int

    init(_ bytes: [UInt8]) { self.bytes = bytes; index = 0; end = bytes.count }

    var remaining: Int { end - index }

    private mutating func take(_ n: Int, _ field: String) throws(AgentProtocolError) -> Int {
        guard n >= 0, remaining >= n else { throw .truncated(field: field) }
        let start = index
        index += n
        return start
    }

    mutating func u8(_ field: String) throws(AgentProtocolError) -> UInt8 { bytes[try take(1, field)] }

    mutating func bool(_ field: String) throws(AgentProtocolError) -> Bool {
        let v = try u8(field)
        guard v <= 1 else { throw .invalidValue(field: field, value: UInt64(v)) }
        return v == 1
    }

    mutating func u16(_ field: String) throws(AgentProtocolError) -> UInt16 {
        let i = try take(2, field)
        return UInt16(bytes[i]) | UInt16(bytes[i + 1]) << 8
    }

    mutating func u32(_ field: String) throws(AgentProtocolError) -> UInt32 {
        let i = try take(4, field)
        var v: UInt32 = 0
        for k in 0..<4 { v |= UInt32(bytes[i + k]) << UInt32(8 * k) }
        return v
    }

    mutating func u64(_ field: String) throws(AgentProtocolError) -> UInt64 {
        let i = try take(8, field)
        var v: UInt64 = 0
        for k in 0..<8 { v |= UInt64(bytes[i + k]) << UInt64(8 * k) }
        return v
    }

    mutating func i32(_ field: String) throws(AgentProtocolError) -> Int32 { Int32(bitPattern: try u32(field)) }

    /// Reads `u32 length` + UTF-8 bytes; the length is checked against `limit` before
    /// anything is copied.
    mutating func string(_ field: String, limit: Int) throws(AgentProtocolError) -> String {
        let length = Int(try u32(field))
        guard length <= limit else { throw .stringTooLong(field: field, length: length, limit: limit) }
        let start = try take(length, field)
        guard let s = String(validating: bytes[start..<start + length], as: UTF8.self) else {
            throw .invalidUTF8(field: field)
        }
        return s
    }

    /// Reads `u32 count` + strings; the count is checked against `countLimit` first.
    mutating func strings(_ field: String, countLimit: Int, lengthLimit: Int) throws(AgentProtocolError) -> [String] {
        let count = Int(try u32(field))
        guard count <= countLimit else { throw .countOverCap(field: field, count: count, limit: countLimit) }
        // Each string needs at least its 4-byte length: reject impossible counts early.
        guard count <= remaining / 4 else { throw .truncated(field: field) }
        var list: [String] = []
        list.reserveCapacity(count)
        for _ in 0..<count { list.append(try string(field, limit: lengthLimit)) }
        return list
    }

    /// Takes everything left (the trailing data field).
    mutating func rest() -> [UInt8] {
        let out = Array(bytes[index..<end])
        index = end
        return out
    }
}
