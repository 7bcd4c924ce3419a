/// A validated Linux kernel command line.
public struct KernelCommandLine: Equatable, Sendable, CustomStringConvertible {
    public enum Error: Swift.Error, Equatable, Sendable, CustomStringConvertible {
        case invalidCharacter(UInt8, position: Int)
        case unbalancedQuote
        case emptyKey(String)
        case invalidKey(String)
        case tooLong(length: Int, limit: Int)

        public var description: String {
            switch self {
            case let .invalidCharacter(c, p):
                return "kernel command line: character 0x\(String(c, radix: 16)) at position \(p) is not printable ASCII"
            case .unbalancedQuote: return "kernel command line: unbalanced double quote"
            case .emptyKey(let p): return "kernel command line: parameter '\(p)' has an empty name"
            case .invalidKey(let k): return "kernel command line: parameter name '\(k)' contains a space, quote or '='"
            case let .tooLong(l, limit): return "kernel command line is \(l) bytes; the limit is \(limit)"
            }
        }
    }

    /// Bytes available for the command line (excluding the terminating NUL).
    public let limit: Int
    public private(set) var parameters: [String] = []

    public init(limit: Int = Layout.maxCommandLine - 1) {
        self.limit = limit
    }

    /// Parses and validates a whole command line (space-separated, double quotes group).
    public init(_ string: String, limit: Int = Layout.maxCommandLine - 1) throws(Error) {
        self.init(limit: limit)
        for p in try Self.split(string) { try append(p) }
    }

    /// Appends one raw parameter (`key`, `key=value` or `key="value with spaces"`).
    public mutating func append(_ parameter: String) throws(Error) {
        try Self.validateCharacters(parameter)
        let key = parameter.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
        if key.isEmpty { throw .emptyKey(parameter) }
        if key.contains(where: { $0 == " " || $0 == "\"" }) { throw .invalidKey(key) }
        var quotes = 0
        for b in parameter.utf8 where b == UInt8(ascii: "\"") { quotes += 1 }
        if quotes % 2 != 0 { throw .unbalancedQuote }
        let value = parameter.drop(while: { $0 != "=" })
        if value.contains(" ") && !(value.hasPrefix("=\"") && value.hasSuffix("\"")) { throw .unbalancedQuote }
        let newLength = (parameters.isEmpty ? 0 : description.utf8.count + 1) + parameter.utf8.count
        if newLength > limit { throw .tooLong(length: newLength, limit: limit) }
        parameters.append(parameter)
    }

    /// Appends `key=value`, quoting the value if it contains spaces.
    public mutating func append(key: String, value: String) throws(Error) {
        if key.isEmpty { throw .emptyKey("=" + value) }
        if key.contains(where: { $0 == " " || $0 == "\"" || $0 == "=" }) { throw .invalidKey(key) }
        if value.contains("\"") { throw .unbalancedQuote }
        try append(value.contains(" ") ? "\(key)=\"\(value)\"" : "\(key)=\(value)")
    }

    /// Appends every parameter of another command line string.
    public mutating func append(contentsOf string: String) throws(Error) {
        for p in try Self.split(string) { try append(p) }
    }

    public var description: String { parameters.joined(separator: " ") }

    /// The NUL-terminated bytes to place in guest memory.
    public var bytes: [UInt8] { Array(description.utf8) + [0] }

    static func validateCharacters(_ s: String) throws(Error) {
        for (i, c) in s.utf8.enumerated() where c < 0x20 || c > 0x7E {
            throw .invalidCharacter(c, position: i)
        }
    }

    static func split(_ s: String) throws(Error) -> [String] {
        try validateCharacters(s)
        var out: [String] = []
        var current: [UInt8] = []
        var inQuote = false
        for c in s.utf8 {
            if c == UInt8(ascii: "\"") { inQuote.toggle() }
            if c == UInt8(ascii: " ") && !inQuote {
                if !current.isEmpty { out.append(String(decoding: current, as: UTF8.self)); current = [] }
            } else {
                current.append(c)
            }
        }
        if inQuote { throw .unbalancedQuote }
        if !current.isEmpty { out.append(String(decoding: current, as: UTF8.self)) }
        return out
    }
}
