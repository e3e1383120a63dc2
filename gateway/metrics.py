"""Prometheus metrics (`GET /metrics`): batches by status, requests done/failed per model, tokens,
queue depth, engines kept warm or asleep, a cluster's nodes. Each app owns its registry, so several apps
(tests) never clash."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.lifecycle import STATUSES
from runtime.executor_api import Outcome


class _LiveCollector(Collector):
    """Values read at scrape time: they live in SQLite and in the running batches."""

    def __init__(self, by_status: Callable[[], dict[str, int]], depth: Callable[[], int],
                 idle: Callable[[], int]) -> None:
        self._by_status, self._depth, self._idle = by_status, depth, idle

    def collect(self) -> Iterator[Any]:
        g = GaugeMetricFamily("samullm_batches", "Batches by status", labels=["status"])
        counts = self._by_status()
        for st in STATUSES:
            g.add_metric([st], counts.get(st, 0))
        yield g
        yield GaugeMetricFamily("samullm_queue_depth",
                                "Requests submitted to the executor and not finished",
                                value=self._depth())
        yield GaugeMetricFamily("samullm_idle_engines",
                                "Engines kept warm for the next batch of their model",
                                value=self._idle())


class _Gauge(Collector):
    """One value read at scrape time."""

    def __init__(self, name: str, doc: str, read: Callable[[], int]) -> None:
        self._name, self._doc, self._read = name, doc, read

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily(self._name, self._doc, value=self._read())


class _NodesCollector(Collector):
    """A cluster's nodes (`[cluster] backend = "ray"`): devices per node, read at scrape time."""

    def __init__(self, read: Callable[[], list[dict[str, Any]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Any]:
        nodes = self._read()
        if not nodes:
            return
        g = GaugeMetricFamily("samullm_node_devices", "Devices (cores or GPUs) of each cluster "
                              "node the planner uses (0: a node of another device kind)",
                              labels=["node", "address", "kind"])
        for n in nodes:
            g.add_metric([n["node"], n["address"], n["device_kind"]], len(n["devices"]))
        yield g
        yield GaugeMetricFamily("samullm_cluster_nodes", "Alive nodes of the cluster",
                                value=len(nodes))


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("samullm_requests", "Finished requests", ["model", "result"],
                                registry=self.registry)
        self.tokens = Counter("samullm_tokens", "Tokens processed", ["model", "kind"],
                              registry=self.registry)
        self.finished = Counter("samullm_batches_finished", "Batches that reached a final status",
                                ["status"], registry=self.registry)
        self.webhooks = Counter(
            "samullm_webhook_deliveries", "Webhook delivery attempts by result: delivered (a 2xx "
            "answer), failed (an attempt to retry or give up), gave_up (an event no longer retried)",
            ["result"], registry=self.registry)
        for result in ("delivered", "failed", "gave_up"):
            self.webhooks.labels(result)  # scraped as 0 before the first
        self.preempted = Counter(
            "samullm_requests_preempted", "Running requests aborted and re-queued so that a small "
            "batch's ran at once (their tokens so far are lost; `runtime/executor/seats.py`)",
            ["model"], registry=self.registry)

    def bind(self, by_status: Callable[[], dict[str, int]], depth: Callable[[], int],
             idle: Callable[[], int] = lambda: 0) -> None:
        self.registry.register(_LiveCollector(by_status, depth, idle))

    def bind_nodes(self, read: Callable[[], list[dict[str, Any]]]) -> None:
        self.registry.register(_NodesCollector(read))

    def bind_sleeping(self, read: Callable[[], int]) -> None:
        self.registry.register(_Gauge(
            "samullm_sleeping_engines", "CPU engines asleep (frozen, their memory kept) or awake "
            "as guests for small batches", read))

    def bind_webhooks(self, pending: Callable[[], int]) -> None:
        self.registry.register(_Gauge("samullm_webhook_pending",
                                      "Webhook events not yet delivered nor given up", pending))

    def observe_outcome(self, o: Outcome) -> None:
        self.requests.labels(o.model, "completed" if o.ok else "failed").inc()
        usage = (o.response_body or {}).get("usage") or {}
        self.tokens.labels(o.model, "input").inc(int(usage.get("prompt_tokens") or 0))
        self.tokens.labels(o.model, "output").inc(int(usage.get("completion_tokens") or 0))

    def observe_event(self, _batch_ids: Any, event: Mapping[str, Any]) -> None:
        """An executor event sink (`PoolExecutor.listen`): counts what the events count."""
        if event.get("event") == "requests_preempted":
            self.preempted.labels(str(event.get("model"))).inc(int(event.get("requeued", 0)))

    def observe_final(self, status: str, _counts: Any) -> None:
        self.finished.labels(status).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
