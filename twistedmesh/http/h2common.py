"""
What the two HTTP/2 codecs have in common: the downstream connection manager (L{twistedmesh.http.h2server})
and the upstream client (L{twistedmesh.upstream.http2}) are both thin protocols around h2's sans-IO engine,
and translate, configure and flow-control it the same way. The rules live here once, so the two sides
cannot drift apart; what only one side does (request validation and flood limits downstream, stream slots
and keep-alive upstream) stays with it.

Every function takes the h2 engine (and the stream id) it works on and keeps no state of its own.
"""

from __future__ import annotations

import logging
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import h2.stream
import hpack.hpack
import hpack.table
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.exceptions import FrameTooLargeError
from h2.frame_buffer import FrameBuffer as _FrameBuffer
from h2.settings import Settings
from hyperframe.frame import WindowUpdateFrame

#: Connection-specific fields (RFC 9113 section 8.2.2): never sent in HTTP/2. C{te} is allowed only as
#: C{te: trailers} (see L{withoutConnectionFields}); C{host} is carried by C{:authority} in a request and has
#: no place in a response.
CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                 b"upgrade", b"te", b"host"))

# Connection-specific fields (RFC 9113 section 8.2.2) make a message malformed, but for "te" (checked on its
# own) and "host" (a request's stand-in for :authority, a plain field in a response).
_CONNECTION_SPECIFIC_RECEIVED = CONNECTION_SPECIFIC - {b"te", b"host"}

# Field checks (RFC 9113 section 8.2), each one C-level bytes.translate: deleting every allowed byte leaves
# nothing when the whole name or value is allowed. A name is a lowercase token (RFC 9110 section 5.6.2;
# uppercase is malformed in HTTP/2); a value may hold anything but NUL, CR and LF, and may not start or end
# with whitespace.
_NAME_BYTES = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
#: The bytes a field value (or a pseudo-header's) may hold: all but NUL, CR and LF.
FIELD_VALUE_BYTES = bytes(b for b in range(256) if b not in (0, 10, 13))
_OWS = (32, 9)


def finalStatus(value: bytes) -> int:
    """
    The final status an HTTP/2 C{:status} field carries, or 0 when it is not exactly three ASCII digits from
    200 to 599 (h2 does not check the value; 1xx heads it hands over apart, as informational responses).
    """
    if len(value) == 3 and value.isdigit() and 50 <= value[0] <= 53:
        return int(value)
    return 0


def badField(name: bytes, value: bytes) -> bool:
    """
    Whether a regular (not pseudo) field received in HTTP/2 makes its message malformed: an invalid or
    uppercase name, a connection-specific field, C{te} other than C{trailers}, or an invalid value. Both
    codecs check what they receive with it (h2's own inbound checks are off: they would make each of these
    a connection error, where RFC 9113 section 8.1.1 wants a stream error).
    """
    if not name or name.translate(None, _NAME_BYTES) or name in _CONNECTION_SPECIFIC_RECEIVED:
        return True
    if name == b"te" and value.lower() != b"trailers":
        return True
    return bool(value) and (value.translate(None, FIELD_VALUE_BYTES) != b"" or value[0] in _OWS
                            or value[-1] in _OWS)


# The size of every new connection's flow-control window, whatever SETTINGS say (RFC 9113 section 6.9.2).
_DEFAULT_CONNECTION_WINDOW = 65535


class FrameBuffer(_FrameBuffer):
    """
    h2's inbound frame buffer, refusing an oversized frame as soon as its 9-byte header is in. h2 checks a
    frame's length against SETTINGS_MAX_FRAME_SIZE only once the whole frame is buffered, so a peer could
    make us hold up to 16 MiB (the largest length a frame header can announce) per connection first.
    """

    def __next__(self):
        try:
            return _FrameBuffer.__next__(self)
        except StopIteration:
            # Only when a frame is incomplete (not on the hot path): is the one waiting too large?
            data = self._data
            if len(data) >= 9 and (data[0] << 16 | data[1] << 8 | data[2]) > self.max_frame_size:
                raise FrameTooLargeError("frame of %d bytes announced, max %d"
                                         % (data[0] << 16 | data[1] << 8 | data[2], self.max_frame_size))
            raise


def _silent(*args, **kwargs) -> None:
    """
    A log call that does nothing (see L{_QuietLog}).
    """


