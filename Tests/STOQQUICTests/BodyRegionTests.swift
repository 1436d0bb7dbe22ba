import Dispatch
import Foundation
import STOQQUIC
import Testing

/// File mappings that bodies are sent from: small ones fault in on their reader and are
/// unmapped where they end; large ones get their page tables built and torn down on the
/// background queue (the worker pays neither).
@Suite(.serialized) struct BodyRegionTests {
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
        let size = BodyRegion.offLoopBytes
        let fd = try file(size)
        defer { close(fd) }
        // Hold the queue: the region's end must not unmap on this thread. The region goes before
        // its populate runs, which then finds nothing to hold and leaves the range to the unmap.
        let held = DispatchSemaphore(value: 0)
        BodyRegion.pageTables.async { held.wait() }
        let address = try mapAndRelease(fd, size)
        #expect(isMapped(address))
        held.signal()
        BodyRegion.waitForPageTables()
        #expect(!isMapped(address))
    }

    /// Minor page faults this thread has taken so far.
    private func minorFaults() -> Int {
        var usage = rusage()
        getrusage(1, &usage)  // RUSAGE_THREAD (1), which Glibc does not import
        return usage.ru_minflt
    }

    /// Reads one byte of every page of `region`; returns the faults that took.
    private func faultsReading(_ region: BodyRegion) throws -> Int {
        let base = try #require(region.base)
        let before = minorFaults()
        var sum = 0
        for offset in stride(from: 0, to: region.count, by: 4096) { sum &+= Int(base.load(fromByteOffset: offset, as: UInt8.self)) }
        #expect(sum >= 0)
        return minorFaults() - before
    }

    /// A file of `size` bytes written (its pages in the page cache, not holes), so that reading
    /// a mapping of it faults only for the mapping.
    private func writtenFile(_ size: Int) throws -> Int32 {
        let fd = try file(size)
        let bytes = [UInt8](repeating: 7, count: size)
        #expect(pwrite(fd, bytes, size, 0) == size)
        return fd
    }

    /// Maps `length` bytes of `fd` and lets the background queue do what it will with them.
    private func settledMapping(_ fd: Int32, _ length: Int) throws -> BodyRegion {
        let region = try #require(BodyRegion.mapping(fd: fd, offset: 0, length: length))
        BodyRegion.waitForPageTables()
        return region
    }

    @Test func aLargeMappingIsPopulatedOffTheReader() throws {
        let size = 2 * BodyRegion.offLoopBytes
        let fd = try writtenFile(size)
        defer { close(fd) }
        #expect(try faultsReading(settledMapping(fd, size)) == 0)
        // A small mapping of the same pages is left to its reader: it faults.
        #expect(try faultsReading(settledMapping(fd, BodyRegion.offLoopBytes / 2)) > 0)
    }

    @Test func populatesStayWithinTheirBudgetAndGiveItBack() throws {
        let size = 2 * BodyRegion.offLoopBytes
        let fd = try writtenFile(size)
        defer { close(fd) }
        let budget = BodyRegion.populateBudget
        BodyRegion.populateBudget = BodyRegion.populatedNow() + size
        defer { BodyRegion.populateBudget = budget }
        // The first region takes the whole budget; the second is left to fault on its reader.
        var first = try settledMapping(fd, size)
        let second = try settledMapping(fd, size)
        #expect(try faultsReading(first) == 0)
        #expect(try faultsReading(second) > 0)
        // Once the first is unmapped, its share comes back: a third is populated again.
        first = try settledMapping(fd, 4096)
        #expect(try faultsReading(settledMapping(fd, size)) == 0)
        withExtendedLifetime((first, second)) {}
    }
}
