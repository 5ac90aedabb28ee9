"""
Tests for L{twistedmesh.http.stream}: the HTTP filter chain's order, pauses, local replies and completion,
driven through the public harness L{twistedmesh.testing.FilterHarness}.
"""

from twisted.internet.defer import Deferred
from twisted.trial import unittest

from twistedmesh.http.stream import HTTPFilter
from twistedmesh.testing import FilterHarness


class Recorder(HTTPFilter):
    """
    Appends C{(name, hook)} to a shared log for every hook.
    """

    def __init__(self, name, log):
        self.name = name
        self.log = log

    def requestHeaders(self, stream):
        self.log.append((self.name, "requestHeaders"))

    def requestData(self, stream, data, end):
        self.log.append((self.name, "requestData", data, end))

    def requestTrailers(self, stream, trailers):
        self.log.append((self.name, "requestTrailers"))

    def responseHeaders(self, stream):
        self.log.append((self.name, "responseHeaders"))

    def responseData(self, stream, data, end):
        self.log.append((self.name, "responseData", data, end))

    def responseTrailers(self, stream, trailers):
        self.log.append((self.name, "responseTrailers"))

    def streamComplete(self, stream):
        self.log.append((self.name, "streamComplete"))


class ChainOrderTests(unittest.TestCase):
    """
    Request hooks run first to last, response hooks last to first, streamComplete once each.
    """

    def test_order(self):
        """
        A full exchange visits the filters in Envoy's order.
        """
        log = []
        h = FilterHarness(Recorder("a", log), Recorder("b", log))
        h.request(b"POST", b"/x", [(b"content-length", b"2")], [b"hi"])
        h.respond(200, [(b"content-length", b"2")], [b"ok"])
        self.assertEqual(log, [
            ("a", "requestHeaders"), ("b", "requestHeaders"),
            ("a", "requestData", b"hi", True), ("b", "requestData", b"hi", True),
            ("b", "responseHeaders"), ("a", "responseHeaders"),
            ("b", "responseData", b"ok", True), ("a", "responseData", b"ok", True),
            ("a", "streamComplete"), ("b", "streamComplete"),
        ])
        self.assertEqual((h.upstream.body, h.downstream.body, h.downstream.status), (b"hi", b"ok", 200))

    def test_trailers(self):
        """
        Trailers travel both ways through the trailer hooks.
        """
        log = []
        h = FilterHarness(Recorder("a", log))
        h.request(b"POST", b"/", body=[b"x"], trailers=[(b"t", b"1")])
        h.respond(200, body=[b"y"], trailers=[(b"grpc-status", b"0")])
        self.assertIn(("a", "requestTrailers"), log)
        self.assertIn(("a", "responseTrailers"), log)
        self.assertEqual(h.upstream.trailers, [(b"t", b"1")])
        self.assertEqual(h.downstream.trailers, [(b"grpc-status", b"0")])
        self.assertTrue(h.completed)

    def test_dataReplacement(self):
        """
        A data hook returning bytes replaces the chunk for the filters after it.
        """

        class Upper(HTTPFilter):
            def requestData(self, stream, data, end):
                return data.upper()

            def responseData(self, stream, data, end):
                return data[::-1]

        h = FilterHarness(Upper())
        h.request(b"POST", b"/", body=[b"abc"])
        h.respond(200, body=[b"xyz"])
        self.assertEqual((h.upstream.body, h.downstream.body), (b"ABC", b"zyx"))

    def test_headerMutation(self):
        """
        Filters change the request and response in place.
        """

        class Tag(HTTPFilter):
            def requestHeaders(self, stream):
                stream.requestHeaders.append((b"x-tag", b"1"))
                stream.path = b"/rewritten"

            def responseHeaders(self, stream):
                stream.responseHeaders.append((b"x-seen", b"yes"))

        h = FilterHarness(Tag())
        h.request(b"GET", b"/orig")
        h.respond(204)
        self.assertEqual(h.upstream.path, b"/rewritten")
        self.assertIn((b"x-tag", b"1"), h.upstream.headers)
        self.assertIn((b"x-seen", b"yes"), h.downstream.headers)


