"""Prometheus metrics of the gateway, in their own registry (one per app, so tests can build
several apps in one process). Names follow Prometheus conventions (seconds, _total)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Buckets: 1 ms .. 10 min. Queue waits and cold starts span seconds to minutes; TTFT and
# latency of warm requests sit in milliseconds.
_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

# 50 us .. 1 s: a control-loop round is pure bookkeeping, milliseconds at most
_TICK_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip

CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sllm_requests", "Invocations by function, API and status code",
            ["function", "api", "status"], registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "sllm_queue_wait_seconds", "Time a request waited for a ready instance",
            ["function"], buckets=_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "sllm_time_to_first_token_seconds",
            "Request arrival to the first byte of the instance's answer",
            ["function"], buckets=_BUCKETS, registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "sllm_request_duration_seconds", "Request arrival to the last byte sent",
            ["function"], buckets=_BUCKETS, registry=r,
        )  # fmt: skip
        self.cold_starts = Counter(
            "sllm_cold_starts", "Instances that became ready, by the tier their checkpoint came from",
            ["function", "tier"], registry=r,
        )  # fmt: skip
        self.cold_start_seconds = Histogram(
            "sllm_cold_start_seconds", "Load command to ready, by source tier",
            ["function", "tier"], buckets=_BUCKETS, registry=r,
        )  # fmt: skip
        self.cache_hits = Counter(
            "sllm_cache_hits", "Loads served from a node cache tier (dram, ssd); store = miss",
            ["tier"], registry=r,
        )  # fmt: skip
        self.wakes = Counter(
            "sllm_wakes", "Scale-from-zero decisions (one per burst)", ["function"], registry=r
        )
        self.instances = Gauge(
            "sllm_instances", "Instances per function and state", ["function", "state"], registry=r
        )
        self.queued = Gauge(
            "sllm_queued_requests", "Requests waiting in the cold-start queue", ["function"],
            registry=r,
        )  # fmt: skip
        self.placements = Counter(
            "sllm_placements", "Placement decisions by policy, outcome and source tier",
            ["policy", "outcome", "tier"], registry=r,
        )  # fmt: skip
        self.retries = Counter(
            "sllm_request_retries", "Requests retried on another instance before any byte",
            ["function"], registry=r,
        )  # fmt: skip
        self.nodes = Gauge("sllm_nodes", "Nodes with a recent heartbeat", registry=r)
        self.deciding = Gauge(
            "sllm_gateway_deciding", "1 while this gateway holds the lease and decides",
            registry=r,
        )  # fmt: skip
        self.tick_seconds = Histogram(
            "sllm_control_tick_seconds",
            "One control-loop round at the deciding gateway: gather, decide and place for every "
            "function (commands are sent in the background)",
            buckets=_TICK_BUCKETS, registry=r,
        )  # fmt: skip
        self.cache_bytes = Gauge(
            "sllm_node_cache_bytes", "Bytes cached per node and tier (from heartbeats)",
            ["node", "tier"], registry=r,
        )  # fmt: skip

    def forget_function(self, name: str) -> None:
        """Drop the gauges of a deleted function (counters keep their history)."""
        for state in ("starting", "ready", "draining", "unreachable"):
            with contextlib.suppress(KeyError):
                self.instances.remove(name, state)
        with contextlib.suppress(KeyError):
            self.queued.remove(name)

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data
