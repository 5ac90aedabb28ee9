"""
Span exporters: finished spans are queued, batched and posted to a collector, either as Zipkin v2 JSON
(C{POST /api/v2/spans}) or as OTLP/HTTP with JSON encoding (C{POST /v1/traces}).

A batch is sent when it fills (C{batch_size} spans), when the flush timer fires (C{flush_interval} after
the first span of a batch was queued; the injected clock), and at shutdown (L{SpanExporter.close}). The
queue is bounded (C{queue_size}): a span that finds it full is dropped and counted, which is what happens
while the collector is slower than the traffic, because at most L{MAX_IN_FLIGHT} reports are outstanding
at once. A report that fails (no connection, a timeout, a non-2xx answer) is counted and its spans
dropped, never retried: a collector that is down must cost the proxy nothing but the count.

Stats, in the store's C{tracing.<provider>.} scope (after Envoy's Zipkin tracer): C{spans_sent},
C{spans_dropped} (queue full, or the collector failed the report), C{reports_sent}, C{reports_dropped}
(the collector answered with other than 2xx), C{reports_failed} (no answer), C{timer_flushed}.
"""

from __future__ import annotations

from collections import deque
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from treq.client import HTTPClient
from twisted.internet.protocol import Protocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

from .tracing import Span

#: Reports outstanding at once; while that many are, spans wait in the queue (bounded) for their turn.
MAX_IN_FLIGHT = 2
#: A collector's answer body is read (so the connection can be reused) and dropped; past this much, the
#: connection is closed instead: a collector must not be able to make the proxy read forever.
MAX_ANSWER_BODY = 64 * 1024
#: OTLP's C{SPAN_KIND_SERVER} and C{STATUS_CODE_ERROR}.
OTLP_KIND_SERVER = 2
OTLP_STATUS_ERROR = 2
SCOPE_NAME = "twistedmesh"

PostFunction = Callable[[str, bytes], "Deferred[int]"]


# The JSON is written as text, each string escaped by the C escaper json.dumps() itself uses (ASCII-only
# output, as json.dumps gives by default): about half the cost of building dicts for json.dumps per span.
# Ids are hex digits and numbers are integers, so they are written as they are. The tests check the bytes
# against json.dumps() of the dict model.
_ZIPKIN_SPAN = ('{"traceId":"%s","id":"%s","name":%s,"kind":"SERVER","timestamp":%d,"duration":%d,'
                '"localEndpoint":%s,"tags":{%s}%s%s%s}')
_OTLP_SPAN = ('{"traceId":"%s","spanId":"%s","name":%s,"kind":%d,"startTimeUnixNano":"%d","endTimeUnixNano":"%d",'
              '"attributes":[%s]%s%s}')
_OTLP_ERROR = ',"status":{"code":%d}' % OTLP_STATUS_ERROR
# Each tag key's text, escaped once: escaping is most of the cost, and keys repeat (the recorder's are a
# fixed set). Bounded, as a Span's tags could be anything.
_ZIPKIN_KEYS: Dict[str, str] = {}
_OTLP_KEYS: Dict[str, str] = {}
_MAX_KEYS = 256


def _zipkinKey(key: str) -> str:
    """
    C{"key":} (a member of the C{tags} map up to its value), kept in L{_ZIPKIN_KEYS} while there is room.
    """
    text = _quote(key) + ":"
    if len(_ZIPKIN_KEYS) < _MAX_KEYS:
        _ZIPKIN_KEYS[key] = text
    return text


def _otlpKey(key: str) -> str:
    """
    An OTLP string attribute up to its value, kept in L{_OTLP_KEYS} while there is room.
    """
    text = '{"key":%s,"value":{"stringValue":' % _quote(key)
    if len(_OTLP_KEYS) < _MAX_KEYS:
        _OTLP_KEYS[key] = text
    return text


