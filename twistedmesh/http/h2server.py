"""
The HTTP/2 connection manager: one downstream HTTP/2 connection on a C{protocol = http} listener.

A thin protocol around h2's sans-IO engine (as Twisted's C{twisted.web._http2.H2Connection} is): bytes go to
C{H2Connection.receive_data}, the events that come back are dispatched, and whatever the engine wants to
send is flushed to the transport once per read (or once per call from a stream outside a read). Each
request becomes a L{Stream} that runs the listener's HTTP filter chain, exactly as an HTTP/1.1 request
does; only here many streams are live at once, answered in whatever order their answers come.

The Stream's codec is not this connection but the stream's own L{_StreamCodec}: the codec contract
(C{registerResponseProducer(producer)}, C{bodyProducer}, ...) names no stream, and with multiplexing every
call must reach one stream's state. So each stream gets a small object that is its codec, its
request-body producer and its share of the connection's flow control.

Flow control is the backpressure, both ways
===========================================

B{Request bodies.} HTTP/2 has no way to stop reading one stream but the window: the client may send a
stream only as many bytes as we have acknowledged. So a chunk is acknowledged (C{acknowledge_received_data})
only once it has been handed to the stream I{and} the stream's request side is not paused. A stream is
paused while a filter holds its request (C{pauseRequest}), while the router waits for an upstream
connection, or while the upstream transport's buffer is full (it pauses the stream's C{bodyProducer}).
While paused, acknowledgements are held; they are released when the last pause ends. The client can
therefore have at most one stream window (64 KiB) in flight per stream, and at most the connection
window (1 MiB) in flight over all streams: that is what bounds the memory a slow upstream can cost us.
h2 batches the WINDOW_UPDATE frames itself (one per half window).

B{Response bodies.} We may send a stream only what the client's windows (stream and connection) allow.
What does not fit waits in that stream's queue, and the stream's response producer (the upstream
transport the router registered) is paused at once, so a stream never holds more than about one upstream
read beyond the client's window. C{WindowUpdated} (and a larger C{INITIAL_WINDOW_SIZE}) sends what fits and
resumes the producer once the queue is empty.

B{The socket.} This connection is the streaming producer of its own transport. When the client does not
read what we write (the transport's buffer is full), every stream's response producer is paused and we
stop reading the socket: a client that sends PINGs, SETTINGS or resets without reading the answers cannot
make us queue more than one read's worth of replies.

Limits (the listener's C{http2.*} keys, see L{HTTP2Settings}; by default Envoy's edge recommendations and
flood limits): 100 concurrent streams, 64 KiB stream window, 1 MiB connection window, a 60 KiB header list.

Abuse is met as Envoy meets it
==============================

Every limit below ends the connection with GOAWAY(ENHANCE_YOUR_CALM), then closes it. Each has a counter.
Any close (these, and the graceful ones: draining, C{max_requests_per_connection}, idle, the client's own
GOAWAY) waits for the client to read what is left only while it keeps reading: a client that reads nothing
for a second (C{delayedCloseTimeout}) is aborted, so no closing connection stays open (Envoy's delayed
close).

  - Rapid reset (CVE-2023-44487): once a connection has closed 500 streams, more than half of them reset
    by the client within a second of opening (or refused as malformed, which the client provoked) closes
    it; before that floor, so do premature resets that alone pass half of it.
  - Inbound frames are counted as h2's frame buffer parses them, before h2 acts on them (L{_InboundFrames}):
    a header block still arriving in CONTINUATION frames is bounded in compressed bytes and frames (so is
    the decoded list, by HPACK: bombs), empty HEADERS/CONTINUATION/DATA frames in a row, PRIORITY frames
    per stream opened, WINDOW_UPDATE frames per stream opened and DATA frame sent.
  - Outbound control frames (PING and SETTINGS acknowledgements, RST_STREAMs) are counted while they are
    not yet with a writing transport (L{_Engine}): the answers to one read, plus everything queued while
    the client's socket is full. A client that floods us with frames whose answers it does not read is cut
    off at 1000.

A malformed request (an uppercase or invalid field name, a connection-specific field, a bad pseudo-header
set, an invalid or conflicting C{content-length}) is a stream error, RST_STREAM(PROTOCOL_ERROR), as RFC 9113
section 8.1.1 has it: the connection's other streams carry on. The fields are checked in the pass that
translates them anyway (h2's own inbound validation is off: it would make each of these a connection
error). One case stays a connection error, as h2 makes it: a body longer or shorter than its valid
C{content-length}, found while h2 parses the DATA frames (their bytes must never reach an HTTP/1.1 upstream
that trusts the length).
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, Optional

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import DenialOfServiceError, H2Error, ProtocolError, StreamClosedError
from h2.frame_buffer import CONTINUATION_BACKLOG
from h2.settings import SettingCodes
from h2.stream import H2Stream
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PriorityFrame,
    WindowUpdateFrame,
)
from twisted.internet import protocol
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.logger import Logger
from zope.interface import implementer

from ..observability.tracing import propagate
from . import h2common
from .h2common import FIELD_VALUE_BYTES as _VALUE_BYTES
from .h2common import badField as _badField
from .h2common import withoutConnectionFields
from .server import HTTPSettings, HTTPStats, newRequestId
from .stream import Headers, Stream
from .xfcc import XFCC_ADDS, forwardedClientCert

_NO_BODY_STATUSES = frozenset((204, 304))
_NO_ERROR = ErrorCodes.NO_ERROR
_INTERNAL_ERROR = ErrorCodes.INTERNAL_ERROR
_PROTOCOL_ERROR = ErrorCodes.PROTOCOL_ERROR
_MALFORMED_FIELD = "http2.invalid.header.field"
_MALFORMED_MESSAGE = "http2.violation.of.messaging.rule"


def _pendingBytes(transport) -> Optional[int]:
    """
    How many bytes C{transport} still has to write, to tell a client that reads slowly from one that
    stopped; C{None} when the transport does not say (then a closing connection is not given more time).
    A TLS transport is asked through to the TCP transport beneath it (what TLS itself holds is small).
    """
    for _ in range(3):
        buffer = getattr(transport, "dataBuffer", None)
        if buffer is not None:
            return len(buffer) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    return None


class _Abuse(DenialOfServiceError):
    """
    A client passed one of the listener's abuse limits: GOAWAY(ENHANCE_YOUR_CALM), then the connection is
    closed. C{stat} names the L{HTTP2Stats} counter that says which limit.
    """

    def __init__(self, stat: str, why: str) -> None:
        super().__init__(why)
        self.stat = stat


class _InboundFrames(h2common.FrameBuffer):
    """
    h2's inbound frame buffer (one that refuses an oversized frame from its header on, see
    L{h2common.FrameBuffer}), with the inbound abuse limits counted as each frame is parsed (before h2
    dispatches it): a header block in pieces is bounded in bytes and frames (CONTINUATION floods), and
    empty frames, PRIORITY and WINDOW_UPDATE frames are counted as Envoy counts them: PRIORITY frames up to
    C{maxInboundPriorityFramesPerStream x (1 + streams opened)}, WINDOW_UPDATE frames up to C{5 + 2 x
    (streams opened + maxInboundWindowUpdateFramesPerDataFrameSent x DATA frames sent)}. A limit passed
    raises L{_Abuse}, which h2 turns into GOAWAY(ENHANCE_YOUR_CALM).

    @ivar streamsOpened: streams the client has opened (kept by the connection).
    @ivar dataFramesSent: DATA frames we have sent (kept by the connection).
    """

    def __init__(self, limits: "HTTP2Settings", blockLimit: int) -> None:
        super().__init__(server=True)
        self.blockLimit = blockLimit
        self.blockBytes = 0
        self.emptyLimit = limits.maxConsecutiveInboundFramesWithEmptyPayload
        self.empty = 0
        self.priorityPerStream = limits.maxInboundPriorityFramesPerStream
        self.priorityFrames = 0
        self.windowUpdatesPerData = limits.maxInboundWindowUpdateFramesPerDataFrameSent
        self.windowUpdates = 0
        self.streamsOpened = 0
        self.dataFramesSent = 0

    def _update_header_buffer(self, f):
        kind = f.__class__
        if kind is DataFrame or kind is HeadersFrame or kind is ContinuationFrame:
            # Envoy's empty-frame rule: no payload and no END_STREAM has no use but to burn our CPU.
            if f.body_len == 0 and "END_STREAM" not in f.flags:
                self.empty += 1
                if self.empty > self.emptyLimit:
                    raise _Abuse("inbound_empty_frames_flood", "too many consecutive empty frames")
            else:
                self.empty = 0
            if kind is not DataFrame and (self._headers_buffer or "END_HEADERS" not in f.flags):
                # h2 keeps a header block's frames until END_HEADERS: bound them before they are kept.
                self.blockBytes += f.body_len
                if self.blockBytes > self.blockLimit or len(self._headers_buffer) >= CONTINUATION_BACKLOG:
                    raise _Abuse("header_overflow", "header block too large")
        elif kind is PriorityFrame:
            self.priorityFrames += 1
            if self.priorityFrames > self.priorityPerStream * (1 + self.streamsOpened):
                raise _Abuse("inbound_priority_frames_flood", "too many PRIORITY frames")
        elif kind is WindowUpdateFrame:
            self.windowUpdates += 1
            # Envoy's allowance: a client widens each stream's window (even one we answer with HEADERS
            # alone) and the connection's, and may answer every DATA frame we send a few times over.
            if self.windowUpdates > 5 + 2 * (self.streamsOpened + self.windowUpdatesPerData * self.dataFramesSent):
                raise _Abuse("inbound_window_update_frames_flood", "too many WINDOW_UPDATE frames")
        f = super()._update_header_buffer(f)
        if self.blockBytes and not self._headers_buffer:
            self.blockBytes = 0
        return f


class _LenientStream(H2Stream):
    """
    h2's stream, but an invalid or conflicting C{content-length} is not h2's to judge: h2 would raise out of
    the whole read and end the connection, where RFC 9113 section 8.1.1 makes a malformed request a stream
    error. L{HTTP2Connection._requestReceived} checks the field in its own pass and resets the stream; until
    then no length is enforced for it, and none of its body is forwarded.
    """

    def _initialize_content_length(self, headers):
        try:
            H2Stream._initialize_content_length(self, headers)
        except ProtocolError:
            self._expected_content_length = None


class _Engine(H2Connection):
    """
    h2's connection, counting the control frames it queues in answer to the client's frames (PING and
    SETTINGS acknowledgements, RST_STREAMs for frames on reset streams): C{controlPending} of them not yet
    handed to a transport that is writing (see L{HTTP2Connection.dataReceived}); past C{controlLimit}, the
    client is flooding us with work it does not read the answers to.
    """

    controlPending = 0
    controlLimit = 1000

    def _begin_new_stream(self, stream_id, allowed_ids):
        stream = H2Connection._begin_new_stream(self, stream_id, allowed_ids)
        stream.__class__ = _LenientStream  # see _LenientStream; same layout, one more method
        return stream

    def _receive_frame(self, frame):
        before = len(self._data_to_send)
        events = H2Connection._receive_frame(self, frame)
        if len(self._data_to_send) != before:
            self.controlPending += 1
            if self.controlPending > self.controlLimit:
                raise _Abuse("outbound_control_flood", "too many control frames queued")
        return events


class HTTP2Settings:
    """
    A listener's HTTP/2 limits, resolved once (the C{http2.*} keys of its section). The defaults are Envoy's
    recommendations for an edge proxy (its built-in defaults are far larger: 2^31-1 streams and 256 MiB
    windows, tuned for a trusted mesh); the flood limits are Envoy's defaults.

    @ivar maxConcurrentStreams: SETTINGS_MAX_CONCURRENT_STREAMS: streams a client may have open at once.
    @ivar initialStreamWindowSize: SETTINGS_INITIAL_WINDOW_SIZE: request-body bytes a client may send a
        stream ahead of our acknowledgement (and so what a paused stream may cost us).
    @ivar initialConnectionWindowSize: the same over all streams of the connection.
    @ivar maxFrameSize: SETTINGS_MAX_FRAME_SIZE: the largest frame payload a client may send us.
    @ivar maxHeaderListSize: SETTINGS_MAX_HEADER_LIST_SIZE, or C{None} for the listener's
        C{max_request_headers_size}; a request over it is answered 431, and a header block (HEADERS and
        its CONTINUATION frames, still compressed) over twice it (at least 64 KiB) closes the connection.
    @ivar maxOutboundControlFrames: PING and SETTINGS acknowledgements and RST_STREAMs queued for a client
        that does not read them (within one read, or while its socket is full); beyond, the connection is
        closed (C{http2.outbound_control_flood}).
    @ivar maxConsecutiveInboundFramesWithEmptyPayload: HEADERS, CONTINUATION and DATA frames in a row with
        no payload and no END_STREAM; beyond, the connection is closed (C{http2.inbound_empty_frames_flood}).
    @ivar maxInboundPriorityFramesPerStream: PRIORITY frames allowed per stream opened (plus one stream's
        worth); beyond, the connection is closed (C{http2.inbound_priority_frames_flood}).
    @ivar maxInboundWindowUpdateFramesPerDataFrameSent: WINDOW_UPDATE frames allowed per DATA frame we sent,
        as Envoy counts them: C{5 + 2 x (streams opened + this x DATA frames sent)} over the connection's
        life; beyond, the connection is closed (C{http2.inbound_window_update_frames_flood}).
    @ivar prematureResetMinStreamLifetime: a stream the client resets sooner than this (seconds) after
        opening it counts as a premature reset.
    @ivar prematureResetTotalStreamCount: the rapid-reset floor: once a connection has closed this many
        streams, more than half of them premature closes it; before, so does a premature count that alone is
        more than half of the floor (the outcome is decided already).
    @ivar delayedCloseTimeout: once the connection is closing (a GOAWAY for abuse, or a graceful close),
        how long (seconds) the client may go without reading what is left before the connection is aborted.
    """

    __slots__ = ("maxConcurrentStreams", "initialStreamWindowSize", "initialConnectionWindowSize",
                 "maxFrameSize", "maxHeaderListSize", "maxOutboundControlFrames",
                 "maxConsecutiveInboundFramesWithEmptyPayload", "maxInboundPriorityFramesPerStream",
                 "maxInboundWindowUpdateFramesPerDataFrameSent", "prematureResetMinStreamLifetime",
                 "prematureResetTotalStreamCount", "delayedCloseTimeout")

    def __init__(self, maxConcurrentStreams: int = 100, initialStreamWindowSize: int = 64 * 1024,
                 initialConnectionWindowSize: int = 1024 * 1024, maxFrameSize: int = 16384,
                 maxHeaderListSize: Optional[int] = None, maxOutboundControlFrames: int = 1000,
                 maxConsecutiveInboundFramesWithEmptyPayload: int = 1, maxInboundPriorityFramesPerStream: int = 100,
                 maxInboundWindowUpdateFramesPerDataFrameSent: int = 10,
                 prematureResetMinStreamLifetime: float = 1.0, prematureResetTotalStreamCount: int = 500,
                 delayedCloseTimeout: float = 1.0) -> None:
        self.maxConcurrentStreams = maxConcurrentStreams
        self.initialStreamWindowSize = initialStreamWindowSize
        self.initialConnectionWindowSize = initialConnectionWindowSize
        self.maxFrameSize = maxFrameSize
        self.maxHeaderListSize = maxHeaderListSize
        self.maxOutboundControlFrames = maxOutboundControlFrames
        self.maxConsecutiveInboundFramesWithEmptyPayload = maxConsecutiveInboundFramesWithEmptyPayload
        self.maxInboundPriorityFramesPerStream = maxInboundPriorityFramesPerStream
        self.maxInboundWindowUpdateFramesPerDataFrameSent = maxInboundWindowUpdateFramesPerDataFrameSent
        self.prematureResetMinStreamLifetime = prematureResetMinStreamLifetime
        self.prematureResetTotalStreamCount = prematureResetTotalStreamCount
        self.delayedCloseTimeout = delayedCloseTimeout


class HTTP2Stats:
    """
    The listener's HTTP/2 stats (Envoy's names): C{http.<listener>.*} next to the L{HTTPStats} both codecs
    share, and the codec's own under C{http.<listener>.http2.*}.
    """

    def __init__(self, scope) -> None:
        self.downstream_rq_http2_total = scope.counter("downstream_rq_http2_total")
        self.downstream_cx_http2_total = scope.counter("downstream_cx_http2_total")
        self.downstream_cx_http2_active = scope.gauge("downstream_cx_http2_active")
        self.downstream_rq_too_many_premature_resets = scope.counter("downstream_rq_too_many_premature_resets")
        codec = scope.scope("http2")
        self.rx_reset = codec.counter("rx_reset")  # RST_STREAM received
        self.tx_reset = codec.counter("tx_reset")  # RST_STREAM sent
        self.rx_messaging_error = codec.counter("rx_messaging_error")  # malformed requests (stream errors)
        self.header_overflow = codec.counter("header_overflow")
        self.outbound_control_flood = codec.counter("outbound_control_flood")
        self.inbound_empty_frames_flood = codec.counter("inbound_empty_frames_flood")
        self.inbound_priority_frames_flood = codec.counter("inbound_priority_frames_flood")
        self.inbound_window_update_frames_flood = codec.counter("inbound_window_update_frames_flood")
        self.trailers = codec.counter("trailers")  # requests that ended with trailers
        self.goaway_sent = codec.counter("goaway_sent")


@implementer(IPushProducer)
class _StreamCodec:
    """
    One stream's side of an L{HTTP2Connection}: what its L{Stream} calls its codec (every method of the
    HTTP/1.1 codec's contract, for this one stream), the producer of its request body (C{bodyProducer},
    which the router registers with the upstream transport), and its flow-control state both ways.

    @ivar pauses: how many reasons hold the request side (filters, the router, the upstream's buffer);
        request data is acknowledged to the client only while there is none.
    @ivar heldAck: flow-controlled bytes received while paused, acknowledged when the last pause ends.
    @ivar pending: response data the client's window has no room for yet (C{None} when there is none).
    """

    __slots__ = ("conn", "sid", "stream", "pauses", "heldAck", "bodyPaused", "producer", "producerPaused",
                 "pending", "pendingEnd", "pendingTrailers", "bodyAllowed", "requestEnded", "responseSent",
                 "openedAt", "finished", "filterHeld")

    def __init__(self, conn: "HTTP2Connection", sid: int, openedAt: float) -> None:
        self.conn = conn
        self.sid = sid
        self.stream: Optional[Stream] = None
        self.pauses = 0
        self.heldAck = 0
        self.bodyPaused = False
        self.producer = None
        self.producerPaused = False
        self.filterHeld = 0  # response filters holding the response (see pauseResponse)
        self.pending: Optional[Deque[memoryview]] = None
        self.pendingEnd = False
        self.pendingTrailers: Optional[Headers] = None
        self.bodyAllowed = True
        self.requestEnded = False
        self.responseSent = False  # END_STREAM (or RST_STREAM) has been queued for the client
        self.openedAt = openedAt
        self.finished = False

    # -- request side: pausing holds the client's window -----------------------------------------------------

    def pauseRequest(self, stream: Stream) -> None:
        """
        A filter or the router holds the request: stop acknowledging its data.
        """
        self.pauses += 1

    def resumeRequest(self, stream: Stream) -> None:
        """
        One reason to hold the request is gone; at the last one, acknowledge what was held.
        """
        self.pauses -= 1
        if self.pauses == 0 and self.heldAck:
            self._releaseAck()

    @property
    def bodyProducer(self) -> "_StreamCodec":
        """
        The request body's producer, for the router to register with the upstream transport: this object.
        """
        return self

    def pauseProducing(self) -> None:
        """
        The upstream transport's buffer is full: hold the client's window for this stream.
        """
        if not self.bodyPaused:
            self.bodyPaused = True
            self.pauses += 1

    def resumeProducing(self) -> None:
        """
        The upstream transport drained: let the client send again.
        """
        if self.bodyPaused:
            self.bodyPaused = False
            self.resumeRequest(self.stream)

    def stopProducing(self) -> None:
        """
        The upstream transport is going away: nothing to hold for it any more.
        """
        self.resumeProducing()

    def _received(self, length: int) -> None:
        """
        A chunk of C{length} flow-controlled bytes was handed to the stream: acknowledge it, unless that
        (or anything else) paused the request.
        """
        if self.pauses:
            self.heldAck += length
        else:
            conn = self.conn
            conn.h2.acknowledge_received_data(length, self.sid)
            conn._written()

    def _releaseAck(self) -> None:
        """
        Acknowledge what was held while the request was paused.
        """
        held, self.heldAck = self.heldAck, 0
        conn = self.conn
        if conn.terminated:
            return
        conn.h2.acknowledge_received_data(held, self.sid)
        conn._written()

    # -- response side --------------------------------------------------------------------------------------

    def localReplyStarted(self, stream: Stream, body: bytes) -> None:
        """
        The proxy answers itself. Nothing to prepare: if the request is still arriving when the answer
        ends, the stream is reset with NO_ERROR (RFC 9113 section 8.1) and the connection carries on.
        """

    def writeHeaders(self, stream: Stream, end: bool) -> None:
        """
        Send the response head (C{:status} and the fields HTTP/2 allows).
        """
        conn = self.conn
        if conn.terminated or self.responseSent:
            return
        status = stream.status
        if status == 101:
            # HTTP/2 has no upgrades; the router resets the stream when it sees this 101 was not asked for.
            return
        if status in _NO_BODY_STATUSES or stream.method == b"HEAD":
            self.bodyAllowed = False
        headers = [(b":status", b"%d" % status)]
        headers += withoutConnectionFields(stream.responseHeaders)
        try:
            conn.h2.send_headers(self.sid, headers, end_stream=end)
        except StreamClosedError:
            # The client reset it in the read being dispatched: its StreamReset event, still to come,
            # ends the stream (and counts toward the rapid-reset defence). So below.
            return
        except (H2Error, ValueError, TypeError):
            # A field h2 will not encode (an illegal character from an upstream, say): never half a head.
            conn.log.failure("HTTP/2 stream {sid}: cannot send response headers", sid=self.sid)
            stream.responseFlags.append("DPE")
            self.resetStream(stream, "http2.invalid_response_headers")
            return
        if end:
            self._sent()
        conn._written()

    def writeData(self, stream: Stream, data: bytes, end: bool) -> None:
        """
        Send response data as far as the client's windows allow; queue the rest and pause its producer.
        """
        conn = self.conn
        if conn.terminated or self.responseSent:
            return
        if not self.bodyAllowed:
            data = b""
        pending = self.pending
        if pending:
            # Data already waits for the window: this goes behind it (the producer is already paused).
            if data:
                pending.append(memoryview(data))
            if end:
                self.pendingEnd = True
            return
        try:
            self._send(data, end)
        except StreamClosedError:
            return
        conn._written()

    def writeTrailers(self, stream: Stream, trailers: Headers) -> None:
        """
        End the response with trailers (a HEADERS frame with END_STREAM), after any queued data.
        """
        conn = self.conn
        if conn.terminated or self.responseSent:
            return
        fields = withoutConnectionFields(trailers)
        if self.pending:
            self.pendingTrailers = fields
            self.pendingEnd = True
            return
        try:
            self._sendTrailers(fields)
        except StreamClosedError:
            return
        conn._written()

    def resetStream(self, stream: Stream, reason: str) -> None:
        """
        Abort the exchange: RST_STREAM(INTERNAL_ERROR), so a half-sent response never looks complete. Only
        this stream is affected.
        """
        conn = self.conn
        conn.httpStats.downstream_rq_tx_reset.value += 1
        if not conn.terminated and not self.responseSent:
            self.responseSent = True
            self.pending = None
            try:
                conn.h2.reset_stream(self.sid, _INTERNAL_ERROR)
            except H2Error:
                pass  # already closed on the wire (the client reset it first): nothing left to abort
            else:
                conn.h2Stats.tx_reset.value += 1
            conn._written()
        conn._finishStream(self)

    def registerResponseProducer(self, producer) -> None:
        """
        The router's upstream transport produces this stream's response: it is paused while the client's
        window (or socket) has no room.
        """
        self.producer = producer
        self.producerPaused = False
        self._updateProducer()

    def pauseResponse(self, stream: Stream) -> None:
        """
        A response filter holds the response: pause the upstream until it lets go.
        """
        self.filterHeld += 1
        self._updateProducer()

    def resumeResponse(self, stream: Stream) -> None:
        if self.filterHeld > 0:
            self.filterHeld -= 1
            self._updateProducer()

    def unregisterResponseProducer(self) -> None:
        """
        The upstream is done with this stream. A transport we paused is resumed: it may go back to its pool,
        where it must read to notice the upstream closing it.
        """
        producer, self.producer = self.producer, None
        if producer is not None and self.producerPaused:
            self.producerPaused = False
            producer.resumeProducing()

    def startTunnel(self, stream: Stream, upstream, fromUpstream: bytes) -> None:
        """
        HTTP/2 has no C{Upgrade} (extended CONNECT is not supported): abandon the upstream and reset.
        """
        upstream.abandon()
        stream.reset("http2.upgrade_not_supported")

    # -- sending under flow control -----------------------------------------------------------------------------

    def _send(self, data: bytes, end: bool) -> None:
        """
        Send C{data} in as many frames as the windows and the peer's frame size allow; queue the rest (and
        the end) and pause the producer.
        """
        conn = self.conn
        h2c = conn.h2
        sid = self.sid
        size = len(data)
        if not size:
            if end:
                # Every response whose body ends apart from its last chunk ends here: kept inline.
                h2c.send_data(sid, b"", end_stream=True)
                conn.inbound.dataFramesSent += 1
                self._sent()
            return
        window = h2c.local_flow_control_window(sid)
        maxFrame = h2c.max_outbound_frame_size
        if size <= window and size <= maxFrame:
            # The common case: one frame, the caller's bytes as they are.
            h2c.send_data(sid, data, end_stream=end)
            conn.inbound.dataFramesSent += 1
            if end:
                self._sent()
            return
        rest, frames = h2common.sendInFrames(h2c, sid, data, window, maxFrame, end)
        conn.inbound.dataFramesSent += frames
        if rest is not None:
            self.pending = deque((rest,))
            self.pendingEnd = end
            conn.blocked[sid] = self
            self._updateProducer()
        elif end:
            self._sent()

    def _drain(self) -> None:
        """
        The client opened a window: send what is queued and fits.
        """
        pending = self.pending
        conn = self.conn
        sid = self.sid
        endAtLast = self.pendingEnd and self.pendingTrailers is None
        conn.inbound.dataFramesSent += h2common.drainInFrames(conn.h2, sid, pending, endAtLast)
        if pending:
            return
        self.pending = None
        self.conn.blocked.pop(sid, None)
        if self.pendingTrailers is not None:
            trailers, self.pendingTrailers = self.pendingTrailers, None
            self._sendTrailers(trailers)
        elif self.pendingEnd:
            self._sent()
        if not self.finished:
            self._updateProducer()

    def _sendTrailers(self, fields: Headers) -> None:
        """
        End the stream with C{fields} as trailers (with an empty DATA frame if a filter removed them all).
        """
        self.conn.inbound.dataFramesSent += h2common.endStream(self.conn.h2, self.sid, fields)
        self._sent()

    def _updateProducer(self) -> None:
        """
        Pause the response producer while anything waits for the client's window or the client's socket is
        full; resume it when neither holds.
        """
        producer = self.producer
        if producer is None:
            return
        blocked = bool(self.pending) or self.conn.writeBlocked or self.filterHeld > 0
        if blocked and not self.producerPaused:
            self.producerPaused = True
            producer.pauseProducing()
        elif not blocked and self.producerPaused:
            self.producerPaused = False
            producer.resumeProducing()

    def _sent(self) -> None:
        """
        END_STREAM is queued: the response is complete on our side, and so is the stream.
        """
        self.responseSent = True
        if not self.requestEnded:
            # The answer did not need the rest of the request: ask the client to stop sending it, unless
            # its END_STREAM is already parsed in this read (h2 has closed the stream; we are told later).
            h2c = self.conn.h2
            h2s = h2c.streams.get(self.sid)
            if h2s is not None and not h2s.closed:
                h2c.reset_stream(self.sid, _NO_ERROR)
                self.conn.h2Stats.tx_reset.value += 1
        self.conn._finishStream(self)


@implementer(IPushProducer)
class HTTP2Connection(protocol.Protocol):
    """
    One downstream HTTP/2 connection (see the module docstring). It is also its transport's producer:
    the transport pauses it when the client stops reading.

    @ivar streams: the live streams' codecs by stream id.
    @ivar blocked: the codecs with response data waiting for the client's window, in the order they
        blocked (served in that order when the connection window opens).
    @ivar writeBlocked: the transport's buffer is full (the client is not reading).
    @ivar terminated: a fatal GOAWAY was sent or the connection is gone: nothing more goes to h2.
    """

    log = Logger()
    factory = None  # the listener's factory, told when the connection opens and closes (None when embedded)

    def __init__(self, settings: HTTPSettings, httpStats: HTTPStats, h2Settings: Optional[HTTP2Settings] = None,
                 h2Stats: Optional[HTTP2Stats] = None) -> None:
        self.settings = settings
        self.httpStats = httpStats
        self.limits = h2Settings if h2Settings is not None else HTTP2Settings()
        self.h2Stats = h2Stats if h2Stats is not None else HTTP2Stats(settings.stats.scope("http", settings.name))
        self.h2: Optional[H2Connection] = None
        self.streams: Dict[int, _StreamCodec] = {}
        self.blocked: Dict[int, _StreamCodec] = {}
        self.writeBlocked = False
        self.readPaused = False
        self.dispatching = False
        self.terminated = False
        self.disconnected = False
        self.goingAway = False  # a graceful GOAWAY was sent: finish the streams we have, then close
        self.lastStreamId = 0  # ... and streams above this one are refused
        self.requests = 0
        self.closedStreams = 0
        self.prematureResets = 0
        self.idleTimer = None
        self.closeTimer = None  # aborts a closing connection whose client stopped reading (see _close)
        self.closePending: Optional[int] = None  # bytes the transport still had to write at the last look
        self.inbound: Optional[_InboundFrames] = None
        self.peer = None
        self.peerHost = b""
        self.forwardedProto = b"http"

    # -- connection lifecycle ---------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        """
        Send our SETTINGS (the limits) and open the connection window.
        """
        if self.factory is not None:
            self.factory.connectionOpened(self)
        transport = self.transport
        self.peer = transport.getPeer()
        # A UNIX-socket peer has no address to forward: then x-forwarded-for is left as the client sent it.
        self.peerHost = getattr(self.peer, "host", "").encode("ascii")
        # Envoy sets x-forwarded-proto from the connection, never from what the client claims (:scheme).
        self.forwardedProto = b"https" if ISSLTransport.providedBy(transport) else b"http"
        self.h2Stats.downstream_cx_http2_total.value += 1
        self.h2Stats.downstream_cx_http2_active.value += 1
        limits = self.limits
        maxHeaderList = limits.maxHeaderListSize or self.settings.maxHeaderBytes
        # Inbound fields are checked by _requestReceived in its one pass (a malformed request is a stream
        # error there, where h2's own check would end the whole connection), and cookie crumbs joined there.
        h2c = self.h2 = _Engine(h2common.engineConfiguration(clientSide=False, checkInbound=False))
        h2c.controlLimit = limits.maxOutboundControlFrames
        h2c.max_inbound_frame_size = limits.maxFrameSize
        # HPACK decodes every block whole, to keep its table in step; a block over our limit is answered
        # 431 per stream, and only one far over it (a decompression bomb) is a connection error. The block's
        # compressed frames are bounded the same way before they are decoded (CONTINUATION floods).
        blockLimit = max(2 * maxHeaderList, 64 * 1024)
        h2c.decoder.max_header_list_size = blockLimit
        self.inbound = h2c.incoming_buffer = _InboundFrames(limits, blockLimit)
        h2common.startConnection(h2c, {
            SettingCodes.MAX_CONCURRENT_STREAMS: limits.maxConcurrentStreams,
            SettingCodes.INITIAL_WINDOW_SIZE: limits.initialStreamWindowSize,
            SettingCodes.MAX_FRAME_SIZE: limits.maxFrameSize,
            SettingCodes.MAX_HEADER_LIST_SIZE: maxHeaderList,
        }, limits.initialConnectionWindowSize)
        transport.registerProducer(self, True)
        self._written()
        timeout = self.settings.idleTimeout
        if timeout:
            self.idleTimer = self.settings.clock.callLater(timeout, self._idle)

    def dataReceived(self, data: bytes) -> None:
        """
        Bytes from the client: through h2, then each event to its handler; one flush at the end.
        """
        if self.terminated:
            return
        if self.idleTimer is not None:
            self.idleTimer.reset(self.settings.idleTimeout)
        h2c = self.h2
        try:
            events = h2c.receive_data(data)
        except ProtocolError as e:
            # h2 has queued a GOAWAY with the error; events of this read before the bad frame are lost
            # with the connection anyway.
            if isinstance(e, DenialOfServiceError):
                # One of the abuse limits (an HPACK bomb is h2's own: the decoded list was far too large).
                counter = getattr(self.h2Stats, getattr(e, "stat", "header_overflow"))
                counter.value += 1
                self.log.info("HTTP/2 connection from {peer} closed: {error}", peer=self.peer, error=e)
            else:
                self.log.debug("HTTP/2 protocol error from {peer}: {error}", peer=self.peer, error=e)
                self.httpStats.downstream_cx_protocol_error.value += 1
            self._terminate(None)
            return
        self.dispatching = True
        try:
            for event in events:
                if self.terminated:
                    break
                kind = event.__class__
                if kind is DataReceived:
                    self._dataReceived(event)
                elif kind is RequestReceived:
                    self._requestReceived(event)
                elif kind is StreamEnded:
                    self._streamEnded(event)
                elif kind is WindowUpdated:
                    self._windowUpdated(event)
                elif kind is TrailersReceived:
                    self._trailersReceived(event)
                elif kind is StreamReset:
                    self._streamReset(event)
                elif kind is RemoteSettingsChanged:
                    if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                        self._windowUpdated(None)
                elif kind is ConnectionTerminated:
                    self._connectionTerminated(event)
                # PING, SETTINGS ACK, PRIORITY and unknown frames need nothing: h2 answers what must be.
        finally:
            self.dispatching = False
        self._written()
        if not self.writeBlocked:
            # What h2 queued in answer to this read is now with a transport that is writing: no longer
            # pending (see _Engine).
            h2c.controlPending = 0

    def connectionLost(self, reason) -> None:
        """
        The connection is gone: streams still open end as client disconnects (C{DC}).
        """
        self.disconnected = True
        self.terminated = True
        if self.idleTimer is not None and self.idleTimer.active():
            self.idleTimer.cancel()
        self.idleTimer = None
        if self.closeTimer is not None and self.closeTimer.active():
            self.closeTimer.cancel()
        self.closeTimer = None
        self.h2Stats.downstream_cx_http2_active.value -= 1
        for codec in list(self.streams.values()):
            stream = codec.stream
            if not stream.responseEnded:
                self.httpStats.downstream_rq_rx_reset.value += 1
                stream.responseFlags.append("DC")
                stream.responseCodeDetails = stream.responseCodeDetails or "downstream_remote_disconnect"
            self._finishStream(codec)
        self.blocked.clear()
        if self.factory is not None:
            self.factory.connectionClosed(self)

    def drain(self) -> None:
        """
        The listener is draining: send GOAWAY(NO_ERROR), answer the streams already open, then close.
        """
        self._goAway()

    # -- the transport's producer: the client's reading paces our writing -------------------------------------

    def pauseProducing(self) -> None:
        """
        The client is not reading: pause every upstream, and stop reading the client (see the module
        docstring).
        """
        if self.writeBlocked:
            return
        self.writeBlocked = True
        for codec in list(self.streams.values()):
            codec._updateProducer()
        if not self.disconnected and not self.readPaused:
            self.readPaused = True
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """
        The client caught up: read again and resume the upstreams that have window.
        """
        if not self.writeBlocked:
            return
        self.writeBlocked = False
        if self.h2 is not None:
            self.h2.controlPending = 0  # the client read what was queued
        if self.readPaused and not self.disconnected:
            self.readPaused = False
            self.transport.resumeProducing()
        for codec in list(self.streams.values()):
            codec._updateProducer()

    def stopProducing(self) -> None:
        """
        The transport is closing; L{connectionLost} cleans up.
        """

    # -- events ----------------------------------------------------------------------------------------------

    def _requestReceived(self, event: RequestReceived) -> None:
        """
        A request head: a new L{Stream} running the listener's filters (or refused, or reset as malformed,
        see below).
        """
        sid = event.stream_id
        inbound = self.inbound
        inbound.streamsOpened += 1
        if self.goingAway and sid > self.lastStreamId:
            # Opened after our GOAWAY: refused, so the client may safely retry it on a new connection.
            if self._resetOpen(sid, ErrorCodes.REFUSED_STREAM):
                self._queuedControl()
            return
        settings = self.settings
        self.requests += 1
        stats = self.httpStats
        stats.downstream_rq_total.value += 1
        stats.downstream_rq_active.value += 1
        self.h2Stats.downstream_rq_http2_total.value += 1
        # What the HTTP/1.1 manager does (Envoy's connection manager, before any filter): pseudo-headers
        # become the request line and authority, x-forwarded-for gets the peer, x-forwarded-proto is ours,
        # an x-request-id is made if missing. The same pass checks the fields (RFC 9113 section 8.2: a
        # malformed request is a stream error, the connection carries on) and joins cookie crumbs with "; "
        # (section 8.2.3), as an HTTP/1.1 upstream needs them. Fields are kept as h2 made them.
        method = path = authority = host = scheme = None
        kept = []
        peerHost = self.peerHost
        xff = requestId = hasLength = regular = False
        length = 0
        xfcc = None  # incoming x-forwarded-client-cert values, when there are any
        crumbs = None  # cookie values, when there are any; joined at cookieAt
        cookieAt = 0
        malformed = None
        size = 0
        for field in event.headers:
            name, value = field
            size += len(name) + len(value) + 32  # RFC 7541's field size, as SETTINGS_MAX_HEADER_LIST_SIZE
            if name[:1] == b":":
                # Pseudo-headers: each known one at most once, all before the first regular field.
                if regular or (value and value.translate(None, _VALUE_BYTES)):
                    malformed = _MALFORMED_MESSAGE
                    break
                if name == b":method" and method is None:
                    method = value
                elif name == b":path" and path is None:
                    path = value
                elif name == b":authority" and authority is None:
                    authority = value
                elif name == b":scheme" and scheme is None:
                    scheme = value
                else:
                    malformed = _MALFORMED_MESSAGE  # repeated, unknown, or a response's (:status)
                    break
                continue
            regular = True
            if _badField(name, value):
                malformed = _MALFORMED_FIELD
                break
            if name == b"host":
                host = value
                continue
            if name == b"cookie":
                if crumbs is None:
                    crumbs = [value]
                    cookieAt = len(kept)
                else:
                    crumbs.append(value)
                    continue
            elif name == b"x-forwarded-for":
                if not xff:
                    if peerHost:
                        field = (name, value + b", " + peerHost)
                    xff = True
            elif name == b"x-forwarded-proto":
                continue
            elif name == b"x-forwarded-client-cert":
                if xfcc is None:
                    xfcc = []
                xfcc.append(value)
                continue
            elif name == b"x-request-id":
                requestId = True
            elif name == b"content-length":
                # 1*DIGIT (RFC 9110 section 8.6), and every copy the same length: else malformed, a stream
                # error (h2, which tracks the body against it, is told nothing; see _LenientStream).
                if not value.isdigit() or (hasLength and int(value) != length):
                    malformed = _MALFORMED_FIELD
                    break
                length = int(value)
                hasLength = True
            kept.append(field)
        if malformed is None:
            if method == b"CONNECT":
                pass  # refused below; its form (no :path, no :scheme) is not checked
            elif method is None or scheme is None or not path or (path[0] != 47 and path != b"*"):
                malformed = _MALFORMED_MESSAGE  # a required pseudo-header missing or empty (section 8.3.1)
            elif authority is None and host is None:
                malformed = _MALFORMED_MESSAGE  # no authority at all: nothing to route on or forward
            elif authority is not None and host is not None and host != authority:
                malformed = _MALFORMED_MESSAGE  # two authorities that disagree (section 8.3.1)
        if crumbs is not None and len(crumbs) > 1:
            kept[cookieAt] = (b"cookie", b"; ".join(crumbs))
        count = len(kept)
        if malformed is None:
            if not xff and peerHost:
                kept.append((b"x-forwarded-for", peerHost))
            kept.append((b"x-forwarded-proto", self.forwardedProto))
            if xfcc is not None or settings.forwardClientCert in XFCC_ADDS:
                kept.extend(forwardedClientCert(self, settings.forwardClientCert, xfcc))
            if not requestId and settings.traceSampleRate is None:
                kept.append((b"x-request-id", newRequestId(settings.random)))
        trace = None
        if settings.traceSampleRate is not None and malformed is None:
            # A missing x-request-id is made by propagate: from the new trace's own draw when no trace came in.
            trace = propagate(kept, settings.random, settings.traceSampleRate, requestId=requestId)
        refusal = None
        if malformed is not None:
            pass
        elif size > (self.limits.maxHeaderListSize or settings.maxHeaderBytes) or count > settings.maxHeaders:
            refusal = (431, "http2.headers_too_large", b"Request Header Fields Too Large\n")
        elif method == b"CONNECT":
            refusal = (405, "connect_not_supported", b"CONNECT is not supported\n")
        now = settings.clock.seconds()
        codec = _StreamCodec(self, sid, now)
        # A request the connection manager refuses itself runs no filter (as an HTTP/1.1 bad head).
        plain = refusal is None and malformed is None
        stream = codec.stream = Stream(codec, settings.makers if plain else (), settings.name, self.peer, now)
        self.streams[sid] = codec
        stream.version = b"2"
        if trace is not None:
            stream.state["trace"] = trace
        stream.method = method or b""
        stream.path = path or b""
        stream.scheme = scheme or b"http"
        # RFC 9113 section 8.3.1: :authority wins; a Host field stands in for it when absent.
        stream.authority = authority if authority is not None else (host or b"")
        stream.requestHeaders = kept
        if event.stream_ended is not None:
            stream.requestEnded = codec.requestEnded = True
        else:
            # Without a length, an HTTP/1.1 upstream needs the body chunked.
            stream.chunked = not hasLength
        if malformed is not None:
            self._malformed(codec, malformed)
        elif refusal is not None:
            status, details, body = refusal
            stream.respond(status, body, details=details)
        else:
            stream.receiveRequestHeaders()
        if settings.maxRequestsPerConnection and self.requests >= settings.maxRequestsPerConnection:
            self._goAway()

    def _malformed(self, codec: _StreamCodec, details: str) -> None:
        """
        The request on C{codec}'s stream is malformed (RFC 9113 section 8.1.1): RST_STREAM(PROTOCOL_ERROR)
        for that stream alone; it completes flagged C{DPE} with C{details}. A client that makes us reset its
        streams is resetting them itself, as far as the rapid-reset defence is concerned.
        """
        stream = codec.stream
        stream.responseFlags.append("DPE")
        stream.responseCodeDetails = stream.responseCodeDetails or details
        self.h2Stats.rx_messaging_error.value += 1
        self.httpStats.downstream_rq_tx_reset.value += 1
        codec.responseSent = True
        codec.pending = None
        if self._resetOpen(codec.sid, _PROTOCOL_ERROR):
            self._queuedControl()
        self._finishStream(codec)
        self.prematureResets += 1
        self._checkPrematureResets()

    def _resetOpen(self, sid: int, code: int) -> bool:
        """
        RST_STREAM(C{code}) for stream C{sid}, unless it is closed on the wire already: the client's own
        RST_STREAM (or END_STREAM after our answer) may have been parsed in the read being dispatched, and
        resetting a closed stream would raise out of it and drop every other stream with the connection.

        @return: whether an RST_STREAM was queued.
        """
        h2s = self.h2.streams.get(sid)
        if h2s is None or h2s.closed:
            return False
        try:
            self.h2.reset_stream(sid, code)
        except StreamClosedError:
            return False
        return True

    def _dataReceived(self, event: DataReceived) -> None:
        """
        Request body: to the stream, then acknowledged (or held, see L{_StreamCodec._received}).
        """
        codec = self.streams.get(event.stream_id)
        length = event.flow_controlled_length
        if codec is None:
            # Answered already (or refused): the bytes go nowhere, but the connection window must reopen.
            if length:
                self.h2.acknowledge_received_data(length, event.stream_id)
            return
        end = event.stream_ended is not None
        if end:
            codec.requestEnded = True
        codec.stream.receiveRequestData(event.data, end)
        if length and not codec.finished:
            codec._received(length)
        elif length:
            self.h2.acknowledge_received_data(length, event.stream_id)

    def _streamEnded(self, event: StreamEnded) -> None:
        """
        The request ended without trailers (unless its last DATA frame already said so).
        """
        codec = self.streams.get(event.stream_id)
        if codec is not None and not codec.requestEnded:
            codec.requestEnded = True
            codec.stream.receiveRequestData(b"", True)

    def _trailersReceived(self, event: TrailersReceived) -> None:
        """
        The request ended with trailers.
        """
        codec = self.streams.get(event.stream_id)
        if codec is not None and not codec.requestEnded:
            codec.requestEnded = True
            self.h2Stats.trailers.value += 1
            for name, value in event.headers:
                if (name[:1] == b":" or _badField(name, value)
                        or (name == b"content-length" and not value.isdigit())):
                    # Trailers carry no pseudo-headers and follow the same rules as any field.
                    self._malformed(codec, _MALFORMED_FIELD)
                    return
            codec.stream.receiveRequestTrailers(event.headers)

    def _streamReset(self, event: StreamReset) -> None:
        """
        The client reset a stream (or h2 did, for a stream-level error): the stream is over, its upstream
        abandoned by the router's C{streamComplete}; then the rapid-reset check.
        """
        if event.remote_reset:
            self.h2Stats.rx_reset.value += 1
        else:
            self.h2Stats.tx_reset.value += 1
        codec = self.streams.get(event.stream_id)
        if codec is None:
            return
        stream = codec.stream
        if event.remote_reset:
            self.httpStats.downstream_rq_rx_reset.value += 1
            stream.responseFlags.append("DR")  # Envoy's downstream remote reset
            stream.responseCodeDetails = stream.responseCodeDetails or "http2.remote_reset"
            if self.settings.clock.seconds() - codec.openedAt < self.limits.prematureResetMinStreamLifetime:
                self.prematureResets += 1
        else:
            # h2 reset it for a stream-level protocol error.
            self.httpStats.downstream_rq_tx_reset.value += 1
            stream.responseFlags.append("DPE")
            stream.responseCodeDetails = stream.responseCodeDetails or "http2.stream_protocol_error"
        codec.responseSent = True  # nothing more may be sent on it
        codec.pending = None
        self._finishStream(codec)
        self._checkPrematureResets()

    def _checkPrematureResets(self) -> None:
        """
        The rapid-reset defence (CVE-2023-44487), Envoy's rule: once the connection has closed the floor's
        number of streams, more than half of them reset prematurely closes it; before the floor, so do
        premature resets that alone are more than half of the floor (the verdict at the floor is decided).
        """
        floor = self.limits.prematureResetTotalStreamCount
        closed = self.closedStreams
        premature = self.prematureResets * 2
        if self.terminated or (premature <= closed if closed >= floor else premature <= floor):
            return
        self.h2Stats.downstream_rq_too_many_premature_resets.value += 1
        self.log.info("HTTP/2 connection from {peer} reset {n} of its {total} streams prematurely: closing",
                      peer=self.peer, n=self.prematureResets, total=closed)
        self._terminate(ErrorCodes.ENHANCE_YOUR_CALM)

    def _queuedControl(self) -> None:
        """
        We queued a control frame of our own (an RST_STREAM for a malformed or refused stream): it counts
        toward the outbound control frame limit as h2's answers do.
        """
        h2c = self.h2
        self.h2Stats.tx_reset.value += 1
        h2c.controlPending += 1
        if h2c.controlPending > h2c.controlLimit and not self.terminated:
            self.h2Stats.outbound_control_flood.value += 1
            self.log.info("HTTP/2 connection from {peer} closed: too many control frames queued", peer=self.peer)
            self._terminate(ErrorCodes.ENHANCE_YOUR_CALM)

    def _windowUpdated(self, event: Optional[WindowUpdated]) -> None:
        """
        A window opened (C{None}: every stream's, by a new SETTINGS_INITIAL_WINDOW_SIZE): send what waits.
        """
        blocked = self.blocked
        if not blocked:
            return
        h2common.serveBlocked(self.h2, blocked, event.stream_id if event is not None else 0, self._drain)

    def _drain(self, codec: _StreamCodec) -> None:
        """
        Send what C{codec} has queued and now fits.
        """
        try:
            codec._drain()
        except StreamClosedError:
            # The client reset it later in the read being dispatched: its StreamReset event ends it.
            codec.pending = None
            self.blocked.pop(codec.sid, None)

    def _connectionTerminated(self, event: ConnectionTerminated) -> None:
        """
        The client sent GOAWAY.
        """
        if event.error_code != _NO_ERROR or not self.streams:
            self.terminated = True
            self._close()
            return
        # A graceful GOAWAY from the client: it opens no more streams but still wants the answers to the
        # ones it has, so we finish them, then close.
        h2common.reopenAfterGoAway(self.h2)
        self.goingAway = True
        self.lastStreamId = self.h2.highest_inbound_stream_id

    # -- completion, GOAWAY, flushing ----------------------------------------------------------------------------

    def _finishStream(self, codec: _StreamCodec) -> None:
        """
        The stream is over, whichever way: count it out, complete it (every filter's C{streamComplete}),
        log it; and close the connection if it was the last one a GOAWAY waited for.
        """
        if codec.finished:
            return
        codec.finished = True
        sid = codec.sid
        self.streams.pop(sid, None)
        self.blocked.pop(sid, None)
        self.closedStreams += 1
        if codec.heldAck and not self.terminated:
            # Bytes the stream held: the stream is gone, but the connection window must reopen.
            codec._releaseAck()
        codec.unregisterResponseProducer()
        stream = codec.stream
        stats = self.httpStats
        stats.downstream_rq_active.value -= 1
        status = stream.status
        if 100 <= status < 600:
            stats.byClass[status // 100].value += 1
        stream.complete()
        settings = self.settings
        if settings.accessLog is not None or settings.spans is not None:
            now = settings.clock.seconds()
            if settings.accessLog is not None:
                settings.accessLog.log(stream, now)
            if settings.spans is not None:
                trace = stream.state.get("trace")
                if trace is not None and trace.sampled:
                    settings.spans.record(stream, trace, now)
        # The stream points at its codec (a router may still call it); the codec lets go of the stream, so
        # no cycle is left for the garbage collector.
        codec.stream = None
        if self.goingAway and not self.streams and not self.terminated:
            self.terminated = True
            self._close()

    def _written(self) -> None:
        """
        Flush what h2 has queued, unless a read is being dispatched (it flushes once at its end).
        """
        if self.dispatching or self.disconnected:
            return
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    def _close(self) -> None:
        """
        Flush everything h2 has queued (even mid-dispatch: nothing may follow it) and close, gracefully or
        not: the close waits for the client to read what is buffered, but only while it keeps reading
        (Envoy's delayed close, L{_closeTimedOut}).
        """
        if self.disconnected:
            return
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)
        self.transport.loseConnection()
        if not self.disconnected and self.closeTimer is None:
            self.closePending = _pendingBytes(self.transport)
            self.closeTimer = self.settings.clock.callLater(self.limits.delayedCloseTimeout, self._closeTimedOut)

    def _goAway(self) -> None:
        """
        A graceful GOAWAY(NO_ERROR): streams up to the highest one seen are answered, later ones refused;
        the connection closes when the last one is done.
        """
        if self.goingAway or self.terminated:
            return
        self.goingAway = True
        self.lastStreamId = self.h2.highest_inbound_stream_id
        if self.disconnected:
            return
        # h2's close_connection() would forbid sending anything more, even on the streams we still answer,
        # so the frame is written directly, after whatever h2 has queued.
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)
        self.transport.write(GoAwayFrame(0, last_stream_id=self.lastStreamId, error_code=_NO_ERROR).serialize())
        self.h2Stats.goaway_sent.value += 1
        if not self.streams:
            self.terminated = True
            self._close()

    def _terminate(self, code: Optional[int]) -> None:
        """
        A fatal end: GOAWAY with C{code} (or the one h2 already queued when C{None}), then close. The streams
        in flight are completed when the connection is lost.
        """
        if self.terminated:
            return
        self.terminated = True
        if code is not None:
            self.h2.close_connection(code)
        self.h2Stats.goaway_sent.value += 1
        # The GOAWAY is flushed first; a client that does not read it is not left holding the connection
        # open (see _close).
        self._close()

    def _closeTimedOut(self) -> None:
        """
        The connection is closing and its client has had C{delayedCloseTimeout} to read what is left: if it
        read some since the last look, it gets another period (a large last answer to a slow but steady
        reader is not cut); otherwise it stopped reading, and the connection is dropped.
        """
        self.closeTimer = None
        if self.disconnected:
            return
        pending = _pendingBytes(self.transport)
        if pending is not None and self.closePending is not None and pending < self.closePending:
            self.closePending = pending
            self.closeTimer = self.settings.clock.callLater(self.limits.delayedCloseTimeout, self._closeTimedOut)
            return
        self.transport.abortConnection()

    def _idle(self) -> None:
        """
        The idle timeout: close the connection if no stream is open, else look again later.
        """
        self.idleTimer = None
        if self.streams or self.terminated:
            if not self.terminated:
                self.idleTimer = self.settings.clock.callLater(self.settings.idleTimeout, self._idle)
            return
        self.httpStats.downstream_cx_idle_timeout.value += 1
        self._terminate(_NO_ERROR)
