"""
What the two HTTP/2 codecs share (L{twistedmesh.http.h2common}), against real h2 engines talking to each
other in memory: every frame checked here is what a peer would parse.
"""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

from h2.connection import H2Connection
from h2.events import DataReceived, RemoteSettingsChanged, StreamEnded, TrailersReceived
from h2.errors import ErrorCodes
from h2.exceptions import FrameTooLargeError, ProtocolError
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame
from twisted.trial.unittest import SynchronousTestCase

from twistedmesh.http import h2common
from twistedmesh.http.h2common import (FrameBuffer, acknowledgeConnection, acknowledgeStream, drainInFrames,
                                        endStream, engineConfiguration, reopenAfterGoAway, sendInFrames,
                                        serveBlocked, startConnection, withoutConnectionFields)

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]


def pair(settings=None, connectionWindow: int = 65535):
    """
    A client engine and a server engine that have exchanged prefaces (the server's made by
    L{startConnection} with C{settings} and C{connectionWindow}) and SETTINGS acknowledgements; and the
    events the client saw.
    """
    client = H2Connection(engineConfiguration(clientSide=True, checkInbound=True))
    server = H2Connection(engineConfiguration(clientSide=False, checkInbound=False))
    client.initiate_connection()
    startConnection(server, settings or {}, connectionWindow)
    server.receive_data(client.data_to_send())
    events = client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server, events


def deliver(sender: H2Connection, receiver: H2Connection) -> list:
    """
    What C{sender} queued, as C{receiver}'s events.
    """
    return receiver.receive_data(sender.data_to_send())


class FieldTests(SynchronousTestCase):
    """
    L{withoutConnectionFields}: what HTTP/2 forbids never goes out, on either side.
    """

    def test_nothingToDropIsNoCopy(self):
        """
        Fields with nothing to drop come back as the same list (the hot path allocates nothing).
        """
        headers = [(b"content-type", b"text/plain"), (b"x-a", b"1")]
        self.assertIs(withoutConnectionFields(headers), headers)

    def test_connectionSpecificAndPseudoDropped(self):
        """
        Connection-specific fields and pseudo-headers are dropped; the others keep their order.
        """
        headers = [(b":status", b"200"), (b"connection", b"close"), (b"x-a", b"1"), (b"keep-alive", b"5"),
                   (b"proxy-connection", b"x"), (b"transfer-encoding", b"chunked"), (b"upgrade", b"h2c"),
                   (b"host", b"h"), (b"x-b", b"2")]
        self.assertEqual(withoutConnectionFields(headers), [(b"x-a", b"1"), (b"x-b", b"2")])

    def test_te(self):
        """
        C{te} goes out only as C{te: trailers}, and only when its list names C{trailers}.
        """
        for value, kept in ((b"trailers", [(b"te", b"trailers")]), (b"Trailers", [(b"te", b"trailers")]),
                            (b"trailers, deflate;q=0.5", [(b"te", b"trailers")]), (b"gzip", [])):
            self.assertEqual(withoutConnectionFields([(b"te", value)]), kept, value)


class ConnectionTests(SynchronousTestCase):
    """
    Configuring and starting an engine.
    """

    def test_configuration(self):
        """
        Fields are bytes, outbound checks are off, inbound checks as asked.
        """
        for checkInbound in (True, False):
            config = engineConfiguration(clientSide=True, checkInbound=checkInbound)
            self.assertEqual((config.client_side, config.header_encoding, config.validate_outbound_headers,
                              config.normalize_outbound_headers, config.validate_inbound_headers,
                              config.normalize_inbound_headers), (True, None, False, False, checkInbound, checkInbound))
        self.assertFalse(engineConfiguration(clientSide=False, checkInbound=True).client_side)

    def test_settingsAndConnectionWindow(self):
        """
        Our settings reach the peer in the preface, and the connection window is widened at once.
        """
        client, server, events = pair({SettingCodes.MAX_CONCURRENT_STREAMS: 7,
                                       SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20}, connectionWindow=4 << 20)
        [changed] = [e for e in events if isinstance(e, RemoteSettingsChanged)]
        self.assertEqual(changed.changed_settings[SettingCodes.MAX_CONCURRENT_STREAMS].new_value, 7)
        self.assertEqual(client.remote_settings.initial_window_size, 1 << 20)
        self.assertEqual(client.outbound_flow_control_window, 4 << 20)

    def test_narrowWindowLeftAlone(self):
        """
        A connection window at (or below) the default sends no WINDOW_UPDATE.
        """
        client, server, events = pair(connectionWindow=65535)
        self.assertEqual(client.outbound_flow_control_window, 65535)

    def test_reopenAfterGoAway(self):
        """
        After the peer's graceful GOAWAY, either side may still send on the streams it has (h2 alone
        would refuse).
        """
        goAway = GoAwayFrame(0, last_stream_id=1, error_code=0).serialize()
        client, server, _ = pair()
        client.send_headers(1, REQUEST)
        deliver(client, server)
        client.receive_data(goAway)
        self.assertRaises(ProtocolError, client.send_data, 1, b"late")
        reopenAfterGoAway(client)
        client.send_data(1, b"body", end_stream=True)
        events = deliver(client, server)
        self.assertEqual([e.data for e in events if isinstance(e, DataReceived)], [b"body"])

        client, server, _ = pair()
        client.send_headers(1, REQUEST, end_stream=True)
        deliver(client, server)
        server.receive_data(goAway)
        self.assertRaises(ProtocolError, server.send_headers, 1, [(b":status", b"204")], end_stream=True)
        reopenAfterGoAway(server)
        server.send_headers(1, [(b":status", b"204")], end_stream=True)
        self.assertTrue(any(isinstance(e, StreamEnded) for e in deliver(server, client)))