class _QuietLog:
    """
    A logger whose C{debug} (and h2's C{trace}) does nothing at the cost of one plain call, the rest passed
    to C{logger} (or ignored without one).

    hpack logs at DEBUG for every integer and every field it encodes or decodes, about a hundred calls per
    proxied HTTP/2 request; each is a C{logging.Logger.debug} call and its level check even when nothing is
    logged, about a tenth of a request's CPU. h2's own default logger is a no-op already, but a method
    bound on every call. Neither says anything an operator of this proxy needs: our own logging is
    C{twisted.logger}.
    """

    def __init__(self, logger: Optional[logging.Logger] = None) -> None:
        self._logger = logger
        # Instance attributes, not methods: no binding on each call.
        self.debug = self.trace = _silent

    def __getattr__(self, name: str):
        if self._logger is None:
            return _silent
        return getattr(self._logger, name)


def _quietHPACK() -> None:
    """
    Replace hpack's module loggers with L{_QuietLog}s, once, at import: only when their DEBUG level is not
    enabled (whoever turned it on before importing us, to debug hpack, keeps it); every other level still
    goes to the real logger.
    """
    for module in (hpack.hpack, hpack.table):
        log = getattr(module, "log", None)
        if isinstance(log, logging.Logger) and not log.isEnabledFor(logging.DEBUG):
            module.log = _QuietLog(log)


_quietHPACK()
_ENGINE_LOG = _QuietLog()


def _bytesHeaders(headers, _encode=h2.stream.utf8_encode_headers):
    """
    h2's C{utf8_encode_headers} (which it calls on every header block it sends, to turn text fields into
    bytes), without the copy when there is nothing to encode: a list of tuples of bytes, as both our codecs
    always send (plain tuples, or the C{HeaderTuple}s hpack decoded, whose class says whether a field may
    be indexed), is returned as it is, which is what h2's function would rebuild. Anything else (text, a
    generator) goes to h2's own function, so other users of h2 in the process see no change.
    """
    if headers.__class__ is list:
        for field in headers:
            if not isinstance(field, tuple) or field[0].__class__ is not bytes or field[1].__class__ is not bytes:
                break
        else:
            return headers
    return _encode(headers)


# h2's stream module looks the function up by this name on each send; see _bytesHeaders.
h2.stream.utf8_encode_headers = _bytesHeaders


def withoutConnectionFields(headers: List[Tuple[bytes, bytes]]) -> List[Tuple[bytes, bytes]]:
    """
    C{headers} ready to go out in HTTP/2: without pseudo-headers and without the connection-specific
    fields HTTP/2 forbids, except C{te}, kept as C{te: trailers} when its list names C{trailers} (an
    HTTP/1.1 client's C{TE: trailers, deflate} is what a gRPC upstream must see as C{te: trailers}).

    @return: C{headers} itself in the common case, nothing to drop (no copy); otherwise a new list.
    """
    for name, _ in headers:
        if name in CONNECTION_SPECIFIC or name[:1] == b":":
            break
    else:
        return headers
    kept = []
    for field in headers:
        name = field[0]
        if name == b"te":
            if b"trailers" in field[1].lower():
                kept.append((b"te", b"trailers"))
        elif name not in CONNECTION_SPECIFIC and name[:1] != b":":
            kept.append(field)
    return kept


def engineConfiguration(clientSide: bool, checkInbound: bool) -> H2Configuration:
    """
    The configuration of an h2 engine: fields as bytes, and no outbound checking. Outbound checks cost
    about a tenth of a request's CPU and add nothing here: names are lowercase by the L{Stream}'s contract,
    values were checked when they came in (by an HTTP/1.1 parser or by the other HTTP/2 side), and
    L{withoutConnectionFields} drops what HTTP/2 forbids.

    @param clientSide: an upstream (client) connection rather than a downstream (server) one.
    @param checkInbound: whether h2 validates and normalizes the fields it receives. The downstream checks
        them itself, because h2 would make a malformed request a connection error where RFC 9113 section
        8.1.1 wants a stream error.
    """
    return H2Configuration(client_side=clientSide, header_encoding=None,
                           validate_inbound_headers=checkInbound, normalize_inbound_headers=checkInbound,
                           validate_outbound_headers=False, normalize_outbound_headers=False,
                           logger=_ENGINE_LOG)


def startConnection(h2c: H2Connection, settings: Dict[int, int], connectionWindow: int) -> None:
    """
    Queue the connection preface of C{h2c} with our C{settings} (L{h2.settings.SettingCodes} to values),
    then widen the connection window to C{connectionWindow}.

    The settings replace h2's initial values rather than following as an update: the peer may use them
    from its first frame on, before it acknowledges them. The connection window starts at 64 KiB whatever
    SETTINGS say; only a WINDOW_UPDATE widens it.
    """
    h2c.local_settings = Settings(client=h2c.config.client_side, initial_values=settings)
    h2c.initiate_connection()
    extra = connectionWindow - _DEFAULT_CONNECTION_WINDOW
    if extra > 0:
        h2c.increment_flow_control_window(extra)


