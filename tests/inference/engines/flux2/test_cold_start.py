"""What a worker's first frame waits for: the default mode at batch size 1 only (the larger batches, and the
other modes, are warmed while idle), and weights read into host memory first (a memory snapshot's half of
the load) end up on the engine's device."""

from __future__ import annotations

import torch

from inference.engines.flux2 import Flux2Config, Flux2Engine


def _batch_sizes(engine: Flux2Engine) -> tuple[list[int], object]:
    assert engine.transformers is not None
    seen: list[int] = []
    hook = engine.transformers.exact.register_forward_hook(
        lambda _module, _args, kwargs, _output: seen.append(kwargs["hidden_states"].shape[0]),
        with_kwargs=True,
    )
    return seen, hook


def test_the_first_frame_waits_for_batch_size_one_of_the_default_mode_only() -> None:
    engine = Flux2Engine(Flux2Config(tiny=True, device="cpu", modes=("exact",), max_batch=2, compile=False))
    engine.load()
    # The warm-up schedule a compiled engine follows (one graph per batch shape), here without compiling:
    # compiling the tiny model on a CPU would take minutes.
    engine.compile = True
    seen, hook = _batch_sizes(engine)
    try:
        engine.warm_up()
        assert set(seen) == {1}
        seen.clear()
        for task in engine.deferred_warm_ups():  # what the scheduler runs while idle
            task()
        assert 2 in seen  # the default mode's larger batch, warmed after the first frame could go
    finally:
        hook.remove()  # type: ignore[attr-defined]


def test_weights_read_on_the_cpu_first_are_moved_to_the_device_by_load() -> None:
    engine = Flux2Engine(Flux2Config(tiny=True, device="cpu", modes=("exact",)))
    engine.load_on_cpu()
    assert engine.pipe is None  # nothing attached yet: the device is untouched until load()
    pipe = engine.load()
    assert pipe.transformer.device == engine.device
    frame = torch.full((1, 3, 512, 512), 128, dtype=torch.uint8)
    assert engine.render_frames(frame, ["ink"], steps=2, seeds=[1]).shape == (1, 3, 512, 512)
    engine.load_on_cpu()  # after load(): nothing more to read
    assert engine.load() is pipe
