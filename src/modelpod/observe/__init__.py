"""Observability: tracing (OpenTelemetry, the ``otel`` extra), payload logging, drift, and the
Grafana dashboard and Prometheus rules over modelpod's metric contract (docs/observe.md)."""