def acknowledgeConnection(h2c: H2Connection, size: int) -> None:
    """
    Hand C{size} received flow-controlled bytes back to the peer's connection window only (a WINDOW_UPDATE
    on stream 0 once enough has gathered, as h2 batches them). With L{acknowledgeStream}, this splits
    h2's C{acknowledge_received_data} in two, so that a stream whose reader is slow holds back its own
    window and not the window every stream of the connection shares.
    """
    increment = h2c._inbound_flow_control_window_manager.process_bytes(size)
    if increment:
        frame = WindowUpdateFrame(0)
        frame.window_increment = increment
        h2c._prepare_for_sending([frame])


def acknowledgeStream(h2c: H2Connection, sid: int, size: int) -> None:
    """
    Hand C{size} received flow-controlled bytes back to stream C{sid}'s window only (see
    L{acknowledgeConnection}). Nothing is sent for a stream that is closed or gone.
    """
    stream = h2c.streams.get(sid)
    if stream is not None and stream.open:
        frames = stream.acknowledge_received_data(size)
        if frames:
            h2c._prepare_for_sending(frames)


def reopenAfterGoAway(h2c: H2Connection) -> None:
    """
    Let C{h2c} go on sending after the peer's GOAWAY. h2 refuses to send anything once it received one,
    which would strand the streams the GOAWAY still covers (their answers, request bodies and window
    updates): so its connection state goes back to open. The streams' own states are left alone, and the
    caller opens no new stream.
    """
    h2c.state_machine.state = ConnectionState.CLIENT_OPEN if h2c.config.client_side else ConnectionState.SERVER_OPEN


def sendInFrames(h2c: H2Connection, sid: int, data: bytes, window: int, maxFrame: int,
                 end: bool) -> Tuple[Optional[memoryview], int]:
    """
    Send C{data} on stream C{sid} in as many DATA frames as C{window} (what the stream and connection
    windows allow) and C{maxFrame} (the peer's frame size) permit, with END_STREAM on the last byte if
    C{end}. The caller sends data that fits in one frame itself (the common case, without a view); this is
    the rest.

    @return: what did not fit (a view of C{data}, to be queued until a window opens; C{None} when all of
        it went) and the number of DATA frames sent.
    """
    size = len(data)
    view = memoryview(data)
    offset = frames = 0
    while offset < size and window > 0:
        n = min(size - offset, window, maxFrame)
        h2c.send_data(sid, view[offset:offset + n], end_stream=end and offset + n == size)
        frames += 1
        offset += n
        window -= n
    return (view[offset:] if offset < size else None), frames


def drainInFrames(h2c: H2Connection, sid: int, pending: Deque[memoryview], endAtLast: bool) -> int:
    """
    A window opened: send the chunks C{pending} holds for stream C{sid} as far as the windows and the
    peer's frame size allow, with END_STREAM on the last one if C{endAtLast}. What does not fit stays in
    C{pending} (a chunk cut in two leaves its tail at the front).

    @return: the number of DATA frames sent.
    """
    window = h2c.local_flow_control_window(sid)
    maxFrame = h2c.max_outbound_frame_size
    frames = 0
    while pending and window > 0:
        chunk = pending[0]
        n = len(chunk)
        if n > window or n > maxFrame:
            n = min(window, maxFrame)
            pending[0] = chunk[n:]
            chunk = chunk[:n]
        else:
            pending.popleft()
        h2c.send_data(sid, chunk, end_stream=endAtLast and not pending)
        frames += 1
        window -= n
    return frames


def endStream(h2c: H2Connection, sid: int, trailers: Optional[Sequence[Tuple[bytes, bytes]]]) -> int:
    """
    End stream C{sid}: with C{trailers} as a HEADERS frame, or, when there are none (or a filter removed
    them all), with an empty DATA frame.

    @return: the number of DATA frames sent (0 or 1).
    """
    if trailers:
        h2c.send_headers(sid, trailers, end_stream=True)
        return 0
    h2c.send_data(sid, b"", end_stream=True)
    return 1


def serveBlocked(h2c: H2Connection, blocked: Dict[int, object], sid: int, drain: Callable[[object], None]) -> None:
    """
    A window opened: C{drain} the streams in C{blocked} (by stream id, in the order they blocked; each has
    C{sid} and C{pending}) that may now send. C{sid} names the stream whose window opened, or is 0 for the
    connection window (or every stream's, after a larger SETTINGS_INITIAL_WINDOW_SIZE): then the streams
    that blocked first go first, and one that still waits goes to the back, so none starves the others.
    """
    if sid:
        s = blocked.get(sid)
        if s is not None:
            drain(s)
        return
    for s in list(blocked.values()):
        if h2c.outbound_flow_control_window <= 0:
            break
        drain(s)
        if s.pending:
            del blocked[s.sid]
            blocked[s.sid] = s
