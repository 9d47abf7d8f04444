"""Event models, price tables, configuration models and ClickHouse DDL.

This package stays importable with the light base install (pydantic only) so that
services publishing events never pull in the pipeline's dependencies; modules that
need more (``schemas.config``, ``schemas.wire``) import them themselves.
"""
