#if canImport(Glibc)
import Glibc
#endif

/// A failed system call: which call, and the errno it returned.
public struct SystemError: Error, Equatable, CustomStringConvertible, Sendable {
    /// The name of the failed call, e.g. `"open(/dev/kvm)"` or `"KVM_CREATE_VM"`.
    public let call: String
    /// The errno value.
    public let errno: Int32

    public init(_ call: String, errno: Int32) {
        self.call = call
        self.errno = errno
    }

    /// `strerror(errno)`.
    public var message: String { String(cString: strerror(errno)) }

    public var description: String { "\(call): \(message) (errno \(errno))" }
}

/// Runs a raw system call, retrying on EINTR; throws `SystemError` naming the call on failure.
/// - Parameter body: performs the call and returns its raw result (negative with `errno` set on failure).
@discardableResult
public func retryingEINTR<T: FixedWidthInteger>(_ call: @autoclosure () -> String, _ body: () -> T) throws(SystemError) -> T {
    while true {
        let r = body()
        if r >= 0 { return r }
        let e = Glibc.errno
        if e == EINTR { continue }
        throw SystemError(call(), errno: e)
    }
}

/// Converts a C shim result that is either a value >= 0 or `-errno`.
@discardableResult
public func checkNegErrno(_ call: @autoclosure () -> String, _ result: Int32) throws(SystemError) -> Int32 {
    if result < 0 { throw SystemError(call(), errno: -result) }
    return result
}
