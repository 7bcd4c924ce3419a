/// Looks image names up in the image store (kept apart so the store can evolve).
enum ImageStoreResolver {
    /// The image file for `name` from the default store (`$SANDBOX_CACHE/images`),
    /// building its recipe first (the default `busybox` included) if needed.
    static func resolve(_ name: String, progress: (String) -> Void) throws -> String {
        try ImageStore().path(name, progress: progress)
    }
}
