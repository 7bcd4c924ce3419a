import Testing
@testable import MicroVM

private let validLines: [(String, [String])] = [
    ("console=ttyS0 reboot=t panic=-1", ["console=ttyS0", "reboot=t", "panic=-1"]),
    ("  quiet   loglevel=3 ", ["quiet", "loglevel=3"]),
    ("init=\"/bin/sh -c true\" ro", ["init=\"/bin/sh -c true\"", "ro"]),
    ("root=/dev/vda key=\"\"", ["root=/dev/vda", "key=\"\""]),
    ("a==b x=y=z", ["a==b", "x=y=z"]),
    ("", []),
    ("   ", []),
    ]

private let invalidLines: [(String, KernelCommandLine.Error)] = [
    ("console=ttyS0\tquiet", KernelCommandLine.Error.invalidCharacter(0x09, position: 13)),
    ("a=b\n", .invalidCharacter(0x0A, position: 3)),
    ("x=\u{7F}", .invalidCharacter(0x7F, position: 2)),
    ("caf\u{E9}=1", .invalidCharacter(0xC3, position: 3)),
    ("init=\"/bin/sh -c", .unbalancedQuote),
    ("a=\"b\" c=\"", .unbalancedQuote),
    ("=value", .emptyKey("=value")),
    ("ok =x", .emptyKey("=x")),
    ("\"a b\"=1", .invalidKey("\"a b\"")),
    ("a\"b\"=1", .invalidKey("a\"b\"")),
    ]

private let keyValueCases: [(String, String, String)] = [
    ("console", "ttyS0", "console=ttyS0"),
    ("init", "/bin/sh -c true", "init=\"/bin/sh -c true\""),
    ("empty", "", "empty="),
    ("k", "a=b", "k=a=b"),
    ]

private let badKeyValueCases: [(String, String, KernelCommandLine.Error)] = [
    ("", "x", KernelCommandLine.Error.emptyKey("=x")),
    ("a b", "x", .invalidKey("a b")),
    ("a=b", "x", .invalidKey("a=b")),
    ("a\"", "x", .invalidKey("a\"")),
    ("k", "say \"hi\"", .unbalancedQuote),
    ("k", "tab\there", .invalidCharacter(0x09, position: 5)),
    ]

@Suite("KernelCommandLine validation")
struct KernelCommandLineTests {
    @Test("valid lines split into parameters", arguments: validLines)
    func valid(line: String, expected: [String]) throws {
        let c = try KernelCommandLine(line)
        #expect(c.parameters == expected)
        #expect(c.description == expected.joined(separator: " "))
        #expect(c.bytes == Array(expected.joined(separator: " ").utf8) + [0])
    }

    @Test("invalid lines are rejected with the reason", arguments: invalidLines)
    func invalid(line: String, error: KernelCommandLine.Error) {
        #expect(throws: error) { try KernelCommandLine(line) }
    }

    @Test("a raw parameter with an unquoted space is refused")
    func unquotedSpace() {
        var c = KernelCommandLine()
        #expect(throws: KernelCommandLine.Error.unbalancedQuote) { try c.append("init=/bin/sh -c") }
        #expect(throws: KernelCommandLine.Error.invalidKey("a b")) { try c.append("a b") }
        #expect(c.parameters.isEmpty)
    }

    @Test("the default limit is maxCommandLine - 1 bytes (room for the NUL)")
    func defaultLimitBoundary() throws {
        let limit = Layout.maxCommandLine - 1
        #expect(KernelCommandLine().limit == limit)
        let exact = try KernelCommandLine(String(repeating: "a", count: limit))
        #expect(exact.bytes.count == Layout.maxCommandLine)
        #expect(throws: KernelCommandLine.Error.tooLong(length: limit + 1, limit: limit)) {
            try KernelCommandLine(String(repeating: "a", count: limit + 1))
        }
        // Separators count: two halves plus one space exactly at the limit.
        let half = String(repeating: "b", count: (limit - 1) / 2)
        let two = try KernelCommandLine("\(half) \(half)")
        #expect(two.description.utf8.count == limit)
        #expect(throws: KernelCommandLine.Error.tooLong(length: limit + 1, limit: limit)) {
            try KernelCommandLine("\(half) \(half)x")
        }
    }

    @Test("appending past a custom limit fails and leaves the line unchanged")
    func customLimit() throws {
        var c = KernelCommandLine(limit: 10)
        try c.append("abcde")
        try c.append("abcd")          // 5 + 1 + 4 == 10
        #expect(c.description == "abcde abcd")
        #expect(throws: KernelCommandLine.Error.tooLong(length: 12, limit: 10)) { try c.append("x") }
        #expect(c.description == "abcde abcd")
    }

    @Test("append(key:value:) quotes values with spaces", arguments: keyValueCases)
    func appendKeyValue(key: String, value: String, expected: String) throws {
        var c = try KernelCommandLine("quiet")
        try c.append(key: key, value: value)
        #expect(c.parameters == ["quiet", expected])
        // The result parses back to the same parameters.
        #expect(try KernelCommandLine(c.description) == c)
    }

    @Test("append(key:value:) rejects bad keys and quotes in values", arguments: badKeyValueCases)
    func appendKeyValueInvalid(key: String, value: String, error: KernelCommandLine.Error) {
        var c = KernelCommandLine()
        #expect(throws: error) { try c.append(key: key, value: value) }
        #expect(c.parameters.isEmpty)
    }

    @Test("append(contentsOf:) adds every parameter")
    func appendContents() throws {
        var c = try KernelCommandLine("console=ttyS0")
        try c.append(contentsOf: " reboot=t  panic=-1 ")
        #expect(c.parameters == ["console=ttyS0", "reboot=t", "panic=-1"])
        #expect(throws: KernelCommandLine.Error.unbalancedQuote) { try c.append(contentsOf: "x=\"") }
    }
}
