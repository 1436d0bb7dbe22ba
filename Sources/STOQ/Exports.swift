// The STOQ library product: what a Swift application embeds to talk to STOQ nodes. The
// client API (STOQTransfer, with `ClientDatapath.ioUring` as its default backend), the
// building blocks beneath it (sans-IO QUIC endpoint, datapath contract and io_uring, worker
// loop, identity, chunking) and nothing of the node: no STOQNode, no AF_XDP, no NIO, no ACME
// (scripts/check-modules keeps it so).
@_exported import STOQChunking
@_exported import STOQCore
@_exported import STOQDatapath
@_exported import STOQDatapathURing
@_exported import STOQQUIC
@_exported import STOQTrust
@_exported import STOQWorker
@_exported import STOQTransfer
