import Sandbox
import Foundation
import Yams

/// What a batch job must end with to pass.
public enum BatchExpectation: Sendable, Equatable, CustomStringConvertible {
    case exit(Int32)
    case signal(Int32)
    case timeout

    /// True if `outcome` is the expected one.
    public func isMet(by outcome: Outcome) -> Bool {
        switch (self, outcome) {
        case (.exit(let want), .exited(let got)): return want == got
        case (.signal(let want), .signalled(let got)): return want == got
        case (.timeout, .timedOut): return true
        default: return false
        }
    }

    public var description: String {
        switch self {
        case .exit(let c): return "exit \(c)"
        case .signal(let s): return "signal \(s)"
        case .timeout: return "timeout"
        }
    }
}

/// One job of a batch: a command, the sandbox it runs in, and what it must end with.
public struct BatchJob: Sendable {
    public var name: String
    public var command: [String]
    public var configuration: SandboxConfiguration
    public var expectation: BatchExpectation = .exit(0)
    /// Extra attempts when the expectation is not met.
    public var retries: Int = 0
    /// Its position in the job file (0-based): results and reports carry it, so shards of
    /// one file merge back in file order. nil: its position in the list it is run with.
    public var position: Int?

    public init(name: String, command: [String], configuration: SandboxConfiguration = SandboxConfiguration(),
                expectation: BatchExpectation = .exit(0), retries: Int = 0, position: Int? = nil) {
        self.name = name
        self.command = command
        self.configuration = configuration
        self.expectation = expectation
        self.retries = retries
        self.position = position
    }
}

/// One share of a job file's jobs for one of N machines (`sandbox batch --shard K/N`):
/// the jobs whose position in the file is K-1 modulo N. The split depends only on the
/// file, so every machine computes the same one; every job is in exactly one shard, and
/// shards differ in size by at most one job.
public struct BatchShard: Sendable, Equatable, CustomStringConvertible {
    /// 1-based.
    public let index: Int
    public let count: Int

    public init(index: Int, count: Int) throws(BatchFileError) {
        guard count >= 1, index >= 1, index <= count else {
            throw BatchFileError(diagnostics: [BatchFileDiagnostic(file: "--shard", line: 0, column: 0, message: "shard \(index)/\(count): want K/N with 1 <= K <= N")])
        }
        self.index = index
        self.count = count
    }

    /// Parses "K/N" (e.g. "2/4").
    public init(parsing text: String) throws(BatchFileError) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let k = Int(parts[0]), let n = Int(parts[1]) else {
            throw BatchFileError(diagnostics: [BatchFileDiagnostic(file: "--shard", line: 0, column: 0, message: "\"\(text)\" is not K/N (e.g. 2/4)")])
        }
        try self.init(index: k, count: n)
    }

    public var description: String { "\(index)/\(count)" }

    /// This shard's jobs, in file order, each keeping its position in the file.
    public func select(_ jobs: [BatchJob]) -> [BatchJob] {
        jobs.enumerated().compactMap { i, job in
            var j = job
            j.position = job.position ?? i
            return j.position! % count == index - 1 ? j : nil
        }
    }
}

/// A problem in a job file, at a position (1-based line and column; 0 when unknown).
public struct BatchFileDiagnostic: Sendable, Equatable, CustomStringConvertible {
    public var file: String
    public var line: Int
    public var column: Int
    public var message: String

    public var description: String {
        line > 0 ? (column > 0 ? "\(file):\(line):\(column): \(message)" : "\(file):\(line): \(message)") : "\(file): \(message)"
    }
}

/// Thrown when a job file is invalid; carries every problem found.
public struct BatchFileError: Error, Sendable, CustomStringConvertible {
    public var diagnostics: [BatchFileDiagnostic]
    public var description: String { diagnostics.map(\.description).joined(separator: "\n") }
}

/// Loads and validates job files (YAML, or JSON, which is YAML too).
///
/// The whole file is checked before anything runs: unknown keys, wrong types, missing
/// or duplicate names, negative numbers and missing copy-in files are all reported,
/// each with its line and column.
public enum BatchFile {
    static let topLevelKeys: Set<String> = ["defaults", "jobs"]
    static let settingKeys: Set<String> = ["image", "env", "files", "timeout", "expect", "expected_exit", "signal",
                                           "retries", "memory", "cpus", "workdir", "disk_size", "snapshot", "cold", "template"]
    static let jobKeys: Set<String> = settingKeys.union(["name", "command"])