class PauseTests(unittest.TestCase):
    """
    A hook returning a Deferred pauses its direction until it fires.
    """

    def test_requestPause(self):
        """
        Request events wait, in order, behind a paused headers hook, and reading is paused meanwhile.
        """
        d = Deferred()

        class Hold(HTTPFilter):
            def requestHeaders(self, stream):
                return d

        h = FilterHarness(Hold())
        h.request(b"POST", b"/", body=[b"one", b"two"])
        self.assertIsNone(h.upstream.method)
        self.assertEqual(h.upstream.chunks, [])
        self.assertTrue(h.paused)
        d.callback(None)
        self.assertEqual(h.upstream.method, b"POST")
        self.assertEqual(h.upstream.chunks, [b"one", b"two"])
        self.assertTrue(h.upstream.ended)
        self.assertFalse(h.paused)

    def test_dataPauseWithReplacement(self):
        """
        A data hook's Deferred may fire with replacement bytes.
        """
        d = Deferred()

        class Hold(HTTPFilter):
            def requestData(self, stream, data, end):
                return d if data == b"a" else None

        h = FilterHarness(Hold())
        h.request(b"POST", b"/", body=[b"a", b"b"])
        self.assertEqual(h.upstream.chunks, [])
        d.callback(b"A")
        self.assertEqual(h.upstream.chunks, [b"A", b"b"])

    def test_responsePause(self):
        """
        A response hook's Deferred holds the response (and later chunks) until it fires.
        """
        d = Deferred()

        class Hold(HTTPFilter):
            def responseHeaders(self, stream):
                return d

        h = FilterHarness(Hold())
        h.request()
        h.respond(200, body=[b"x", b"y"])
        self.assertIsNone(h.downstream.status)
        self.assertEqual(h.codec.responsePaused, 1, "the upstream must be paused while a filter holds")
        d.callback(None)
        self.assertEqual(h.codec.responsePaused, 0)
        self.assertEqual((h.downstream.status, h.downstream.body), (200, b"xy"))
        self.assertTrue(h.completed)

    def test_failedDeferredIs500(self):
        """
        A hook's Deferred that fails becomes a 500 local reply, and the stream still completes.
        """
        d = Deferred()

        class Hold(HTTPFilter):
            def requestHeaders(self, stream):
                return d

        h = FilterHarness(Hold())
        h.request()
        d.errback(ValueError("boom"))
        self.assertEqual(h.downstream.status, 500)
        self.assertTrue(h.completed)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class LocalReplyTests(unittest.TestCase):
    """
    C{stream.respond} stops the request and answers from the proxy.
    """

    def test_replyFromFirstFilter(self):
        """
        A local reply stops the request chain; only the filters before the replying one see the response.
        """
        log = []

        class Deny(HTTPFilter):
            def requestHeaders(self, stream):
                return stream.respond(403, b"denied", flag="RBAC", details="rbac_access_denied")

        before = Recorder("before", log)
        after = Recorder("after", log)
        h = FilterHarness(before, Deny(), after)
        h.request(b"POST", b"/", body=[b"secret"])
        self.assertEqual((h.downstream.status, h.downstream.body), (403, b"denied"))
        self.assertIn((b"content-type", b"text/plain"), h.downstream.headers)
        self.assertIsNone(h.upstream.method)
        self.assertNotIn(("after", "requestHeaders"), log)
        self.assertNotIn(("after", "responseHeaders"), log)
        self.assertIn(("before", "responseHeaders"), log)
        self.assertEqual(h.stream.responseFlags, ["RBAC"])
        self.assertEqual(h.stream.responseCodeDetails, "rbac_access_denied")
        self.assertEqual([e for e in log if e[1] == "streamComplete"],
                         [("before", "streamComplete"), ("after", "streamComplete")])

    def test_replyFromDataHook(self):
        """
        A data hook can reply too (a body too large, say).
        """

        class Limit(HTTPFilter):
            def requestData(self, stream, data, end):
                return stream.respond(413, b"too big")

        h = FilterHarness(Limit())
        h.request(b"POST", b"/", body=[b"x" * 10, b"y"])
        self.assertEqual(h.downstream.status, 413)
        self.assertEqual(h.upstream.chunks, [])

    def test_replyAfterResponseStartedResets(self):
        """
        Replying after the response started resets the stream instead of sending a second head.
        """

        class Late(HTTPFilter):
            def responseData(self, stream, data, end):
                return stream.respond(500, b"late")

        h = FilterHarness(Late())
        h.request()
        h.respond(200, body=[b"partial", b"more"])
        self.assertEqual(h.downstream.status, 200)
        self.assertEqual(h.codec.resets, ["local_reply_after_response_started"])
        self.assertTrue(h.completed)

    def test_completeOnce(self):
        """
        streamComplete runs once however many times completion is asked for.
        """
        log = []
        h = FilterHarness(Recorder("a", log))
        h.request()
        h.respond(200)
        h.stream.complete()
        h.stream.reset("again")
        self.assertEqual(log.count(("a", "streamComplete")), 1)

    def test_misbehavingFilter(self):
        """
        A hook returning something outside the contract is a 500, logged.
        """

        class Bad(HTTPFilter):
            def requestHeaders(self, stream):
                return 42

        h = FilterHarness(Bad())
        h.request()
        self.assertEqual(h.downstream.status, 500)
        self.assertEqual(h.stream.responseCodeDetails, "filter_returned_invalid_value")


