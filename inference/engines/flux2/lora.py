"""LoRA style adapters, chosen per batch row: many adapters loaded, each session's own one applied.

Adapters are read by diffusers' own loader (``Flux2KleinPipeline.load_lora_weights``), so every format it
accepts for FLUX.2 works and a file that is not a LoRA for this transformer fails in its validation. Their
PEFT ``lora_A``/``lora_B`` weights and scalings are then copied into stacked tensors (``LoraBank``), PEFT's
layers are removed again, and every targeted linear layer becomes a ``MultiLoraLinear``, which serves a
batch in one of two ways (``LoraSelection.select`` picks per batch):

* **Fused**, when every row of the batch takes the same adapter at the same scale, or none (always the case
  with one session per batch, as the exact mode's admission has it): the layer's own weight holds
  ``W + s * B A`` (what diffusers' ``fuse_lora`` computes) or ``W`` alone, and the layer is the base layer
  with no branch at all, the same kernels as without LoRA support. A new choice is fused in place, into the
  same storage, from the unfused ``W`` kept beside it, so compiled graphs and captured CUDA graphs stay
  valid: a switch costs one pass over the adapted weights, not a compilation.
* **Branches**, when rows differ: the weight is the unfused ``W`` and row b adds
  ``s_b * B_{a_b} (A_{a_b} x)``, with the adapter index a_b and the scale s_b read from persistent tensors
  that the engine fills before the batch. One batch mixes sessions with different adapters; switching
  adapters or scales changes tensor values only.

Which of the two a layer computes is a Python attribute a compiled graph is specialised on, so each is a
graph of its own; the engine warms both up (branches only where a batch can hold two sessions) and keys its
CUDA graphs by it. With one adapter active at scale s, a branched row computes what PEFT computes after
``set_adapters([name], [s])``, operation for operation (``base + (B (A x)) * (s * alpha / r)``), and a
fused layer's weight is bit for bit what ``set_adapters`` then ``fuse_lora`` leaves in it.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import Flux2KleinPipeline

from inference.adapters import AdapterSpec

logger = logging.getLogger(__name__)

# Fused projections (diffusers' fuse_projections): the fused layer's output is its parts' outputs, in order.
_FUSED: dict[str, tuple[str, ...]] = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}


class LoraLoadError(RuntimeError):
    """An adapter could not be loaded; the message names the adapter and its file."""


@dataclass(slots=True)
class TargetWeights:
    """One adapter's low-rank pair for one linear layer, as PEFT holds it."""

    down: torch.Tensor  # lora_A.weight, (r, in)
    up: torch.Tensor  # lora_B.weight, (out, r)
    alpha: float
    rank: int
    rslora: bool

    def scaling(self, scale: float) -> float:
        """PEFT's LoraLayer.set_scale, as a Python float (double precision, in its order)."""
        if self.rslora:
            return scale * self.alpha / math.sqrt(self.rank)
        return scale * self.alpha / self.rank


@dataclass(slots=True)
class LoraBank:
    """The loaded adapters, in order, and their weights by the qualified name of the layer they adapt."""

    specs: tuple[AdapterSpec, ...]
    targets: dict[str, dict[int, TargetWeights]] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.specs)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"unknown adapter {name!r}; this engine has {', '.join(self.names)}") from None


def resolve_adapter_file(
    spec: AdapterSpec, *, cache_dir: str | Path | None = None, local_files_only: bool = False
) -> Path:
    """The local file of ``spec``: itself, or downloaded from its Hub repo into ``cache_dir`` (the model
    cache) with progress bars, reused when already there."""
    if spec.weight_name is None:
        path = Path(spec.source)
        if not path.is_file():
            raise LoraLoadError(f"LoRA adapter {spec.name!r}: {spec.source} is not a file")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()
    logger.info("fetching LoRA adapter %s (%s) into %s", spec.name, spec.label, cache_dir or "the HF cache")
    try:
        return Path(
            hf_hub_download(
                spec.source,
                spec.weight_name,
                cache_dir=str(cache_dir) if cache_dir is not None else None,
                local_files_only=local_files_only,
            )
        )
    except Exception as exc:
        raise LoraLoadError(f"LoRA adapter {spec.name!r}: could not fetch {spec.label}: {exc}") from exc