    /// Reads `path` and returns its jobs in file order.
    /// - Parameter displayPath: how to name the file in diagnostics (default: `path`).
    /// - Throws: `BatchFileError` listing every problem.
    public static func load(path: String, displayPath: String? = nil) throws(BatchFileError) -> [BatchJob] {
        let shown = displayPath ?? path
        guard let data = FileManager.default.contents(atPath: path) else {
            throw BatchFileError(diagnostics: [BatchFileDiagnostic(file: shown, line: 0, column: 0, message: "cannot read the job file")])
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw BatchFileError(diagnostics: [BatchFileDiagnostic(file: shown, line: 0, column: 0, message: "the job file is not UTF-8 text")])
        }
        let directory = (URL(fileURLWithPath: path).standardizedFileURL.deletingLastPathComponent()).path
        return try parse(text, file: shown, baseDirectory: directory)
    }

    /// Parses job-file text. Relative `files[].from` paths resolve against `baseDirectory`.
    public static func parse(_ text: String, file: String, baseDirectory: String) throws(BatchFileError) -> [BatchJob] {
        var parser = Validator(file: file, baseDirectory: baseDirectory)
        let jobs = parser.parse(text)
        if !parser.diagnostics.isEmpty {
            throw BatchFileError(diagnostics: parser.diagnostics.enumerated().sorted {
                ($0.element.line, $0.element.column, $0.offset) < ($1.element.line, $1.element.column, $1.offset)
            }.map(\.element))
        }
        return jobs
    }
}

/// Settings that `defaults` and each job can carry; nil = not given.
private struct JobSettings {
    var image: String?
    var env: [String: String] = [:]
    var files: [FileCopy] = []
    var timeout: Double?
    var expectation: BatchExpectation?
    var retries: Int?
    var memory: UInt64?
    var cpus: Int?
    var workdir: String?
    var diskSizeMiB: UInt64?
    var snapshot: String?
    var cold: Bool?
    var template: String?
}

private struct Validator {
    let file: String
    let baseDirectory: String
    var diagnostics: [BatchFileDiagnostic] = []

    init(file: String, baseDirectory: String) {
        self.file = file
        self.baseDirectory = baseDirectory
    }

    mutating func error(_ node: Node?, _ message: String) {
        error(at: node?.mark, message)
    }

    mutating func error(at mark: Mark?, _ message: String) {
        diagnostics.append(BatchFileDiagnostic(file: file, line: mark?.line ?? 0, column: mark?.column ?? 0, message: message))
    }

