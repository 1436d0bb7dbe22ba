import CNgtcp2
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

    /// The guard holds `guardedMappingsMax` mappings; past that a mapping is refused (EBUSY),
    /// not sent from unguarded, and a freed slot takes the next. (The table is filled with
    /// ranges that are not mapped: vm.max_map_count, 65,530 by default, ends mmap sooner.)
    @Test func aMappingPastTheGuardsRoomIsRefused() throws {
        BodyRegion.guardFileMappings()
        let fd = try file(4096)
        defer { close(fd) }
        var slots: [Int] = []
        defer { for s in slots { stoq_guard_remove(s) } }
        let fake = UnsafeRawPointer(bitPattern: 0x1000)!
        while slots.count < BodyRegion.guardedMappingsMax {
            let s = stoq_guard_add(fake + slots.count * 4096, 4096)
            guard s >= 0 else { break }
            slots.append(s)
        }
        #expect(slots.count == BodyRegion.guardedMappingsMax)
        errno = 0
        #expect(BodyRegion.mapping(fd: fd, offset: 0, length: 100) == nil)
        #expect(errno == EBUSY)
        stoq_guard_remove(slots.removeLast())
        #expect(BodyRegion.mapping(fd: fd, offset: 0, length: 100)?.count == 100)
    }

    /// Two files cut short under their mappings in one write: both mappings are recorded, so
    /// every stream sending from either is reset (only the first fault's address was kept, and
    /// the second stream was sent zeros and its FIN). A third, untouched, is not hit.
    @Test func everyMappingThatFaultedIsRecorded() throws {
        BodyRegion.guardFileMappings()
        let fds = try (0..<3).map { _ in try file(3 * 4096) }
        defer { for fd in fds { close(fd) } }
        let regions = fds.map { BodyRegion.mapping(fd: $0, offset: 0, length: 3 * 4096) }
        let bases = try regions.map { try #require($0?.base) }
        stoq_guard_clear()
        for fd in fds.prefix(2) { #expect(ftruncate(fd, 4096) == 0) }
        for base in bases { #expect(base.load(fromByteOffset: 2 * 4096, as: UInt8.self) == 0) }  // zeros, not SIGBUS
        #expect(stoq_guard_faulted() == 1)
        #expect(stoq_guard_hit(bases[0] + 100, 10) == 1 && stoq_guard_hit(bases[1], 1) == 1)
        #expect(stoq_guard_hit(bases[2], 3 * 4096) == 0)
        stoq_guard_clear()
        #expect(stoq_guard_faulted() == 0 && stoq_guard_hit(bases[0], 1) == 0)
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

    /// Bytes of `region` that have page-table entries (bit 63, "present", of each page's entry
    /// in /proc/self/pagemap): what its reader can read without a fault. Not the thread's
    /// fault count, which a fresh test thread's own stack pages move too. The region is held
    /// until the entries are read: a temporary passed in may be released after its last use.
    private func mappedBytes(_ region: BodyRegion) throws -> Int {
        let base = UInt(bitPattern: region.base)
        try #require(base != 0)
        let pages = (region.count + 4095) / 4096
        let fd = open("/proc/self/pagemap", O_RDONLY)
        try #require(fd >= 0)
        defer { close(fd) }
        var entries = [UInt64](repeating: 0, count: pages)
        let n = withExtendedLifetime(region) { pread(fd, &entries, pages * 8, off_t(base / 4096 * 8)) }
        try #require(n == pages * 8)
        return entries.count { $0 >> 63 == 1 } * 4096
    }

    /// A file of `size` bytes written (its pages in the page cache, not holes), so that a
    /// mapping of it has pages to populate.
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
        #expect(try mappedBytes(settledMapping(fd, size)) == size)
        // A small mapping of the same pages is left to its reader: nothing is mapped ahead.
        #expect(try mappedBytes(settledMapping(fd, BodyRegion.offLoopBytes / 2)) == 0)
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
        #expect(try mappedBytes(first) == size)
        #expect(try mappedBytes(second) == 0)
        // Once the first is unmapped, its share comes back: a third is populated again.
        first = try settledMapping(fd, 4096)
        #expect(try mappedBytes(settledMapping(fd, size)) == size)
        withExtendedLifetime((first, second)) {}
    }
}
