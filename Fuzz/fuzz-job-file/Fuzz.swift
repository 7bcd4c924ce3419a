// libFuzzer target: batch job files (YAML or JSON, through Yams): whatever the text,
// BatchFile.parse returns jobs or a BatchFileError with diagnostics; it never traps.
import Foundation
@testable import SandboxBatch

func one(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let data else { return 0 }
    let text = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    do {
        let jobs = try BatchFile.parse(text, file: "fuzz.yaml", baseDirectory: "/nonexistent")
        for j in jobs where j.name.isEmpty { fatalError("a job without a name was accepted") }
    } catch {
        guard !error.diagnostics.isEmpty else { fatalError("a refused job file without a diagnostic") }
    }
    return 0
}