    mutating func parse(_ text: String) -> [BatchJob] {
        let root: Node
        do {
            guard let r = try Yams.compose(yaml: text) else {
                error(at: nil, "the job file is empty")
                return []
            }
            root = r
        } catch let e as YamlError {
            switch e {
            case .scanner(_, let problem, let mark, _), .parser(_, let problem, let mark, _), .composer(_, let problem, let mark, _):
                error(at: mark, "not valid YAML or JSON: \(problem)")
            default:
                error(at: nil, "not valid YAML or JSON: \(e)")
            }
            return []
        } catch {
            self.error(at: nil, "not valid YAML or JSON: \(error)")
            return []
        }
        guard let top = root.mapping else {
            error(root, "the top level must be a mapping with 'jobs' (and optionally 'defaults')")
            return []
        }
        var defaults = JobSettings()
        var jobsNode: Node?
        var seenKeys: Set<String> = []
        for (key, value) in top {
            guard let k = key.scalar?.string else { error(key, "keys must be strings"); continue }
            if !seenKeys.insert(k).inserted { error(key, "duplicate key '\(k)'"); continue }
            switch k {
            case "defaults":
                guard let m = value.mapping else { error(value, "'defaults' must be a mapping"); continue }
                defaults = settings(m, context: "defaults", allowed: BatchFile.settingKeys)
            case "jobs": jobsNode = value
            default: error(key, "unknown top-level key '\(k)' (expected \(BatchFile.topLevelKeys.sorted().map { "'\($0)'" }.joined(separator: " or ")))")
            }
        }
        guard let jobsNode else {
            error(root, "missing 'jobs' (a list of jobs)")
            return []
        }
        guard let list = jobsNode.sequence else {
            error(jobsNode, "'jobs' must be a list")
            return []
        }
        if list.isEmpty { error(jobsNode, "'jobs' is empty") }

        var jobs: [BatchJob] = []
        var seen: [String: Mark?] = [:]
        for (index, item) in list.enumerated() {
            guard let m = item.mapping else {
                error(item, "job #\(index + 1): must be a mapping with 'name' and 'command'")
                continue
            }
            let nameNode = m["name"]
            var label = "job #\(index + 1)"
            var name: String?
            if let nameNode {
                if let s = nameNode.scalar, !has(nameNode, .null), !s.string.isEmpty {
                    name = s.string
                    label = "job '\(s.string)'"
                } else {
                    error(nameNode, "\(label): 'name' must be a non-empty string")
                }
            } else {
                error(item, "\(label): missing 'name'")
            }
            if let name, let nameNode {
                if let first = seen[name] {
                    error(nameNode, "\(label): duplicate name (first defined at \(first.map { "\($0.line):\($0.column)" } ?? "?"))")
                } else {
                    seen[name] = nameNode.mark
                }
            }
            let s = settings(m, context: label, allowed: BatchFile.jobKeys)
            var command: [String]?
            if let c = m["command"] {
                if let seq = c.sequence {
                    var argv: [String] = []
                    for a in seq {
                        if let sc = a.scalar, !has(a, .null) { argv.append(sc.string) } else { error(a, "\(label): 'command' items must be strings") }
                    }
                    if seq.isEmpty { error(c, "\(label): 'command' is empty") }
                    if argv.count == seq.count && !seq.isEmpty { command = argv }
                } else if let sc = c.scalar, !has(c, .null), !sc.string.isEmpty {
                    command = ["sh", "-c", sc.string]
                } else {
                    error(c, "\(label): 'command' must be a string (run with sh -c) or a list of strings")
                }
            } else {
                error(item, "\(label): missing 'command'")
            }
            guard let name, let command else { continue }
            var config = SandboxConfiguration()
            if let v = s.image ?? defaults.image { config.image = v }
            config.environment = defaults.env.merging(s.env) { _, job in job }
            config.copyIn = defaults.files + s.files
            if let t = s.timeout ?? defaults.timeout { config.timeout = try? InputCheck.seconds(t, name: "timeout") }
            if let v = s.memory ?? defaults.memory { config.memoryMiB = v }
            if let v = s.cpus ?? defaults.cpus { config.cpus = v }
            if let v = s.diskSizeMiB ?? defaults.diskSizeMiB { config.diskSizeMiB = v }
            if let v = s.snapshot ?? defaults.snapshot { config.snapshot = v }
            if let v = s.cold ?? defaults.cold { config.cold = v }
            if config.snapshot != nil && config.cold {
                error(m["cold"] ?? m["snapshot"] ?? item, "\(label): 'cold' cannot be combined with 'snapshot' (a job either boots or restores)")
            }
            if let t = s.template ?? defaults.template {
                // The template brings the VM: the job's own shape keys contradict it, and
                // the defaults' do not apply.
                let clashing = ["image", "memory", "cpus", "disk_size", "snapshot", "cold"].filter { m[$0] != nil }
                if !clashing.isEmpty {
                    error(m[clashing[0]] ?? item, "\(label): \(clashing.map { "'\($0)'" }.joined(separator: ", ")) cannot be combined with 'template' (the template brings its image, memory, cpus and disk)")
                }
                config = SandboxConfiguration()
                config.environment = defaults.env.merging(s.env) { _, job in job }
                config.copyIn = defaults.files + s.files
                if let t = s.timeout ?? defaults.timeout { config.timeout = try? InputCheck.seconds(t, name: "timeout") }
                config.template = t
            }
            if config.snapshot != nil && config.diskSizeMiB != nil {
                error(m["disk_size"] ?? m["snapshot"] ?? item, "\(label): 'disk_size' cannot be combined with 'snapshot' (the disk is the snapshot's)")
            }
            if let v = s.workdir ?? defaults.workdir { config.workingDirectory = v }
            let expectation = s.expectation ?? defaults.expectation ?? .exit(0)
            if expectation == .timeout && config.timeout == nil {
                error(m["expect"] ?? item, "\(label): 'expect: timeout' needs a 'timeout' greater than 0")
            }
            jobs.append(BatchJob(name: name, command: command, configuration: config, expectation: expectation,
                                 retries: s.retries ?? defaults.retries ?? 0, position: jobs.count))
        }
        return jobs
    }

