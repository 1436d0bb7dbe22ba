// The STOQ library product: the client API in this module, plus the building blocks a
// Swift application embeds (sans-IO QUIC endpoint, datapath, worker loop, identity).
@_exported import STOQChunking
@_exported import STOQCore
@_exported import STOQDatapath
@_exported import STOQDatapathURing
@_exported import STOQQUIC
@_exported import STOQTrust
@_exported import STOQWorker
@_exported import STOQTransfer
