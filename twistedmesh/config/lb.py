"""
A cluster's load-balancing options (see docs/load-balancing.md): C{lb_policy}, the panic threshold, the
policy-specific dotted keys and C{hash_policy}.

L{parseLB} reads them from the cluster section's L{Options} into a frozen L{LBConfig}, reporting every bad
value through the section so that the loader collects all errors of the file at once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from .errors import suggest
from .options import Options

#: The policies C{lb_policy} may name, in the order the docs present them.
POLICY_NAMES = ("round_robin", "least_request", "random", "ring_hash", "maglev")
#: The policies that hash a request attribute and so use C{hash_policy}.
HASHING_POLICIES = ("ring_hash", "maglev")
HASH_KINDS = ("header", "cookie", "source_ip")
#: Envoy's cap on a ring: larger rings cost memory and build time for no better spread.
MAX_RING_SIZE = 8 * 1024 * 1024

#: The keys that belong to one policy: writing one with another policy is an error (it would do nothing).
_POLICY_KEYS = {
    "least_request": ("least_request.choice_count", "least_request.active_request_bias"),
    "ring_hash": ("ring_hash.minimum_ring_size", "ring_hash.maximum_ring_size"),
}
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token: header and cookie names


@dataclass(frozen=True)
class HashPolicy:
    """
    What a hashing policy hashes for a request (or connection).

    @ivar kind: C{"header"}, C{"cookie"} or C{"source_ip"}.
    @ivar name: the header name (lowercase, as the codecs give header names) or the cookie name, as
        bytes since it is compared with wire bytes; C{b""} for C{source_ip}.
    """

    kind: str
    name: bytes = b""


@dataclass(frozen=True)
class LBConfig:
    """
    The load-balancing options of a C{[cluster:NAME]} section, with Envoy's defaults.

    @ivar policy: one of L{POLICY_NAMES}.
    @ivar healthy_panic_threshold: a percentage (0 to 100); when fewer of the hosts than this are healthy
        the balancer uses all hosts (panic mode). 0 disables panic mode.
    @ivar choice_count: C{least_request}: how many random hosts are compared (equal weights).
    @ivar active_request_bias: C{least_request}: the exponent of C{rq_active + 1} that divides a host's
        weight (unequal weights).
    @ivar minimum_ring_size: C{ring_hash}: the entries a host of the largest weight gets.
    @ivar maximum_ring_size: C{ring_hash}: the cap on the whole ring's entries.
    @ivar hash_policy: what C{ring_hash} and C{maglev} hash, or C{None}.
    """

    policy: str = "round_robin"
    healthy_panic_threshold: float = 50.0
    choice_count: int = 2
    active_request_bias: float = 1.0
    minimum_ring_size: int = 1024
    maximum_ring_size: int = MAX_RING_SIZE
    hash_policy: Optional[HashPolicy] = None


def parseHashPolicy(text: str) -> HashPolicy:
    """
    C{header:NAME}, C{cookie:NAME} or C{source_ip} as a L{HashPolicy}.

    @raise ValueError: with a message for the user when C{text} is none of these.
    """
    text = text.strip()
    kind, colon, name = text.partition(":")
    kind, name = kind.strip(), name.strip()
    if kind not in HASH_KINDS:
        raise ValueError(
            f"{text!r} is not a hash policy: write header:NAME, cookie:NAME or source_ip{suggest(kind, HASH_KINDS)}"
        )
    if kind == "source_ip":
        if colon:
            raise ValueError(f"source_ip takes no name: write source_ip, not {text!r}")
        return HashPolicy("source_ip")
    if not name:
        raise ValueError(f"{kind} needs a name: write {kind}:NAME")
    if not _TOKEN.match(name):
        raise ValueError(f"{name!r} is not a valid {kind} name (letters, digits and !#$%&'*+.^_`|~-)")
    # Header names arrive lowercase from every codec; cookie names are case-sensitive.
    return HashPolicy(kind, (name.lower() if kind == "header" else name).encode("ascii"))


def _number(o: Options, key: str, default: float, low: float, high: Optional[float], percent: bool = False) -> float:
    """
    A decimal number from C{low} to C{high} (no upper bound for C{None}); with C{percent}, a trailing
    C{%} is allowed. Errors go to C{o} and give C{default}.
    """
    raw = o.string(key, None)
    if raw is None:
        return default
    text = raw[:-1].strip() if percent and raw.endswith("%") else raw
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # float() takes "nan" and "inf": not numbers a user means
        o.error(key, f"{raw!r} is not a number")
        return default
    if value < low or (high is not None and value > high):
        bound = f"from {low:g} to {high:g}" if high is not None else f"at least {low:g}"
        o.error(key, f"{raw} must be {bound}")
        return default
    return value


def parseLB(o: Options) -> LBConfig:
    """
    Read the load-balancing keys of a cluster section.

    Every problem is recorded in C{o} (naming the file, section and key) and the default is used in its
    place, so that checking goes on; the loader raises them all together. Keys of a policy other than the
    one chosen, and C{hash_policy} without a hashing policy (or a hashing policy without it), are errors:
    they would silently do nothing.
    """
    before = len(o.errors)
    policy = o.string("lb_policy", "round_robin", choices=POLICY_NAMES)
    policyValid = len(o.errors) == before  # a misspelled policy must not make its keys errors too

    threshold = _number(o, "healthy_panic_threshold", 50.0, 0.0, 100.0, percent=True)

    extra = {}
    for owner, keys in _POLICY_KEYS.items():
        if owner != policy:
            for key in keys:
                if key in o and policyValid:  # `in` marks the key known either way
                    o.error(key, f"applies only to lb_policy = {owner}, not {policy}")
            continue
        if owner == "least_request":
            extra["choice_count"] = o.integer("least_request.choice_count", 2, minimum=2)
            extra["active_request_bias"] = _number(o, "least_request.active_request_bias", 1.0, 0.0, None)
        else:
            low = o.integer("ring_hash.minimum_ring_size", 1024, minimum=1)
            high = o.integer("ring_hash.maximum_ring_size", MAX_RING_SIZE, minimum=1)
            if high > MAX_RING_SIZE:
                o.error("ring_hash.maximum_ring_size", f"{high} is more than the limit of {MAX_RING_SIZE} (8M)")
                high = MAX_RING_SIZE
            if low > high:
                o.error("ring_hash.minimum_ring_size", f"{low} is more than ring_hash.maximum_ring_size ({high})")
                low = high
            extra["minimum_ring_size"] = low
            extra["maximum_ring_size"] = high

    hashPolicy = None
    rawHash = o.string("hash_policy", None)
    if policy in HASHING_POLICIES:
        if rawHash is None:
            o.error("hash_policy", f"is required with lb_policy = {policy}: write header:NAME, cookie:NAME or source_ip")
        else:
            try:
                hashPolicy = parseHashPolicy(rawHash)
            except ValueError as e:
                o.error("hash_policy", str(e))
    elif rawHash is not None and policyValid:
        o.error("hash_policy", f"applies only to lb_policy = ring_hash or maglev, not {policy}")

    return LBConfig(policy=policy, healthy_panic_threshold=threshold, hash_policy=hashPolicy, **extra)
