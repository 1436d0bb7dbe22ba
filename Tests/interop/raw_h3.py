"""HTTP/3 by hand over aioquic's QuicConnection (no H3Connection): the tests that need frames
and QPACK instructions no well-behaved client sends (a head that waits for an encoder
instruction, a HEADERS frame that never ends) write their bytes here, and read the node's
answers frame by frame."""
import select
import socket
import time

import pylsqpack
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, PingAcknowledged, StreamDataReceived, StreamReset

# Our control stream: its type (0x00) and an empty SETTINGS frame (the defaults: no dynamic
# table for the node's encoder, so its heads decode with the static table alone).
CONTROL = b"\x00\x04\x00"
# Our QPACK encoder stream's type.
ENCODER = b"\x02"


def varint(v):
    """RFC 9000 §16."""
    if v < 0x40:
        return bytes([v])
    if v < 0x4000:
        return (v | 0x4000).to_bytes(2, "big")
    if v < 0x40000000:
        return (v | 0x80000000).to_bytes(4, "big")
    return (v | 0xC000000000000000).to_bytes(8, "big")


def read_varint(b, i):
    n = 1 << (b[i] >> 6)
    v = b[i] & 0x3F
    for k in range(1, n):
        v = (v << 8) | b[i + k]
    return v, i + n


def frames(b):
    """The complete (type, payload) frames at the start of `b`."""
    out, i = [], 0
    while i < len(b):
        try:
            t, j = read_varint(b, i)
            n, j = read_varint(b, j)
        except IndexError:
            break
        if j + n > len(b):
            break
        out.append((t, b[j:j + n]))
        i = j + n
    return out


def prefixed(first, bits, v):
    """A QPACK integer with a `bits`-bit prefix in a first byte starting `first` (RFC 7541 §5.1)."""
    top = (1 << bits) - 1
    if v < top:
        return bytes([first | v])
    out, v = [first | top], v - top
    while v >= 0x80:
        out.append(0x80 | (v & 0x7F))
        v >>= 7
    return bytes(out + [v])


# The static table's entries for request methods (RFC 9204 Appendix A).
METHODS = {"DELETE": 16, "GET": 17, "HEAD": 18, "PUT": 21}


def request(method, path, authority, headers=()):
    """A HEADERS frame for a request."""
    block = field_section(method, path, authority, headers)
    return b"\x01" + varint(len(block)) + block


def field_section(method, path, authority, headers=()):
    """A request's encoded field section, static table and literals only (QPACK, RFC 9204 §4.5):
    each field a static entry, or a literal under a static name (:path 1, :authority 0) or
    under its own."""
    def named(index, value):
        v = value.encode()
        return prefixed(0x50, 4, index) + prefixed(0x00, 7, len(v)) + v
    block = b"\x00\x00" + prefixed(0xC0, 6, METHODS[method]) + prefixed(0xC0, 6, 23)  # 23: :scheme https
    block += named(1, path) + named(0, authority)
    for name, value in headers:
        n, v = name.encode(), value.encode()
        block += prefixed(0x20, 3, len(n)) + n + prefixed(0x00, 7, len(v)) + v
    return block


class RawH3:
    """One connection to `node`: the bytes received on each stream, the streams that ended
    (FIN), the resets by stream, and how the connection ended (None while it is up)."""

    def __init__(self, node, **config):
        cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, idle_timeout=60, **config)
        cfg.load_verify_locations(node.cert)
        cfg.server_name = "::1"
        self.node = node
        self.addr = ("::1", node.port)
        self.quic = QuicConnection(configuration=cfg)
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.connect(self.addr)
        self.sock.setblocking(False)
        self.received, self.finished, self.resets, self.ended = {}, set(), {}, None
        self.pings_acked = set()
        self.qpack = pylsqpack.Decoder(0, 0)
        self.quic.connect(self.addr, now=time.time())
        self.established = False
        self.pump(lambda: self.established)
        ctrl = self.quic.get_next_available_stream_id(is_unidirectional=True)
        self.quic.send_stream_data(ctrl, CONTROL)
        self.encoder = self.quic.get_next_available_stream_id(is_unidirectional=True)
        self.quic.send_stream_data(self.encoder, ENCODER)
        self.flush()

    def close(self):
        self.quic.close()
        self.flush()
        self.sock.close()

    def flush(self):
        for data, _ in self.quic.datagrams_to_send(now=time.time()):
            self.sock.send(data)

    def pump(self, done, timeout=20):
        """Runs the connection until `done()` (asserting it comes within `timeout` s)."""
        deadline = time.time() + timeout
        while True:
            self.flush()
            while (ev := self.quic.next_event()) is not None:
                if isinstance(ev, StreamDataReceived):
                    self.received[ev.stream_id] = self.received.get(ev.stream_id, b"") + ev.data
                    if ev.end_stream:
                        self.finished.add(ev.stream_id)
                elif isinstance(ev, StreamReset):
                    self.resets[ev.stream_id] = ev.error_code
                elif isinstance(ev, ConnectionTerminated):
                    self.ended = ev
                elif isinstance(ev, HandshakeCompleted):
                    self.established = True
                elif isinstance(ev, PingAcknowledged):
                    self.pings_acked.add(ev.uid)
            if done():
                self.flush()
                return
            assert self.ended is None, (
                f"the node closed the connection: 0x{self.ended.error_code:x} {self.ended.reason_phrase!r}")
            now = time.time()
            assert now < deadline, f"timed out: resets {self.resets}, connection ended: {self.ended}"
            timer = self.quic.get_timer()
            if timer is not None and timer <= now:
                self.quic.handle_timer(now)
                continue
            wait = min(deadline, timer if timer is not None else deadline) - now
            if select.select([self.sock], [], [], max(0.0, min(wait, 0.1)))[0]:
                while True:
                    try:
                        data = self.sock.recv(65536)
                    except BlockingIOError:
                        break
                    self.quic.receive_datagram(data, self.addr, now=time.time())

    def send(self, stream_id, data, end=False):
        self.quic.send_stream_data(stream_id, data, end_stream=end)
        self.flush()

    def sync(self):
        """Returns once the node has read every packet sent before, and the ACKs we owe: a
        PING sent now with them (aioquic would hold them back its ack delay) is acknowledged."""
        for space in self.quic._spaces.values():
            if space.ack_at is not None:
                space.ack_at = 0.0
        uid = len(self.pings_acked) + 1
        self.quic.send_ping(uid)
        self.pump(lambda: uid in self.pings_acked)

    def new_stream(self):
        """The next request stream's id (the same until something is sent on it)."""
        return self.quic.get_next_available_stream_id()

    def response(self, stream_id):
        """The status and body of the answer on `stream_id`, once it ended (FIN)."""
        assert stream_id in self.finished, f"stream {stream_id} has not ended"
        fs = frames(self.received.get(stream_id, b""))
        assert fs and fs[0][0] == 0x01, f"stream {stream_id} does not start with HEADERS: {fs}"
        _, headers = self.qpack.feed_header(stream_id, fs[0][1])
        status = int(dict(headers)[b":status"])
        body = b"".join(p for t, p in fs[1:] if t == 0x00)
        return status, body
