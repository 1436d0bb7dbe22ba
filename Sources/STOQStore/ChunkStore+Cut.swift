import STOQChunking

extension ChunkStore {
    /// Puts every chunk `chunker` cuts, in order, each from the chunker's own buffer: the
    /// bytes its id was just computed from, so they are not hashed again. `reserve` is asked
    /// for each chunk's room before it is put (and throws to stop); `stored` hears how each
    /// put went (with the chunk's bytes, valid only during the call). Returns the manifest's entries; the chunker then holds the object's length
    /// (and digest, if it computed one). Throws the store's errors and the source's.
    public func put<Source: STOQChunking.ChunkSource>(
        cutBy chunker: StreamingChunker<Source>, sizeHint: UInt64, reserve: ((Int) throws -> Void)? = nil,
        stored: (ChunkID, UnsafeRawBufferPointer, PutResult) -> Void
    ) throws -> [Manifest.Entry] {
        var entries: [Manifest.Entry] = []
        entries.reserveCapacity(Int(min(sizeHint, 1 << 40)) / chunker.parameters.avgSize + 1)
        while let (c, bytes) = try chunker.nextWithBytes() {
            let id = ChunkID(bytes: c.id.bytes)!
            try reserve?(c.length)
            stored(id, bytes, try put(id: id, hashedBytes: bytes))
            entries.append(Manifest.Entry(id: c.id, length: UInt32(c.length)))
        }
        return entries
    }
}