class SendingTests(SynchronousTestCase):
    """
    Sending under flow control.
    """

    def setUp(self):
        self.client, self.server, _ = pair()
        self.client.send_headers(1, REQUEST)
        deliver(self.client, self.server)

    def received(self):
        events = deliver(self.client, self.server)
        data = [bytes(e.data) for e in events if isinstance(e, DataReceived)]
        return data, any(isinstance(e, StreamEnded) for e in events)

    def test_sendInFrames(self):
        """
        Data larger than a frame goes in frames of the peer's size up to the window; the rest is returned
        as a view, and END_STREAM waits for the last byte.
        """
        data = bytes(range(256)) * 300  # 76800 bytes: more than the 65535-byte window
        rest, frames = sendInFrames(self.client, 1, data, 65535, 16384, True)
        self.assertEqual(frames, 4)
        self.assertEqual(bytes(rest), data[65535:])
        chunks, ended = self.received()
        self.assertEqual([len(c) for c in chunks], [16384, 16384, 16384, 16383])
        self.assertEqual(b"".join(chunks), data[:65535])
        self.assertFalse(ended)

    def test_sendInFramesAllFits(self):
        """
        All of it fits: nothing is returned, and the stream ends with the last frame.
        """
        rest, frames = sendInFrames(self.client, 1, b"x" * 20000, 65535, 16384, True)
        self.assertEqual((rest, frames), (None, 2))
        chunks, ended = self.received()
        self.assertEqual(([len(c) for c in chunks], ended), ([16384, 3616], True))

    def test_drainInFrames(self):
        """
        Queued chunks go as far as the window allows; a chunk cut in two leaves its tail at the front, and
        END_STREAM comes with the last chunk only.
        """
        sendInFrames(self.client, 1, b"w" * 60000, 65535, 16384, False)
        deliver(self.client, self.server)
        pending = deque([memoryview(b"a" * 3000), memoryview(b"b" * 4000)])
        self.assertEqual(drainInFrames(self.client, 1, pending, True), 2)
        self.assertEqual([bytes(c) for c in pending], [b"b" * 1465])
        self.assertEqual(self.received(), ([b"a" * 3000, b"b" * 2535], False))
        self.server.acknowledge_received_data(65535, 1)
        deliver(self.server, self.client)
        self.assertEqual(drainInFrames(self.client, 1, pending, True), 1)
        self.assertFalse(pending)
        self.assertEqual(self.received(), ([b"b" * 1465], True))

    def test_endStream(self):
        """
        The end is the trailers' HEADERS frame when there are trailers, else an empty DATA frame (counted).
        """
        self.assertEqual(endStream(self.client, 1, [(b"x-sum", b"3")]), 0)
        events = deliver(self.client, self.server)
        self.assertEqual([e.headers for e in events if isinstance(e, TrailersReceived)], [[(b"x-sum", b"3")]])
        for empty in (None, []):
            client, server, _ = pair()
            client.send_headers(1, REQUEST)
            self.assertEqual(endStream(client, 1, empty), 1)
            events = deliver(client, server)
            self.assertEqual([e.data for e in events if isinstance(e, DataReceived)], [b""])
            self.assertTrue(any(isinstance(e, StreamEnded) for e in events))


class ServeBlockedTests(SynchronousTestCase):
    """
    L{serveBlocked}: which waiting streams are drained when a window opens, and in what order.
    """

    def setUp(self):
        self.h2c = SimpleNamespace(outbound_flow_control_window=100)
        self.drained = []
        self.blocked = {}
        for sid in (1, 3, 5):
            self.blocked[sid] = SimpleNamespace(sid=sid, pending=True)

    def drain(self, s):
        self.drained.append(s.sid)

    def test_oneStream(self):
        """
        A stream's own window: that stream alone.
        """
        serveBlocked(self.h2c, self.blocked, 3, self.drain)
        serveBlocked(self.h2c, self.blocked, 7, self.drain)  # not blocked: nothing
        self.assertEqual(self.drained, [3])

    def test_connectionWindowInOrder(self):
        """
        The connection window: in the order they blocked; those still waiting go to the back.
        """
        self.blocked[3].pending = False
        serveBlocked(self.h2c, self.blocked, 0, self.drain)
        self.assertEqual(self.drained, [1, 3, 5])
        self.assertEqual(list(self.blocked), [3, 1, 5])

    def test_connectionWindowSpent(self):
        """
        Once the connection window is spent, the rest wait where they are.
        """
        def drain(s):
            self.drained.append(s.sid)
            self.h2c.outbound_flow_control_window = 0

        serveBlocked(self.h2c, self.blocked, 0, drain)
        self.assertEqual(self.drained, [1])
        self.assertEqual(list(self.blocked), [3, 5, 1])


