// swift-tools-version:6.1
// An example of a package whose tests run commands in sandboxes with SandboxTesting.
// In your own package, depend on the sandbox repository by URL instead of by path.
import PackageDescription

let package = Package(
    name: "SandboxExample",
    platforms: [.macOS(.v14)],
    dependencies: [
        // `name:` because a path dependency is otherwise known by its folder's name.
        .package(name: "sandbox", path: "../../.."),
    ],
    targets: [
        .testTarget(name: "ExampleTests", dependencies: [
            .product(name: "SandboxTesting", package: "sandbox"),
            // The VMM executable each sandbox runs in. Depending on the product makes
            // SwiftPM build it next to the test bundle, where the library looks for it;
            // without this, a dependency's executables are not built at all.
            .product(name: "sandbox-vmm", package: "sandbox"),
        ], exclude: ["Fixtures"]),  // host files the tests copy into sandboxes by path
    ]
)
