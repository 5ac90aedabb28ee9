"""
Active health checking (Envoy's): every host of a cluster is probed on a timer, and its C{healthy} flag
follows the results, so that the load balancer stops picking a host that fails and picks it again once it
recovers. See docs/health-checking.md.

One L{HealthChecker} per cluster holds one L{HostHealthChecker} per host. Checks connect with the host's
own client endpoint (C{host.client.connect}), so a TLS host is checked over TLS with the cluster's
certificates (and, for an HTTP/2 cluster, its ALPN C{h2}), and a check never takes or leaves a connection
in the request pool: a check stuck behind a slow request would time out for the wrong reason.

  - B{HTTP} checks send C{GET <path>} with the host (C{host}, or C{:authority} in HTTP/2) and
    C{user-agent: twistedmesh-health-check}, and pass when the response's status is one of
    C{expected_statuses}. They speak the cluster's protocol (C{health.codec} may override it): HTTP/1.1,
    or HTTP/2 (h2c with prior knowledge on plaintext, h2 negotiated by ALPN over TLS). The status is
    taken from the response head, but the verdict is given when the response ends (the body is read and
    dropped): a host that answers C{200} and then stalls, resets or closes mid-body fails, as it would
    fail real requests. Only C{x-envoy-immediate-health-check-fail} fails the check from the head alone
    (the rest of the response is then read and dropped in HTTP/1.1, the stream reset in HTTP/2). A
    malformed HTTP/2 C{:status} (anything but three ASCII digits from 200 to 599) is a protocol error.
  - B{TCP} checks connect (and, for a TLS host, complete the handshake), write C{send} if configured, and
    pass when C{receive} appears in what the host sends (or at once when no C{receive} is configured). A
    TCP check always uses a new connection.

Connection reuse (Envoy's C{reuse_connection}, on by default): an HTTP check's connection stays open after
a verdict the host answered (whatever the status), and the next check of the host sends its request on it
(HTTP/1.1 keep-alive: the previous response must have ended and allowed keep-alive; HTTP/2: a new stream,
ids 1, 3, 5, ..., unless the host sent GOAWAY). A network failure (timeout, reset, protocol error) closes
it, and the next check connects again. An HTTP/2 connection is not reused once the host's
C{SETTINGS_MAX_CONCURRENT_STREAMS} leaves no room for the check's stream (a fresh connection then tries,
and the host refuses the stream, which fails the check clearly). The control frames h2 queues in answer
to the host's (PING and SETTINGS acknowledgements, RST_STREAMs) are capped as the downstream server caps
them: past 1000 not yet taken by a writing transport, the host is flooding a connection it does not read,
and the connection is aborted (C{health_check.outbound_control_flood}).

A host may close an idle connection at any time (its keep-alive timeout), so a check whose request went
out on a reused connection that the host closed, or refused by GOAWAY, before any of the response arrived
is not the host's failure: it is sent again once on a new connection, within the same timeout. With
C{reuse_connection = false} each check has its own connection: HTTP/1.1 sends C{connection: close}, HTTP/2
closes with GOAWAY after the verdict.

A check that takes longer than C{timeout} (connecting included) fails: the connection attempt is
cancelled, or the connection aborted. Everything is timed on the injected clock and every random draw
comes from the injected L{random.Random}, so tests are exact.

Health (Envoy's rules): when the checker starts every host is unhealthy, flagged C{failed_active_hc} and
C{pending_active_hc}, until its first check; the first check that passes makes it healthy at once. After
that, C{unhealthy_threshold} consecutive failures make a healthy host unhealthy and C{healthy_threshold}
consecutive passes make an unhealthy host healthy. A response carrying
C{x-envoy-immediate-health-check-fail} (another proxy's C{health_check} filter, failed by its admin) makes
the host unhealthy at once.

The checker owns the host's C{failed_active_hc} and C{pending_active_hc} flags and sets them through
L{Host.setHealthFlag}, so that it never undoes another owner's verdict (outlier detection's
C{failed_outlier_check}): a host is healthy only when no flag is left. When C{host.healthy} changes the
checker calls C{cluster.healthChanged()}, which rebuilds the load balancer. C{host.healthReason} is set on
every change of the checker's flags and, while no other owner's flag is set, after every check too, so
that C{/clusters} shows how close a host is to changing.
"""

from __future__ import annotations

from random import Random
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, DataReceived, ResponseReceived, StreamEnded, StreamReset
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes, Settings
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IHandshakeListener, INegotiated, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config.health import HealthConfig
from ..http import h1
from ..http.h2common import finalStatus

if TYPE_CHECKING:
    from .cluster import Cluster, Host

__all__ = [
    "HealthChecker", "HostHealthChecker", "FAILED_ACTIVE_HC", "PENDING_ACTIVE_HC", "USER_AGENT",
    "IMMEDIATE_FAIL_HEADER", "finalStatus",
]

#: The health flag (Envoy's name, as C{/clusters} shows it) of a host that active health checking failed.
FAILED_ACTIVE_HC = "failed_active_hc"
#: The health flag of a host not yet checked since the checker started.
PENDING_ACTIVE_HC = "pending_active_hc"
#: The C{user-agent} of HTTP checks, so that hosts can tell checks from traffic (in their logs, say).
USER_AGENT = b"twistedmesh-health-check"
#: A response header that fails the host at once, whatever the thresholds (set by Envoy's, and our,
#: C{health_check} filter when that proxy is failed or draining).
IMMEDIATE_FAIL_HEADER = b"x-envoy-immediate-health-check-fail"
_PENDING_REASON = "pending first health check"
_PASSED_REASON = "healthy: last check passed"
_FAILED_PREFIX = "failed active health check: "
_OWN_FLAGS = frozenset((FAILED_ACTIVE_HC, PENDING_ACTIVE_HC))
# Envoy's max_outbound_control_frames default: control frames h2 may queue in answer to the host's frames
# while the transport is not writing (see _CheckEngine).
_CONTROL_LIMIT = 1000
# The last client stream id HTTP/2 allows (2**31 - 1): a reused connection that got there is replaced.
_LAST_STREAM_ID = 0x7FFFFFFF
_NO_ERROR = ErrorCodes.NO_ERROR