def _zipkinEndpoint(address: Tuple[str, int]) -> str:
    """
    The C{remoteEndpoint} member for an C{(ip, port)} pair.
    """
    ip, port = address
    return ',"remoteEndpoint":{"%s":%s,"port":%d}' % ("ipv6" if ":" in ip else "ipv4", _quote(ip), port)


def _uniqueTags(tags: Sequence[Tuple[str, str]]) -> Sequence[Tuple[str, str]]:
    """
    C{tags} as a JSON object may hold them: a key given twice keeps its last value, in its first place (as
    a dict built from them does). The proxy's own spans never repeat a key, so this is one set, no copy.
    """
    if len({k for k, _ in tags}) == len(tags):
        return tags
    return list(dict(tags).items())


def encodeZipkin(spans: Sequence[Span], serviceName: str) -> bytes:
    """
    A Zipkin v2 JSON report: a list of spans, each with hex ids, microsecond C{timestamp} and C{duration}
    (at least 1, as Zipkin requires of a duration it is given), kind C{SERVER}, the local and remote
    endpoints, and its tags as a map of strings.
    """
    quote = _quote
    keys = _ZIPKIN_KEYS
    local = '{"serviceName":%s}' % quote(serviceName)
    out = []
    for span in spans:
        parentId = span.parentId
        remote = span.remote
        out.append(_ZIPKIN_SPAN % (
            span.traceId.decode("ascii"), span.spanId.decode("ascii"), quote(span.name),
            int(round(span.start * 1_000_000)), max(1, int(round(span.duration * 1_000_000))), local,
            ",".join([(keys.get(k) or _zipkinKey(k)) + quote(v) for k, v in _uniqueTags(span.tags)]),
            "" if parentId is None else ',"parentId":"%s"' % parentId.decode("ascii"),
            "" if remote is None else _zipkinEndpoint(remote),
            ',"debug":true' if span.debug else ""))
    return ("[" + ",".join(out) + "]").encode("ascii")


def encodeOTLP(spans: Sequence[Span], serviceName: str) -> bytes:
    """
    An OTLP C{ExportTraceServiceRequest} in JSON: one resource (C{service.name}) with one scope, its spans
    with hex ids (a 64-bit B3 trace id padded to 128 bits, as OTLP requires), times as unix nanoseconds in
    strings (proto3 JSON's form of a 64-bit integer), kind SERVER, tags as string attributes, and an error
    status for a failed request.
    """
    quote = _quote
    keys = _OTLP_KEYS
    out = []
    for span in spans:
        start = int(round(span.start * 1_000_000_000))
        parentId = span.parentId
        out.append(_OTLP_SPAN % (
            span.traceId.decode("ascii").rjust(32, "0"), span.spanId.decode("ascii"), quote(span.name),
            OTLP_KIND_SERVER, start, start + int(round(span.duration * 1_000_000_000)),
            ",".join([(keys.get(k) or _otlpKey(k)) + quote(v) + "}}" for k, v in span.tags]),
            "" if parentId is None else ',"parentSpanId":"%s"' % parentId.decode("ascii"),
            _OTLP_ERROR if span.error else ""))
    return ('{"resourceSpans":[{"resource":{"attributes":[%s]},"scopeSpans":[{"scope":{"name":%s},"spans":[%s]}]}]}'
            % (_otlpKey("service.name") + quote(serviceName) + "}}", quote(SCOPE_NAME), ",".join(out))
            ).encode("ascii")


ENCODERS: Dict[str, Callable[[Sequence[Span], str], bytes]] = {"zipkin": encodeZipkin, "otlp": encodeOTLP}


class _QuietClientFactory(_HTTP11ClientFactory):
    """
    Twisted's HTTP client factory without its "Starting factory" lines: one per report is noise.
    """

    noisy = False


