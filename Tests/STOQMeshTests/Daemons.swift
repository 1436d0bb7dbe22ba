import Foundation
import STOQTestSupport
import STOQConfig
import STOQCore
import STOQMesh
import Testing

/// Real daemons nobody here wrote (dnsmasq, etcd), started by the tests on loopback ports.
struct MissingBinary: Error, CustomStringConvertible {
    let path: String
    let package: String
    var description: String {
        "\(path) is missing: install Debian's \(package) (apt-get install -y \(package), or scripts/install-deps)"
    }
}

/// The path of `binary`, or a failure saying which package to install.
func requireBinary(_ path: String, package: String) throws -> String {
    guard FileManager.default.isExecutableFile(atPath: path) else { throw MissingBinary(path: path, package: package) }
    return path
}

/// A loopback port nothing listens on (TCP and UDP), for a daemon to take.
func freePort() -> UInt16 {
    for _ in 0..<64 {
        let fd = socket(AF_INET6, Int32(SOCK_STREAM.rawValue), 0)
        var sa = IPv6Endpoint(address: .loopback, port: 0).sockaddr
        var len = socklen_t(MemoryLayout<sockaddr_in6>.size)
        let ok = withUnsafeMutablePointer(to: &sa) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0
            }
        }
        close(fd)
        let port = UInt16(bigEndian: sa.sin6_port)
        guard ok, port > 0 else { continue }
        let u = socket(AF_INET6, Int32(SOCK_DGRAM.rawValue), 0)
        var su = IPv6Endpoint(address: .loopback, port: port).sockaddr
        let free = withUnsafePointer(to: &su) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(u, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) == 0 }
        }
        close(u)
        if free { return port }
    }
    fatalError("no free loopback port")
}

/// Whether something accepts TCP connections on loopback `port`, polled every 50 ms for at most `timeout`.
func listening(_ port: UInt16, timeout: Duration = .seconds(10)) async -> Bool {
    await eventually(timeout: timeout) {
        let fd = socket(AF_INET6, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var sa = IPv6Endpoint(address: .loopback, port: port).sockaddr
        return withUnsafePointer(to: &sa) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) == 0 }
        }
    }
}

/// Spawns `path` with `arguments`, standard output and error appended to `log`, with every
/// signal unblocked and at its default (posix_spawn: a child of a test thread would otherwise
/// inherit the thread's blocked signals and ignore SIGTERM). Foundation's Process is not used:
/// its waitUntilExit hangs when called from several test tasks at once.
func spawn(_ path: String, _ arguments: [String], log: String, environment: [String]? = nil) throws -> pid_t {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0o644)
    posix_spawn_file_actions_adddup2(&actions, 1, 2)
    var attr = posix_spawnattr_t()
    posix_spawnattr_init(&attr)
    defer { posix_spawnattr_destroy(&attr) }
    var none = sigset_t()
    sigemptyset(&none)
    posix_spawnattr_setsigmask(&attr, &none)
    var defaults = sigset_t()
    sigemptyset(&defaults)
    for s in [SIGTERM, SIGINT, SIGHUP, SIGPIPE, SIGCHLD] { sigaddset(&defaults, s) }
    posix_spawnattr_setsigdefault(&attr, &defaults)
    posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
    let argv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { strdup($0) } + [nil]
    defer { for a in argv { free(a) } }
    var pid: pid_t = 0
    let rc: Int32
    if let environment {
        let envp: [UnsafeMutablePointer<CChar>?] = environment.map { strdup($0) } + [nil]
        defer { for e in envp { free(e) } }
        rc = posix_spawn(&pid, path, &actions, &attr, argv, envp)
    } else {
        rc = posix_spawn(&pid, path, &actions, &attr, argv, environ)
    }
    guard rc == 0 else { throw MissingBinary(path: "\(path) (posix_spawn: \(String(cString: strerror(rc))))", package: "?") }
    return pid
}

/// Waits for `pid` at most `timeout`; its exit status, or nil if it is still running.
func reap(_ pid: pid_t, timeout: Duration) -> Int32? {
    let end = ContinuousClock.now + timeout
    var status: Int32 = 0
    repeat {
        let r = waitpid(pid, &status, WNOHANG)
        if r == pid { return status }
        if r < 0 { return -1 }
        usleep(10_000)
    } while ContinuousClock.now < end
    return nil
}

