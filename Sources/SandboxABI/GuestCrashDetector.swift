/// Recognises a guest kernel crash in its console output (the kernel and the host agree
/// on these console lines as they agree on the ports in ``GuestABI``). Linux guests without ACPI
/// end every run with a reset (`reboot=t`), and `panic=-1` turns a panic into the
/// same reset, so the console is what tells a crash from a clean end.
public enum GuestCrashDetector {
    static let markers = ["Kernel panic - not syncing", "kernel BUG at"]

    /// The panic line if the console shows a kernel panic, else nil.
    public static func crashReason(consoleTail: String) -> String? {
        for line in consoleTail.split(whereSeparator: \.isNewline) {
            for marker in markers where line.contains(marker) {
                return String(line)
            }
        }
        return nil
    }
}
