"""
What the two HTTP/2 codecs have in common: the downstream connection manager (L{twistedmesh.http.h2server})
and the upstream client (L{twistedmesh.upstream.http2}) are both thin protocols around h2's sans-IO engine,
and translate, configure and flow-control it the same way. The rules live here once, so the two sides
cannot drift apart; what only one side does (request validation and flood limits downstream, stream slots
and keep-alive upstream) stays with it.

Every function takes the h2 engine (and the stream id) it works on and keeps no state of its own.
"""

from __future__ import annotations

from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.settings import Settings

#: Connection-specific fields (RFC 9113 section 8.2.2): never sent in HTTP/2. C{te} is allowed only as
#: C{te: trailers} (see L{withoutConnectionFields}); C{host} is carried by C{:authority} in a request and has
#: no place in a response.
CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                 b"upgrade", b"te", b"host"))

# The size of every new connection's flow-control window, whatever SETTINGS say (RFC 9113 section 6.9.2).
_DEFAULT_CONNECTION_WINDOW = 65535


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
                           validate_outbound_headers=False, normalize_outbound_headers=False)


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