class _ControlFlood(Exception):
    """
    The host made h2 queue more control frames than L{_CONTROL_LIMIT} while the transport was not writing.
    """


class _CheckEngine(H2Connection):
    """
    h2's connection, counting the control frames it queues in answer to the host's frames (PING and
    SETTINGS acknowledgements, RST_STREAMs for frames on reset streams): C{controlPending} of them not yet
    handed to a transport that is writing. Past L{_CONTROL_LIMIT} the host floods a connection whose
    answers it does not read, and L{_ControlFlood} ends the read.
    """

    controlPending = 0

    def _receive_frame(self, frame):
        before = len(self._data_to_send)
        events = H2Connection._receive_frame(self, frame)
        if len(self._data_to_send) != before:
            self.controlPending += 1
            if self.controlPending > _CONTROL_LIMIT:
                raise _ControlFlood()
        return events


class _Attempt:
    """
    One check of one host in flight: the connection attempt (or connection) and the timeout timer.
    Exactly one of L{succeed}, L{fail} or L{cancel} ends it; later calls (a close after the verdict, the
    errback of a cancelled connection attempt) are ignored.

    @ivar done: the verdict is in (or the attempt was cancelled).
    @ivar connecting: the endpoint's connection Deferred, once C{connect} returned.
    @ivar conn: the check protocol carrying the check, once connected (or when a reused one took it).
    @ivar timer: the timeout's delayed call, while pending.
    """

    __slots__ = ("report", "done", "connecting", "conn", "timer")

    def __init__(self, report: Callable[[bool, str, bool, bool], None]) -> None:
        self.report = report
        self.done = False
        self.connecting: Optional[defer.Deferred] = None
        self.conn: Optional["_CheckProtocol"] = None
        self.timer = None

    def succeed(self) -> None:
        """
        The check passed: release the connection (kept for the next check, or closed) and report.
        """
        if self._end(network=False):
            self.report(True, "", False, False)

    def fail(self, reason: str, network: bool = False, immediate: bool = False) -> None:
        """
        The check failed for C{reason}: release the connection (or cancel the attempt) and report.
        C{network} says the host gave no usable answer (refused, reset, timed out, not HTTP): then the
        connection is aborted, since nothing on it is worth waiting for; a host that answered (a 503) keeps
        its connection for the next check, or gets a clean close. C{immediate} says the host asked to be
        failed at once.
        """
        if self._end(network=network):
            self.report(False, reason, network, immediate)

    def cancel(self) -> None:
        """
        Abandon the check without a verdict (the checker stopped).
        """
        self._end(network=True)

    def timedOut(self) -> None:
        """
        The timeout fired before a verdict.
        """
        self.timer = None
        conn = self.conn
        if conn is not None and conn.status:
            self.fail(f"timeout before the response ended (status {conn.status})", network=True)
        else:
            self.fail("timeout", network=True)

    def _end(self, network: bool) -> bool:
        """
        Tear down or release what is open, once; C{False} if the attempt had already ended.
        """
        if self.done:
            return False
        self.done = True
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        conn = self.conn
        if conn is not None:
            conn.checkEnded(network)
        elif self.connecting is not None and not self.connecting.called:
            # Not connected yet: cancelling the endpoint's Deferred stops the attempt (its errback then
            # finds the attempt done and says nothing).
            self.connecting.cancel()
        return True


