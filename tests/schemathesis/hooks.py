"""Schemathesis hooks for tests/openapi.rs.

- A refused request writes nothing: around every request sent (the generated cases, and the
  probes the checks send straight through the transport: no credentials, wrong credentials, a
  wrong method) the whole SQLite database is digested (every row of every table); after an
  answer of 4xx or 5xx the digest must be the same, or the run fails. The counts go to the file
  named by TOLLGATE_FUZZ_STATS, so the Rust test can tell the comparison really ran.
- Stripe's half of the webhook: two bodies in three are signed with the webhook secret as Stripe
  signs them (unless the case is about a wrong header), so the event parser behind the
  signature check is reached, with valid and with malformed events.
- Each call comes from its own client address (X-Forwarded-For, which the test gateway trusts
  from loopback): the wrong credentials the auth check sends would otherwise spend loopback's
  allowance of wrong admin tokens, and every later operator call would be answered 429.
- The customer's license is never revoked, rotated or patched (its key is the customer
  endpoints' credential); those calls go to the license after it.
"""

import hashlib
import hmac
import json
import os
import sqlite3
import time

import schemathesis
from schemathesis.transport.requests import RequestsTransport

DB = os.environ["TOLLGATE_FUZZ_DB"]
STATS = os.environ["TOLLGATE_FUZZ_STATS"]
WEBHOOK_SECRET = os.environ["TOLLGATE_FUZZ_WEBHOOK_SECRET"]
CUSTOMER_ID = int(os.environ["TOLLGATE_FUZZ_CUSTOMER_ID"])

_stats = {"calls": 0, "refused": 0, "compared": 0, "succeeded": 0, "signed": 0, "statuses": {}}
_address = [0]


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
    signed. A case whose headers were made invalid on purpose is sent as it was made.
    """
    meta = case.meta
    if meta is not None and meta.is_negative_at("header"):
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
    _stats["signed"] += 1


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    method = case.method.upper()
    if case.path == "/payments/webhook" and method == "POST":
        sign_webhook(case)
    ids = case.path_parameters or {}
    keeps_its_key = case.path.endswith(("/revoke", "/rotate")) or method == "PATCH"
    if keeps_its_key and ids.get("id") == CUSTOMER_ID:
        ids["id"] = CUSTOMER_ID + 1


def compared_send(send):
    """The transport's `send`, with its own client address and the database digested around
    it."""

    def wrapper(self, case, *args, **kwargs):
        _address[0] += 1
        n = _address[0]
        case.headers = dict(case.headers or {})
        case.headers["X-Forwarded-For"] = f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
        before = digest()
        response = send(self, case, *args, **kwargs)
        _stats["calls"] += 1
        status = response.status_code
        key = f"{case.method.upper()} {case.path} {status}"
        _stats["statuses"][key] = _stats["statuses"].get(key, 0) + 1
        if status < 400:
            _stats["succeeded"] += 1
        else:
            _stats["refused"] += 1
            _stats["compared"] += 1
            if digest() != before:
                _stats.setdefault("changed", []).append(key)
        _save()
        return response

    return wrapper


RequestsTransport.send = compared_send(RequestsTransport.send)


@schemathesis.check
def nothing_written_when_refused(ctx, response, case):
    """Fails the case whose request (or one of its checks' probes) changed the database while
    being refused."""
    changed = _stats.get("changed", [])
    if changed:
        raise AssertionError(f"refused and still changed the database: {changed}")
