// libFuzzer's entry points (FuzzSupport/Driver.swift says why main is fuzz_tree_main).
import FuzzSupport

@_cdecl("LLVMFuzzerTestOneInput")
func testOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt { one(data, size) }

@_cdecl("fuzz_tree_main")
func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    runLibFuzzer(argc, argv) { one($0, $1) }
}
