import Dispatch
import Foundation
import STOQQUIC
import Testing

/// File mappings that bodies are sent from: small ones are unmapped where they end, large
/// ones on the background queue (the worker never pays the page-table teardown).
struct BodyRegionTests {
    /// A file of `size` bytes (sparse) and its descriptor.
    private func file(_ size: Int) throws -> Int32 {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("stoq-region-\(UUID())").path
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0o600)
        try #require(fd >= 0)
        unlink(path)
        try #require(ftruncate(fd, off_t(size)) == 0)
        return fd
    }

    /// Whether `address` is mapped: msync answers ENOMEM for an unmapped page.
    private func isMapped(_ address: UInt) -> Bool {
        msync(UnsafeMutableRawPointer(bitPattern: address), 1, MS_ASYNC) == 0
    }

    /// Maps `size` bytes, reads the first, drops the region; returns the address it had.
    private func mapAndRelease(_ fd: Int32, _ size: Int) throws -> UInt {
        var region = BodyRegion.mapping(fd: fd, offset: 0, length: size)
        let base = try #require(region?.base)
        #expect(base.load(as: UInt8.self) == 0)
        let address = UInt(bitPattern: base)
        #expect(isMapped(address))
        region = nil
        return address
    }

    @Test func aSmallMappingIsUnmappedWhenItsRegionEnds() throws {
        let fd = try file(1 << 20)
        defer { close(fd) }
        let address = try mapAndRelease(fd, 1 << 20)
        #expect(!isMapped(address))
    }

    @Test func aLargeMappingIsUnmappedOnTheBackgroundQueue() throws {
        let size = BodyRegion.unmapOffLoopBytes
        let fd = try file(size)
        defer { close(fd) }
        // Hold the queue: the region's end must not unmap on this thread.
        let held = DispatchSemaphore(value: 0)
        BodyRegion.unmapping.async { held.wait() }
        let address = try mapAndRelease(fd, size)
        #expect(isMapped(address))
        held.signal()
        BodyRegion.waitForUnmaps()
        #expect(!isMapped(address))
    }
}