class _CheckProtocol(protocol.Protocol):
    """
    What the checks' protocols share: the attempt they report to, the host's checker, the TLS handshake.

    @ivar owner: the L{HostHealthChecker} whose check made this connection.
    @ivar attempt: the check this connection carries now, or carried last.
    @ivar handshaken: the TLS handshake is done (TLS hosts only).
    @ivar lost: the connection closed.
    @ivar status: the status of the current check's response head, while its end is awaited (HTTP checks
        give their verdict when the response ends); 0 before the head.
    """

    status = 0

    def __init__(self, owner: "HostHealthChecker", attempt: _Attempt) -> None:
        self.owner = owner
        self.attempt: Optional[_Attempt] = attempt
        self.handshaken = False
        self.lost = False

    def inFlight(self) -> Optional[_Attempt]:
        """
        The attempt waiting for its verdict on this connection, or C{None}.
        """
        attempt = self.attempt
        return attempt if attempt is not None and not attempt.done else None

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake is done (only for a TLS host): a close from now on is no handshake failure.
        """
        self.handshaken = True

    def checkEnded(self, network: bool) -> None:
        """
        The attempt on this connection has its verdict: abort after a network failure, else close.
        """
        if network:
            self.transport.abortConnection()
        else:
            self.close()

    def close(self) -> None:
        """
        Close the connection cleanly (what was written still goes out).
        """
        self.transport.loseConnection()

    def closedBeforeVerdict(self, attempt: _Attempt, what: str) -> None:
        """
        The connection closed with C{attempt} in flight: the TLS handshake failed, or the host hung up
        before C{what} (before the response ended, once its head came).
        """
        if INegotiated.providedBy(self.transport) and not self.handshaken:
            attempt.fail("TLS handshake failed", network=True)
        elif self.status:
            attempt.fail(f"connection closed before the response ended (status {self.status})", network=True)
        else:
            attempt.fail("connection closed before " + what, network=True)

    def wrongALPN(self, want: bytes) -> bool:
        """
        Whether the TLS handshake just done negotiated, by ALPN, another protocol than C{want}; if so the
        check in flight fails (a host that negotiated nothing is assumed to speak C{want}, as Envoy does).
        """
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        attempt = self.inFlight()
        if negotiated is None or negotiated == want or attempt is None:
            return False
        attempt.fail("protocol error: ALPN negotiated %s, not %s" % (
            negotiated.decode("ascii", "replace"), want.decode("ascii")), network=True)
        return True


@implementer(IHandshakeListener)
class _HTTPCheck(_CheckProtocol):
    """
    HTTP/1.1 checks on one connection: writes the request once connected (and again for each check that
    reuses the connection) and parses the response (an L{h1.ResponseHandler}): the status from its head,
    the verdict at its end (the body is dropped), so that a host that stalls or hangs up mid-body fails.

    @ivar checks: checks sent on this connection (more than one: it was reused).
    @ivar received: bytes arrived since the current check's request was sent.
    @ivar keepAlive: the last response head allows another request on this connection.
    @ivar idle: the last response ended: a new request may go out.
    @ivar head: the first bytes the host sent on this connection (up to four), to name a protocol error.
    """

    def __init__(self, owner: "HostHealthChecker", attempt: _Attempt) -> None:
        super().__init__(owner, attempt)
        self.parser: Optional[h1.ResponseParser] = None
        self.checks = 0
        self.received = False
        self.keepAlive = False
        self.idle = False
        self.head = b""

    def connectionMade(self) -> None:
        """
        Send the first check's request.
        """
        self.parser = h1.ResponseParser(self)
        self.startCheck(self.attempt)

    def startCheck(self, attempt: _Attempt) -> bool:
        """
        Send C{attempt}'s request (the parser then expects the response to a C{GET}); C{True}: it went out.
        """
        self.attempt = attempt
        attempt.conn = self
        self.checks += 1
        self.received = self.idle = self.keepAlive = False
        self.status = 0
        self.parser.expectResponse(b"GET")
        self.transport.write(self.owner.parent.request)
        return True

    def reusable(self) -> bool:
        """
        Whether the next check may send its request on this connection.
        """
        return self.idle and self.keepAlive and not self.lost

    def checkEnded(self, network: bool) -> None:
        """
        After an answer that allows keep-alive, hand the connection to the host's checker for the next
        check (when reuse is on); otherwise close it.
        """
        if not network and self.keepAlive:
            self.owner.keep(self)
        else:
            super().checkEnded(network)

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake is done: a host that picked HTTP/2 by ALPN cannot answer an HTTP/1.1 request.
        """
        self.handshaken = True
        self.wrongALPN(b"http/1.1")

    def dataReceived(self, data: bytes) -> None:
        """
        Parse the response (after the verdict too, to find its end).
        """
        self.received = True
        if len(self.head) < 4:
            self.head += data[:4 - len(self.head)]
        self.parser.feed(data)

    def responseInformational(self, status: int, headers: h1.Headers) -> None:
        """
        A 1xx before the final response: wait on.
        """

    def responseHead(self, status: int, reason: bytes, version: bytes, headers: h1.Headers, keepAlive: bool,
                     hasBody: bool, chunked: bool) -> None:
        """
        The immediate-fail header fails the check at once; otherwise the status waits for the response's
        end (L{responseEnd}).
        """
        attempt = self.inFlight()
        if attempt is None:
            return
        self.keepAlive = keepAlive and self.owner.parent.config.reuse_connection
        if any(name == IMMEDIATE_FAIL_HEADER for name, _ in headers):
            attempt.fail(f"immediate health check fail (status {status})", immediate=True)
        else:
            self.status = status

    def responseData(self, data: bytes) -> None:
        """
        The body is not looked at.
        """

    def responseEnd(self, trailers: Optional[h1.Headers]) -> None:
        """
        The response is over: the verdict, from the status of its head; the connection may carry the next
        check.
        """
        self.idle = True
        attempt = self.inFlight()
        status, self.status = self.status, 0
        if attempt is not None and status:
            _statusVerdict(self.owner.parent.config, attempt, status)

    def protocolError(self, reason: str) -> None:
        """
        The host did not speak HTTP/1.1 (before the verdict), or spoiled a kept connection (after it).
        """
        attempt = self.inFlight()
        if attempt is not None:
            if self.lost:
                # feedEOF (connectionLost) found the response unfinished.
                self.closedBeforeVerdict(attempt, "a response")
                return
            if self.head[3:4] == b"\x04" and not self.head.startswith(b"HTTP"):
                # A SETTINGS frame first: an h2c-only host answered with its server preface.
                reason = "the host answered in HTTP/2, not HTTP/1.1"
            attempt.fail(f"protocol error: {reason}", network=True)
        else:
            self.keepAlive = False
            self.owner.forget(self)
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """
        Before the verdict the host hung up on the check (or the TLS handshake failed); a reused connection
        closed before any of the response came is retried on a new one. After the verdict this is our own
        close, or the host closing a kept connection.
        """
        self.lost = True
        self.owner.forget(self)
        attempt = self.inFlight()
        if attempt is None:
            return
        if self.checks > 1 and not self.received:
            self.attempt = None
            self.owner.retry(attempt)
        elif self.status:
            # A body read until the close ends here (a verdict); one cut short is a protocol error.
            self.parser.feedEOF()
            attempt = self.inFlight()
            if attempt is not None:
                self.closedBeforeVerdict(attempt, "a response")
        else:
            self.closedBeforeVerdict(attempt, "a response")


def _statusVerdict(config: HealthConfig, attempt: _Attempt, status: int) -> None:
    """
    The verdict of a whole response with C{status}.
    """
    if config.statusPasses(status):
        attempt.succeed()
    else:
        attempt.fail(f"status {status}")


