@preconcurrency import Crypto
import Foundation
import STOQCore
import STOQTrust

/// The access files a node keeps under `data_dir/access/`: its token key and the operator's
/// token. Both 0600; the directory 0700.
public enum AccessFiles {
    /// `data_dir/access`.
    public static func directory(dataDir: String) -> String { dataDir + "/access" }
    /// The node's token-signing key (P-256, PKCS#8 PEM): tokens it signs are always accepted.
    public static func tokenKey(dataDir: String) -> String { directory(dataDir: dataDir) + "/token-key.pem" }
    /// The operator's credential: an admin token for every path and method.
    public static func operatorToken(dataDir: String) -> String { directory(dataDir: dataDir) + "/operator.token" }
    /// How long the operator token the node issues itself lives.
    public static let operatorLifetime: Int64 = 365 * 86_400
    /// Re-issue the operator token when less than this is left, so a node restarted now and
    /// then never leaves its operator holding an expired one.
    public static let operatorRenewBefore: Int64 = 30 * 86_400

    /// Loads the node's token key, creating it (and the directory) the first time.
    public static func loadOrCreateTokenKey(dataDir: String) throws(AccessError) -> P256.Signing.PrivateKey {
        let path = tokenKey(dataDir: dataDir)
        if FileManager.default.fileExists(atPath: path) { return try readPrivateKey(path) }
        try makeDirectory(dataDir: dataDir)
        let key = P256.Signing.PrivateKey()
        do { try PEMFiles.writeFile(key.pemRepresentation, to: path, mode: 0o600) } catch {
            throw AccessError(.io, "\(path): \(error)")
        }
        return key
    }

    /// The file at `path`, or an error naming it and the system's reason.
    private static func contents(_ path: String, _ code: AccessError.Code) throws(AccessError) -> [UInt8] {
        switch FileContents.read(path) {
        case .success(let bytes): return bytes
        case .failure(let why): throw AccessError(code, "\(path): cannot be read: \(why)")
        }
    }

    /// Reads a P-256 private key (PKCS#8 or SEC1 PEM).
    public static func readPrivateKey(_ path: String) throws(AccessError) -> P256.Signing.PrivateKey {
        let data = try contents(path, .badKey)
        do { return try PEMFiles.p256PrivateKey(pem: String(decoding: data, as: UTF8.self)) } catch {
            throw AccessError(.badKey, "\(path): not a P-256 private key in PEM (\(error))")
        }
    }

    /// Reads a P-256 public key (SPKI PEM), or the public half of a private key file, so an
    /// operator can point `token_keys` at either.
    public static func readPublicKey(_ path: String) throws(AccessError) -> P256.Signing.PublicKey {
        let text = String(decoding: try contents(path, .badKey), as: UTF8.self)
        if let k = try? P256.Signing.PublicKey(pemRepresentation: text) { return k }
        if let k = try? PEMFiles.p256PrivateKey(pem: text) { return k.publicKey }
        throw AccessError(.badKey, "\(path): not a P-256 public key in PEM")
    }

    /// Makes sure `data_dir/access/operator.token` holds an admin token signed by `key` with
    /// more than `operatorRenewBefore` left; writes a new one otherwise (missing, expiring,
    /// unreadable, or signed by another key). Returns whether it wrote one.
    @discardableResult
    public static func ensureOperatorToken(dataDir: String, key: P256.Signing.PrivateKey, now: Int64) throws(AccessError) -> Bool {
        let path = operatorToken(dataDir: dataDir)
        if let data = FileManager.default.contents(atPath: path),
            let claims = try? AccessToken.verify(
                String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines), keys: [key.publicKey], now: now),
            claims.expires - now > operatorRenewBefore, claims.role == .admin
        {
            return false
        }
        try makeDirectory(dataDir: dataDir)
        let claims = AccessClaims(subject: "operator", issuedAt: now, expires: now + operatorLifetime, role: .admin, scope: .everything)
        do {
            let token = try AccessToken.sign(claims, with: key)
            try PEMFiles.writeFile(token + "\n", to: path, mode: 0o600)
        } catch let e as AccessError {
            throw e
        } catch {
            throw AccessError(.io, "\(path): \(error)")
        }
        return true
    }

    /// Reads a token file (the token, surrounding white space ignored).
    public static func readToken(_ path: String) throws(AccessError) -> String {
        let data = Data(try contents(path, .io))
        let token = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard !token.isEmpty else { throw AccessError(.malformed, "\(path): empty") }
        return token
    }

    private static func makeDirectory(dataDir: String) throws(AccessError) {
        let dir = directory(dataDir: dataDir)
        do {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        } catch {
            throw AccessError(.io, "\(dir): \(error.localizedDescription)")
        }
    }
}