class FrameBufferTests(SynchronousTestCase):
    """
    The inbound frame buffer refuses an oversized frame from its header on, without buffering its payload.
    """

    def test_oversizedHeaderRefused(self):
        """
        A frame header announcing more than SETTINGS_MAX_FRAME_SIZE is a FRAME_SIZE_ERROR as soon as the
        9 bytes are in: h2 queues GOAWAY(FRAME_SIZE_ERROR), and not one byte of the payload is held.
        """
        client, server, _ = pair()
        server.incoming_buffer = FrameBuffer(server=False)
        header = (0xFFFFFF).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big")
        with self.assertRaises(FrameTooLargeError):
            server.receive_data(header)
        self.assertEqual(len(server.incoming_buffer._data), 9)
        [goaway] = [e for e in client.receive_data(server.data_to_send()) if e.__class__.__name__ ==
                    "ConnectionTerminated"]
        self.assertEqual(goaway.error_code, ErrorCodes.FRAME_SIZE_ERROR)

    def test_framesInPiecesAccepted(self):
        """
        Frames within the limit are parsed as ever, whether they arrive whole or byte by byte.
        """
        client, server, _ = pair()
        server.incoming_buffer = FrameBuffer(server=False)
        client.send_headers(1, REQUEST)
        client.send_data(1, b"x" * 16384, end_stream=True)
        wire = client.data_to_send()
        events = []
        for i in range(len(wire)):
            events += server.receive_data(wire[i:i + 1])
        self.assertEqual(sum(len(e.data) for e in events if isinstance(e, DataReceived)), 16384)
        self.assertTrue(any(isinstance(e, StreamEnded) for e in events))


class AcknowledgementTests(SynchronousTestCase):
    """
    Received data acknowledged to the connection window and the stream window apart.
    """

    def test_connectionAndStreamApart(self):
        """
        acknowledgeConnection reopens only the connection window, acknowledgeStream only the stream's.
        """
        client, server, _ = pair()
        client.send_headers(1, REQUEST)
        for size in (16384, 16384, 7232):
            client.send_data(1, b"x" * size)
        deliver(client, server)
        self.assertEqual((client.outbound_flow_control_window, client.local_flow_control_window(1)),
                         (65535 - 40000, 65535 - 40000))
        acknowledgeConnection(server, 40000)
        deliver(server, client)
        self.assertEqual(client.outbound_flow_control_window, 65535)
        self.assertEqual(client._get_stream_by_id(1).outbound_flow_control_window, 65535 - 40000)
        acknowledgeStream(server, 1, 40000)
        deliver(server, client)
        self.assertEqual(client.local_flow_control_window(1), 65535)
        acknowledgeStream(server, 99, 10)  # a stream that is gone: nothing to send, no error
        self.assertEqual(server.data_to_send(), b"")


class CostTests(SynchronousTestCase):
    """
    The hot-path savings around h2 and hpack change nothing anyone can see.
    """

    def test_hpackDebugQuiet(self):
        """
        hpack's module loggers do nothing at DEBUG (about a hundred calls per request), and pass every other
        level on to the real logger.
        """
        import logging

        import hpack.hpack
        import hpack.table
        for module in (hpack.hpack, hpack.table):
            self.assertIsNone(module.log.debug("Encoding %d with %d bits", 1, 2))
            self.assertIs(module.log.debug, h2common._silent)
            self.assertIs(module.log.warning.__self__, logging.getLogger(module.__name__))

    def test_headersSentAsTheyAre(self):
        """
        A list of bytes fields (plain tuples or hpack's, never-indexed ones keeping their class) goes to
        HPACK as it is (no copy); text still goes through h2's own conversion, and the frames on the wire are
        the same either way.
        """
        import h2.stream
        from hpack import HeaderTuple, NeverIndexedHeaderTuple
        fields = [(b":status", b"200"), HeaderTuple(b"x-a", b"1"), NeverIndexedHeaderTuple(b"authorization", b"x")]
        self.assertIs(h2.stream.utf8_encode_headers(fields), fields)
        self.assertEqual(h2.stream.utf8_encode_headers([(":status", "200")]), [(b":status", b"200")])
        mixed = h2.stream.utf8_encode_headers([NeverIndexedHeaderTuple("authorization", "x")])
        self.assertEqual(mixed, [(b"authorization", b"x")])
        self.assertIsInstance(mixed[0], NeverIndexedHeaderTuple)
        client, server, _ = pair()
        client.send_headers(1, REQUEST + [(b"x-b", b"2")], end_stream=True)
        [event, _] = deliver(client, server)
        self.assertEqual(event.headers, REQUEST + [(b"x-b", b"2")])
