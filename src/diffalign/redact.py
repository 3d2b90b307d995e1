"""Secrets stay in memory: redaction of everything a run writes, and ``env:VAR`` references.

A config may carry credentials: an HTTP reward's ``headers`` (``Authorization = "Bearer ..."``), a reward
argument such as ``api_key``, the labeling app's ``feedback.token``. A run writes its config to
``config.toml``, to ``lora/diffalign_config.toml`` (the folder people share), to the tracker's hyperparameters
(TensorBoard's ``hparams.yml``) and to the feedback store. Every one of those goes through :func:`redact`,
which replaces

* every value under a key named ``headers`` (a header's name says nothing about whether it is secret), and
* every value whose key looks like a secret (token, key, password, secret, authorization, credential, cookie),
* the password of a URL (``https://user:pass@host``) and URL query values whose names look like secrets,

with :data:`REDACTED`. A value written as ``"env:VAR"`` is a reference, not a secret: it is kept as written (so
a saved config can be committed and rerun) and resolved by :func:`resolve_env` only in memory, when the reward
is built.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "<redacted>"
ENV_PREFIX = "env:"

# Substrings that mark a secret wherever they occur in a key ("hf_token", "X-Api-Key", "client_secret"), and
# whole words that do so only on their own ("key", "auth", "pwd"), so that "keep" or "author" stay visible.
_SECRET_PARTS = ("token", "secret", "password", "passwd", "authorization", "credential", "cookie", "apikey",
                 "privatekey", "accesskey", "signature")
_SECRET_WORDS = {"key", "auth", "pwd", "pass", "sig"}


def is_secret_name(name: str) -> bool:
    """Whether a key or argument name looks like it holds a secret."""
    lowered = str(name).lower()
    squashed = re.sub(r"[^a-z0-9]", "", lowered)
    if any(part in squashed for part in _SECRET_PARTS):
        return True
    return any(word in _SECRET_WORDS for word in re.split(r"[^a-z0-9]+", lowered))


def is_env_reference(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(ENV_PREFIX)


def _redact_value(value: Any) -> Any:
    """A secret's value: references stay (they hold no secret), anything else becomes REDACTED."""
    if is_env_reference(value):
        return value
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return REDACTED


def redact_url(url: str) -> str:
    """``https://user:pw@host/p?token=abc&x=1`` -> ``https://user:<redacted>@host/p?token=<redacted>&x=1``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(is_secret_name(k) for k, _ in pairs):
            query = urlencode([(k, REDACTED if is_secret_name(k) else v) for k, v in pairs], safe="<>")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(obj: Any) -> Any:
    """A copy of a JSON-like structure (a dumped config) with secrets replaced by :data:`REDACTED`."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if str(k).lower() == "headers" and isinstance(v, dict):
                out[k] = {name: _redact_value(value) for name, value in v.items()}
            elif is_secret_name(k) and v is not None:
                out[k] = _redact_value(v)
            else:
                out[k] = redact(v)
        return out
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    if isinstance(obj, str) and "://" in obj:
        return redact_url(obj)
    return obj


def resolve_env(obj: Any, field: str) -> Any:
    """A copy of ``obj`` with every ``"env:VAR"`` string replaced by the variable's value (in memory only).

    A value that is :data:`REDACTED` (a config saved by a run, given back) or names an unset variable is an error
    naming the field and the fix.
    """
    if isinstance(obj, dict):
        return {k: resolve_env(v, f"{field}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [resolve_env(v, f"{field}[{i}]") for i, v in enumerate(obj)]
    if obj == REDACTED:
        raise ValueError(f"{field} is {REDACTED!r}: the secret was removed when this config was saved; give it "
                         f"again, preferably as an environment-variable reference (\"env:VAR\", see docs/rewards.md)")
    if is_env_reference(obj):
        name = obj[len(ENV_PREFIX):]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"{field} = {obj!r}: after 'env:' give the name of an environment variable "
                             f"(letters, digits, underscores), e.g. \"env:SCORER_TOKEN\"")
        value = os.environ.get(name)
        if value is None:
            raise ValueError(f"{field} = {obj!r}: environment variable {name} is not set; export {name}=... "
                             f"before the run (the value is read only in memory, never saved)")
        return value
    return obj
