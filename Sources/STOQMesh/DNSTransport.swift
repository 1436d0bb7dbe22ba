import Foundation
import STOQCore

/// One DNS exchange with one server: UDP, then TCP when the answer comes back truncated
/// (RFC 7766). Blocking socket calls with a deadline, run on a thread of their own so that a
/// slow server never holds a thread of Swift's cooperative pool.
enum DNSTransport {
    /// Sends `query` to `server` and returns the raw answer whose id is `id` (UDP datagrams with
    /// another id are dropped: a spoofer must also guess the id and our port).
    static func exchange(
        _ query: [UInt8], id: UInt16, server: IPv6Endpoint, tcp: Bool,
        timeout: Duration
    ) async throws(DiscoveryError) -> [UInt8] {
        let result: Result<[UInt8], DiscoveryError> = await withCheckedContinuation { c in
            let t = Thread {
                do throws(DiscoveryError) {
                    c.resume(returning: .success(try (tcp ? exchangeTCP : exchangeUDP)(query, id, server, timeout)))
                } catch {
                    c.resume(returning: .failure(error))
                }
            }
            t.name = "stoq-dns"
            t.start()
        }
        return try result.get()
    }

    private static func open(_ type: Int32, _ server: IPv6Endpoint) throws(DiscoveryError) -> Int32 {
        let fd = socket(AF_INET6, type | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw DiscoveryError(.unreachable, "DNS \(server): socket: \(String(cString: strerror(errno)))") }
        // Off, so that an IPv4 nameserver from /etc/resolv.conf (as ::ffff:a.b.c.d) works too.
        var off: Int32 = 0
        _ = setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &off, socklen_t(MemoryLayout<Int32>.size))
        return fd
    }

    private static func connectTo(_ fd: Int32, _ server: IPv6Endpoint) -> Int32 {
        var sa = server.sockaddr
        return withUnsafePointer(to: &sa) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
        }
    }

    private static func millisecondsLeft(_ deadline: ContinuousClock.Instant) -> Int32 {
        let left = ContinuousClock.now.duration(to: deadline)
        if left <= .zero { return 0 }
        return Int32(min(left.nanoseconds / 1_000_000 + 1, 60_000))
    }

    /// Waits until `fd` is readable (or writable), false at the deadline.
    private static func wait(_ fd: Int32, _ events: Int16, _ deadline: ContinuousClock.Instant) -> Bool {
        while true {
            let ms = millisecondsLeft(deadline)
            if ms == 0 { return false }
            var p = pollfd(fd: fd, events: events, revents: 0)
            let n = poll(&p, 1, ms)
            if n > 0 { return true }
            if n < 0 && errno != EINTR { return false }
        }
    }

    private static func exchangeUDP(
        _ query: [UInt8], _ id: UInt16, _ server: IPv6Endpoint,
        _ timeout: Duration
    ) throws(DiscoveryError) -> [UInt8] {
        let fd = try open(Int32(SOCK_DGRAM.rawValue), server)
        defer { close(fd) }
        guard connectTo(fd, server) == 0 else {
            throw DiscoveryError(.unreachable, "DNS \(server): connect: \(String(cString: strerror(errno)))")
        }
        guard send(fd, query, query.count, 0) == query.count else {
            throw DiscoveryError(.unreachable, "DNS \(server): send: \(String(cString: strerror(errno)))")
        }
        let deadline = ContinuousClock.now + timeout
        var buf = [UInt8](repeating: 0, count: 65535)
        while wait(fd, Int16(POLLIN), deadline) {
            let n = recv(fd, &buf, buf.count, Int32(MSG_DONTWAIT))
            if n < 0 {
                if errno == EAGAIN || errno == EINTR { continue }
                throw DiscoveryError(.unreachable, "DNS \(server): \(String(cString: strerror(errno)))")
            }
            if n >= 2 && UInt16(buf[0]) << 8 | UInt16(buf[1]) == id { return Array(buf[0..<n]) }
        }
        throw DiscoveryError(.timeout, "DNS \(server): no answer over UDP within \(timeout)")
    }

    private static func exchangeTCP(
        _ query: [UInt8], _ id: UInt16, _ server: IPv6Endpoint,
        _ timeout: Duration
    ) throws(DiscoveryError) -> [UInt8] {
        let fd = try open(Int32(SOCK_STREAM.rawValue), server)
        defer { close(fd) }
        let deadline = ContinuousClock.now + timeout
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        if connectTo(fd, server) != 0 {
            guard errno == EINPROGRESS, wait(fd, Int16(POLLOUT), deadline) else {
                throw DiscoveryError(.unreachable, "DNS \(server): TCP connect: \(String(cString: strerror(errno)))")
            }
            var err: Int32 = 0
            var len = socklen_t(MemoryLayout<Int32>.size)
            _ = getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len)
            guard err == 0 else { throw DiscoveryError(.unreachable, "DNS \(server): TCP connect: \(String(cString: strerror(err)))") }
        }
        var out = [UInt8(query.count >> 8), UInt8(query.count & 0xFF)] + query
        while !out.isEmpty {
            guard wait(fd, Int16(POLLOUT), deadline) else { throw DiscoveryError(.timeout, "DNS \(server): TCP send timed out") }
            let n = send(fd, out, out.count, Int32(MSG_NOSIGNAL))
            if n < 0 {
                if errno == EAGAIN || errno == EINTR { continue }
                throw DiscoveryError(.unreachable, "DNS \(server): TCP send: \(String(cString: strerror(errno)))")
            }
            out.removeFirst(n)
        }
        func read(_ count: Int) throws(DiscoveryError) -> [UInt8] {
            var got = [UInt8](repeating: 0, count: count)
            var have = 0
            while have < count {
                guard wait(fd, Int16(POLLIN), deadline) else {
                    throw DiscoveryError(.timeout, "DNS \(server): no complete answer over TCP within \(timeout)")
                }
                let n = got.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + have, count - have, 0) }
                if n == 0 { throw DiscoveryError(.malformed, "DNS \(server): TCP answer cut short") }
                if n < 0 {
                    if errno == EAGAIN || errno == EINTR { continue }
                    throw DiscoveryError(.unreachable, "DNS \(server): TCP receive: \(String(cString: strerror(errno)))")
                }
                have += n
            }
            return got
        }
        let len = try read(2)
        return try read(Int(len[0]) << 8 | Int(len[1]))
    }
}

/// The nameservers of /etc/resolv.conf: the system resolver's, used when `mesh.dns_server` is
/// not set. IPv4 nameservers are kept (as IPv4-mapped addresses): the resolver is the system's
/// choice, and only the mesh's own links are IPv6 only.
enum ResolvConf {
    /// At most 3 (glibc's MAXNS), in file order, at port 53.
    static func nameservers(_ text: String) -> [IPv6Endpoint] {
        var out: [IPv6Endpoint] = []
        for raw in text.split(whereSeparator: \.isNewline) {
            let line = raw.prefix { $0 != "#" && $0 != ";" }
            let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard f.count >= 2, f[0] == "nameserver", out.count < 3 else { continue }
            let a = String(f[1])
            if case .success(let ep) = IPv6Endpoint.parse("[\(a)]:53") {
                out.append(ep)
            } else {
                var v4 = in_addr()
                if inet_pton(AF_INET, a, &v4) == 1 {
                    let b = withUnsafeBytes(of: v4.s_addr) { Array($0) }
                    out.append(
                        IPv6Endpoint(
                            address: IPv6Address(bytes: (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, b[0], b[1], b[2], b[3])),
                            port: 53))
                }
            }
        }
        return out
    }
}
