// swift-tools-version: 6.1
//
// STOQ: a kernel-bypass QUIC data plane for Linux, IPv6 only.
// Dependencies point one way: a target depends only on targets declared above it
// (scripts/check-modules checks it, and that the STOQ product stays client-only).
import PackageDescription

let systemQUIC: [LinkerSetting] = [
    .linkedLibrary("ngtcp2_crypto_gnutls"),
    .linkedLibrary("ngtcp2"),
    .linkedLibrary("nghttp3"),
    .linkedLibrary("gnutls"),
]

let package = Package(
    name: "stoq",
    platforms: [.macOS(.v14)],
    products: [
        // What a Swift application embeds to fetch from and upload to STOQ nodes: the client,
        // the sans-IO QUIC endpoint, the datapath contract with io_uring, identity. No node,
        // no AF_XDP, no NIO, no ACME (scripts/check-modules fails the build if one creeps in).
        .library(name: "STOQ", targets: ["STOQ"]),
        .executable(name: "stoq-node", targets: ["stoq-node"]),
        .executable(name: "stoq", targets: ["stoq"]),
    ],
    // AF_XDP is optional. Without this trait
    //   swift build --disable-default-traits --product stoq-node   (likewise --product stoq)
    // neither compiles nor links CSTOQXDP, STOQDatapathXDP, libxdp or libbpf; the node refuses
    // network.datapath = "af_xdp" ("not compiled in") and "auto" uses io_uring. (A plain
    // `swift build` compiles every target, used or not, but links them into nothing.)
    traits: [
        .trait(name: "AFXDP", description: "The AF_XDP datapath (kernel bypass; links libxdp and libbpf)."),
        .default(enabledTraits: ["AFXDP"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.1.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.0"),
        .package(url: "https://github.com/apple/swift-certificates", from: "1.21.0"),
        .package(url: "https://github.com/apple/swift-asn1", from: "1.3.0"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
        // ACME over HTTPS (STOQACME): the server on swift-nio + NIOSSL + NIOHTTP1, the client on
        // async-http-client, which brings those same NIO packages anyway.
        .package(url: "https://github.com/apple/swift-nio", from: "2.100.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.0"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
        // The daemon's lifecycle: signals, graceful shutdown, reload (stoq-node).
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        // Distributed tracing: the span API (workers, edge fetcher) and, in the node only, its
        // OTLP/HTTP+protobuf exporter (the OTLPHTTP trait alone: no gRPC packages are built).
        .package(url: "https://github.com/apple/swift-distributed-tracing", from: "1.1.0"),
        .package(url: "https://github.com/swift-otel/swift-otel", from: "1.6.0", traits: ["OTLPHTTP"]),
    ],
    targets: [
        // Shared vocabulary: addresses, time, errors. No I/O.
        .target(name: "STOQCore"),

        // C shim over ngtcp2 0.12 + ngtcp2_crypto_gnutls + GnuTLS + nghttp3.
        .target(name: "CNgtcp2", cSettings: [.headerSearchPath("../../bpf")], linkerSettings: systemQUIC),
        // Sans-IO QUIC endpoint + HTTP/3 session.
        .target(
            name: "STOQQUIC",
            dependencies: ["STOQCore", "CNgtcp2", .product(name: "DequeModule", package: "swift-collections")]),

        // The datapath contract, and its io_uring implementation.
        .target(name: "STOQDatapath", dependencies: ["STOQCore"]),
        .target(name: "CSTOQURing", cSettings: [.headerSearchPath("../../bpf")], linkerSettings: [.linkedLibrary("uring")]),
        .target(name: "STOQDatapathURing", dependencies: ["STOQDatapath", "CSTOQURing"]),
        // AF_XDP (kernel bypass): the engine over libxdp, and its datapath. Removable: only
        // STOQNode (and `stoq xdp status`) name it, both under the AFXDP trait. The C target
        // shares bpf/stoq_kern_user.h with the XDP program.
        .target(
            name: "CSTOQXDP", cSettings: [.headerSearchPath("../../bpf")],
            linkerSettings: [.linkedLibrary("xdp"), .linkedLibrary("bpf")]),
        .target(name: "STOQDatapathXDP", dependencies: ["STOQDatapath", "CSTOQXDP"]),

        // Pinned per-core loop: RX -> endpoint -> handlers -> TX.
        .target(name: "CSTOQSystem"),
        .target(name: "STOQWorker", dependencies: ["STOQQUIC", "STOQDatapath", "CSTOQSystem", .product(name: "Logging", package: "swift-log")]),

        // TrustChain: identities, CA, ACME, transparency log (the embedded identity for now).
        .target(
            name: "STOQTrust",
            dependencies: [
                "STOQCore",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
            ]),

        // ACME (RFC 8555) for TrustChain: wire types and JWS shared by the server role (issues
        // through TrustAuthority, logs to TransparencyLog) and the client. Networking lives here,
        // not in STOQTrust, so the CA and log stay usable without NIO.
        .target(
            name: "STOQACME",
            dependencies: [
                "STOQTrust", "STOQCore",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Logging", package: "swift-log"),
            ]),

        // Who may write and read a node: bearer tokens (compact JWS, ES256), certificate roles
        // (SAN `urn:stoq:role:…`), the `[access]` policy, the node's token key and operator token.
        // Pure but for those two files; the router in STOQContent is its one enforcement point.
        .target(
            name: "STOQAccess",
            dependencies: ["STOQCore", "STOQTrust", .product(name: "Crypto", package: "swift-crypto")]),

        // The mesh's routing engine: link-state database, hop-limited route computation, disjoint
        // backups, route tables. Pure and sans-IO (callers pass `now`); docs/routing.md.
        .target(name: "STOQRouting", dependencies: ["STOQCore"]),
        // scripts/bench-routing: route computation on the 10,000-node overlay vs plain Dijkstra.
        .executableTarget(name: "stoq-routing-bench", dependencies: ["STOQRouting", "STOQCore"]),

        // Content-defined chunking (FastCDC-style), chunk ids and manifests. Pure functions;
        // the only I/O is an optional streaming reader over a file descriptor. Vocabulary for
        // the targets below, STOQConfig first ([chunking] is validated by ChunkingParameters).
        .target(
            name: "STOQChunking",
            dependencies: ["STOQCore", .product(name: "Crypto", package: "swift-crypto")]),

        // Request tracing on the workers: W3C trace context in HTTP/3 headers and spans through
        // swift-distributed-tracing's synchronous API. The span API only; the exporter
        // (swift-otel) is bootstrapped by STOQNode.
        .target(name: "STOQTracing", dependencies: ["STOQCore", "STOQQUIC", .product(name: "Tracing", package: "swift-distributed-tracing")]),

        // Content-addressed chunk store and object index. Above STOQConfig, whose `[storage]`
        // defaults are the store's own (`ChunkStore.Options`).
        .target(
            name: "STOQStore",
            dependencies: [
                "STOQCore", "STOQChunking", .product(name: "Crypto", package: "swift-crypto"), .product(name: "Logging", package: "swift-log"),
            ]),

        .target(
            name: "STOQConfig",
            dependencies: ["STOQCore", "STOQQUIC", "STOQChunking", "STOQRouting", "STOQTrust", "STOQAccess", "STOQStore",
                           .product(name: "TOMLKit", package: "TOMLKit"),
                           .product(name: "Logging", package: "swift-log")]),

        // Cache eviction policies (S3-FIFO, LRU) and their crash-safe index file. Pure: keys and
        // sizes only, no threads.
        .target(name: "STOQCache", dependencies: [.product(name: "DequeModule", package: "swift-collections")]),

        // The HTTP/3 client: one connection driven on the calling thread (get/put, chunked
        // transfer) over any DatapathQueue its caller opens, used by the CLI and by a node
        // fetching from its origin (edge cache). It names no datapath backend.
        .target(
            name: "STOQTransfer",
            dependencies: ["STOQCore", "STOQQUIC", "STOQTrust", "STOQDatapath", "STOQWorker", "STOQChunking",
                           "CSTOQSystem", .product(name: "Crypto", package: "swift-crypto")]),

        // The mesh: link-state adverts (signed, versioned), neighbour liveness and link metrics,
        // discovery. Pure where it can be; the node assembly wires it to connections.
        .target(
            name: "STOQMesh",
            dependencies: ["STOQCore", "STOQRouting", "STOQConfig", "STOQQUIC", "STOQTrust", "STOQChunking",
                           // The mesh service's connections to its neighbours.
                           "STOQTransfer", "CSTOQSystem",
                           .product(name: "Crypto", package: "swift-crypto"),
                           .product(name: "X509", package: "swift-certificates"),
                           .product(name: "SwiftASN1", package: "swift-asn1"),
                           // Discovery: logs, and etcd's JSON gateway over HTTP (node-side only).
                           .product(name: "Logging", package: "swift-log"),
                           .product(name: "NIOCore", package: "swift-nio"),
                           .product(name: "AsyncHTTPClient", package: "async-http-client")]),

        // The node's parts, one concern each; STOQNode assembles them.
        // The edge cache: chunks and manifests fetched from the origin, kept under S3-FIFO.
        .target(
            name: "STOQEdge",
            dependencies: ["STOQQUIC", "STOQChunking", "STOQStore", "STOQCache", "STOQTransfer", "CSTOQSystem", "STOQTracing",
                           .product(name: "Tracing", package: "swift-distributed-tracing"),
                           .product(name: "Logging", package: "swift-log")]),
        // The worker-side HTTP/3 applications: objects, chunks, manifests, and the router.
        .target(
            name: "STOQContent",
            dependencies: ["STOQCore", "STOQQUIC", "STOQChunking", "STOQStore", "STOQEdge", "STOQMesh", "STOQTransfer",
                           "STOQAccess", "CSTOQSystem", "STOQTracing", .product(name: "Tracing", package: "swift-distributed-tracing"),
                           .product(name: "Crypto", package: "swift-crypto"), .product(name: "Logging", package: "swift-log"),
                           .product(name: "DequeModule", package: "swift-collections")]),
        // The node's TLS identity over time: issue, renew, publish to workers (embedded CA or ACME),
        // and the CA's transparency log.
        .target(
            name: "STOQRenewal",
            dependencies: [
                "STOQCore", "STOQQUIC", "STOQConfig", "STOQTrust", "STOQACME",
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        // The admin API (HTTP/1.1 on NIO): /metrics and /status from the workers' snapshots.
        .target(
            name: "STOQAdmin",
            dependencies: [
                "STOQCore", "STOQQUIC", "STOQDatapath", "STOQWorker", "STOQStore", "STOQContent", "STOQEdge", "STOQMesh", "STOQAccess",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]),
        // Assembly only: picks the datapath (the one place that names backends), starts the
        // workers and the services, reloads.
        .target(
            name: "STOQNode",
            dependencies: [
                "STOQCore", "STOQQUIC", "STOQDatapath", "STOQDatapathURing",
                .target(name: "STOQDatapathXDP", condition: .when(traits: ["AFXDP"])),
                "STOQWorker", "STOQConfig", "STOQTrust", "STOQStore", "STOQTransfer",
                "STOQEdge", "STOQContent", "STOQRenewal", "STOQAdmin", "STOQTracing", "STOQAccess",
                .product(name: "Crypto", package: "swift-crypto"),
                // The OTLP/HTTP span exporter, only when `[tracing] enabled`.
                .product(name: "OTel", package: "swift-otel"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ]),

        // The library product: the client API (STOQTransfer) plus the building blocks an
        // application embeds, and the one factory that picks io_uring for a client.
        .target(
            name: "STOQ",
            dependencies: ["STOQTransfer", "STOQQUIC", "STOQDatapath", "STOQDatapathURing", "STOQWorker", "STOQCore",
                           "STOQTrust", "STOQChunking"]),

        .executableTarget(
            name: "stoq-node",
            dependencies: ["STOQNode", "STOQConfig", .product(name: "ArgumentParser", package: "swift-argument-parser"),
                           .product(name: "Logging", package: "swift-log"),
                           .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                           .product(name: "UnixSignals", package: "swift-service-lifecycle")]),
        .executableTarget(
            name: "stoq",
            dependencies: ["STOQ", "STOQConfig", "STOQTrust", "STOQACME", "STOQAccess", "STOQCore",
                           .target(name: "STOQDatapathXDP", condition: .when(traits: ["AFXDP"])), "STOQChunking",
                           .product(name: "X509", package: "swift-certificates"),
                           .product(name: "SwiftASN1", package: "swift-asn1"),
                           .product(name: "Crypto", package: "swift-crypto"),
                           .product(name: "AsyncHTTPClient", package: "async-http-client"),
                           .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOHTTP1", package: "swift-nio"),
                           .product(name: "NIOSSL", package: "swift-nio-ssl"),
                           .product(name: "ArgumentParser", package: "swift-argument-parser"),
                           .product(name: "Logging", package: "swift-log")]),

        // Runs the multipath scenarios on the simulated mesh (scripts/bench-multipath).
        .executableTarget(name: "stoq-mesh-sim", dependencies: ["STOQRouting"]),
        .target(
            name: "STOQTestSupport",
            dependencies: [
                "STOQCore", "STOQDatapath", "STOQQUIC", "STOQTrust", .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
            ], path: "Tests/STOQTestSupport"),

        .testTarget(name: "STOQCoreTests", dependencies: ["STOQCore"]),
        .testTarget(name: "STOQConfigTests", dependencies: ["STOQConfig", "STOQCore", "STOQQUIC", "STOQChunking", "STOQAccess", "STOQStore",
                                                            .product(name: "TOMLKit", package: "TOMLKit"),
                                                            .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "STOQQUICTests", dependencies: ["STOQQUIC", "STOQTestSupport"]),
        // STOQQUIC only for the defaults the AF_XDP engine shares with it (XDPDefaultsTests).
        .testTarget(name: "STOQDatapathTests", dependencies: ["STOQDatapath", "STOQDatapathURing", "STOQCore",
                                                              .target(name: "STOQQUIC", condition: .when(traits: ["AFXDP"])),
                                                              .target(name: "STOQDatapathXDP", condition: .when(traits: ["AFXDP"]))]),
        .testTarget(name: "STOQChunkingTests", dependencies: ["STOQChunking", "STOQCore"]),
        // Test only: runs bpf/stoq_xdp.bpf.o through BPF_PROG_TEST_RUN (the steering agreement test).
        .target(name: "CSTOQXDPProbe", path: "Tests/CSTOQXDPProbe", cSettings: [.headerSearchPath("../../bpf")],
                linkerSettings: [.linkedLibrary("bpf")]),
        .testTarget(name: "STOQWorkerTests", dependencies: ["STOQWorker", "STOQCore", "STOQDatapath", "STOQDatapathURing", "STOQQUIC",
                                                            "STOQTestSupport", "CSTOQXDPProbe",
                                                            .product(name: "Crypto", package: "swift-crypto")]),
        .testTarget(name: "STOQCacheTests", dependencies: ["STOQCache"]),
        .testTarget(
            name: "STOQMeshTests",
            dependencies: ["STOQMesh", "STOQTrust", "STOQTransfer", "STOQRouting", "STOQCore", "STOQConfig", "STOQTestSupport",
                           .product(name: "SwiftASN1", package: "swift-asn1"),
                           .product(name: "Logging", package: "swift-log"),
                           .product(name: "Crypto", package: "swift-crypto"),
                           .product(name: "X509", package: "swift-certificates")],
            exclude: ["Resources"]),
        .testTarget(name: "STOQRoutingTests", dependencies: ["STOQRouting", "STOQCore"]),
        .testTarget(name: "STOQAccessTests", dependencies: ["STOQAccess", "STOQTrust", "STOQCore", .product(name: "Crypto", package: "swift-crypto")]),
        .testTarget(
            name: "STOQTracingTests",
            dependencies: ["STOQTracing", "STOQQUIC", .product(name: "Tracing", package: "swift-distributed-tracing"),
                           .product(name: "InMemoryTracing", package: "swift-distributed-tracing")]),
        // Replays a request trace through S3-FIFO and LRU (scripts/bench-cache).
        .executableTarget(name: "stoq-cache-sim", dependencies: ["STOQCache"]),
        // Puts chunks and objects in a loop until killed: the crash test's victim.
        .executableTarget(name: "stoq-store-crash", dependencies: ["STOQStore"], path: "Tests/stoq-store-crash"),
        .testTarget(
            name: "STOQStoreTests",
            dependencies: ["STOQStore", "stoq-store-crash", "STOQTestSupport", .product(name: "Crypto", package: "swift-crypto")]),
        .testTarget(name: "STOQNodeTests", dependencies: [
            "STOQNode", "STOQAdmin", "STOQMesh", "STOQRenewal", "STOQTestSupport",
            .product(name: "ServiceLifecycleTestKit", package: "swift-service-lifecycle"),
            .product(name: "UnixSignals", package: "swift-service-lifecycle"),
        ]),
        // `stoq mesh`'s tables and errors, on the fixture STOQNodeTests checks the admin API renders.
        .testTarget(name: "stoqTests", dependencies: ["stoq", "STOQ"]),
        .testTarget(name: "STOQContentTests", dependencies: ["STOQContent", "STOQChunking", "STOQStore", "STOQCore", "STOQTestSupport",
                                                             .product(name: "Logging", package: "swift-log")]),
        // The session cache's file format (0-RTT's parameters kept with the session), and the
        // connection pool against upstreams in the test's process (STOQTestSupport).
        .testTarget(name: "STOQTransferTests", dependencies: ["STOQTransfer", "STOQTestSupport"]),
        .testTarget(name: "STOQEdgeTests", dependencies: ["STOQEdge", "STOQChunking", "STOQStore", "STOQCache", "STOQTransfer", "STOQTestSupport",
                                                          .product(name: "Crypto", package: "swift-crypto"),
                                                          .product(name: "Logging", package: "swift-log")]),
        .testTarget(
            name: "STOQTrustTests",
            dependencies: [
                // STOQQUIC and STOQTestSupport: the policy-agreement test runs the real handshake.
                "STOQTrust", "STOQCore", "STOQQUIC", "STOQTestSupport",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
            ],
            // rfc6962.py is run by path (python3), not bundled.
            exclude: ["Resources"]),
        .testTarget(
            name: "STOQACMETests",
            dependencies: [
                "STOQACME", "STOQTrust", "STOQTestSupport",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]),
    ]
)
