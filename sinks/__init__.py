"""Where results go: ClickHouse (chDB or a server), alert channels, Prometheus metrics.

Sinks own batching, retries and idempotency; processors never see a client.
"""
