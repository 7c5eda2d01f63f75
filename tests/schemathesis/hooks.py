"""Schemathesis hooks for tests/openapi.rs.

- A check that a refused request wrote nothing: before each call the whole SQLite database is
  digested (every row of every table); after a call answered with 4xx or 5xx the digest must be
  the same. The run's counts go to the file named by TOLLGATE_FUZZ_STATS, so the Rust test can
  tell the check really ran.
- Stripe's half of the webhook: two bodies in three are signed with the webhook secret as Stripe
  signs them, so the event parser behind the signature check is fuzzed too.
- The customer's license is never rotated (its key is the customer endpoints' credential).
"""

import hashlib
import hmac
import json
import os
import sqlite3
import time

import schemathesis

DB = os.environ["TOLLGATE_FUZZ_DB"]
STATS = os.environ["TOLLGATE_FUZZ_STATS"]
WEBHOOK_SECRET = os.environ["TOLLGATE_FUZZ_WEBHOOK_SECRET"]
CUSTOMER_ID = int(os.environ["TOLLGATE_FUZZ_CUSTOMER_ID"])

_before = {}
_stats = {"calls": 0, "refused": 0, "compared": 0, "succeeded": 0, "statuses": {}}


def digest():
    """Every row of every table, sorted, hashed (the database is opened read-only)."""
    con = sqlite3.connect(f"file:{DB}?mode=ro", uri=True, timeout=10)
    try:
        h = hashlib.sha256()
        tables = [
            r[0]
            for r in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        for t in tables:
            h.update(t.encode())
            for row in sorted(repr(r) for r in con.execute(f'SELECT * FROM "{t}"')):
                h.update(row.encode())
        return h.hexdigest()
    finally:
        con.close()


def _save():
    with open(STATS, "w") as f:
        json.dump(_stats, f)


def sign_webhook(case):
    """Signs the body as Stripe would (`t=<unix>,v1=<hmac>`). The body stays as generated (so
    the checks judge it as generated): it is sent as `json.dumps` writes it, which is what is
    signed.

    Only cases generated to be valid are signed: a case made invalid on purpose (a wrong
    header, a malformed body) must reach the gateway as it was made.
    """
    meta = case.meta
    if meta is not None and (
        meta.generation.mode.is_negative
        or any(c.mode.is_negative for c in meta.components.values())
    ):
        return
    if isinstance(case.body, bytes):
        raw = case.body
    elif case.body is None or isinstance(case.body, (dict, list, str, int, float, bool)):
        raw = json.dumps(case.body).encode()
    else:
        return  # no body at all

    if hashlib.sha256(raw).digest()[0] % 3 == 0:
        return
    t = int(time.time())
    mac = hmac.new(WEBHOOK_SECRET.encode(), f"{t}.".encode() + raw, hashlib.sha256)
    case.headers = dict(case.headers or {})
    case.headers["Stripe-Signature"] = f"t={t},v1={mac.hexdigest()}"
    _stats["signed"] = _stats.get("signed", 0) + 1


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if case.path == "/payments/webhook" and case.method.upper() == "POST":
        sign_webhook(case)
    ids = case.path_parameters or {}
    if case.path.endswith("/rotate") and ids.get("id") == CUSTOMER_ID:
        ids["id"] = CUSTOMER_ID + 1
    _before[id(case)] = digest()


@schemathesis.check
def nothing_written_when_refused(ctx, response, case):
    _stats["calls"] += 1
    key = f"{case.method.upper()} {case.path} {response.status_code}"
    _stats["statuses"][key] = _stats["statuses"].get(key, 0) + 1
    before = _before.pop(id(case), None)
    if response.status_code < 400:
        _stats["succeeded"] += 1
        _save()
        return None
    _stats["refused"] += 1
    if before is not None:
        _stats["compared"] += 1
        after = digest()
        _save()
        if after != before:
            raise AssertionError(
                f"{case.method.upper()} {case.path} was refused with "
                f"{response.status_code} and still changed the database"
            )
    _save()
    return None