def load_adapters(
    pipe: Flux2KleinPipeline,
    specs: Sequence[AdapterSpec],
    *,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> LoraBank:
    """Read every adapter of ``specs`` through ``pipe.load_lora_weights`` and copy its weights out of the
    PEFT layers; ``pipe.transformer`` is left without PEFT layers. All or nothing: the first adapter that
    fails raises LoraLoadError (naming it and its file) and the transformer is left as it was."""
    from peft.tuners.lora import LoraLayer

    bank = LoraBank(tuple(specs))
    transformer = pipe.transformer
    try:
        for index, spec in enumerate(specs):
            path = resolve_adapter_file(spec, cache_dir=cache_dir, local_files_only=local_files_only)
            try:
                pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=spec.name)
            except Exception as exc:
                raise LoraLoadError(
                    f"LoRA adapter {spec.name!r}: {spec.label} is not a LoRA for the FLUX.2 [klein] "
                    f"transformer: {exc}"
                ) from exc
            found = 0
            for module_name, module in transformer.named_modules():
                if not isinstance(module, LoraLayer) or spec.name not in module.lora_A:
                    continue
                if module.use_dora.get(spec.name) or module.lora_bias.get(spec.name):
                    raise LoraLoadError(
                        f"LoRA adapter {spec.name!r}: {spec.label} uses DoRA or LoRA biases, which this "
                        "engine does not serve"
                    )
                if not isinstance(module.lora_A[spec.name], torch.nn.Linear):
                    raise LoraLoadError(
                        f"LoRA adapter {spec.name!r}: {spec.label} adapts {module_name}, not a linear layer"
                    )
                bank.targets.setdefault(module_name, {})[index] = TargetWeights(
                    down=module.lora_A[spec.name].weight.detach().clone(),
                    up=module.lora_B[spec.name].weight.detach().clone(),
                    alpha=float(module.lora_alpha[spec.name]),
                    rank=int(module.r[spec.name]),
                    rslora=bool(module.use_rslora.get(spec.name, False)),
                )
                found += 1
            if not found:
                # diffusers only warns when a file holds no weights for the transformer.
                raise LoraLoadError(
                    f"LoRA adapter {spec.name!r}: {spec.label} has no LoRA weights for the FLUX.2 [klein] "
                    "transformer"
                )
            logger.info("LoRA adapter %s: %d layers from %s", spec.name, found, spec.label)
    finally:
        if getattr(transformer, "peft_config", None):
            pipe.unload_lora_weights()
    return bank


class LoraSelection:
    """Which adapter, at what scale, each row of the batch being rendered applies: persistent tensors that
    every MultiLoraLinear reads, so a compiled transformer and a captured CUDA graph see new choices as new
    values in the same buffers. ``scales[t, b]`` is the scaling of layer t for row b, computed on the host
    exactly as PEFT computes its per-layer scaling."""

    def __init__(self, bank: LoraBank, max_batch: int, device: torch.device) -> None:
        self.bank = bank
        self.layers: tuple[str, ...] = tuple(bank.targets)
        # Room for more rows than the engine's max_batch: the bench raises it between cases.
        rows = max(max_batch, 64)
        self.index = torch.zeros(rows, dtype=torch.long, device=device)
        self.scales = torch.zeros(len(self.layers), rows, dtype=torch.float32, device=device)
        self._columns: OrderedDict[tuple[int, float], torch.Tensor] = OrderedDict()
        # What the buffers hold now: a render loop mostly repeats the last batch's choice, which then
        # costs no copy to the device.
        self._selected: tuple[tuple[str | None, ...], tuple[float | None, ...]] | None = None
        # How the next batch is served: False, every row alike, by the layers' own weights with `fused`
        # (adapter index, scale) fused in (None: the base weights); True, by the per-row branches.
        self.branches = False
        self.fused: tuple[int, float] | None = None

    def layer(self, name: str) -> int:
        return self.layers.index(name)

    def scaling(self, layer: int, index: int, scale: float) -> float:
        """PEFT's scaling of adapter ``index`` at ``scale`` for layer ``layer`` (0 where it has none)."""
        target = self.bank.targets[self.layers[layer]].get(index)
        return 0.0 if target is None or scale == 0.0 else target.scaling(scale)

    def select(self, adapters: Sequence[str | None], scales: Sequence[float | None]) -> None:
        """Set the rows' adapters (None: none) and scales (None: the adapter's default) for the next batch:
        fused when every row makes the same choice, branches otherwise."""
        rows = len(adapters)
        if rows > self.index.shape[0]:
            raise ValueError(f"at most {self.index.shape[0]} rows, got {rows}")
        choices = {self._choice(name, scale) for name, scale in zip(adapters, scales, strict=True)}
        if len(choices) == 1:
            self.branches = False
            self.fused = next(iter(choices))
            return
        self.branches = True
        self.fused = None
        selected = (tuple(adapters), tuple(scales))
        if selected == self._selected:
            return
        indices: list[int] = []
        columns: list[torch.Tensor] = []
        for name, scale in zip(adapters, scales, strict=True):
            if name is None:
                # Any adapter's weights at scaling 0: the row's output is the base layer's, exactly.
                indices.append(0)
                columns.append(self._column(0, 0.0))
                continue
            index = self.bank.index(name)
            indices.append(index)
            columns.append(self._column(index, self.bank.specs[index].scale if scale is None else scale))
        self.index[:rows].copy_(torch.tensor(indices, dtype=torch.long), non_blocking=False)
        self.scales[:, :rows].copy_(torch.stack(columns, dim=1))
        self._selected = selected

    def _choice(self, name: str | None, scale: float | None) -> tuple[int, float] | None:
        """(adapter index, scale) of a row, None for no adapter (or scale 0, which is the same)."""
        if name is None:
            return None
        index = self.bank.index(name)
        value = float(self.bank.specs[index].scale if scale is None else scale)
        return None if value == 0.0 else (index, value)

    def _column(self, index: int, scale: float) -> torch.Tensor:
        key = (index, float(scale))
        column = self._columns.get(key)
        if column is None:
            values = []
            for name in self.layers:
                target = self.bank.targets[name].get(index)
                values.append(0.0 if target is None or scale == 0.0 else target.scaling(scale))
            column = torch.tensor(values, dtype=torch.float32)
            self._columns[key] = column
            while len(self._columns) > 256:
                self._columns.popitem(last=False)
        else:
            self._columns.move_to_end(key)
        return column


