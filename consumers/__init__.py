"""Wiring of the ingest library for the two streams (webhook, audit), the CLI and settings from the environment."""
