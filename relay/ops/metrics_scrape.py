"""Metric families computed when /metrics is scraped, in the process that serves it.

Spool depth and oldest age per state (a directory scan of the spool), the feedback and
reputation numbers (named by feedback_families, a pure table), and the process_* metrics:
of this process alone, or summed over every live worker when the workers share a
multiprocess directory (PROMETHEUS_MULTIPROC_DIR, set by relay.ops.workers). Used by
relay.ops.metrics.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from relay.spool.queue import STATES, arrival
from relay.spool.spool import Spool

#: outcomes of an SQS feedback message (relay.feedback.sqs counts), each always exposed
FEEDBACK_OUTCOMES = ("applied", "duplicate", "ignored", "unparseable", "rejected", "too_old",
                     "errors")
#: feedback event kinds applied (relay.feedback.parse), each always exposed
FEEDBACK_KINDS = ("bounce", "soft-bounce", "complaint", "delivery", "delay", "reject",
                  "rendering-failure", "send")
_PID_FILE = re.compile(r"_(\d+)\.db$")


def feedback_families(stats: Mapping[str, float]) -> list[Metric]:
    """The feedback ingester's and reputation guard's numbers, one meaning per metric.

    stats holds `feedback_<outcome>` (messages taken from SQS, by outcome), `sns_rejected`,
    `bounce_rate`, `complaint_rate`, `reputation_sample`, `reputation_paused` and
    `ses_paused`; a number that is missing (no SQS ingester, no SNS endpoint) is exposed as 0."""
    messages = CounterMetricFamily("relay_feedback_messages",
                                   "SES feedback messages taken from SQS, by outcome",
                                   labels=["outcome"])
    for outcome in FEEDBACK_OUTCOMES:
        messages.add_metric([outcome], stats.get(f"feedback_{outcome}", 0.0))
    kinds = CounterMetricFamily("relay_feedback_events_applied",
                                "SES feedback events applied (new, one per recipient), by kind",
                                labels=["kind"])
    for kind in FEEDBACK_KINDS:
        kinds.add_metric([kind], stats.get(f"feedback_kind_{kind}", 0.0))
    lag = GaugeMetricFamily("relay_feedback_lag_seconds",
                            "Seconds from SES's event timestamp to applied, over the latest "
                            "events applied from SQS", labels=["quantile"])
    for q, key in (("0.5", "feedback_lag_p50"), ("0.99", "feedback_lag_p99")):
        lag.add_metric([q], stats.get(key, 0.0))
    families: list[Metric] = [messages, kinds, lag, GaugeMetricFamily(
        "relay_feedback_backlog_messages",
        "Messages waiting in the SQS feedback queue (ApproximateNumberOfMessages; -1 unknown)",
        value=stats.get("feedback_backlog", 0.0)), CounterMetricFamily(
        "relay_sns_notifications_rejected",
        "SNS messages refused (signature, topic or subscription URL not accepted)",
        value=stats.get("sns_rejected", 0.0)), CounterMetricFamily(
        "relay_sns_notifications_unparseable",
        "SNS POST bodies refused with 400 (not JSON, nested too deep, not SES)",
        value=stats.get("sns_unparseable", 0.0))]
    for name, key, text in (
            ("relay_reputation_bounce_ratio", "bounce_rate",
             "Bounces per judged send over the reputation window (0-1)"),
            ("relay_reputation_complaint_ratio", "complaint_rate",
             "Complaints per judged send over the reputation window (0-1)"),
            ("relay_reputation_sample_sends", "reputation_sample",
             "Sends whose outcome had time to arrive, counted in the ratios"),
            ("relay_reputation_paused", "reputation_paused",
             "1 while the reputation guard holds delivery paused"),
            ("relay_ses_paused", "ses_paused",
             "1 while SES holds delivery paused (sending disabled or paused for the account)")):
        families.append(GaugeMetricFamily(name, text, value=stats.get(key, 0.0)))
    return families + lane_families(stats)


#: the reputation guard's per-scope numbers: stats key suffix -> (metric, help)
LANE_GAUGES = {
    "bounce_rate": ("relay_lane_bounce_ratio",
                    "Permanent bounces per judged send, as the reputation guard counts them "
                    "(lane=account: every lane)"),
    "complaint_rate": ("relay_lane_complaint_ratio",
                       "Complaints per judged send that did not bounce (a lower bound "
                       "while complaints trail)"),
    "judged": ("relay_lane_judged_sends",
               "Sends counted in the rates: an outcome arrived, or feedback.bounce_settle "
               "passed"),
    "unknown": ("relay_lane_unjudged_sends", "Sends SES accepted whose outcome is not known yet"),
    "bounce_line": ("relay_lane_bounce_line_ratio", "The bounce rate the lane may not exceed"),
    "complaint_line": ("relay_lane_complaint_line_ratio",
                       "The complaint rate the lane may not exceed"),
    "paused": ("relay_lane_paused", "1 while the reputation guard holds the lane paused"),
}


def lane_families(stats: Mapping[str, float]) -> list[Metric]:
    """The guard's `lane/<lane>/<number>` stats as gauges with a `lane` label."""
    families = {suffix: GaugeMetricFamily(name, text, labels=["lane"])
                for suffix, (name, text) in LANE_GAUGES.items()}
    for key, value in sorted(stats.items()):
        kind, _, rest = key.partition("/")
        lane, _, suffix = rest.rpartition("/")
        if kind == "lane" and suffix in families:
            families[suffix].add_metric([lane], value)
    return list(families.values())


