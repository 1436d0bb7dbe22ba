// swift-tools-version: 6.1
// STOQ's benchmarks on ordo-one/benchmark, in their own package so that the main
// build never pays for them. Run: cd Benchmarks && swift package benchmark
import PackageDescription

let package = Package(
    name: "STOQBenchmarks",
    platforms: [.macOS(.v14)],
    dependencies: [
        .package(name: "stoq", path: "../"),
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.0", traits: ["MallocInterposer"]),
    ],
    targets: [
        .executableTarget(
            name: "PacketPath",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "STOQ", package: "stoq"),
            ],
            path: "Benchmarks/PacketPath",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")])
    ]
)
