"""Published contracts: JSON Schema for producers (``*.v1.json``) and SQL migrations (``sql/``)."""
