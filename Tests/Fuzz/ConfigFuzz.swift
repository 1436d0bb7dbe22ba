// libFuzzer target for the config loader: TOML text → ConfigLoader.parse (TOMLKit's parse,
// then every key's type, value and range check) → the section comparisons a reload makes
// (Node.reload reports each section whose value changed). Not part of the package build:
// `scripts/fuzz config` recompiles STOQConfig with coverage; TOMLKit and toml++ are linked
// from the debug build uninstrumented, so the seeds (valid configs) carry the syntax.
//
// Properties: parsing is a function of the text (a reload of an unchanged file reports no
// change: the second parse equals the first, section by section); every refusal names what
// is allowed; the errors come back identical on a second parse.

@testable import STOQConfig

@_cdecl("LLVMFuzzerTestOneInput")
public func configFuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    let text = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    let first: Result<NodeConfig, ConfigErrors>
    do { first = .success(try ConfigLoader.parse(text, source: "fuzz")) } catch { first = .failure(error) }
    switch first {
    case .failure(let e):
        guard !e.errors.isEmpty else { fatalError("refused with no error") }
        for x in e.errors where x.allowed.isEmpty { fatalError("an error that does not say what is allowed: \(x)") }
        do {
            _ = try ConfigLoader.parse(text, source: "fuzz")
            fatalError("refused once, accepted on the second parse")
        } catch {
            guard error.errors == e.errors else { fatalError("different errors on the second parse") }
        }
    case .success(let config):
        guard let again = try? ConfigLoader.parse(text, source: "fuzz") else { fatalError("accepted once, refused on the second parse") }
        let defaults = NodeConfig()
        let unchanged = [
            again.network == config.network, again.node == config.node, again.storage == config.storage,
            again.tls == config.tls, again.admin == config.admin, again.chunking == config.chunking,
            again.edge == config.edge, again.routing == config.routing, again.mesh == config.mesh,
            again.trust == config.trust, again.log == config.log,
        ]
        guard unchanged.allSatisfy({ $0 }), again == config else { fatalError("a reload of the same text would report a change") }
        // The reload's comparisons against another config (the defaults) must be total too.
        _ = [config.network == defaults.network, config.mesh == defaults.mesh, config.trust == defaults.trust]
        _ = config.notices
    }
    return 0
}