class MultiLoraLinear(torch.nn.Module):
    """A linear layer (``nn.Linear``, or the FP8 one) plus every adapter's low-rank branch: each row of the
    batch takes the branch and scaling the LoraSelection says, or, when the selection is fused, the base
    layer alone on weights holding the batch's one choice (``fuse``). ``weight``: the base layer's unfused
    weight (a copy is taken of an ``nn.Linear``'s own; an FP8 layer's is given in the model dtype)."""

    def __init__(
        self,
        base: torch.nn.Module,
        down: torch.Tensor,
        up: torch.Tensor,
        selection: LoraSelection,
        layer: int,
        weight: torch.Tensor,
    ) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("lora_down", down)  # (adapters, r, in)
        self.register_buffer("lora_up", up)  # (adapters, out, r)
        # The unfused weight every fusion starts from, so fusing never accumulates rounding.
        self.register_buffer("unfused_weight", weight)
        self.selection = selection
        self.layer = layer
        self.in_features = down.shape[2]
        self.out_features = up.shape[1]
        self.fused: tuple[int, float] | None = None  # what the base layer's weight holds now

    @torch.no_grad()
    def fuse(self, choice: tuple[int, float] | None) -> None:
        """Make the base layer's weight hold adapter ``choice`` = (index, scale) fused in, or the unfused
        weight for None, in place. As PEFT's merge: ``W + (B @ A) * scaling`` in the weight's dtype."""
        if choice == self.fused:
            return
        weight = self.unfused_weight
        if choice is not None:
            index, scale = choice
            scaling = self.selection.scaling(self.layer, index, scale)
            delta = (self.lora_up[index] @ self.lora_down[index]) * scaling
            weight = weight + delta.to(weight.dtype)
        if isinstance(self.base, torch.nn.Linear):
            self.base.weight.copy_(weight)
        else:
            self.base.requantize(weight)  # type: ignore[operator]
        self.fused = choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if not self.selection.branches:
            return result
        rows = x.shape[0]
        index = self.selection.index[:rows]
        # (B, tokens, in) for the blocks, (B, in) for the modulation layers.
        tokens = x if x.dim() == 3 else x.reshape(rows, -1, x.shape[-1])
        down = torch.matmul(tokens.to(self.lora_down.dtype), self.lora_down[index].transpose(-1, -2))
        up = torch.matmul(down, self.lora_up[index].transpose(-1, -2)).reshape(*result.shape)
        scale = self.selection.scales[self.layer, :rows].reshape(rows, *([1] * (result.dim() - 1)))
        # In float32, rounded to the output's dtype: what PEFT's `up * scaling` (a Python float) computes.
        return result + (up * scale).to(result.dtype)


