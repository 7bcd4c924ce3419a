import AgentProtocol
import Glibc
import SystemShims

/// Why a connection ended.
enum ConnectionError: Error, CustomStringConvertible {
    case system(SystemError)
    case malformed(AgentProtocolError)
    case closedByPeer
    var description: String {
        switch self {
        case .system(let e): "\(e)"
        case .malformed(let e): "malformed frame: \(e)"
        case .closedByPeer: "connection closed by peer"
        }
    }
}

/// A blocking stream socket carrying frames, with a queue of decoded frames not yet
/// handled (one read may deliver several).
final class FrameConnection {
    let fd: Int32
    private var decoder = FrameDecoder()
    private var queue: [Frame] = []
    private var queueHead = 0

    init(fd: Int32) { self.fd = fd }
    deinit { close(fd) }

    /// Encodes and writes one frame.
    func send(_ message: AgentMessage, id: UInt32) throws(ConnectionError) {
        let bytes: [UInt8]
        do { bytes = try message.encode(id: id) } catch { throw .malformed(error) }
        do { try writeAll(fd, bytes) } catch { throw .system(error) }
    }

    /// The next queued frame, if any, without reading the socket.
    func popQueued() -> Frame? {
        guard queueHead < queue.count else { return nil }
        let frame = queue[queueHead]
        queueHead += 1
        if queueHead == queue.count { queue.removeAll(keepingCapacity: true); queueHead = 0 }
        return frame
    }

    var hasQueued: Bool { queueHead < queue.count }

    /// Reads once (blocks if nothing is available) and queues every complete frame.
    /// - Throws: `.closedByPeer` at end of stream, `.malformed` on undecodable bytes.
    func readOnce() throws(ConnectionError) {
        let result: ReadResult
        do { result = try readChunk(fd, max: 64 * 1024) } catch { throw .system(error) }
        switch result {
        case .wouldBlock: return
        case .endOfFile:
            do { try decoder.finish() } catch { throw .malformed(error) }
            throw .closedByPeer
        case .data(let bytes):
            decoder.append(bytes)
            do {
                while let frame = try decoder.next() { queue.append(frame) }
            } catch {
                throw .malformed(error)
            }
        }
    }
}
