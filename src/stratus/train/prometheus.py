"""Prometheus metrics of a training job, served from rank 0 on `log.prometheus_port`
(http://HOST:PORT/metrics), for the operators' dashboards (deploy/grafana/). Its own
registry, so that nothing but training appears there. Gauges move on logged steps and at
timeline events: a scrape never waits on the loop, and the loop never waits on a scrape."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from stratus.errors import StratusError

# metrics.jsonl key -> (gauge name, help)
FROM_METRICS = {
    "loss": ("stratus_train_loss", "training loss of the last logged step"),
    "val_loss": ("stratus_train_val_loss", "validation loss of the last validation"),
    "grad_norm": ("stratus_train_grad_norm", "gradient norm of the last logged step"),
    "lr": ("stratus_train_learning_rate", "learning rate of the last logged step"),
    "tokens_per_s": ("stratus_train_tokens_per_second", "training tokens per second, whole job"),
    "mfu": ("stratus_train_mfu", "model FLOPs utilization, 0 to 1"),
    "ettr": ("stratus_train_ettr", "effective training time ratio since the run first started"),
    "memory_gb": ("stratus_train_memory_gb", "peak memory of the busiest rank, GB"),
    "tokens_seen": ("stratus_train_tokens_seen", "training tokens seen"),
}


def registry_for_training() -> tuple[CollectorRegistry, dict[str, Gauge]]:
    r = CollectorRegistry()
    gauges = {key: Gauge(name, doc, registry=r) for key, (name, doc) in FROM_METRICS.items()}
    for g in gauges.values():
        g.set(float("nan"))  # unknown until a logged step says (MFU stays so on an unknown device)
    gauges["step"] = Gauge("stratus_train_step", "optimizer steps done", registry=r)
    gauges["restarts"] = Gauge("stratus_train_restarts", "restarts of the run so far", registry=r)
    gauges["skipped"] = Gauge(
        "stratus_train_skipped_steps", "updates skipped for a non-finite loss", registry=r
    )
    gauges["rollbacks"] = Gauge("stratus_train_rollbacks", "loss-spike rollbacks in this process", registry=r)
    gauges["checkpoint_time"] = Gauge(
        "stratus_train_last_checkpoint_timestamp_seconds",
        "wall time of the last committed checkpoint",
        registry=r,
    )
    return r, gauges


class PrometheusSink:
    def __init__(self, port: int):
        self.registry, self.gauges = registry_for_training()
        self._last_checkpoint: float | None = None
        age = Gauge(
            "stratus_train_last_checkpoint_age_seconds",
            "seconds since the last committed checkpoint (absent until the first)",
            registry=self.registry,
        )
        age.set_function(
            lambda: time.time() - self._last_checkpoint if self._last_checkpoint else float("nan")
        )
        try:
            self._server, self._thread = start_http_server(port, registry=self.registry)
        except OSError as e:
            raise StratusError(
                f"log.prometheus_port {port}: cannot listen ({e.strerror}); pick a free port"
            ) from None

    def write(self, step: int, numbers: dict[str, float]) -> None:
        self.gauges["step"].set(step)
        for key, value in numbers.items():
            if key in FROM_METRICS:
                self.gauges[key].set(value)
        if "skipped_nonfinite" in numbers:
            self.gauges["skipped"].set(numbers["skipped_nonfinite"])

    def event(self, kind: str, step: int, record: dict) -> None:
        if kind == "start":
            self.gauges["step"].set(step)
            self.gauges["restarts"].set(record["restarts"])
        elif kind == "checkpoint_saved":
            self._last_checkpoint = record["time"]
            self.gauges["checkpoint_time"].set(record["time"])
        elif kind == "rollback":
            self.gauges["rollbacks"].inc()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
