import Foundation
import Logging
import STOQConfig
import STOQCore
import Synchronization

/// `mesh.discovery = "dns"`: the members are what `mesh.dns_name` resolves to, asked again every
/// `mesh.dns_interval` — exactly what a Kubernetes headless Service publishes:
///
/// - its AAAA records: one member per address, at the node's own listen port;
/// - its SRV records (`_port._proto.service…`): one member per target address, at the record's
///   port; the target's AAAA come from the answer's additional section, or are asked for.
///
/// Both are asked each round and the members are their union. A CNAME chain in the answer is
/// followed (at most 8 links). No record, or NXDOMAIN, is an empty mesh; a timeout, a server
/// error or a malformed answer for the name is a failure (counted, logged once, retried with
/// backoff) that keeps the last member set. One for an SRV target's addresses fails that target
/// only (`target_unresolved`): it keeps the addresses it had in the last round, if any, and the
/// rest of the answer is used.
public final class DNSDiscovery: DiscoveryBackend {
    /// What to resolve, where, how often.
    public struct Options: Sendable {
        /// `mesh.dns_name`.
        public var name: String
        /// The port AAAA-only members listen on (the node's `network.listen_addr` port).
        public var defaultPort: UInt16
        /// `mesh.dns_server`; nil = the nameservers of `resolvConf`.
        public var server: IPv6Endpoint?
        /// Where the system's nameservers are listed.
        public var resolvConf = "/etc/resolv.conf"
        /// `mesh.dns_interval`.
        public var interval: Duration = .seconds(30)
        /// How long one server gets to answer one question.
        public var timeout: Duration = .seconds(2)
        /// A bigger answer is cut here (the rest is counted as refused `too_many`).
        public var maxMembers = 1024
        /// SRV targets whose addresses were not in the answer and are asked for, per round.
        public var maxTargetLookups = 64

        /// Options for `name`, members of AAAA records at `defaultPort`.
        public init(name: String, defaultPort: UInt16) {
            self.name = name
            self.defaultPort = defaultPort
        }
    }

    /// The options it runs with.
    public let options: Options
    private let logger: Logger
    private let box = CounterBox()
    /// Each SRV target's addresses in the last round: what a target whose lookup fails keeps.
    private let lastTargets = Mutex<[String: [IPv6Address]]>([:])

