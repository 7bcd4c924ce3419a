/// The library's one public error: a code to switch on, a message for people, and the
/// error underneath when there was one. `Outcome.infrastructureError` carries it, every
/// throwing API of `Sandbox` throws it, and the VMM process reports its failures as one.
///
/// ```swift
/// if case .infrastructureError(let e) = result.outcome, e.code == .noKVM { ... }
/// ```
public struct SandboxError: Error, Sendable, Equatable, Codable, CustomStringConvertible {
    /// What kind of thing went wrong.
    public enum Code: String, Sendable, Codable, CaseIterable {
        /// Bad input from the caller: flags, paths, configuration values, job files.
        case invalidInput
        /// No usable /dev/kvm (missing, no permission, missing capabilities).
        case noKVM
        /// The guest kernel: building, finding or loading it.
        case kernel
        /// A root image: building, importing, finding or validating it.
        case image
        /// A snapshot: taking, validating or restoring it.
        case snapshot
        /// The guest agent: it did not answer, broke the protocol, or refused a request.
        case agent
        /// The guest: it did not boot in time, or stopped before its command finished.
        case guest
        /// The caller's deadline passed while the sandbox itself did not respond.
        case timeout
        /// The VMM's jail could not be applied, or the jail stopped the VMM.
        case jail
        /// The VMM process could not be found or started, or died.
        case vmm
        /// Something the host lacks: a package, a tool, a directory, a permission.
        case host
        /// The run was cancelled by its caller.
        case cancelled
        /// A bug in this library.
        case `internal`
    }

    public var code: Code
    public var message: String
    /// The error underneath (a system call's, a decoder's, ...), when there was one.
    public var underlying: (any Error & Sendable)?

    public init(_ code: Code, _ message: String, underlying: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.underlying = underlying
    }

    public var description: String {
        guard let underlying else { return message }
        return "\(message): \(underlying)"
    }

    /// Same code, message and underlying description.
    public static func == (a: SandboxError, b: SandboxError) -> Bool {
        a.code == b.code && a.message == b.message && a.underlying.map { "\($0)" } == b.underlying.map { "\($0)" }
    }

    private enum CodingKeys: String, CodingKey { case code, message, underlying }

    /// Across a process boundary the underlying error travels as its description.
    public struct Described: Error, Sendable, CustomStringConvertible {
        public let description: String
        public init(description: String) { self.description = description }
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        code = try c.decode(Code.self, forKey: .code)
        message = try c.decode(String.self, forKey: .message)
        underlying = try c.decodeIfPresent(String.self, forKey: .underlying).map { Described(description: $0) }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(code, forKey: .code)
        try c.encode(message, forKey: .message)
        try c.encodeIfPresent(underlying.map { "\($0)" }, forKey: .underlying)
    }
}

extension SandboxError {
    /// Shorthands for the common codes.
    public static func invalidInput(_ message: String) -> SandboxError { SandboxError(.invalidInput, message) }
    public static func image(_ message: String) -> SandboxError { SandboxError(.image, message) }
    public static func kernel(_ message: String) -> SandboxError { SandboxError(.kernel, message) }
    public static func host(_ message: String) -> SandboxError { SandboxError(.host, message) }
    public static func agent(_ message: String) -> SandboxError { SandboxError(.agent, message) }
    public static func guest(_ message: String) -> SandboxError { SandboxError(.guest, message) }
    public static func vmm(_ message: String) -> SandboxError { SandboxError(.vmm, message) }
    public static func `internal`(_ message: String) -> SandboxError { SandboxError(.internal, message) }
    /// The caller cancelled the run.
    public static let cancelled = SandboxError(.cancelled, "cancelled")
}

extension SandboxError {
    /// `error` itself when it is a `SandboxError`, else one with `code` whose message is
    /// `context` (or the error's description) and whose underlying error is `error`.
    public static func from(_ error: any Error, code: Code, context: String? = nil) -> SandboxError {
        if let e = error as? SandboxError { return e }
        let underlying: any Error & Sendable = (error as? any Error & Sendable) ?? Described(description: "\(error)")
        guard let context else { return SandboxError(code, "\(error)") }
        return SandboxError(code, context, underlying: underlying)
    }
}
