"""Pure stream logic: validate → enrich → window → sample, one small named step per module.

Nothing here does I/O or imports Kafka or ClickHouse clients: every step takes a batch and
returns a batch (plus whatever it set aside, e.g. dead letters), so the embedded runtime and
the Kafka worker run the very same code and tests need no servers.
"""
