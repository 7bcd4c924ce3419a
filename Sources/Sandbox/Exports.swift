// One `import Sandbox` gives the whole public API: the error type (SandboxCore) and the
// kernel and image stores (SandboxImages) are part of it.
@_exported import SandboxCore
@_exported import SandboxImages