    /// Reads the settings keys of a job or of `defaults`, reporting unknown keys and bad values.
    mutating func settings(_ m: Node.Mapping, context: String, allowed: Set<String>) -> JobSettings {
        var s = JobSettings()
        var expectKeys: [Node] = []
        var seenKeys: Set<String> = []
        for (key, value) in m {
            guard let k = key.scalar?.string else { error(key, "\(context): keys must be strings"); continue }
            if !seenKeys.insert(k).inserted { error(key, "\(context): duplicate key '\(k)'"); continue }
            guard allowed.contains(k) else {
                error(key, "\(context): unknown key '\(k)'" + (Validator.suggestion(k, in: allowed).map { " (did you mean '\($0)'?)" } ?? ""))
                continue
            }
            switch k {
            case "name", "command": break
            case "image":
                s.image = string(value, context: context, key: k)
            case "workdir":
                if let w = string(value, context: context, key: k) {
                    if w.hasPrefix("/") { s.workdir = w } else { error(value, "\(context): 'workdir' must be an absolute guest path") }
                }
            case "env":
                guard let em = value.mapping else { error(value, "\(context): 'env' must be a mapping of names to strings"); break }
                for (ek, ev) in em {
                    guard let name = ek.scalar?.string, !name.isEmpty, !name.contains("=") else {
                        error(ek, "\(context): 'env' names must be non-empty strings without '='"); continue
                    }
                    guard let v = ev.scalar else { error(ev, "\(context): env '\(name)' must be a string"); continue }
                    s.env[name] = has(ev, .null) ? "" : v.string
                }
            case "files":
                guard let seq = value.sequence else { error(value, "\(context): 'files' must be a list of {from: HOSTPATH, to: GUESTPATH}"); break }
                for f in seq {
                    if let copy = fileCopy(f, context: context) { s.files.append(copy) }
                }
            case "timeout":
                if let t = number(value) {
                    do { _ = try InputCheck.seconds(t, name: "'timeout'"); s.timeout = t } catch let e {
                        error(value, "\(context): \(e.message)")
                    }
                } else {
                    error(value, "\(context): 'timeout' must be a number of seconds")
                }
            case "retries":
                if let r = integer(value), r >= 0 { s.retries = r } else { error(value, "\(context): 'retries' must be a whole number >= 0") }
            case "memory":
                if let r = integer(value), r >= 32 { s.memory = UInt64(r) } else { error(value, "\(context): 'memory' must be a whole number of MiB >= 32") }
            case "cpus":
                if let r = integer(value), r >= 1, r <= InputCheck.maxCPUs { s.cpus = r } else { error(value, "\(context): 'cpus' must be a whole number from 1 to \(InputCheck.maxCPUs)") }
            case "snapshot":
                if let given = string(value, context: context, key: k) {
                    // Relative to the job file, as copy-in paths are.
                    let dir = given.hasPrefix("/") ? given : (baseDirectory as NSString).appendingPathComponent(given)
                    if FileManager.default.fileExists(atPath: dir + "/state.json") { s.snapshot = dir } else {
                        error(value, "\(context): 'snapshot' \(dir) is not a snapshot directory (no state.json; make one with `sandbox snapshot create`)")
                    }
                }
            case "cold":
                if has(value, .bool), let b = value.bool { s.cold = b } else { error(value, "\(context): 'cold' must be true or false") }
            case "template":
                if let name = string(value, context: context, key: k) {
                    do { _ = try Templates.path(name); s.template = name } catch let e {
                        error(value, "\(context): 'template': \(e.message)")
                    }
                }
            case "disk_size":
                // A whole number of MiB, or a string with a unit ("4G").
                let text = integer(value).map(String.init) ?? value.scalar?.string ?? ""
                do {
                    let mib = try InputCheck.parseSizeMiB(text, name: "'disk_size'")
                    try InputCheck.diskSize(mib, name: "'disk_size'")
                    s.diskSizeMiB = mib
                } catch let e {
                    error(value, "\(context): \(e.message)")
                }
            case "expected_exit":
                expectKeys.append(key)
                if let c = integer(value), (0...255).contains(c) { s.expectation = .exit(Int32(c)) } else { error(value, "\(context): 'expected_exit' must be an exit code from 0 to 255") }
            case "signal":
                expectKeys.append(key)
                if let c = integer(value), (1...64).contains(c) { s.expectation = .signal(Int32(c)) } else { error(value, "\(context): 'signal' must be a signal number from 1 to 64") }
            case "expect":
                expectKeys.append(key)
                if let e = expectation(value, context: context) { s.expectation = e }
            default: break
            }
        }
        if expectKeys.count > 1 {
            error(expectKeys[1], "\(context): give only one of 'expect', 'expected_exit' and 'signal'")
        }
        return s
    }