@implementer(IHandshakeListener)
class _H2Check(_CheckProtocol):
    """
    HTTP/2 checks on one connection: the client preface, then one stream per check (C{GET}, no body) whose
    response head gives the status and whose end (END_STREAM) the verdict. Received DATA is acknowledged
    at once and dropped, so that flow control never stalls the connection. A stream still open after an
    immediate-fail head is reset (CANCEL). The connection closes with GOAWAY.

    The transport's producer is this protocol, to know when the host stops reading: what h2 queues in
    answer to the host's frames counts toward L{_CONTROL_LIMIT} while the transport is not writing.

    @ivar sid: the current (or last) check's stream id.
    @ivar ended: that stream is over (ended or reset by the host).
    @ivar answered: the check's verdict came from the head (immediate fail), before the stream ended.
    @ivar writeBlocked: the transport asked us to pause: the host is not reading.
    @ivar checks: checks sent on this connection.
    @ivar received: the host sent a frame of the current check's stream.
    @ivar goingAway: the host sent GOAWAY: no new streams.
    @ivar closing: we closed (or are closing) the connection: nothing more goes to h2.
    @ivar prefaceHead: the host's first bytes, until there are four (then C{None}): see L{dataReceived}.
    """

    def __init__(self, owner: "HostHealthChecker", attempt: _Attempt) -> None:
        super().__init__(owner, attempt)
        self.h2: Optional[H2Connection] = None
        self.sid = 0
        self.ended = True
        self.answered = False
        self.checks = 0
        self.received = False
        self.goingAway = False
        self.closing = False
        self.writeBlocked = False
        self.prefaceHead: Optional[bytes] = b""

    def connectionMade(self) -> None:
        """
        Send the client preface (with push disabled: a check wants nothing pushed) and the first check.
        """
        h2c = self.h2 = _CheckEngine(H2Configuration(client_side=True, header_encoding=None))
        # Set before the preface so that its SETTINGS carry them.
        h2c.local_settings = Settings(client=True, initial_values={SettingCodes.ENABLE_PUSH: 0})
        h2c.initiate_connection()
        self.transport.registerProducer(self, True)
        attempt = self.attempt
        if not self.startCheck(attempt):
            # The host's settings are not known yet, so h2 has no reason to refuse the first stream.
            attempt.fail("protocol error: the check's stream could not be opened", network=True)

    def startCheck(self, attempt: _Attempt) -> bool:
        """
        Open C{attempt}'s stream: C{HEADERS} with END_STREAM. C{False} if h2 refused to (the connection is
        then closed and C{attempt} not taken: the caller connects afresh or fails it).
        """
        self.attempt = attempt
        attempt.conn = self
        self.checks += 1
        self.received = self.answered = False
        self.status = 0
        h2c = self.h2
        try:
            self.sid = h2c.get_next_available_stream_id()
            h2c.send_headers(self.sid, self.owner.parent.h2Request, end_stream=True)
        except H2Error:
            # reusable() said yes, yet h2 disagrees (a limit it keeps that we did not check): let go of the
            # attempt so that this connection's close says nothing about it.
            self.attempt = None
            attempt.conn = None
            self.close()
            return False
        self.ended = False
        self._flush()
        return True

    def reusable(self) -> bool:
        """
        Whether the next check may open its stream on this connection: it is open, the host is not going
        away, stream ids are left, and the host's C{SETTINGS_MAX_CONCURRENT_STREAMS} leaves room (a host
        may lower it to 0 at any time).
        """
        if self.lost or self.closing or self.goingAway or self.sid >= _LAST_STREAM_ID - 2:
            return False
        h2c = self.h2
        return h2c.open_outbound_streams < h2c.remote_settings.max_concurrent_streams

    # -- the transport's producer: whether the host reads what we write ------------------------------------

    def pauseProducing(self) -> None:
        """
        The transport's buffer is full (the host is not reading): queued control frames count from now on.
        """
        self.writeBlocked = True

    def resumeProducing(self) -> None:
        """
        The host read what was queued.
        """
        self.writeBlocked = False
        if self.h2 is not None:
            self.h2.controlPending = 0

    def stopProducing(self) -> None:
        """
        The connection is going away (L{connectionLost} follows).
        """

    def checkEnded(self, network: bool) -> None:
        """
        After a network failure abort; after an answer keep the connection for the next check (when reuse
        is on and the host did not send GOAWAY), else close it with GOAWAY.
        """
        if self.closing:
            return
        if network:
            self.closing = True
            self.transport.abortConnection()
        elif self.owner.parent.config.reuse_connection and not self.goingAway:
            self.owner.keep(self)
        else:
            self.close()

    def close(self) -> None:
        """
        Say GOAWAY (no error) and close.
        """
        if self.closing:
            return
        self.closing = True
        self.owner.forget(self)
        try:
            self.h2.close_connection()
        except H2Error:
            pass  # h2 already closed the connection (a protocol error sent its own GOAWAY)
        self._flush()
        self.transport.loseConnection()

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake is done: a host that picked another protocol than h2 by ALPN fails the check.
        """
        self.handshaken = True
        self.wrongALPN(b"h2")

    def dataReceived(self, data: bytes) -> None:
        """
        Feed h2 and act on its events; flush what h2 queued (SETTINGS and PING acknowledgements, window
        updates, a reset).
        """
        if self.closing:
            return
        head = self.prefaceHead
        if head is not None:
            # The host's first frame must be SETTINGS (type 4, the fourth byte). h2 would wait for a whole
            # "frame" first, and an HTTP/1.1 answer to the preface makes one megabytes long: say at once
            # that the host does not speak HTTP/2 (the likeliest mistake: protocol = http2 for an HTTP/1.1
            # host), rather than time out.
            head += data
            if len(head) < 4:
                self.prefaceHead = head
            else:
                self.prefaceHead = None
                if head[3] != 4:
                    self.closing = True
                    self.owner.forget(self)
                    self.transport.abortConnection()
                    attempt = self.inFlight()
                    if attempt is not None:
                        attempt.fail("protocol error: " + ("the host answered in HTTP/1.x, not HTTP/2"
                                                           if head.startswith(b"HTTP") else
                                                           "no HTTP/2 SETTINGS frame from the host"), network=True)
                    return
        try:
            events = self.h2.receive_data(data)
        except _ControlFlood:
            self._flooded()
            return
        except ProtocolError as e:
            # h2 queued a GOAWAY naming the error: send it, then close.
            self.closing = True
            self.owner.forget(self)
            self._flush()
            self.transport.loseConnection()
            attempt = self.inFlight()
            if attempt is not None:
                attempt.fail(f"protocol error: {e or e.__class__.__name__}", network=True)
            return
        sid = self.sid
        h2c = self.h2
        for event in events:
            if self.closing:
                break
            kind = event.__class__
            if kind is ResponseReceived:
                if event.stream_id == sid:
                    self.received = True
                    self._head(event.headers)
            elif kind is DataReceived:
                # Acknowledged at once, whichever stream (h2 only widens the connection's window for a
                # stream already closed): a health check must never block on flow control.
                if event.flow_controlled_length:
                    h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif kind is StreamEnded:
                if event.stream_id == sid:
                    self.ended = True
                    status, self.status = self.status, 0
                    attempt = self.inFlight()
                    if attempt is not None and status:
                        _statusVerdict(self.owner.parent.config, attempt, status)
            elif kind is StreamReset:
                if event.stream_id == sid:
                    self.received = self.ended = True
                    attempt = self.inFlight()
                    if attempt is not None:
                        attempt.fail(f"stream reset ({_errorName(event.error_code)})", network=True)
            elif kind is ConnectionTerminated:
                self._goAway(event)
            # SETTINGS, PINGs and their ACKs need nothing from us (h2 answers them); 1xx heads are waited
            # past; pushed streams cannot come (push is disabled).
        if not self.closing:
            if self.answered and not self.ended:
                # The verdict came from the head: the body is of no interest.
                self.ended = True
                h2c.reset_stream(sid, ErrorCodes.CANCEL)
            self._flush()
            if not self.writeBlocked:
                # What h2 queued in answer to this read is with a transport that is writing: no longer
                # pending (see _CheckEngine).
                h2c.controlPending = 0

    def _head(self, headers: List[Tuple[bytes, bytes]]) -> None:
        """
        The check's response head arrived: an invalid C{:status} is a protocol error and the immediate-fail
        header a verdict at once; otherwise the status waits for the stream's end.
        """
        attempt = self.inFlight()
        if attempt is None:
            return
        status = 0
        immediate = False
        for name, value in headers:
            if name == b":status":
                status = finalStatus(value)
            elif name == IMMEDIATE_FAIL_HEADER:
                immediate = True
        if not status:
            attempt.fail("protocol error: invalid :status", network=True)
        elif immediate:
            self.answered = True
            attempt.fail(f"immediate health check fail (status {status})", immediate=True)
        else:
            self.status = status

    def _flooded(self) -> None:
        """
        The host made h2 queue more than L{_CONTROL_LIMIT} control frames it does not read: abort the
        connection, counted; a check in flight on it fails.
        """
        parent = self.owner.parent
        parent.outbound_control_flood.value += 1
        parent.log.info("cluster {cluster}: health check connection to {host} aborted: too many control frames "
                        "queued", cluster=parent.cluster.name, host=_hostLabel(self.owner.host.endpoint))
        self.closing = True
        self.owner.forget(self)
        self.transport.abortConnection()
        attempt = self.inFlight()
        if attempt is not None:
            attempt.fail("protocol error: too many control frames queued", network=True)

    def _goAway(self, event: ConnectionTerminated) -> None:
        """
        The host sent GOAWAY: no new stream on this connection. A check stream the host says it never
        processed (above the last stream id) is retried on a new connection when this one was reused (the
        host retired a connection it had kept), and fails otherwise; a GOAWAY with an error fails it; with
        NO_ERROR a processed stream is answered before the host closes. Idle, the connection is closed now.
        """
        self.goingAway = True
        self.owner.forget(self)
        attempt = self.inFlight()
        if attempt is None:
            self.close()
            return
        last = event.last_stream_id
        if last is not None and self.sid > last:
            if self.checks > 1:
                self.attempt = None
                self.close()
                self.owner.retry(attempt)
            else:
                attempt.fail("GOAWAY before a response", network=True)
        elif event.error_code != _NO_ERROR:
            attempt.fail(f"GOAWAY ({_errorName(event.error_code)})", network=True)
        else:
            # h2 refuses every frame after a GOAWAY it received, which would make the answer the host still
            # owes this stream a protocol error: put its connection state back to open (the streams' own
            # states are untouched), as the upstream HTTP/2 codec does.
            self.h2.state_machine.state = ConnectionState.CLIENT_OPEN

    def _flush(self) -> None:
        """
        Write what h2 queued.
        """
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """
        As for HTTP/1.1: before the verdict the check fails (or, on a reused connection that carried nothing
        of the response yet, is retried on a new one).
        """
        self.lost = self.closing = True
        self.owner.forget(self)
        attempt = self.inFlight()
        if attempt is None:
            return
        if self.checks > 1 and not self.received:
            self.attempt = None
            self.owner.retry(attempt)
        else:
            self.closedBeforeVerdict(attempt, "a response")


def _errorName(code) -> str:
    """
    An HTTP/2 error code's name (C{CANCEL}), or its number when h2 does not know it.
    """
    return getattr(code, "name", None) or str(code)


@implementer(IHandshakeListener)
class _TCPCheck(_CheckProtocol):
    """
    A TCP check on one connection: writes C{send}, then waits for C{receive} to appear in the bytes read.
    Only the last C{len(receive) - 1} bytes are kept between reads, so a host that talks a lot costs no
    memory.
    """

    def __init__(self, owner: "HostHealthChecker", attempt: _Attempt) -> None:
        super().__init__(owner, attempt)
        config = owner.parent.config
        self.send = config.send
        self.receive = config.receive
        self.tail = b""

    def connectionMade(self) -> None:
        """
        Write C{send}; pass a connect-only check over plain TCP at once.
        """
        self.attempt.conn = self
        if self.send:
            self.transport.write(self.send)  # a TLS transport holds it until the handshake is done
        # A TLS host passes a connect-only check once the handshake is done (handshakeCompleted), as in
        # Envoy, whose connect event for TLS comes after it: a host that accepts TCP but cannot do TLS is
        # no use to the cluster.
        if self.receive is None and not INegotiated.providedBy(self.transport):
            self.attempt.succeed()

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake is done: a connect-only check passes.
        """
        self.handshaken = True
        if self.receive is None:
            self.attempt.succeed()

    def dataReceived(self, data: bytes) -> None:
        """
        Look for C{receive} in what was read, across reads.
        """
        if self.attempt.done or self.receive is None:
            return
        buffered = self.tail + data if self.tail else data
        receive = self.receive
        if receive in buffered:
            self.attempt.succeed()
            return
        keep = len(receive) - 1
        self.tail = buffered[-keep:] if keep else b""

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """
        Before the verdict: the host hung up (during the TLS handshake, or before sending C{receive}).
        """
        self.lost = True
        attempt = self.inFlight()
        if attempt is not None:
            self.closedBeforeVerdict(attempt, "the expected bytes")


