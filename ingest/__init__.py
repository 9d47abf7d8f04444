"""How events get in: producer SDK, Kafka source, HTTP and OTLP receivers, file replay, synthetic traffic.

Importing ``ingest`` must stay cheap and need only the base install (pydantic, orjson,
aiokafka): services import the SDK from here.
"""