def treqPost(reactor: Any, timeout: float) -> "tuple[PostFunction, Callable[[], Deferred]]":
    """
    A function posting a JSON body with treq on its own connection pool (its Deferred fires with the
    answer's status code once the answer's body is read and dropped, or fails), and one closing the pool's
    connections. C{timeout} bounds the whole exchange, the answer's body included (treq's own timeout
    stops at the answer's head): a collector that stalls mid-answer cannot hold a report slot for ever.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietClientFactory
    pool.maxPersistentPerHost = MAX_IN_FLIGHT
    client = HTTPClient(Agent(reactor, pool=pool))
    headers = {b"content-type": [b"application/json"]}

    def post(url: str, body: bytes) -> "Deferred[int]":
        d = client.post(url, data=body, headers=headers, timeout=timeout, reactor=reactor)
        d.addCallback(_dropBody)
        d.addTimeout(timeout, reactor)
        return d

    return post, pool.closeCachedConnections


class _DropBody(Protocol):
    """
    Reads an answer's body and drops it (reading it lets the connection go back to the pool); closes the
    connection past L{MAX_ANSWER_BODY} or when cancelled (a timeout). C{done} fires with the status code.
    """

    def __init__(self, code: int) -> None:
        self.code = code
        self.seen = 0
        self.done: Deferred = Deferred(lambda d: self._abort())

    def dataReceived(self, data: bytes) -> None:
        self.seen += len(data)
        if self.seen > MAX_ANSWER_BODY:
            self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # closes the connection

    def connectionLost(self, reason) -> None:
        if not self.done.called:
            self.done.callback(self.code)


def _dropBody(response) -> Deferred:
    drop = _DropBody(response.code)
    response.deliverBody(drop)
    return drop.done


class ExporterStats:
    """
    The C{tracing.<provider>.*} counters, resolved once.
    """

    def __init__(self, stats: Any, provider: str) -> None:
        prefix = f"tracing.{provider}."
        self.spans_sent = stats.counter(prefix + "spans_sent")
        self.spans_dropped = stats.counter(prefix + "spans_dropped")
        self.reports_sent = stats.counter(prefix + "reports_sent")
        self.reports_dropped = stats.counter(prefix + "reports_dropped")
        self.reports_failed = stats.counter(prefix + "reports_failed")
        self.timer_flushed = stats.counter(prefix + "timer_flushed")


class SpanExporter:
    """
    Queues spans and posts them to a collector in batches (see the module docstring).

    @ivar queue: spans waiting to be sent, oldest first.
    @ivar inFlight: reports sent and not yet answered.
    """

    log = Logger()

    def __init__(self, provider: str, url: str, serviceName: str, clock: IReactorTime, stats: Any,
                 post: PostFunction, batchSize: int = 512, queueSize: int = 2048, flushInterval: float = 5.0,
                 closePool: Optional[Callable[[], Any]] = None) -> None:
        """
        @param provider: C{"zipkin"} or C{"otlp"}: the encoding, and the stats' scope.
        @param url: the collector's URL.
        @param stats: the L{twistedmesh.observability.stats.StatsStore}.
        @param post: posts a body to a URL; its Deferred fires with the status code or fails
            (L{treqPost}'s first result, or a test's).
        @param closePool: called by L{close} once the last report is answered, to close idle connections.
        """
        self.provider = provider
        self.url = url
        self.serviceName = serviceName
        self.encode = ENCODERS[provider]
        self.clock = clock
        self.stats = ExporterStats(stats, provider)
        self.post = post
        self.batchSize = batchSize
        self.queueSize = queueSize
        self.flushInterval = flushInterval
        self.closePool = closePool
        self.queue: Deque[Span] = deque()
        self.inFlight = 0
        self.closed = False
        self._timer = None
        self._idle: List[Deferred] = []  # close() waiting for the last report
        self._failing = False  # the last report failed: warned already

    def add(self, span: Span) -> None:
        """
        Queue C{span}; send a batch if that fills one. When the queue is full the span is dropped (and
        counted).
        """
        queue = self.queue
        if len(queue) >= self.queueSize or self.closed:
            self.stats.spans_dropped.value += 1
            return
        queue.append(span)
        if len(queue) >= self.batchSize:
            self._send(full=True)
        if queue and self._timer is None:
            self._timer = self.clock.callLater(self.flushInterval, self._timerFired)

    def _timerFired(self) -> None:
        self._timer = None
        self.stats.timer_flushed.value += 1
        self.flush()

    def flush(self) -> None:
        """
        Send what is queued, partial batch included, as far as the in-flight limit allows; what the limit
        holds back goes when a report is answered.
        """
        self._send(full=False)
        if self.queue and self._timer is None and not self.closed:
            self._timer = self.clock.callLater(self.flushInterval, self._timerFired)

    def _send(self, full: bool) -> None:
        """
        Post batches while there are spans (C{full}: only whole batches) and room in flight.
        """
        queue = self.queue
        size = self.batchSize
        while queue and self.inFlight < MAX_IN_FLIGHT and (len(queue) >= size or not full):
            batch = [queue.popleft() for _ in range(min(size, len(queue)))]
            if not queue and self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._report(batch)

    def _report(self, batch: List[Span]) -> None:
        self.inFlight += 1
        try:
            body = self.encode(batch, self.serviceName)
            d = self.post(self.url, body)
        except Exception:
            self.log.failure("encoding or posting {n} spans to {url} failed", n=len(batch), url=self.url)
            self._answered(None, batch)
            return
        d.addCallbacks(self._answered, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))

    def _answered(self, code: Optional[int], batch: List[Span]) -> None:
        stats = self.stats
        if code is not None and 200 <= code < 300:
            stats.reports_sent.value += 1
            stats.spans_sent.value += len(batch)
            if self._failing:
                self._failing = False
                self.log.info("the {provider} collector at {url} takes spans again", provider=self.provider,
                              url=self.url)
        else:
            stats.reports_dropped.value += 1
            stats.spans_dropped.value += len(batch)
            self._warn("answered {code}".format(code=code), len(batch))
        self._done()

    def _failed(self, failure, batch: List[Span]) -> None:
        self.stats.reports_failed.value += 1
        self.stats.spans_dropped.value += len(batch)
        self._warn("failed: " + failure.getErrorMessage(), len(batch))
        self._done()

    def _warn(self, what: str, n: int) -> None:
        """
        Say that a report failed, once per outage: a collector that is down would otherwise fill the log.
        """
        if not self._failing:
            self._failing = True
            self.log.warn("a report of {n} spans to the {provider} collector at {url} {what}; spans are dropped "
                          "until it takes them again (see the tracing.{provider}.* stats)",
                          n=n, provider=self.provider, url=self.url, what=what)

    def _done(self) -> None:
        self.inFlight -= 1
        if self.closed:
            self._send(full=False)
        elif len(self.queue) >= self.batchSize:
            self._send(full=True)
        if self.inFlight == 0 and not self.queue:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def close(self) -> Deferred:
        """
        Stop the timer and send everything queued; the Deferred fires (never fails) once every report is
        answered (each is bounded by C{tracing.timeout}, body included) and the pool's idle connections are closed.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.closed = True
        self._send(full=False)
        if self.inFlight == 0:
            d: Deferred = succeed(None)
        else:
            d = Deferred()
            self._idle.append(d)
        closePool = self.closePool
        if closePool is not None:
            d.addCallback(lambda _: closePool())
        d.addErrback(lambda f: self.log.failure("closing the {provider} exporter", f, provider=self.provider))
        return d


def buildExporter(config: Any, reactor: Any, stats: Any) -> Optional[SpanExporter]:
    """
    The exporter C{[mesh] tracing.*} asks for, posting with treq on C{reactor}, or None without a provider.

    @param config: a L{twistedmesh.config.tracing.TracingConfig}, or None.
    """
    if config is None or config.provider is None:
        return None
    post, closePool = treqPost(reactor, config.timeout)
    return SpanExporter(config.provider, config.collector, config.service_name, reactor, stats, post,
                        batchSize=config.batch_size, queueSize=config.queue_size,
                        flushInterval=config.flush_interval, closePool=closePool)
