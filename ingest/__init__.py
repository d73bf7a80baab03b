"""ingest: Kafka -> validated, deduplicated, quota-checked rows in partitioned Postgres, effectively-once.

The library knows no topic or table names and reads no environment; ``consumers`` wires it per stream.
"""

__version__ = "0.1.0"