    /// A backend; nothing happens until `run`.
    public init(options: Options, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    public var backendName: String { "dns" }
    public var counters: DiscoveryCounters { box.snapshot }

    public func run(_ report: @escaping @Sendable (Set<MeshMember>) async -> Void) async {
        var log = FailureLog(logger: logger, what: "mesh discovery (dns \(options.name))")
        var backoff = Backoff(initial: .milliseconds(500), maximum: options.interval)
        var last: Set<MeshMember>?
        while !Task.isCancelled {
            let wait: Duration
            do throws(DiscoveryError) {
                let (members, refused) = try await resolve()
                log.succeeded(counters: box)
                backoff.reset()
                box.update { c in for (k, v) in refused { c.refused[k, default: 0] += v } }
                if !refused.isEmpty {
                    logger.debug("mesh discovery (dns \(options.name)): refused records \(refused)")
                }
                if members != last {
                    last = members
                    box.update {
                        $0.updates += 1
                        $0.members = members.count
                    }
                    if members.isEmpty { logger.notice("mesh discovery (dns \(options.name)): no members (no AAAA or SRV records)") }
                    await report(members)
                }
                wait = options.interval
            } catch {
                if Task.isCancelled { break }
                wait = backoff.next()
                log.failed(error, counters: box, retryIn: wait)
            }
            if !(await pause(wait)) { break }
        }
    }

    /// One round: SRV and AAAA of the name, then the SRV targets' addresses. Also the records
    /// refused, by reason.
    func resolve() async throws(DiscoveryError) -> (Set<MeshMember>, [String: UInt64]) {
        let servers: [IPv6Endpoint]
        if let s = options.server {
            servers = [s]
        } else {
            let text = (try? String(contentsOfFile: options.resolvConf, encoding: .utf8)) ?? ""
            servers = ResolvConf.nameservers(text)
            guard !servers.isEmpty else {
                throw DiscoveryError(.unreachable, "no nameserver in \(options.resolvConf) (set mesh.dns_server)")
            }
        }
        let srv = try await ask(options.name, DNSMessage.typeSRV, servers)
        let aaaa = try await ask(options.name, DNSMessage.typeAAAA, servers)
        var targets: [String: [IPv6Address]] = [:]
        for r in srv.additional {
            if case .aaaa(let a) = r.data { targets[r.owner, default: []].append(a) }
        }
        var pending: [(target: String, port: UInt16)] = []
        var found: [(IPv6Address, UInt16)] = []
        var refused: [String: UInt64] = [:]
        for r in Self.answers(srv, for: options.name) {
            guard case .srv(_, _, let port, let target) = r.data else { continue }
            if target.isEmpty { continue }  // "." : the service is explicitly not offered there
            if port == 0 { refused["bad_port", default: 0] += 1; continue }
            pending.append((target, port))
        }
        // The targets not in the additional section are asked for together: one whose server
        // never answers costs the round one timeout, not one each.
        var missing: [String] = []
        for (target, _) in pending where targets[target] == nil && !missing.contains(target) {
            guard missing.count < options.maxTargetLookups else { continue }
            missing.append(target)
        }
        let previous = lastTargets.withLock { $0 }
        await withTaskGroup(of: (String, Result<[IPv6Address], DiscoveryError>).self) { group in
            for target in missing {
                group.addTask {
                    do throws(DiscoveryError) {
                        let answer = try await self.ask(target, DNSMessage.typeAAAA, servers)
                        return (target, .success(Self.answers(answer, for: target).compactMap { if case .aaaa(let a) = $0.data { a } else { nil } }))
                    } catch {
                        return (target, .failure(error))
                    }
                }
            }
            for await (target, result) in group {
                switch result {
                case .success(let addresses): targets[target] = addresses
                case .failure(let error):
                    refused["target_unresolved", default: 0] += 1
                    targets[target] = previous[target]
                    logger.debug(
                        "mesh discovery (dns \(options.name)): SRV target \(target): \(error); \(previous[target].map { "keeping its \($0.count) address(es) of the last round" } ?? "no member this round")"
                    )
                }
            }
        }
        var used: [String: [IPv6Address]] = [:]
        for (target, port) in pending {
            guard let addresses = targets[target] else {
                // Beyond the lookups allowed this round, or unresolved and never seen before.
                if !missing.contains(target) { refused["too_many", default: 0] += 1 }
                continue
            }
            used[target] = addresses
            for a in addresses { found.append((a, port)) }
        }
        lastTargets.withLock { $0 = used }
        for r in Self.answers(aaaa, for: options.name) {
            if case .aaaa(let a) = r.data { found.append((a, options.defaultPort)) }
        }
        var members = Set<MeshMember>()
        for (address, port) in found {
            if let why = Self.refusal(address) { refused[why, default: 0] += 1; continue }
            let m = MeshMember(url: MeshURL(endpoint: IPv6Endpoint(address: address, port: port)))
            if members.contains(m) { continue }
            guard members.count < options.maxMembers else { refused["too_many", default: 0] += 1; continue }
            members.insert(m)
        }
        return (members, refused)
    }

    /// Why an address cannot be a member's, or nil: the unspecified address, multicast,
    /// IPv4-mapped (STOQ is IPv6 only) and link-local (DNS cannot say which interface).
    static func refusal(_ a: IPv6Address) -> String? {
        let b = a.bytes
        if a.isUnspecified || b.0 == 0xFF || a.isIPv4Mapped || (b.0 == 0xFE && b.1 & 0xC0 == 0x80) { return "bad_address" }
        return nil
    }

    /// The answer records that belong to `name`, following a CNAME chain (at most 8 links).
    static func answers(_ r: DNSMessage.Response, for name: String) -> [DNSMessage.Record] {
        var owner = DNSMessage.canonical(name)
        var chain: Set<String> = [owner]
        for _ in 0..<8 {
            guard let next = r.answers.first(where: { $0.owner == owner && $0.type == DNSMessage.typeCNAME }),
                case .cname(let target) = next.data, !chain.contains(target)
            else { break }
            owner = target
            chain.insert(target)
        }
        return r.answers.filter { chain.contains($0.owner) && $0.type != DNSMessage.typeCNAME }
    }

    /// One question, asked of each server in turn until one answers: over UDP, then over TCP if
    /// the answer was truncated. NXDOMAIN is an answer (no records); other errors are failures.
    func ask(_ name: String, _ type: UInt16, _ servers: [IPv6Endpoint]) async throws(DiscoveryError) -> DNSMessage.Response {
        var lastError = DiscoveryError(.unreachable, "no DNS server")
        for server in servers {
            do throws(DiscoveryError) {
                var response = try await once(name, type, server, tcp: false)
                if response.truncated { response = try await once(name, type, server, tcp: true) }
                switch response.rcode {
                case DNSMessage.RCode.noError.rawValue, DNSMessage.RCode.nameError.rawValue:
                    if response.rcode == DNSMessage.RCode.nameError.rawValue { response.answers = [] }
                    return response
                default:
                    let names = [2: "SERVFAIL", 1: "FORMERR", 4: "NOTIMP", 5: "REFUSED"]
                    throw DiscoveryError(
                        .serverError,
                        "DNS \(server) answered \(names[Int(response.rcode)] ?? "rcode \(response.rcode)") for \(name) (\(type == DNSMessage.typeSRV ? "SRV" : "AAAA"))"
                    )
                }
            } catch {
                lastError = error
            }
        }
        throw lastError
    }

    private func once(_ name: String, _ type: UInt16, _ server: IPv6Endpoint, tcp: Bool) async throws(DiscoveryError) -> DNSMessage.Response {
        let id = UInt16.random(in: 0...UInt16.max)
        let q = DNSMessage.query(id: id, name: name, type: type)
        let bytes = try await DNSTransport.exchange(q, id: id, server: server, tcp: tcp, timeout: options.timeout)
        do { return try DNSMessage.parse(bytes, id: id, name: name, type: type) } catch {
            throw DiscoveryError(error.code, "from \(server) for \(name): \(error.detail)")
        }
    }
}
