// sandbox-init: the guest's PID 1 and agent. See Docs/AgentProtocol.md.
//
//   sandbox-init                    PID 1 mode: set up the system, serve on vsock 1024
//   sandbox-init --listen-unix PATH serve the same protocol on a Unix socket (host tests)
//   sandbox-init --selftest         run `/bin/sh -c 'echo hi'` locally and print the result
import AgentProtocol
import CInit
import SandboxABI
import Glibc
import SystemShims

let initStarted = nowNanos()
let isPID1 = getpid() == 1
let arguments = Array(CommandLine.arguments.dropFirst())

func usage() -> Never {
    log("usage: sandbox-init [--listen-unix PATH | --selftest]")
    exit(2)
}

func makeReaper() -> Reaper {
    do { return try Reaper() } catch {
        log("\(error)")
        if isPID1 { Boot.powerOff() }
        exit(1)
    }
}

switch arguments.first {
case "--selftest":
    exit(SelfTest.run(reaper: makeReaper()))

case "--listen-unix":
    guard arguments.count == 2 else { usage() }
    let reaper = makeReaper()
    // Reap orphans like PID 1 would, so host tests see the same behaviour.
    _ = cinit_set_child_subreaper()
    let fd = cinit_unix_listen(arguments[1], 16)
    guard fd >= 0 else {
        log("cannot listen on unix socket \(arguments[1]): \(errnoDescription(-fd))")
        exit(1)
    }
    log("listening on unix socket \(arguments[1])")
    Agent(reaper: reaper, initStartedNanos: initStarted).serve(listenFD: fd)
    close(fd)
    unlink(arguments[1])
    log("shutdown requested")
    exit(0)

case nil:
    if isPID1 {
        Boot.marker(.initStarted)
        Boot.setUpSystem()
    }
    let reaper = makeReaper()
    let port = GuestABI.agentVsockPort
    let fd = cinit_vsock_listen(port, 16)
    guard fd >= 0 else {
        log("cannot listen on vsock port \(port): \(errnoDescription(-fd)) (errno \(-fd))")
        if isPID1 {
            log("no vsock device; powering off in 3 seconds")
            sleep(3)
            Boot.powerOff()
        }
        exit(1)
    }
    log("listening on vsock port \(port)")
    if isPID1 {
        // AF_VSOCK works with only the loopback transport; without virtio-vsock no
        // host can connect, so do not sit there forever (e.g. QEMU without vsock).
        let cid = cinit_vsock_local_cid()
        if cid <= 2 /* VMADDR_CID_HOST */ || cid == Int64(UInt32.max) /* VMADDR_CID_ANY */ {
            let what = cid < 0 ? errnoDescription(Int32(-cid)) : "local CID \(cid)"
            log("no vsock guest transport (\(what)); powering off in 3 seconds")
            sleep(3)
            Boot.powerOff()
        }
        log("vsock guest CID \(cid)")
        Boot.marker(.agentReady)
    }
    Agent(reaper: reaper, initStartedNanos: initStarted).serve(listenFD: fd)
    log("shutdown requested")
    if isPID1 { Boot.powerOff() }
    exit(0)

default:
    usage()
}