class _CheckFactory(protocol.Factory):
    """
    Builds the one protocol of one check (endpoints want a factory).
    """

    noisy = False  # a "Starting factory" log line per check would drown the log

    def __init__(self, build: Callable[[], protocol.Protocol]) -> None:
        self.build = build

    def buildProtocol(self, addr) -> protocol.Protocol:
        """
        The check's protocol.
        """
        return self.build()


def _connectReason(failure: Failure) -> str:
    """
    A short, stable description of why a connection attempt failed, for C{healthReason}.
    """
    if failure.check(error.ConnectionRefusedError):
        return "connection refused"
    if failure.check(error.TimeoutError):
        return "connect timeout"
    if failure.check(error.DNSLookupError):
        return "DNS lookup failed"
    if failure.check(error.NoRouteError):
        return "no route to host"
    return f"connection failed: {failure.getErrorMessage()}"


def _hostLabel(endpoint: str) -> str:
    """
    The first three fields of an endpoint string (C{tls:host=a:port=443}) for log lines: enough to name
    the host, without the certificate and key parameters the admin pages take care to redact.
    """
    fields = []
    field = []
    escaped = False
    for c in endpoint:
        if escaped:
            field.append(c)
            escaped = False
        elif c == "\\":
            field.append(c)
            escaped = True
        elif c == ":":
            fields.append("".join(field))
            field = []
            if len(fields) == 3:
                return ":".join(fields)
        else:
            field.append(c)
    fields.append("".join(field))
    return ":".join(fields[:3])


