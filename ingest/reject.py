"""Rejection reasons: every record that cannot be stored ends up in ``dead_letters`` with one of these."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Machine-readable dead-letter reasons (stable: dashboards and alerts key on them)."""

    TOMBSTONE = "tombstone"
    TOO_LARGE = "too_large"
    NOT_JSON = "not_json"
    INVALID_UTF8 = "invalid_utf8"
    NOT_OBJECT = "not_object"
    DUPLICATE_KEY = "duplicate_key"
    UNREPRESENTABLE_NUMBER = "unrepresentable_number"
    TOO_DEEP = "too_deep"
    NUL_CHARACTER = "nul_character"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    INVALID_TENANT_ID = "invalid_tenant_id"
    INVALID_IDEMPOTENCY_KEY = "invalid_idempotency_key"
    INVALID_FIELD = "invalid_field"
    INVALID_TIMESTAMP = "invalid_timestamp"
    TIMESTAMP_TOO_OLD = "timestamp_too_old"
    TIMESTAMP_IN_FUTURE = "timestamp_in_future"
    QUOTA_EXCEEDED = "quota_exceeded"
    DB_REJECTED = "db_rejected"


class Rejected(Exception):
    """Raised by a stage for one record that must be dead-lettered; ``detail`` is for humans."""

    __slots__ = ("detail", "reason")

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