    /// `expect: 3`, `expect: timeout`, `expect: {exit: 3}`, `expect: {signal: 9}`.
    mutating func expectation(_ value: Node, context: String) -> BatchExpectation? {
        let message = "\(context): 'expect' must be an exit code, 'timeout', {exit: N} or {signal: N}"
        if let c = integer(value) {
            guard (0...255).contains(c) else { error(value, message); return nil }
            return .exit(Int32(c))
        }
        if let s = value.scalar, has(value, .str), s.string == "timeout" { return .timeout }
        if let m = value.mapping, m.count == 1, let (k, v) = m.first.map({ ($0.key.scalar?.string, $0.value) }) {
            if k == "exit", let c = integer(v), (0...255).contains(c) { return .exit(Int32(c)) }
            if k == "signal", let c = integer(v), (1...64).contains(c) { return .signal(Int32(c)) }
        }
        error(value, message)
        return nil
    }

    mutating func fileCopy(_ node: Node, context: String) -> FileCopy? {
        guard let m = node.mapping else { error(node, "\(context): each 'files' entry must be {from: HOSTPATH, to: GUESTPATH}"); return nil }
        var from: String?, to: String?
        for (k, v) in m {
            switch k.scalar?.string {
            case "from": from = string(v, context: context, key: "from")
            case "to": to = string(v, context: context, key: "to")
            default: error(k, "\(context): unknown key '\(k.scalar?.string ?? "?")' in a 'files' entry (expected 'from' and 'to')")
            }
        }
        guard let from else { error(node, "\(context): 'files' entry without 'from'"); return nil }
        guard let to else { error(node, "\(context): 'files' entry without 'to'"); return nil }
        guard to.hasPrefix("/") else { error(m["to"], "\(context): 'to' must be an absolute guest path"); return nil }
        let host = from.hasPrefix("/") ? from : (baseDirectory as NSString).appendingPathComponent(from)
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: host, isDirectory: &isDirectory) else {
            error(m["from"], "\(context): copy-in file '\(from)' does not exist"); return nil
        }
        guard FileManager.default.isReadableFile(atPath: host) else {
            error(m["from"], "\(context): copy-in \(isDirectory.boolValue ? "directory" : "file") '\(from)' is not readable"); return nil
        }
        return FileCopy(hostPath: host, guestPath: to)
    }

    mutating func string(_ node: Node, context: String, key: String) -> String? {
        guard let s = node.scalar, !has(node, .null), !s.string.isEmpty else {
            error(node, "\(context): '\(key)' must be a non-empty string")
            return nil
        }
        return s.string
    }

    func has(_ node: Node, _ tag: Tag.Name) -> Bool { node.tag == Tag(tag) }

    func number(_ node: Node) -> Double? {
        guard has(node, .int) || has(node, .float) else { return nil }
        return node.float.flatMap { $0.isFinite ? $0 : nil }
    }

    func integer(_ node: Node) -> Int? {
        guard has(node, .int) else { return nil }
        return node.int
    }

    /// The allowed key closest to a misspelled one, if any is close.
    static func suggestion(_ key: String, in allowed: Set<String>) -> String? {
        func distance(_ a: [Character], _ b: [Character]) -> Int {
            var row = Array(0...b.count)
            for i in 1...max(a.count, 1) where !a.isEmpty {
                var prev = row[0]; row[0] = i
                for j in 1...max(b.count, 1) where !b.isEmpty {
                    let cur = row[j]
                    row[j] = min(row[j] + 1, row[j - 1] + 1, prev + (a[i - 1] == b[j - 1] ? 0 : 1))
                    prev = cur
                }
            }
            return row[b.count]
        }
        let k = Array(key.lowercased())
        return allowed.map { ($0, distance(k, Array($0))) }.filter { $0.1 <= 2 }.min { $0.1 < $1.1 }?.0
    }
}
