// swift-tools-version: 6.1
//
// STOQ: a kernel-bypass QUIC data plane for Linux, IPv6 only.
// Dependencies point one way, down this list (see README "Architecture").
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
        .library(name: "STOQ", targets: ["STOQ"]),
        .executable(name: "stoq-node", targets: ["stoq-node"]),
        .executable(name: "stoq", targets: ["stoq"]),
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
    ],
    targets: [
        // Shared vocabulary: addresses, time, errors. No I/O.
        .target(name: "STOQCore"),

        // C shim over ngtcp2 0.12 + ngtcp2_crypto_gnutls + GnuTLS + nghttp3.
        .target(name: "CNgtcp2", cSettings: [.headerSearchPath("../../bpf")], linkerSettings: systemQUIC),
        // Sans-IO QUIC endpoint + HTTP/3 session.
        .target(
            name: "STOQQUIC",
            dependencies: ["STOQCore", "CNgtcp2", .product(name: "HeapModule", package: "swift-collections")]),

        // The datapath contract, and its io_uring implementation.
        .target(name: "STOQDatapath", dependencies: ["STOQCore"]),
        .target(name: "CSTOQURing", cSettings: [.headerSearchPath("../../bpf")], linkerSettings: [.linkedLibrary("uring")]),
        .target(name: "STOQDatapathURing", dependencies: ["STOQDatapath", "CSTOQURing"]),
        // AF_XDP (kernel bypass): the engine over libxdp, and its datapath. Removable: only
        // STOQNode names it. The C target shares bpf/stoq_kern_user.h with the XDP program.
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

        .target(
            name: "STOQConfig",
            dependencies: ["STOQCore", "STOQQUIC", "STOQChunking", .product(name: "TOMLKit", package: "TOMLKit"),
                           .product(name: "Logging", package: "swift-log")]),

        // The mesh's routing engine: link-state database, hop-limited route computation, disjoint
        // backups, route tables. Pure and sans-IO (callers pass `now`); docs/routing.md.
        .target(name: "STOQRouting", dependencies: ["STOQCore"]),
        // scripts/bench-routing: route computation on the 10,000-node overlay vs plain Dijkstra.
        .executableTarget(name: "stoq-routing-bench", dependencies: ["STOQRouting", "STOQCore"]),

        // Content-defined chunking (FastCDC-style), chunk ids and manifests. Pure functions;
        // the only I/O is an optional streaming reader over a file descriptor.
        .target(
            name: "STOQChunking",
            dependencies: [.product(name: "Crypto", package: "swift-crypto")]),

        // Content-addressed chunk store and object index.
        .target(
            name: "STOQStore",
            dependencies: [.product(name: "Crypto", package: "swift-crypto"), .product(name: "Logging", package: "swift-log")]),

        // Cache eviction policies (S3-FIFO, LRU) and their crash-safe index file. Pure: keys and
        // sizes only, no threads.
        .target(name: "STOQCache", dependencies: [.product(name: "DequeModule", package: "swift-collections")]),

        // The HTTP/3 client: one connection driven on the calling thread (get/put, chunked
        // transfer), used by the CLI and by a node fetching from its origin (edge cache).
        .target(
            name: "STOQTransfer",
            dependencies: ["STOQCore", "STOQQUIC", "STOQTrust", "STOQDatapath", "STOQDatapathURing", "STOQWorker", "STOQChunking",
                           "CSTOQSystem", .product(name: "Crypto", package: "swift-crypto")]),

        // The mesh: link-state adverts (signed, versioned), neighbour liveness and link metrics,
        // discovery. Pure where it can be; the node assembly wires it to connections.
        .target(
            name: "STOQMesh",
            dependencies: ["STOQCore", "STOQRouting", "STOQConfig",
                           .product(name: "Crypto", package: "swift-crypto"),
                           .product(name: "X509", package: "swift-certificates"),
                           .product(name: "SwiftASN1", package: "swift-asn1"),
                           // Discovery: logs, and etcd's JSON gateway over HTTP (node-side only).
                           .product(name: "Logging", package: "swift-log"),
                           .product(name: "NIOCore", package: "swift-nio"),
                           .product(name: "AsyncHTTPClient", package: "async-http-client")]),

        .target(
            name: "STOQNode",
            dependencies: [
                "STOQCore", "STOQQUIC", "STOQDatapath", "STOQDatapathURing", "STOQDatapathXDP", "STOQWorker", "STOQConfig", "STOQTrust",
                "STOQStore", "STOQChunking", "CSTOQSystem", "STOQACME", "STOQCache", "STOQTransfer",
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ]),

        .target(
            name: "STOQ",
            dependencies: ["STOQNode", "STOQTransfer", "STOQQUIC", "STOQDatapath", "STOQDatapathURing", "STOQWorker", "STOQCore",
                           "STOQTrust", "STOQChunking", "CSTOQSystem", .product(name: "Crypto", package: "swift-crypto")]),

        .executableTarget(
            name: "stoq-node",
            dependencies: ["STOQ", .product(name: "ArgumentParser", package: "swift-argument-parser"),
                           .product(name: "Logging", package: "swift-log")]),
        .executableTarget(
            name: "stoq",
            dependencies: ["STOQ", "STOQConfig", "STOQTrust", "STOQACME", "STOQCore", "STOQDatapathXDP", "STOQChunking",
                           .product(name: "X509", package: "swift-certificates"),
                           .product(name: "SwiftASN1", package: "swift-asn1"),
                           .product(name: "Crypto", package: "swift-crypto"),
                           .product(name: "AsyncHTTPClient", package: "async-http-client"),
                           .product(name: "NIOCore", package: "swift-nio"),
                           .product(name: "ArgumentParser", package: "swift-argument-parser"),
                           .product(name: "Logging", package: "swift-log")]),

        .target(name: "STOQTestSupport", dependencies: ["STOQCore", "STOQDatapath", "STOQQUIC", "STOQTrust", .product(name: "Crypto", package: "swift-crypto")], path: "Tests/STOQTestSupport"),

        .testTarget(name: "STOQCoreTests", dependencies: ["STOQCore"]),
        .testTarget(name: "STOQConfigTests", dependencies: ["STOQConfig", "STOQCore", "STOQQUIC", "STOQChunking",
                                                            .product(name: "TOMLKit", package: "TOMLKit"),
                                                            .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "STOQQUICTests", dependencies: ["STOQQUIC", "STOQTestSupport"]),
        .testTarget(name: "STOQDatapathTests", dependencies: ["STOQDatapath", "STOQDatapathURing", "STOQDatapathXDP"]),
        .testTarget(name: "STOQChunkingTests", dependencies: ["STOQChunking"]),
        // Test only: runs bpf/stoq_xdp.bpf.o through BPF_PROG_TEST_RUN (the steering agreement test).
        .target(name: "CSTOQXDPProbe", path: "Tests/CSTOQXDPProbe", cSettings: [.headerSearchPath("../../bpf")],
                linkerSettings: [.linkedLibrary("bpf")]),
        .testTarget(name: "STOQWorkerTests", dependencies: ["STOQWorker", "STOQCore", "STOQDatapath", "STOQDatapathURing", "STOQQUIC",
                                                            "STOQTestSupport", "CSTOQXDPProbe",
                                                            .product(name: "Crypto", package: "swift-crypto")]),
        .testTarget(name: "STOQCacheTests", dependencies: ["STOQCache"]),
        .testTarget(
            name: "STOQMeshTests",
            dependencies: ["STOQMesh", "STOQTrust", "STOQRouting", "STOQCore", "STOQConfig",
                           .product(name: "SwiftASN1", package: "swift-asn1"),
                           .product(name: "Logging", package: "swift-log"),
                           .product(name: "Crypto", package: "swift-crypto"),
                           .product(name: "X509", package: "swift-certificates")],
            exclude: ["Resources"]),
        .testTarget(name: "STOQRoutingTests", dependencies: ["STOQRouting", "STOQCore"]),
        // Replays a request trace through S3-FIFO and LRU (scripts/bench-cache).
        .executableTarget(name: "stoq-cache-sim", dependencies: ["STOQCache"]),
        // Puts chunks and objects in a loop until killed: the crash test's victim.
        .executableTarget(name: "stoq-store-crash", dependencies: ["STOQStore"], path: "Tests/stoq-store-crash"),
        .testTarget(
            name: "STOQStoreTests",
            dependencies: ["STOQStore", "stoq-store-crash", .product(name: "Crypto", package: "swift-crypto")]),
        .testTarget(name: "STOQNodeTests", dependencies: ["STOQ", "STOQNode", "STOQConfig", "STOQStore", "STOQCache", "STOQTransfer",
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
                "STOQACME", "STOQTrust",
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
