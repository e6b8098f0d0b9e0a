"""An engine's modes come from its config: built-in recipes by id, custom ones described by their recipe, and
only the modes offered cost memory (the FP8 copy of the transformer exists only for a mode that uses it)."""

from __future__ import annotations

import pytest

from inference.engines.flux2 import Flux2Config, Flux2Engine, ModeRecipe
from inference.engines.flux2.fp8 import Float8Linear


def test_modes_are_offered_in_the_configured_order_and_custom_ones_say_what_they_change() -> None:
    config = Flux2Config(
        tiny=True,
        device="cpu",
        modes=("turbo", "exact"),
        custom_modes={"kv": ModeRecipe(reference_kv_reuse=True), "plain": ModeRecipe()},
    )
    engine = Flux2Engine(config)
    assert [mode.id for mode in engine.modes] == ["turbo", "exact", "kv", "plain"]
    assert engine.modes[0].approximate  # the default mode is the first configured, approximate or not
    kv, plain = engine.modes[2:]
    assert (kv.label, kv.approximate, kv.detail) == ("kv", True, "reference K/V reuse")
    assert (plain.approximate, plain.detail) == (False, "exact")


def test_a_custom_mode_cannot_take_a_built_in_modes_id() -> None:
    with pytest.raises(ValueError, match="'exact' is already a mode"):
        Flux2Config(custom_modes={"exact": ModeRecipe(text_tokens=64)})


def test_the_fp8_copy_of_the_transformer_exists_only_for_a_mode_that_uses_it() -> None:
    exact_only = Flux2Engine(Flux2Config(tiny=True, device="cpu", modes=("exact",)))
    exact_only.load()
    assert exact_only.transformers is not None
    assert exact_only.transformers.fp8 is None
    assert list(exact_only.transformers) == [exact_only.pipe.transformer]

    with_fast = Flux2Engine(Flux2Config(tiny=True, device="cpu", modes=("exact", "fast")))
    with_fast.load()
    transformers = with_fast.transformers
    assert transformers is not None
    assert transformers.fp8 is not None
    assert transformers.for_recipe(ModeRecipe(fp8=True)) is transformers.fp8
    assert transformers.for_recipe(ModeRecipe()) is transformers.exact is with_fast.pipe.transformer
    assert any(isinstance(module, Float8Linear) for module in transformers.fp8.modules())
    assert not any(isinstance(module, Float8Linear) for module in transformers.exact.modules())


def test_style_kv_once_is_part_of_reference_kv_reuse_and_says_so() -> None:
    with pytest.raises(ValueError, match="style_kv_once needs reference_kv_reuse"):
        ModeRecipe(style_kv_once=True)
    recipe = ModeRecipe(reference_kv_reuse=True, style_kv_once=True)
    assert recipe.approximate
    assert recipe.describe() == "reference K/V reuse, style image K/V once per image"