class HostHealthChecker:
    """
    The checks of one host: its timer, its check in flight and its run of consecutive results.

    @ivar host: the L{Host}.
    @ivar successes: consecutive passing checks (0 after a failure).
    @ivar failures: consecutive failing checks (0 after a pass).
    @ivar firstCheck: no check has ended since the checker started.
    @ivar timer: the delayed call of the next check, while one is scheduled.
    @ivar attempt: the check in flight, or C{None}.
    @ivar connection: the HTTP check connection kept for the next check (C{reuse_connection}), or C{None}.
    @ivar stopped: L{stop} was called: a connection whose check ends now is closed, not kept.
    @ivar lastTraffic: the cluster's traffic count (see L{HealthChecker.traffic}) when this host's last
        check ended (or the checker started).
    """

    def __init__(self, parent: "HealthChecker", host: "Host") -> None:
        self.parent = parent
        self.host = host
        self.successes = 0
        self.failures = 0
        self.firstCheck = True
        self.timer = None
        self.attempt: Optional[_Attempt] = None
        self.connection: Optional[_CheckProtocol] = None
        self.stopped = False
        self.lastTraffic = parent.traffic()

    def schedule(self, delay: float) -> None:
        """
        Check again in C{delay} seconds.
        """
        self.timer = self.parent.clock.callLater(delay, self.check)

    def stop(self) -> None:
        """
        Cancel the next check, abandon the one in flight and close the kept connection.
        """
        self.stopped = True
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.close()
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.cancel()

    def check(self) -> None:
        """
        Start one check now.
        """
        self.timer = None
        parent = self.parent
        config = parent.config
        attempt = _Attempt(lambda ok, reason, network, immediate: self._ended(attempt, ok, reason, network,
                                                                               immediate))
        self.attempt = attempt
        parent.attempt.value += 1
        attempt.timer = parent.clock.callLater(config.timeout, attempt.timedOut)
        connection, self.connection = self.connection, None
        if connection is not None:
            if connection.reusable():
                if connection.startCheck(attempt):
                    return
            else:
                # Still reading the last response, or the host is going away: start afresh.
                connection.close()
        self._connect(attempt)

    def keep(self, connection: _CheckProtocol) -> None:
        """
        Hold C{connection}, whose check is over, for the next check (closed instead once stopped).
        """
        if self.stopped:
            connection.close()
        else:
            self.connection = connection

    def forget(self, connection: _CheckProtocol) -> None:
        """
        C{connection} can carry no more checks (it closed, or is closing).
        """
        if self.connection is connection:
            self.connection = None

    def retry(self, attempt: _Attempt) -> None:
        """
        Send C{attempt} again on a new connection: the reused connection it went out on was closed by the
        host before any of the answer came (see the module docstring). Its timeout runs on.
        """
        if attempt is self.attempt and not attempt.done:
            attempt.conn = None
            self._connect(attempt)

    def _connect(self, attempt: _Attempt) -> None:
        """
        Connect to the host for C{attempt}; the check protocol takes over once connected.
        """
        parent = self.parent
        if parent.config.type == "tcp":
            factory = _CheckFactory(lambda: _TCPCheck(self, attempt))
        elif parent.codec == "http2":
            factory = _CheckFactory(lambda: _H2Check(self, attempt))
        else:
            factory = _CheckFactory(lambda: _HTTPCheck(self, attempt))

        def connectFailed(failure: Failure) -> None:
            """
            The connection could not be made; after a verdict this is the errback of our own cancel, and
            there is nothing to report.
            """
            if not attempt.done:
                attempt.fail(_connectReason(failure), network=True)

        # maybeDeferred: an endpoint that raises instead of returning a failed Deferred is a failed check too.
        d = defer.maybeDeferred(self.host.client.connect, factory)
        if not attempt.done:
            attempt.connecting = d
        # Once connected the protocol reports by itself: only a failure to connect needs handling here.
        d.addErrback(connectFailed)
        d.addErrback(self._bug)

    def _bug(self, failure: Failure) -> None:
        """
        Log an unexpected error in the check's own callbacks (never a failed check: those are verdicts).
        """
        self.parent.log.failure("health check of {host} failed unexpectedly", failure,
                                host=_hostLabel(self.host.endpoint))

    def _ended(self, attempt: _Attempt, ok: bool, reason: str, network: bool, immediate: bool) -> None:
        """
        A check ended: count it, apply the thresholds, schedule the next one.
        """
        if attempt is not self.attempt:
            return
        self.attempt = None
        try:
            self._judge(ok, reason, network, immediate)
        finally:
            # Scheduled whatever happened: one failing callback must not end checking of the host for good.
            if self.parent.running:
                self.schedule(self.nextDelay())

    def _judge(self, ok: bool, reason: str, network: bool, immediate: bool) -> None:
        """
        Count a check's verdict and apply the thresholds to the host's health.
        """
        parent = self.parent
        config = parent.config
        host = self.host
        failed = FAILED_ACTIVE_HC in host.healthFlags
        first, self.firstCheck = self.firstCheck, False
        progress = None  # a new healthReason when the verdict does not change the flag
        if ok:
            parent.success.value += 1
            self.failures = 0
            self.successes += 1
            if not failed:
                progress = _PASSED_REASON
            elif first or self.successes >= config.healthy_threshold:
                # Envoy's rule: a host's very first passing check makes it healthy at once, so that a
                # cluster starting up need not wait healthy_threshold intervals for its first host.
                parent.setFailed(host, False, _PASSED_REASON)
            else:
                progress = (f"{_FAILED_PREFIX}last check passed, {self.successes} of "
                            f"{config.healthy_threshold} passing checks to become healthy")
        else:
            parent.failure.value += 1
            if network:
                parent.network_failure.value += 1
            self.successes = 0
            self.failures += 1
            if failed:
                if first:
                    # A failed first check leaves the host unhealthy but no longer pending.
                    host.setHealthFlag(PENDING_ACTIVE_HC, False)
                    parent.log.info("cluster {cluster}: host {host} failed its first health check ({reason})",
                                    cluster=parent.cluster.name, host=_hostLabel(host.endpoint), reason=reason)
                progress = _FAILED_PREFIX + reason
            elif immediate or self.failures >= config.unhealthy_threshold:
                parent.setFailed(host, True, _FAILED_PREFIX + reason)
            else:
                progress = (f"healthy: last check failed ({reason}), {self.failures} of "
                            f"{config.unhealthy_threshold} failing checks to become unhealthy")
        if progress is not None and host.healthFlags <= _OWN_FLAGS:
            # While another owner (outlier detection) keeps the host out, its reason is the one to show.
            host.healthReason = progress
        outlier = getattr(parent.cluster, "outlier", None)
        if ok and outlier is not None:
            outlier.onActiveHealthCheckPassed(host)

    def nextDelay(self) -> float:
        """
        The wait before the next check (Envoy's choice of interval, plus jitter): C{unhealthy_interval}
        while the host is unhealthy; while it is healthy, C{no_traffic_interval} if the cluster carried no
        traffic since this host's last check, else C{interval}. Then C{interval_jitter_percent} of that
        and C{interval_jitter}, each scaled by a random draw, are added (a draw is made only for a jitter
        that is configured).
        """
        parent = self.parent
        config = parent.config
        traffic = parent.traffic()
        if FAILED_ACTIVE_HC in self.host.healthFlags:
            # An unhealthy host gets no traffic by construction, so "no traffic" says nothing about it;
            # and noticing its recovery soon matters more than saving a check.
            base = config.unhealthy_interval
        elif traffic == self.lastTraffic:
            base = config.no_traffic_interval
        else:
            base = config.interval
        self.lastTraffic = traffic
        delay = base
        rand = parent.random.random
        if config.interval_jitter_percent:
            delay += rand() * base * config.interval_jitter_percent / 100.0
        if config.interval_jitter:
            delay += rand() * config.interval_jitter
        return delay


