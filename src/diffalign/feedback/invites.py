"""Evaluator identities: personal invitations whose secret token authenticates every submission.

Part of :class:`~diffalign.feedback.store.FeedbackStore` (see ``store.py``). The session owner invites
evaluators by name (``diffalign feedback invite``); each gets a random token, printed once inside a personal
link, of which the store keeps only the sha256 (a copy of the database cannot be used to sign in). Once a
store holds an invitation, the labeling app attributes a submission to the evaluator whose token it carries
and refuses one without a token (server.py); with no invitation it keeps the typed-name, loopback mode.

Names are unique case-insensitively: inviting "Alice" when "alice" exists is refused, so one person cannot
appear as two evaluators (or complete a two-evaluator round alone). An evaluator's latest invitation is the
valid one: ``reissue`` gives a new link and the old one stops working.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3

from diffalign.feedback.base import (
    ConflictError,
    FeedbackError,
    StoreBase,
    _now,
    check_evaluator,
    find_evaluator,
)

TOKEN_BYTES = 24  # 192 bits from secrets.token_urlsafe: not guessable online or offline


def token_digest(token: str) -> str:
    """The sha256 (hex) under which a token is stored and looked up."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Invites(StoreBase):
    """Inviting evaluators and resolving a personal token to its evaluator."""

    def invite(self, names: list[str], invited_by: str, reissue: bool = False) -> list[tuple[str, str]]:
        """Invite evaluators; returns ``(name, token)`` per name, the only time the tokens exist in clear.

        Refused (nothing recorded) when two names differ only by case, when a name matches an existing
        evaluator spelled differently (use that spelling), or when someone is already invited and
        ``reissue`` is false. With ``reissue``, an invited evaluator gets a new token and the old one stops
        working. Every invitation is recorded in the audit log with ``invited_by``.
        """
        if isinstance(names, str) or not names:
            raise FeedbackError("names: give at least one evaluator name to invite")
        clean = [check_evaluator(n) for n in names]
        by = check_evaluator(invited_by).strip() if invited_by else ""
        if not by:
            raise FeedbackError("invited_by: say who invites (recorded in the audit log)")
        seen: dict[str, str] = {}
        for name in clean:
            other = seen.setdefault(name.casefold(), name)
            if other != name or clean.count(name) > 1:
                raise ConflictError(f"names: {other!r} and {name!r} are the same evaluator (names are compared "
                                    f"without case); invite each person once")
        out = []
        with self._write() as c:
            for name in clean:
                row = find_evaluator(c, name)
                if row is not None and row["name"] != name:
                    raise ConflictError(f"names: {name!r} is already an evaluator of this store spelled "
                                        f"{row['name']!r} (names are compared without case); invite "
                                        f"{row['name']!r} instead")
                if row is not None and not reissue and self._latest_invite(c, int(row["id"])) is not None:
                    raise ConflictError(f"names: {name!r} is already invited; pass --reissue to give them a new "
                                        f"link (their old link then stops working)")
                evaluator_id = int(row["id"]) if row is not None else int(c.execute(
                    "INSERT INTO evaluators (name, created_at) VALUES (?, ?)", (name, _now())).lastrowid)
                token = secrets.token_urlsafe(TOKEN_BYTES)
                c.execute("INSERT INTO invites (evaluator_id, token_sha256, invited_by, created_at) "
                          "VALUES (?, ?, ?, ?)", (evaluator_id, token_digest(token), by, _now()))
                c.execute("INSERT INTO audit_log (run_id, action, actor, detail, created_at) VALUES (?, ?, ?, ?, ?)",
                          (None, "reissue_invite" if row is not None and reissue else "invite", by,
                           json.dumps({"evaluator": name}), _now()))
                out.append((name, token))
        return out

    @staticmethod
    def _latest_invite(c: sqlite3.Connection, evaluator_id: int) -> sqlite3.Row | None:
        return c.execute("SELECT id, token_sha256, invited_by, created_at FROM invites WHERE evaluator_id = ? "
                         "ORDER BY id DESC LIMIT 1", (evaluator_id,)).fetchone()

    def has_invites(self) -> bool:
        """Whether evaluators sign in with personal tokens (any invitation exists)."""
        return self._conn().execute("SELECT 1 FROM invites LIMIT 1").fetchone() is not None

    def evaluator_for_token(self, token: str | None) -> str | None:
        """The invited evaluator whose current token this is, or None (unknown, or replaced by a reissue).

        The lookup is by the token's sha256, so its timing says nothing about the stored tokens.
        """
        if not token or not isinstance(token, str) or len(token) > 200:
            return None
        with self._read() as c:
            row = c.execute("SELECT i.id, i.evaluator_id, e.name FROM invites i JOIN evaluators e "
                            "ON e.id = i.evaluator_id WHERE i.token_sha256 = ?", (token_digest(token),)).fetchone()
            if row is None:
                return None
            latest = self._latest_invite(c, int(row["evaluator_id"]))
            return row["name"] if latest is not None and int(latest["id"]) == int(row["id"]) else None

    def invited_evaluators(self) -> list[dict]:
        """Every invited evaluator with when and by whom their current link was issued (no tokens)."""
        with self._read() as c:
            rows = c.execute("SELECT e.name, i.invited_by, i.created_at FROM invites i JOIN evaluators e "
                             "ON e.id = i.evaluator_id WHERE i.id IN (SELECT MAX(id) FROM invites GROUP BY "
                             "evaluator_id) ORDER BY e.name").fetchall()
        return [{"evaluator": r["name"], "invited_by": r["invited_by"], "invited_at": r["created_at"]} for r in rows]
