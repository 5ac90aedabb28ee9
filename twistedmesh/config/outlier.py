"""
A cluster's outlier detection options (see docs/outlier-detection.md): the C{outlier.*} keys of a
C{[cluster:NAME]} section, named and defaulted as Envoy's C{OutlierDetection} message.

L{parseOutlier} reads them from the cluster section's L{Options} into a frozen L{OutlierConfig}, or returns
C{None} when the section has no C{outlier.*} key (no outlier detection, as in Envoy when the message is
absent). Every bad value is recorded through the section, so that the loader reports all errors of the file
at once, and the default is used in its place so that checking goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .options import Options

#: Envoy's default C{max_ejection_time}: used unless C{base_ejection_time} is longer (then that).
DEFAULT_MAX_EJECTION_TIME = 300.0


@dataclass(frozen=True)
class OutlierConfig:
    """
    The outlier detection options of a cluster, with Envoy's defaults. Durations are in seconds;
    percentages are whole numbers from 0 to 100.

    @ivar consecutive_5xx: consecutive 5xx answers (and, unless split, local-origin failures) that eject a
        host; 0 turns this detection off.
    @ivar consecutive_gateway_failure: consecutive 502, 503 and 504 answers (and, unless split, local-origin
        failures) that eject a host; 0 turns it off.
    @ivar consecutive_local_origin_failure: with C{split_external_local_origin_errors}, consecutive
        connect failures, resets and timeouts that eject a host; 0 turns it off.
    @ivar split_external_local_origin_errors: count failures the proxy saw itself (connect failure, reset,
        timeout) apart from the upstream's own 5xx answers.
    @ivar interval: seconds between sweeps (returning hosts to service, success-rate detection).
    @ivar base_ejection_time: a host's first ejection lasts this long; each ejection in a row one more of it.
    @ivar max_ejection_time: the longest an ejection lasts (jitter aside); at least C{base_ejection_time}.
    @ivar max_ejection_percent: the largest share of the cluster's hosts that may be ejected at once.
    @ivar enforcing_consecutive_5xx: the chance, in percent, that a consecutive 5xx detection ejects.
    @ivar enforcing_consecutive_gateway_failure: likewise for consecutive gateway failures (0 by default:
        detected and counted, not enforced).
    @ivar enforcing_consecutive_local_origin_failure: likewise for consecutive local-origin failures.
    @ivar enforcing_success_rate: likewise for success-rate detection.
    @ivar success_rate_minimum_hosts: success-rate detection runs only when at least this many hosts had
        C{success_rate_request_volume} requests in the last interval.
    @ivar success_rate_request_volume: the requests a host needs in an interval to count in success-rate
        detection.
    @ivar success_rate_stdev_factor: thousandths: a host is an outlier when its success rate is below the
        mean minus C{success_rate_stdev_factor / 1000} standard deviations (1900: 1.9).
    @ivar max_ejection_time_jitter: seconds; a random amount from 0 to this (whole milliseconds) is added to
        each ejection, so that hosts ejected together do not all return at once.
    @ivar successful_active_health_check_uneject_host: an active health check that passes returns an ejected
        host to service at once.
    @ivar always_eject_one_host: allow one ejection even when it exceeds C{max_ejection_percent} (with the
        default 10%, a cluster of fewer than 10 hosts could otherwise never eject).
    """

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    consecutive_local_origin_failure: int = 5
    split_external_local_origin_errors: bool = False
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = DEFAULT_MAX_EJECTION_TIME
    max_ejection_percent: int = 10
    enforcing_consecutive_5xx: int = 100
    enforcing_consecutive_gateway_failure: int = 0
    enforcing_consecutive_local_origin_failure: int = 100
    enforcing_success_rate: int = 100
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: int = 1900
    max_ejection_time_jitter: float = 0.0
    successful_active_health_check_uneject_host: bool = True
    always_eject_one_host: bool = False


def parseOutlier(o: Options) -> Optional[OutlierConfig]:
    """
    Read the C{outlier.*} keys of a cluster section.

    @return: C{None} when the section has no C{outlier.*} key at all; otherwise an L{OutlierConfig}, with
        defaults in place of bad values (every problem is recorded in C{o}). Unknown C{outlier.*} keys are
        left for L{Options.finish} to report, with a suggestion.
    """
    if not any(key.startswith("outlier.") for key in o.keys()):
        return None
    d = OutlierConfig()
    base = o.positiveDuration("outlier.base_ejection_time", d.base_ejection_time)
    # Envoy: an unwritten max_ejection_time is the default or base_ejection_time, whichever is longer; a
    # written one shorter than base_ejection_time is an error.
    maxTime = o.positiveDuration("outlier.max_ejection_time", max(DEFAULT_MAX_EJECTION_TIME, base))
    if maxTime < base:
        o.error("outlier.max_ejection_time",
                f"cannot be shorter than outlier.base_ejection_time ({base:g}s)")
        maxTime = base
    return OutlierConfig(
        consecutive_5xx=o.integer("outlier.consecutive_5xx", d.consecutive_5xx),
        consecutive_gateway_failure=o.integer("outlier.consecutive_gateway_failure",
                                              d.consecutive_gateway_failure),
        consecutive_local_origin_failure=o.integer("outlier.consecutive_local_origin_failure",
                                                   d.consecutive_local_origin_failure),
        split_external_local_origin_errors=o.boolean("outlier.split_external_local_origin_errors",
                                                     d.split_external_local_origin_errors),
        interval=o.positiveDuration("outlier.interval", d.interval),
        base_ejection_time=base,
        max_ejection_time=maxTime,
        max_ejection_percent=o.percentage("outlier.max_ejection_percent", d.max_ejection_percent, whole=True),
        enforcing_consecutive_5xx=o.percentage("outlier.enforcing_consecutive_5xx", d.enforcing_consecutive_5xx, whole=True),
        enforcing_consecutive_gateway_failure=o.percentage("outlier.enforcing_consecutive_gateway_failure", d.enforcing_consecutive_gateway_failure, whole=True),
        enforcing_consecutive_local_origin_failure=o.percentage("outlier.enforcing_consecutive_local_origin_failure", d.enforcing_consecutive_local_origin_failure, whole=True),
        enforcing_success_rate=o.percentage("outlier.enforcing_success_rate", d.enforcing_success_rate, whole=True),
        success_rate_minimum_hosts=o.integer("outlier.success_rate_minimum_hosts", d.success_rate_minimum_hosts),
        success_rate_request_volume=o.integer("outlier.success_rate_request_volume",
                                              d.success_rate_request_volume),
        success_rate_stdev_factor=o.integer("outlier.success_rate_stdev_factor", d.success_rate_stdev_factor),
        max_ejection_time_jitter=o.duration("outlier.max_ejection_time_jitter", d.max_ejection_time_jitter),
        successful_active_health_check_uneject_host=o.boolean(
            "outlier.successful_active_health_check_uneject_host", d.successful_active_health_check_uneject_host),
        always_eject_one_host=o.boolean("outlier.always_eject_one_host", d.always_eject_one_host),
    )


__all__ = ["OutlierConfig", "parseOutlier", "DEFAULT_MAX_EJECTION_TIME"]
