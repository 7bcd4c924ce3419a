import Synchronization

/// A weak reference that can be shared between threads: lets a callback created before
/// an object finishes its init (a device handler, a worker) reach it later without
/// keeping it alive.
public final class WeakReference<Object: AnyObject & Sendable>: Sendable {
    private struct Ref { weak var object: Object? }
    private let ref = Mutex(Ref())

    public init() {}

    /// The object, or nil once it is gone (or before it is set).
    public var object: Object? {
        get { ref.withLock { $0.object } }
        set { ref.withLock { $0.object = newValue } }
    }
}
