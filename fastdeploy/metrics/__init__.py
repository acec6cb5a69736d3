"""Prometheus metrics with FastDeploy's names, owned by the engine process.

The engine sees every request of every api worker, so counting there makes the numbers add up
however many api workers there are; api workers only proxy `/metrics` to it.
"""
from fastdeploy.metrics.engine_metrics import EngineMetrics

__all__ = ["EngineMetrics"]