/// Runs a tool to completion; its exit status and standard output (errors go to `dir/name.err`).
func runTool(_ path: String, _ arguments: [String], dir: URL, environment: [String]? = nil) throws -> (Int32, String, String) {
    let tag = UUID().uuidString.prefix(8)
    let out = dir.appendingPathComponent("tool-\(tag).out").path
    let pid = try spawn(path, arguments, log: out, environment: environment)
    guard let status = reap(pid, timeout: .seconds(30)) else {
        Foundation.kill(pid, SIGKILL)
        _ = reap(pid, timeout: .seconds(5))
        throw MissingBinary(path: "\(path) \(arguments.joined(separator: " ")) did not finish in 30 s", package: "?")
    }
    let text = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
    try? FileManager.default.removeItem(atPath: out)
    return (status, text, text)
}

/// A daemon process: its output goes to `dir/name.log`; stopped (SIGTERM) or killed (SIGKILL)
/// by the test, and killed when dropped.
final class Daemon {
    let pid: pid_t
    let log: URL
    private var running = true

    init(_ path: String, _ arguments: [String], dir: URL, name: String) throws {
        log = dir.appendingPathComponent("\(name).log")
        pid = try spawn(path, arguments, log: log.path)
    }

    /// SIGTERM, then SIGKILL if it has not exited within 5 s.
    func stop() {
        guard running else { return }
        Foundation.kill(pid, SIGTERM)
        if reap(pid, timeout: .seconds(5)) == nil { kill() }
        running = false
    }

    /// SIGKILL and wait: a crash, not a shutdown.
    func kill() {
        guard running else { return }
        Foundation.kill(pid, SIGKILL)
        _ = reap(pid, timeout: .seconds(10))
        running = false
    }

    var output: String { (try? String(contentsOf: log, encoding: .utf8)) ?? "" }

    deinit { kill() }
}


/// The member sets a backend reported, for tests to wait on.
actor MemberLog {
    private(set) var sets: [Set<MeshMember>] = []
    var latest: Set<MeshMember>? { sets.last }

    func add(_ s: Set<MeshMember>) { sets.append(s) }

    /// Waits (polling every 50 ms, at most `timeout`) until the latest set satisfies `condition`.
    func wait(timeout: Duration = .seconds(20), _ condition: @Sendable (Set<MeshMember>) -> Bool) async -> Bool {
        let end = ContinuousClock.now + timeout
        while ContinuousClock.now < end {
            if let l = sets.last, condition(l) { return true }
            try? await Task.sleep(for: .milliseconds(50))
        }
        return false
    }

    /// How many sets have been added so far: a mark for `waitSeen(after:)`.
    var count: Int { sets.count }

    /// Waits like `wait` until any set added after `mark` satisfies `condition`, however briefly
    /// it was the latest: a member with a short lease may come and go between two polls.
    func waitSeen(after mark: Int, timeout: Duration = .seconds(20), _ condition: @Sendable (Set<MeshMember>) -> Bool) async -> Bool {
        let end = ContinuousClock.now + timeout
        while ContinuousClock.now < end {
            if sets.dropFirst(mark).contains(where: condition) { return true }
            try? await Task.sleep(for: .milliseconds(50))
        }
        return false
    }
}

/// Runs `backend` in a task feeding `log`.
func start(_ backend: DiscoveryBackend, into log: MemberLog) -> Task<Void, Never> {
    Task { await backend.run { await log.add($0) } }
}

/// Polls `condition` every 50 ms for at most `timeout`.
func eventually(timeout: Duration = .seconds(20), _ condition: () async -> Bool) async -> Bool {
    let end = ContinuousClock.now + timeout
    while ContinuousClock.now < end {
        if await condition() { return true }
        try? await Task.sleep(for: .milliseconds(50))
    }
    return false
}

func member(_ text: String, _ id: UInt8? = nil) -> MeshMember {
    MeshMember(url: try! MeshURL.parse(text).get(), nodeID: id.map { NodeIdentity([UInt8](repeating: $0, count: 32)) })
}
