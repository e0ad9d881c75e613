"""The operator's own Prometheus metrics (``tandem:`` prefix), on a registry each operator instance owns."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram

from tandem.runtime import register_process_collectors


@dataclass
class OperatorMetrics:
    """Reconcile counters and durations; one instance per running operator (never module-global)."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        register_process_collectors(self.registry)
        self.reconciles = Counter("tandem:operator_reconciles", "LLMDeployment reconciles, by trigger and result.",
                                  ["trigger", "result"], registry=self.registry)
        self.errors = Counter("tandem:operator_reconcile_errors", "Failed reconciles, by reason.",
                              ["reason"], registry=self.registry)
        self.duration = Histogram("tandem:operator_reconcile_duration_seconds", "Time spent in one reconcile.",
                                  registry=self.registry,
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.child_actions = Counter("tandem:operator_child_actions", "Children created, updated or deleted.",
                                     ["kind", "action"], registry=self.registry)

    def total(self, name: str, **labels: str) -> float:
        """Sum of every sample called ``name`` whose labels include ``labels``."""
        return sum(sample.value for metric in self.registry.collect() for sample in metric.samples
                   if sample.name == name and labels.items() <= sample.labels.items())

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample (e.g. ``tandem:operator_reconciles_total``), 0 when absent."""
        return self.registry.get_sample_value(name, labels or {}) or 0.0
