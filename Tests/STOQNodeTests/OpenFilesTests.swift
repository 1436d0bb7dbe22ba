import Foundation
import Testing

@testable import STOQNode

/// The node takes the hard limit on open files at start (systemd gives a service 1024).
@Suite(.serialized) struct OpenFilesTests {
    @Test func theSoftLimitRisesToTheHardOne() throws {
        var l = rlimit()
        try #require(getrlimit(OpenFiles.resource, &l) == 0)
        let hard = l.rlim_max, before = l.rlim_cur
        defer {
            l.rlim_cur = before
            setrlimit(OpenFiles.resource, &l)
        }
        try #require(hard > 512, "a hard limit of \(hard) leaves nothing to raise")
        l.rlim_cur = 512
        try #require(setrlimit(OpenFiles.resource, &l) == 0)
        let raised = try #require(OpenFiles.raiseSoftLimit())
        #expect(raised.from == 512 && raised.to == UInt64(hard))
        var now = rlimit()
        #expect(getrlimit(OpenFiles.resource, &now) == 0 && now.rlim_cur == hard)
        #expect(OpenFiles.raiseSoftLimit() == nil, "already at the hard limit: nothing to do")
    }
}