class SpoolCollector(Collector):
    """Depth and oldest age per state, from a directory scan (no file is read)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("relay_spool_messages", "Messages in the spool",
                                  labels=["state"])
        oldest = GaugeMetricFamily("relay_spool_oldest_age_seconds",
                                   "Age of the oldest message per state", labels=["state"])
        now = time.time()
        for state in STATES:
            n, first = 0, None
            try:
                for qid in self.spool.scan(state):
                    n += 1
                    if first is None or qid < first:
                        first = qid
            except FileNotFoundError:
                pass
            born = arrival(first) if first else None
            depth.add_metric([state.value], n)
            oldest.add_metric([state.value], max(0.0, now - born) if born else 0.0)
        yield depth
        yield oldest


def worker_pids(directory: Path) -> list[int]:
    """The processes that wrote metrics into the multiprocess directory and still run."""
    pids = set()
    for path in directory.iterdir():
        found = _PID_FILE.search(path.name)
        if found:
            pids.add(int(found.group(1)))
    return sorted(pid for pid in pids if Path(f"/proc/{pid}").exists())


def merge_processes(per_process: Iterable[Iterable[Metric]]) -> list[Metric]:
    """process_* of several processes as one: the sum of CPU, memory and open files, the
    earliest start time, the highest file limit."""
    merged: dict[str, Metric] = {}
    for families in per_process:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                merged[family.name] = family
                continue
            for i, (mine, theirs) in enumerate(zip(into.samples, family.samples, strict=False)):
                if family.name == "process_start_time_seconds":
                    value = min(mine.value, theirs.value)
                elif family.name == "process_max_fds":
                    value = max(mine.value, theirs.value)
                else:
                    value = mine.value + theirs.value
                into.samples[i] = mine._replace(value=value)
    return list(merged.values())


class WorkersProcessCollector(Collector):
    """process_* summed over the live worker processes of a multiprocess directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def collect(self) -> Iterable[Metric]:
        pids = worker_pids(self.directory) or [os.getpid()]
        return merge_processes(
            ProcessCollector(pid=lambda p=pid: p, registry=None).collect()  # type: ignore[misc]
            for pid in pids)


__all__ = ["FEEDBACK_OUTCOMES", "SpoolCollector", "WorkersProcessCollector",
           "feedback_families", "lane_families", "merge_processes", "worker_pids"]
