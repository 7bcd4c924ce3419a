// virtio-vsock packet header, virtio spec 1.2 section 5.10.6 ("Device Operation").
//
//   offset  size  field
//        0     8  src_cid     le64
//        8     8  dst_cid     le64
//       16     4  src_port    le32
//       20     4  dst_port    le32
//       24     4  len         le32   payload bytes that follow the header
//       28     2  type        le16   1 = STREAM (2 = SEQPACKET, not offered)
//       30     2  op          le16   see VsockOp
//       32     4  flags       le32   SHUTDOWN: 1 = RCV, 2 = SEND
//       36     4  buf_alloc   le32   sender's receive buffer size
//       40     4  fwd_cnt     le32   bytes the sender's application has consumed
//   = 44 bytes, packed.

/// Well-known context IDs (spec 5.10.4).
public enum VsockCID {
    /// The host's CID: every packet the guest sends must be addressed to it.
    public static let host: UInt64 = 2
}

/// Socket types in `type` (spec 5.10.6).
public enum VsockType {
    public static let stream: UInt16 = 1
}

/// Operations in `op` (spec 5.10.6). Unknown values are representable on purpose:
/// the guest can send anything.
public enum VsockOp {
    public static let request: UInt16 = 1
    public static let response: UInt16 = 2
    public static let rst: UInt16 = 3
    public static let shutdown: UInt16 = 4
    public static let rw: UInt16 = 5
    public static let creditUpdate: UInt16 = 6
    public static let creditRequest: UInt16 = 7

    /// A short name for logs and errors.
    public static func name(_ op: UInt16) -> String {
        switch op {
        case request: return "REQUEST"
        case response: return "RESPONSE"
        case rst: return "RST"
        case shutdown: return "SHUTDOWN"
        case rw: return "RW"
        case creditUpdate: return "CREDIT_UPDATE"
        case creditRequest: return "CREDIT_REQUEST"
        default: return "op \(op)"
        }
    }
}

/// SHUTDOWN flags (spec 5.10.6.5).
public enum VsockShutdown {
    /// The sender will receive no more data.
    public static let receive: UInt32 = 1
    /// The sender will send no more data.
    public static let send: UInt32 = 2
    /// Both directions.
    public static let both: UInt32 = 3
}

/// The 44-byte `struct virtio_vsock_hdr`, decoded. Fields are host-endian here and
/// little-endian on the wire.
public struct VsockHeader: Equatable, Sendable, CustomStringConvertible {
    /// Size of the header on the wire.
    public static let size = 44

    public var srcCID: UInt64
    public var dstCID: UInt64
    public var srcPort: UInt32
    public var dstPort: UInt32
    public var len: UInt32
    public var type: UInt16
    public var op: UInt16
    public var flags: UInt32
    public var bufAlloc: UInt32
    public var fwdCnt: UInt32

    public init(srcCID: UInt64, dstCID: UInt64, srcPort: UInt32, dstPort: UInt32, len: UInt32 = 0,
                type: UInt16 = VsockType.stream, op: UInt16, flags: UInt32 = 0, bufAlloc: UInt32 = 0, fwdCnt: UInt32 = 0) {
        self.srcCID = srcCID
        self.dstCID = dstCID
        self.srcPort = srcPort
        self.dstPort = dstPort
        self.len = len
        self.type = type
        self.op = op
        self.flags = flags
        self.bufAlloc = bufAlloc
        self.fwdCnt = fwdCnt
    }

    /// Decodes the first 44 bytes of `bytes`.
    /// - Precondition: `bytes.count >= VsockHeader.size`.
    public init(decoding bytes: UnsafeRawBufferPointer) {
        precondition(bytes.count >= Self.size)
        // loadUnaligned: the header is packed and may sit at any offset.
        func u64(_ o: Int) -> UInt64 { UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: o, as: UInt64.self)) }
        func u32(_ o: Int) -> UInt32 { UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: o, as: UInt32.self)) }
        func u16(_ o: Int) -> UInt16 { UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: o, as: UInt16.self)) }
        self.init(srcCID: u64(0), dstCID: u64(8), srcPort: u32(16), dstPort: u32(20), len: u32(24),
                  type: u16(28), op: u16(30), flags: u32(32), bufAlloc: u32(36), fwdCnt: u32(40))
    }

    /// Decodes a header from an array of at least 44 bytes.
    public init(decoding bytes: [UInt8]) {
        self = bytes.withUnsafeBytes { VsockHeader(decoding: $0) }
    }

    /// The 44 wire bytes.
    public var bytes: [UInt8] {
        var out = [UInt8](repeating: 0, count: Self.size)
        out.withUnsafeMutableBytes { b in
            b.storeBytes(of: srcCID.littleEndian, toByteOffset: 0, as: UInt64.self)
            b.storeBytes(of: dstCID.littleEndian, toByteOffset: 8, as: UInt64.self)
            b.storeBytes(of: srcPort.littleEndian, toByteOffset: 16, as: UInt32.self)
            b.storeBytes(of: dstPort.littleEndian, toByteOffset: 20, as: UInt32.self)
            b.storeBytes(of: len.littleEndian, toByteOffset: 24, as: UInt32.self)
            b.storeBytes(of: type.littleEndian, toByteOffset: 28, as: UInt16.self)
            b.storeBytes(of: op.littleEndian, toByteOffset: 30, as: UInt16.self)
            b.storeBytes(of: flags.littleEndian, toByteOffset: 32, as: UInt32.self)
            b.storeBytes(of: bufAlloc.littleEndian, toByteOffset: 36, as: UInt32.self)
            b.storeBytes(of: fwdCnt.littleEndian, toByteOffset: 40, as: UInt32.self)
        }
        return out
    }

    public var description: String {
        "\(VsockOp.name(op)) \(srcCID):\(srcPort) -> \(dstCID):\(dstPort) len \(len) type \(type) flags \(flags) buf_alloc \(bufAlloc) fwd_cnt \(fwdCnt)"
    }
}
