"""SHA-256 checksums of saved states, so that a damaged or edited state is refused on load
rather than resumed into a different run.

:func:`state_digest` hashes a state as ``torch.load`` gives it back (the CLI's checkpoints use
it too); :func:`with_checksum` adds it to a state to save and :func:`checked` verifies it on
load. A state is a dict of known fields plus ``"sha256"``; one of the form granet saved before it
had checksums loads with a warning, since nothing can tell a change in it (the new forms differ
from the old by more than the checksum, so that removing it does not make an old one).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Collection, Mapping
from typing import Any

import torch

__all__ = ["checked", "state_digest", "warn_unchecked", "with_checksum"]

KEY = "sha256"


def state_digest(state: Any) -> str:
    """SHA-256 of a state's contents: every tensor's dtype, shape and bytes (wherever it lies),
    every other value's type and ``repr``, in the nesting order (as ``torch.load`` gives it
    back)."""
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if torch.is_tensor(value):
        t = value.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for k, v in value.items():
            _feed(digest, k)
            _feed(digest, v)
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for v in value:
            _feed(digest, v)
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def with_checksum(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` and its ``"sha256"``, to save."""
    return {**state, KEY: state_digest(dict(state))}


def checked(
    saved: Any,
    where: str,
    fields: Collection[str],
    what: str,
    legacy: Collection[str] | None = None,
) -> dict[str, Any]:
    """``saved`` (a :func:`with_checksum` of a dict of exactly ``fields``) without its checksum,
    after checking it; ``where`` (the file) and ``what`` (the kind of state) name it in the
    one-line ``ValueError`` of a malformed or changed state. A dict of exactly the ``legacy``
    fields (what granet saved before it had checksums; they must differ from ``fields``, so that
    a state whose checksum was removed is not taken for one) is returned with a warning."""
    keys = set(saved) if isinstance(saved, dict) else None
    if legacy is not None and keys == set(legacy):
        warn_unchecked(where, what)
        return dict(saved)
    if keys != {*fields, KEY}:
        found = "a dict of " + ", ".join(map(repr, sorted(keys, key=str))) if keys else repr(saved)
        raise ValueError(
            f"{where}: not a granet {what} (expected a dict of {', '.join(sorted(fields))} "
            f"and {KEY}; found {_short(found)})"
        )
    state = {k: v for k, v in saved.items() if k != KEY}
    if saved[KEY] != state_digest(state):
        raise ValueError(
            f"{where}: its {what} is corrupt: its contents do not match their SHA-256 (a damaged "
            "or edited file)"
        )
    return state


def warn_unchecked(where: str, what: str) -> None:
    """Warn that the ``what`` in ``where`` was saved before granet had checksums."""
    warnings.warn(
        f"{where}: its {what} has no checksum (saved by an older granet); it is loaded "
        "unchecked, and the next one saved will have one",
        stacklevel=3,
    )


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
