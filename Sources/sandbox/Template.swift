import ArgumentParser
import Foundation
import Sandbox
#if canImport(Glibc)
import Glibc
#endif

struct TemplateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "template",
        abstract: "Named templates: a sandbox prepared by a setup command, snapshotted, and started from in milliseconds.",
        discussion: """
        `sandbox template create NAME --run 'CMD'` starts a sandbox, runs CMD in it (sh -c), \
        and snapshots the VM as CMD left it: its memory, its processes, its disk. \
        `sandbox exec --template NAME -- ...` and batch jobs with `template: NAME` start there. \
        Templates live in the cache (`$SANDBOX_CACHE/templates`).
        """,
        subcommands: [Create.self, List.self, Remove.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "create", abstract: "Make a template: start a sandbox, run the setup command, snapshot it.")
        @Argument(help: "The template's name (letters, digits, '-', '_', '.').")
        var name: String
        @OptionGroup var vm: VMOptions
        @Option(name: .customLong("run"), help: "The setup command, run with sh -c; the template is made only if it exits 0.")
        var setup: String
        @Option(parsing: .unconditional, help: "Wall-clock limit for the setup command, in seconds (0 = none).")
        var timeout: Double = 1800
        @Option(name: .customLong("env"), help: "Set an environment variable for the setup command (K=V); repeatable.")
        var env: [String] = []
        @Option(help: "Working directory of the setup command in the guest.")
        var workdir: String = "/"
        @Flag(help: "Replace an existing template of this name (once the new one is made).")
        var replace = false
        @Flag(help: "Boot the kernel for the setup instead of restoring the start snapshot.")
        var cold = false

        func run() throws {
            var config = SandboxConfiguration()
            config.workingDirectory = workdir
            config.cold = cold
            config.outputLimit = 0
            do {
                config.environment = try parseEnvironment(env)
                config.timeout = try InputCheck.seconds(timeout, name: "--timeout")
                try vm.apply(to: &config)
                printError("sandbox: making template \(name): running the setup command in a \(config.image) sandbox")
                // The setup's output is shown as it runs (both streams on stderr: stdout
                // stays free for scripts).
                let info = try Templates.create(name: name, configuration: config, setup: ["sh", "-c", setup], replace: replace,
                                                onOutput: { event in
                                                    switch event {
                                                    case .stdout(let b), .stderr(let b): b.withUnsafeBytes { writeAll(2, $0) }
                                                    }
                                                }, progress: { printError($0) })
                printError(String(format: "sandbox: template %@ made in %.0f ms (%@)", info.name, info.makeMillis,
                                  Self.size(Templates.bytesOnDisk(info.name))))
            } catch {
                printError("sandbox template create: \(error)")
                throw ExitCode(1)
            }
        }

        static func size(_ bytes: UInt64) -> String {
            bytes >= 1 << 30 ? String(format: "%.1f GiB", Double(bytes) / Double(1 << 30)) : String(format: "%.1f MiB", Double(bytes) / Double(1 << 20))
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List the templates.")
        func run() throws {
            let all = Templates.list()
            if all.isEmpty {
                print("no templates (make one with `sandbox template create NAME --run 'CMD'`)")
                return
            }
            let f = ISO8601DateFormatter()
            print("NAME\tIMAGE\tMEMORY\tCPUS\tON DISK\tCREATED\tSETUP")
            for t in all {
                let setup = t.setup.count == 3 && t.setup[0] == "sh" && t.setup[1] == "-c" ? t.setup[2] : t.setup.joined(separator: " ")
                print("\(t.name)\t\(t.image)\t\(t.memoryMiB) MiB\t\(t.cpus)\t\(Create.size(Templates.bytesOnDisk(t.name)))\t\(f.string(from: t.created))\t\(setup.prefix(60))")
            }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "rm", abstract: "Remove templates.")
        @Argument(help: "The templates to remove.")
        var names: [String]
        func run() throws {
            var failed = false
            for n in names {
                do { try Templates.remove(n) } catch {
                    printError("sandbox template rm: \(error)")
                    failed = true
                }
            }
            if failed { throw ExitCode(1) }
        }
    }
}
