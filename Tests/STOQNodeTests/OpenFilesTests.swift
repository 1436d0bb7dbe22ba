import Foundation
import Testing

@testable import STOQNode

/// The node takes the hard limit on open files at start (systemd gives a service 1024).
/// It lowers the process's own soft limit for a moment: the unit tests run one at a time
/// (`swift test --no-parallel`, scripts/test).
@Suite(.serialized) struct OpenFilesTests {
    static var hardLimit: UInt64 {
        var l = rlimit()
        return getrlimit(OpenFiles.resource, &l) == 0 ? UInt64(l.rlim_max) : 0
    }

    @Test(.enabled(if: hardLimit > 512, "the hard limit on open files is 512 or less: nothing to raise to"))
    func theSoftLimitRisesToTheHardOne() throws {
        var l = rlimit()
        try #require(getrlimit(OpenFiles.resource, &l) == 0)
        let hard = l.rlim_max, before = l.rlim_cur
        defer {
            l.rlim_cur = before
            setrlimit(OpenFiles.resource, &l)
        }
        l.rlim_cur = 512
        try #require(setrlimit(OpenFiles.resource, &l) == 0)
        let raised = try #require(OpenFiles.raiseSoftLimit())
        #expect(raised.from == 512 && raised.to == UInt64(hard))
        var now = rlimit()
        #expect(getrlimit(OpenFiles.resource, &now) == 0 && now.rlim_cur == hard)
        #expect(OpenFiles.raiseSoftLimit() == nil, "already at the hard limit: nothing to do")
    }
}