def apply_lora(
    transformer: torch.nn.Module,
    selection: LoraSelection,
    *,
    weights_from: torch.nn.Module | None = None,
) -> list[MultiLoraLinear]:
    """Wrap every layer of ``transformer`` that an adapter targets in a MultiLoraLinear, in place; a fused
    q/k/v layer takes its parts' branches side by side. Returns the wrapped layers. ``weights_from``: the
    bf16 transformer whose unfused weights stand for those of layers that keep none of their own (FP8 ones),
    already wrapped by apply_lora itself."""
    bank = selection.bank
    count = len(bank.specs)
    wrapped: list[MultiLoraLinear] = []
    modules = dict(transformer.named_modules())
    sources = dict(weights_from.named_modules()) if weights_from is not None else {}

    def unfused(name: str, base: torch.nn.Module) -> torch.Tensor:
        if isinstance(base, torch.nn.Linear):
            return base.weight.detach().clone()
        source = sources.get(name)
        if isinstance(source, MultiLoraLinear):
            return source.unfused_weight  # shared, never written
        if isinstance(source, torch.nn.Linear):
            return source.weight.detach()
        parent_name, _, child = name.rpartition(".")
        parts = _FUSED.get(child)
        if parts is not None:
            prefix = f"{parent_name}." if parent_name else ""
            return torch.cat([unfused(prefix + part, base) for part in parts])
        raise ValueError(f"no unfused weight for the LoRA-adapted layer {name}")

    for name in selection.layers:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else transformer
        if getattr(parent, "fused_projections", False) and any(child in parts for parts in _FUSED.values()):
            continue  # served by the fused layer below
        base = getattr(parent, child)
        down, up = _stack([bank.targets[name]], count, base)
        layer = MultiLoraLinear(base, down, up, selection, selection.layer(name), unfused(name, base))
        setattr(parent, child, layer)
        wrapped.append(layer)
    for parent_name, parent in list(modules.items()):
        if not getattr(parent, "fused_projections", False):
            continue
        for fused, parts in _FUSED.items():
            names = [f"{parent_name}.{part}" if parent_name else part for part in parts]
            if not hasattr(parent, fused) or not any(name in bank.targets for name in names):
                continue
            base = getattr(parent, fused)
            first = next(name for name in names if name in bank.targets)
            reference = bank.targets[first]
            parts_weights = [_relative(bank.targets.get(name, {}), reference) for name in names]
            down, up = _stack(parts_weights, count, base)
            full_name = f"{parent_name}.{fused}" if parent_name else fused
            weight = unfused(full_name, base)
            layer = MultiLoraLinear(base, down, up, selection, selection.layer(first), weight)
            setattr(parent, fused, layer)
            wrapped.append(layer)
    return wrapped


def _relative(
    weights: dict[int, TargetWeights], reference: dict[int, TargetWeights]
) -> dict[int, TargetWeights]:
    """A fused part's weights with its scaling relative to the layer whose scaling the fused layer uses
    folded into its up-projection (1 when alpha/r agree, the usual case)."""
    out: dict[int, TargetWeights] = {}
    for index, target in weights.items():
        ref = reference.get(index)
        ratio = target.scaling(1.0) / ref.scaling(1.0) if ref is not None else 0.0
        up = target.up if ratio == 1.0 else target.up * ratio
        out[index] = TargetWeights(target.down, up, target.alpha, target.rank, target.rslora)
    return out


def _stack(
    parts: Sequence[dict[int, TargetWeights]], count: int, base: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, r, in) down- and (count, out, r) up-projections of ``count`` adapters for one layer whose
    output is ``parts`` side by side; adapters (or parts) that do not target it are zeros. Ranks are padded
    with zeros to the largest."""
    in_features = next(t.down.shape[1] for part in parts for t in part.values())
    outs = [next(t.up.shape[0] for t in part.values()) if part else None for part in parts]
    if any(size is None for size in outs):
        # A fused part no adapter targets: its share of the output is the base layer's split.
        total = base.out_features if hasattr(base, "out_features") else base.weight.shape[0]
        known = sum(size for size in outs if size is not None)
        missing = [i for i, size in enumerate(outs) if size is None]
        for i in missing:
            outs[i] = (total - known) // len(missing)
    ranks = [sum(part[i].rank if i in part else 0 for part in parts) for i in range(count)]
    rank = max(ranks)
    sample = next(t.down for part in parts for t in part.values())
    down = torch.zeros(count, rank, in_features, dtype=sample.dtype, device=sample.device)
    up = torch.zeros(count, sum(outs), rank, dtype=sample.dtype, device=sample.device)  # type: ignore[arg-type]
    for i in range(count):
        r0, o0 = 0, 0
        for part, out in zip(parts, outs, strict=True):
            target = part.get(i)
            if target is not None:
                down[i, r0 : r0 + target.rank] = target.down
                up[i, o0 : o0 + out, r0 : r0 + target.rank] = target.up  # type: ignore[operator]
                r0 += target.rank
            o0 += out  # type: ignore[operator]
    return down, up


def prompt_with_trigger(prompt: str, trigger: str) -> str:
    """The prompt a job is rendered with: its own, then its adapter's trigger words after ", "."""
    if not trigger:
        return prompt
    return f"{prompt}, {trigger}" if prompt.strip() else trigger