class BufferBodyTests(unittest.TestCase):
    """
    C{stream.bufferRequestBody} gives a filter the whole body at once.
    """

    def test_wholeBody(self):
        """
        The filter gets the joined body once it is complete; reading goes on meanwhile, and the filters
        after it see the original chunks.
        """
        seen = []

        class Sign(HTTPFilter):
            def requestHeaders(self, stream):
                d = stream.bufferRequestBody(100)
                d.addCallback(seen.append)
                return d

        h = FilterHarness(Sign())
        h.request(b"POST", b"/", body=[b"ab", b"cd", b"ef"], end=False)
        self.assertEqual(seen, [])
        self.assertFalse(h.paused)
        self.assertIsNone(h.upstream.method)
        h.sendData(b"gh", end=True)
        self.assertEqual(seen, [b"abcdefgh"])
        self.assertEqual(h.upstream.chunks, [b"ab", b"cd", b"ef", b"gh"])
        self.assertTrue(h.upstream.ended)

    def test_tooLarge(self):
        """
        A body over the limit is answered 413 and never reaches the upstream.
        """

        class Sign(HTTPFilter):
            def requestHeaders(self, stream):
                return stream.bufferRequestBody(5)

        h = FilterHarness(Sign())
        h.request(b"POST", b"/", body=[b"abc", b"def"], end=False)
        self.assertEqual(h.downstream.status, 413)
        self.assertEqual(h.stream.responseCodeDetails, "request_payload_too_large")
        self.assertIsNone(h.upstream.method)

    def test_noBody(self):
        """
        A request without a body gives an empty body at once.
        """
        seen = []

        class Sign(HTTPFilter):
            def requestHeaders(self, stream):
                return stream.bufferRequestBody(5).addCallback(seen.append)

        h = FilterHarness(Sign())
        h.request(b"GET", b"/")
        self.assertEqual(seen, [b""])
        self.assertEqual(h.upstream.method, b"GET")

    def test_nestedPauseResumesReading(self):
        """
        A second pause inside a resumed chain does not leave reading paused once both are over.
        """
        first, second = Deferred(), Deferred()

        class A(HTTPFilter):
            def requestHeaders(self, stream):
                return first

        class B(HTTPFilter):
            def requestHeaders(self, stream):
                return second

        h = FilterHarness(A(), B())
        h.request(b"GET", b"/")
        first.callback(None)
        self.assertTrue(h.paused)
        second.callback(None)
        self.assertFalse(h.paused)
        self.assertEqual(h.upstream.method, b"GET")