class HealthChecker:
    """
    Active health checking of one cluster's hosts (see the module docstring).

    Stats, under C{cluster.<name>.health_check.} (Envoy's names): C{attempt}, C{success}, C{failure}
    (every failed check, network failures included), C{network_failure} (no answer: refused, reset, timed
    out, not HTTP), C{outbound_control_flood} (HTTP/2 check connections aborted because the host flooded
    them with frames to acknowledge without reading the answers), and the gauge C{healthy} (hosts that
    active health checking does not fail).

    @ivar cluster: the L{Cluster}.
    @ivar config: the L{HealthConfig}.
    @ivar clock: the L{IReactorTime} every timer runs on.
    @ivar random: the L{random.Random} jitter is drawn from.
    @ivar checkers: the L{HostHealthChecker} of each host, while started.
    @ivar running: between L{start} and L{stop}.
    @ivar codec: the HTTP version of HTTP checks, C{"http1"} or C{"http2"}.
    @ivar request: the HTTP/1.1 check's request, encoded once.
    @ivar h2Request: the HTTP/2 check's header block, made once.
    """

    log = Logger()

    def __init__(self, cluster: "Cluster", config: HealthConfig, clock: IReactorTime, random: Random) -> None:
        self.cluster = cluster
        self.config = config
        self.clock = clock
        self.random = random
        self.running = False
        self.checkers: Dict["Host", HostHealthChecker] = {}
        scope = cluster.stats.scope("health_check")
        self.attempt = scope.counter("attempt")
        self.success = scope.counter("success")
        self.failure = scope.counter("failure")
        self.network_failure = scope.counter("network_failure")
        self.outbound_control_flood = scope.counter("outbound_control_flood")
        self.healthy = scope.gauge("healthy")
        # health.codec, else the cluster's protocol.
        self.codec = config.codec or ("http2" if getattr(cluster, "http2", False) else "http1")
        host = config.host.encode("ascii")
        path = (config.path or "/").encode("ascii")
        headers = [(b"host", host), (b"user-agent", USER_AGENT)]
        if not config.reuse_connection:
            # One check, one connection: tell the host so that it can close at once.
            headers.append((b"connection", b"close"))
        self.request = h1.encodeRequestHead(b"GET", path, headers)
        # The scheme is the connection's: https when the cluster's hosts are reached over TLS.
        scheme = b"https" if getattr(cluster, "tls", None) is not None else b"http"
        self.h2Request = [(b":method", b"GET"), (b":scheme", scheme), (b":authority", host), (b":path", path),
                          (b"user-agent", USER_AGENT)]

    def traffic(self) -> int:
        """
        A count that grows with the cluster's traffic (requests and connections the proxy sent it; health
        checks do not count), to tell whether the cluster carried traffic between two checks.
        """
        cluster = self.cluster
        return cluster.upstream_rq_total.value + cluster.upstream_cx_total.value

    def start(self) -> None:
        """
        Mark every host unhealthy, pending its first check, and schedule each host's first check: at once,
        or a random time up to C{initial_jitter} later (drawn per host, in host order).
        """
        if self.running:
            return
        self.running = True
        cluster = self.cluster
        for host in cluster.hosts:
            host.setHealthFlag(FAILED_ACTIVE_HC, True)
            host.setHealthFlag(PENDING_ACTIVE_HC, True, reason=_PENDING_REASON)
        self._updateGauge()
        cluster.healthChanged()
        self.checkers = {host: HostHealthChecker(self, host) for host in cluster.hosts}
        jitter = self.config.initial_jitter
        for checker in self.checkers.values():
            checker.schedule(self.random.random() * jitter if jitter else 0.0)

    def stop(self) -> None:
        """
        Cancel every scheduled check and abandon those in flight. Hosts keep their health.
        """
        self.running = False
        for checker in self.checkers.values():
            checker.stop()

    def hostsChanged(self, added, removed) -> None:
        """
        The cluster's membership changed (L{Cluster.updateHosts}): a removed host's checks stop; an added
        host starts as Envoy's do, unhealthy and pending its first check, which runs at once (or up to
        C{initial_jitter} later) when checking is running. The caller rebuilds the load balancer.
        """
        for host in removed:
            checker = self.checkers.pop(host, None)
            if checker is not None:
                checker.stop()
        jitter = self.config.initial_jitter
        for host in added:
            host.setHealthFlag(FAILED_ACTIVE_HC, True)
            host.setHealthFlag(PENDING_ACTIVE_HC, True, reason=_PENDING_REASON)
            if self.running:
                checker = self.checkers[host] = HostHealthChecker(self, host)
                checker.schedule(self.random.random() * jitter if jitter else 0.0)
        self._updateGauge()

    def setFailed(self, host: "Host", failed: bool, reason: str) -> None:
        """
        Set or clear C{host}'s C{failed_active_hc} flag (clearing C{pending_active_hc}) with C{reason}, and
        tell the cluster if C{host.healthy} changed (another owner's flag may keep the host out anyway).
        """
        before = host.healthy
        host.setHealthFlag(PENDING_ACTIVE_HC, False)
        # The reason is written only when this flag decides the host's health: while outlier detection
        # keeps the host out, its reason stays the one shown.
        others = host.healthFlags - _OWN_FLAGS
        host.setHealthFlag(FAILED_ACTIVE_HC, failed, reason="" if others else reason)
        self.log.info("cluster {cluster}: host {host} {state} active health checking ({reason})",
                      cluster=self.cluster.name, host=_hostLabel(host.endpoint),
                      state="failed" if failed else "passed", reason=reason)
        self._updateGauge()
        if host.healthy != before:
            self.cluster.healthChanged()

    def _updateGauge(self) -> None:
        """
        Set the C{healthy} gauge: the hosts active health checking does not fail.
        """
        self.healthy.value = sum(1 for h in self.cluster.hosts if FAILED_ACTIVE_HC not in h.healthFlags)
