"""Prompt sources: a toy prompt-set name, a text file (one prompt per line), or an explicit list."""

from __future__ import annotations

from .toy.prompts import load_prompts


def resolve_prompts(source: str | list[str]) -> list[str]:
    if isinstance(source, list):
        prompts = [p.strip() for p in source if p.strip()]
        if not prompts:
            raise ValueError("sample.prompts is an empty list: give at least one prompt")
        return prompts
    return load_prompts(source)
