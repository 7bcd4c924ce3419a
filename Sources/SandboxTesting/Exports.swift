@_exported import Sandbox
