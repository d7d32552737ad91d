"""Prometheus metrics of the node (served by the console at ``GET /metrics``).

Counters and histograms are counted where things happen (receiver, association policy,
completion sweep, worker pool, dispatcher) in this module's own registry; gauges of what the
store holds (jobs by state and backend, queue depth, spool bytes) are read from the store at each
scrape by :class:`StoreCollector`.  Names follow Prometheus conventions: base units (seconds,
bytes), ``_total`` counters, no UIDs or patient data in labels.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "REGISTRY",
    "INSTANCES_RECEIVED",
    "BYTES_RECEIVED",
    "ASSOCIATIONS",
    "SERIES_COMPLETED",
    "JOB_DURATION",
    "STAGE_DURATION",
    "JOBS_FINISHED",
    "DISPATCH_ATTEMPTS",
    "observe_stage_timings",
    "StoreCollector",
]

#: the node's counters and histograms (one per process; the console adds a StoreCollector at scrape)
REGISTRY = CollectorRegistry(auto_describe=True)

INSTANCES_RECEIVED = Counter(
    "dicomnode_received_instances", "C-STORE requests received, by outcome (stored, duplicates, conflicts, refused, "
    "index_errors)", ["outcome"], registry=REGISTRY)
BYTES_RECEIVED = Counter("dicomnode_received_bytes", "Bytes of data sets received by C-STORE", registry=REGISTRY)
ASSOCIATIONS = Counter(
    "dicomnode_associations", "Association requests by outcome (accepted, rejected) and reason of a rejection "
    "(called_ae, calling_ae, limit, out_of_resources)", ["outcome", "reason"], registry=REGISTRY)
SERIES_COMPLETED = Counter("dicomnode_series_completed", "Series completed by the quiet-period sweep", registry=REGISTRY)
_DURATION_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
JOB_DURATION = Histogram(
    "dicomnode_job_duration_seconds", "Wall time of one job try, by backend and outcome (done, failed, timeout, died, lost: by a Dask cluster)",
    ["backend", "outcome"], buckets=_DURATION_BUCKETS, registry=REGISTRY)
STAGE_DURATION = Histogram(
    "dicomnode_job_stage_duration_seconds", "Time of one pipeline stage of a successful try (the report's timings_s)",
    ["stage"], buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800), registry=REGISTRY)
JOBS_FINISHED = Counter("dicomnode_job_tries", "Job tries finished, by backend and outcome", ["backend", "outcome"],
                        registry=REGISTRY)
DISPATCH_ATTEMPTS = Counter(
    "dicomnode_dispatch_attempts", "Dispatch attempts by outcome (sent, retry, failed), destination and kind",
    ["outcome", "destination", "kind"], registry=REGISTRY)


def observe_stage_timings(timings_s: Mapping[str, Any]) -> None:
    """Observe each numeric stage time of a report's ``timings_s`` (not ``total``: that is the job's)."""
    for stage, value in timings_s.items():
        if stage != "total" and isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            STAGE_DURATION.labels(stage=str(stage)).observe(float(value))


class StoreCollector(Collector):
    """Gauges read from the store at scrape time (:meth:`node.store.Store.gauges`): jobs by state and
    backend, queued jobs per slot kind, dispatches by state and destination; spool bytes from
    ``spool_bytes()`` (the console caches it: it reads every instance row)."""

    def __init__(self, store: Any, spool_bytes: Callable[[], int]) -> None:  # node.store.Store
        self.store = store
        self.spool_bytes = spool_bytes

    def collect(self) -> Iterable[Metric]:
        g = self.store.gauges()
        jobs = GaugeMetricFamily("dicomnode_jobs", "Jobs in the store by state and backend", labels=["state", "backend"])
        for state, backend, n in g["jobs"]:
            jobs.add_metric([state, backend], float(n))
        yield jobs
        queue = GaugeMetricFamily("dicomnode_queue_depth", "Queued jobs by the slot kind that runs them (cpu, gpu)",
                                  labels=["resource"])
        for resource, n in g["queued"]:
            queue.add_metric([resource], float(n))
        yield queue
        disp = GaugeMetricFamily("dicomnode_dispatches", "Dispatches in the store by state and destination",
                                 labels=["state", "destination"])
        for state, dest, n in g["dispatches"]:
            disp.add_metric([state, dest], float(n))
        yield disp
        yield GaugeMetricFamily("dicomnode_spool_bytes", "Bytes of the received instances still in the spool",
                                value=float(self.spool_bytes()))
