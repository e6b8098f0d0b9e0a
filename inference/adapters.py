"""The LoRA adapters a worker serves, as ``FLUX2_LORAS`` names them; parsed without torch, so a bad setting
is refused before any weights load.

``FLUX2_LORAS`` is a comma-separated list of ``name=source`` entries, each with optional ``;``-separated
options: ``clay=owner/repo:clay.safetensors;scale=0.8;trigger=claymation style,ink=/models/ink.safetensors``.
A source is a local file (an absolute or ``./`` path) or ``owner/repo:weight_name`` on the Hugging Face Hub
(downloaded into the model cache). ``scale`` is the adapter's default strength (MIN..MAX_ADAPTER_SCALE, 1 if
omitted); ``trigger`` are words appended to a session's prompt while the adapter is active.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from inference.protocol import ADAPTER_ID_PATTERN, MAX_ADAPTER_SCALE, MIN_ADAPTER_SCALE, AdapterInfo

_ADAPTER_ID: Final = re.compile(ADAPTER_ID_PATTERN)
_REPO_ID: Final = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class AdapterSpecError(ValueError):
    """A ``FLUX2_LORAS`` entry that does not name an adapter the worker could load."""


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """One configured adapter: where its weights are, its default scale and its trigger words."""

    name: str
    # A local file, or a Hub repo id (then `weight_name` is the file inside it).
    source: str
    weight_name: str | None = None
    scale: float = 1.0
    trigger: str = ""

    @property
    def is_local(self) -> bool:
        return self.weight_name is None

    @property
    def label(self) -> str:
        """The file, as error messages and logs name it."""
        return self.source if self.weight_name is None else f"{self.source}:{self.weight_name}"

    def info(self) -> AdapterInfo:
        return AdapterInfo(name=self.name, scale=self.scale, trigger=self.trigger)


def parse_adapters(text: str) -> tuple[AdapterSpec, ...]:
    """The adapters ``text`` (a ``FLUX2_LORAS`` value) configures, in order; raises AdapterSpecError."""
    specs: list[AdapterSpec] = []
    for entry in (part.strip() for part in text.split(",")):
        if entry:
            specs.append(_parse_entry(entry))
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise AdapterSpecError(f"adapter names must be unique; {', '.join(duplicates)} appear more than once")
    return tuple(specs)


def _parse_entry(entry: str) -> AdapterSpec:
    head, *options = (part.strip() for part in entry.split(";"))
    name, sep, source = (part.strip() for part in head.partition("="))
    if not sep or not source:
        raise AdapterSpecError(f"{entry!r}: expected name=source (a local file or owner/repo:weight_name)")
    if not _ADAPTER_ID.match(name):
        raise AdapterSpecError(f"{entry!r}: the name {name!r} must match {ADAPTER_ID_PATTERN}")
    scale, trigger = 1.0, ""
    for option in options:
        key, sep, value = (part.strip() for part in option.partition("="))
        if key == "scale" and sep:
            try:
                scale = float(value)
            except ValueError:
                raise AdapterSpecError(f"{entry!r}: scale {value!r} is not a number") from None
            if not MIN_ADAPTER_SCALE <= scale <= MAX_ADAPTER_SCALE:
                raise AdapterSpecError(
                    f"{entry!r}: scale must be between {MIN_ADAPTER_SCALE:g} and {MAX_ADAPTER_SCALE:g}"
                )
        elif key == "trigger" and sep:
            trigger = value
        else:
            raise AdapterSpecError(f"{entry!r}: unknown option {option!r} (scale=..., trigger=...)")
    if source.startswith(("/", "./", "../", "~")) or Path(source).is_file():
        return AdapterSpec(name, str(Path(source).expanduser()), None, scale, trigger)
    repo, sep, weight_name = source.partition(":")
    if not sep or not weight_name or not _REPO_ID.match(repo):
        raise AdapterSpecError(
            f"{entry!r}: {source!r} is neither a local file nor owner/repo:weight_name "
            "(e.g. owner/repo:style.safetensors)"
        )
    return AdapterSpec(name, repo, weight_name, scale, trigger)
