"""Prometheus text exposition (format 0.0.4) of the Cloud's counters, gauges and histograms.

A deliberately small registry: metrics are created once, labels are fixed per metric, and
``render()`` writes every sample in a stable order.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import TypeVar

__all__ = ["CloudMetrics", "Counter", "Gauge", "Histogram", "Registry"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.label_names = tuple(labels)

    def _key(self, labels: Sequence[str]) -> tuple[str, ...]:
        if len(labels) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {labels}")
        return tuple(labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1) -> None:
        """Add ``amount`` (>= 0) to the series named by ``labels``."""
        if amount < 0:
            raise ValueError("a counter cannot decrease")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0) + amount

    def value(self, *labels: str) -> float:
        """Return the current value of one series (0 if never incremented)."""
        return self._values.get(self._key(labels), 0)

    def samples(self) -> list[str]:
        return [
            f"{self.name}{_labels(self.label_names, k)} {_number(v)}"
            for k, v in sorted(self._values.items())
        ]


class Gauge(_Metric):
    """A value that goes up and down (one series, no labels)."""

    kind = "gauge"

    def __init__(self, name: str, help: str) -> None:
        super().__init__(name, help)
        self.value = 0.0

    def set(self, value: float) -> None:
        """Set the value."""
        self.value = value

    def add(self, amount: float) -> None:
        """Add ``amount`` (negative to decrease)."""
        self.value += amount

    def samples(self) -> list[str]:
        return [f"{self.name} {_number(self.value)}"]


class Histogram(_Metric):
    """Observations counted in cumulative ``le`` buckets, with ``_sum`` and ``_count``."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, value: float, *labels: str) -> None:
        """Record one observation in the series named by ``labels``."""
        key = self._key(labels)
        counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        total[0] += value

    def count(self, *labels: str) -> int:
        """Return the number of observations of one series."""
        series = self._series.get(self._key(labels))
        return sum(series[0]) if series else 0

    def samples(self) -> list[str]:
        out = []
        for key, (counts, total) in sorted(self._series.items()):
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                running += n
                le = f'le="{_number(bound)}"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {running}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(total[0])}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {running}")
        return out


_M = TypeVar("_M", bound=_Metric)


class Registry:
    """An ordered set of metrics rendered together."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def register(self, metric: _M) -> _M:
        """Add ``metric``; return it."""
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        """Return the text exposition of every metric (ends with a newline)."""
        lines: list[str] = []
        for metric in self._metrics:
            lines += metric.header()
            lines += metric.samples()
        return "\n".join(lines) + "\n"


class CloudMetrics:
    """The Cloud's metrics (names prefixed ``resultity_cloud_``)."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        p = "resultity_cloud_"
        self.requests = r.register(
            Counter(p + "requests_total", "HTTP requests by route and status.", ("route", "status"))
        )
        self.prompt_tokens = r.register(
            Counter(p + "prompt_tokens_total", "Prompt tokens of finished jobs.", ("model",))
        )
        self.completion_tokens = r.register(
            Counter(p + "completion_tokens_total", "Tokens generated for clients.", ("model",))
        )
        self.ttft = r.register(
            Histogram(p + "time_to_first_token_seconds", "Time to first token.", ("route",))
        )
        self.duration = r.register(
            Histogram(p + "request_duration_seconds", "Time to the last byte.", ("route",))
        )
        self.in_flight = r.register(Gauge(p + "in_flight_requests", "Requests being served."))
        self.jobs_in_flight = r.register(Gauge(p + "jobs_in_flight", "Jobs submitted, not ended."))
        self.queue_depth = r.register(Gauge(p + "queue_depth", "Jobs queued in the network."))
        self.nodes_live = r.register(Gauge(p + "nodes_live", "Live nodes in the network."))
        self.nodes_ready = r.register(Gauge(p + "nodes_ready", "Nodes able to serve now."))
        self.cancelled = r.register(
            Counter(p + "jobs_cancelled_total", "Jobs cancelled after a client disconnect.")
        )

    def render(self) -> str:
        """Return the exposition text."""
        return self.registry.render()
