"""The compiled VAE's two-stage GroupNorm (group_norm.py): PyTorch's normalisation up to float rounding, in
either memory layout, and the tiny VAE's images unchanged by it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inference.engines.flux2.group_norm import (
    SPLIT_GROUP_NORM_OP,
    SplitGroupNorm,
    operator_name,
    split_group_norm,
    use_split_group_norm,
)
from inference.engines.flux2.klein_config import TINY, build_random_components

# (B, C, H, W), groups: the VAE's shapes in small, one whose pixels do not split into equal 256-pixel
# chunks (12 x 20), and TAEF2's 4 groups.
SHAPES = [((1, 128, 32, 32), 32), ((2, 64, 12, 20), 32), ((1, 256, 16, 16), 4), ((1, 32, 3, 5), 8)]
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _input(shape: tuple[int, ...], *, mean: float = 0.5, std: float = 2.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64) * std + mean


@pytest.mark.parametrize(("shape", "groups"), SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_matches_group_norm_to_rounding(shape: tuple[int, ...], groups: int, layout: object) -> None:
    x = _input(shape)
    channels = shape[1]
    weight, bias = torch.randn(channels, dtype=torch.float64), torch.randn(channels, dtype=torch.float64)
    exact = F.group_norm(x, groups, weight, bias, 1e-6)
    ours = split_group_norm(
        x.float().contiguous(memory_format=layout), groups, weight.float(), bias.float(), 1e-6
    )
    assert ours.dtype == torch.float32
    assert ours.is_contiguous(memory_format=layout)  # the VAE's next convolution reads it as it came
    assert (ours.double() - exact).abs().max() < 1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bfloat16_rounds_as_pytorchs_own(layout: object) -> None:
    """In bf16 both compute in float32 and round once: they differ from the float64 result alike."""
    x = _input((1, 128, 32, 32)).to(torch.bfloat16).contiguous(memory_format=layout)
    weight = torch.randn(128).to(torch.bfloat16)
    bias = torch.randn(128).to(torch.bfloat16)
    exact = F.group_norm(x.double(), 32, weight.double(), bias.double(), 1e-6)
    ours = split_group_norm(x, 32, weight, bias, 1e-6)
    theirs = F.group_norm(x, 32, weight, bias, 1e-6)
    assert ours.dtype == torch.bfloat16
    assert (ours.double() - exact).abs().max() <= (theirs.double() - exact).abs().max() * 1.01
    assert (ours.float() != theirs.float()).float().mean() < 0.01  # all but a few values the same bits


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_large_offset_does_not_cancel_the_variance(layout: object) -> None:
    """Activations far from zero, in float32: a variance taken as E[x²] - E[x]² loses all of it to
    cancellation (it comes out negative: NaN); the chunks' own variances, combined, keep it as well as
    PyTorch's float32 GroupNorm does."""
    x = _input((1, 64, 32, 32), mean=3000.0, std=0.01).float()
    exact = F.group_norm(x.double(), 32, None, None, 1e-6)  # of the same float32 values
    ours = split_group_norm(x.contiguous(memory_format=layout), 32, None, None, 1e-6)
    theirs = F.group_norm(x, 32, None, None, 1e-6)
    assert torch.isfinite(ours).all()
    assert (ours.double() - exact).abs().max() <= (theirs.double() - exact).abs().max()


def test_without_affine_parameters_and_for_other_ranks() -> None:
    norm = nn.GroupNorm(4, 16, affine=False)
    x = _input((2, 16, 6, 6)).float()
    expected = norm(x)
    norm.__class__ = SplitGroupNorm
    assert (norm(x) - expected).abs().max() < 1e-5
    sequence = _input((2, 16, 10)).float()  # not an image: PyTorch's own path
    assert torch.equal(norm(sequence), F.group_norm(sequence, 4, None, None, norm.eps))


@torch.no_grad()
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_vae_encodes_and_decodes_the_same_images(layout: object) -> None:
    vae = build_random_components(TINY)["vae"]
    norms = sum(1 for module in vae.modules() if type(module) is nn.GroupNorm)
    split = copy.deepcopy(vae)
    assert use_split_group_norm(split) == norms > 0
    assert not any(type(module) is nn.GroupNorm for module in split.modules())
    assert split.state_dict().keys() == vae.state_dict().keys()  # the same parameters, loaded the same way
    vae.to(memory_format=layout)
    split.to(memory_format=layout)
    image = (torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1).contiguous(
        memory_format=layout
    )
    latent = vae.encode(image).latent_dist.mode()
    assert (split.encode(image).latent_dist.mode() - latent).abs().max() < 1e-4
    assert (split.decode(latent).sample - vae.decode(latent).sample).abs().max() < 1e-4


class TracedSplitGroupNorm(nn.GroupNorm):
    """The two-stage norm called as a function, which dynamo traces operation by operation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def _decoder_graphs(
    norm: type[nn.GroupNorm] = SplitGroupNorm,
) -> tuple[nn.Module, list[torch.fx.GraphModule], list[torch.fx.GraphModule]]:
    """The tiny VAE's decoder with its norms made ``norm``, compiled: dynamo's graphs and AOT autograd's
    (with inductor's decompositions, as inductor calls it)."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.decomposition import select_decomp_table

    vae = build_random_components(TINY)["vae"].to(memory_format=torch.channels_last)
    use_split_group_norm(vae)
    for module in vae.modules():
        if isinstance(module, SplitGroupNorm):
            module.__class__ = norm
    dynamo_graphs: list[torch.fx.GraphModule] = []
    aten_graphs: list[torch.fx.GraphModule] = []

    def backend(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> object:
        dynamo_graphs.append(graph)

        def forward_compiler(aten: torch.fx.GraphModule, _: object) -> object:
            aten_graphs.append(aten)
            return aten.forward

        return aot_module_simplified(
            graph, inputs, fw_compiler=forward_compiler, decompositions=select_decomp_table()
        )

    torch._dynamo.reset()
    decoder = torch.compile(vae.decoder, fullgraph=True, dynamic=False, backend=backend)
    latent = torch.randn(1, TINY.vae["latent_channels"], 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        decoded = decoder(latent)
        assert (decoded - vae.decoder(latent)).abs().max() < 1e-5
    return vae, dynamo_graphs, aten_graphs


def _calls(graph: torch.fx.GraphModule) -> list[object]:
    return [node.target for node in graph.graph.nodes if node.op == "call_function"]


def test_dynamo_traces_each_norm_as_one_node_that_aot_autograd_expands_as_traced() -> None:
    vae, (dynamo_graph,), (aten_graph,) = _decoder_graphs()
    norms = sum(1 for module in vae.decoder.modules() if isinstance(module, SplitGroupNorm))
    calls = _calls(dynamo_graph)
    assert calls.count(SPLIT_GROUP_NORM_OP) == norms > 0
    assert torch.var_mean not in calls  # the norm's own operations are not traced by dynamo...
    # ...yet reach inductor as the same ATen operations as when dynamo traces them one by one.
    _, (traced_graph,), (traced_aten_graph,) = _decoder_graphs(TracedSplitGroupNorm)
    assert torch.var_mean in _calls(traced_graph)
    assert _calls(aten_graph) == _calls(traced_aten_graph)
    assert not any("stylecast" in str(target) for target in _calls(aten_graph))


def test_the_vaes_graphs_stay_in_aot_autograds_cache() -> None:
    from torch._functorch._aot_autograd.autograd_cache import check_node_safe

    _, dynamo_graphs, _ = _decoder_graphs()
    for graph in dynamo_graphs:
        for node in graph.graph.nodes:
            check_node_safe(node)  # raises BypassAOTAutogradCache for a node the cache would not take


def test_a_changed_kernel_gets_an_operator_of_another_name() -> None:
    import inspect

    source = inspect.getsource(split_group_norm)
    assert SPLIT_GROUP_NORM_OP.default.name().startswith("stylecast::split_group_norm_")
    assert operator_name(source) == operator_name(source)
    assert operator_name(source) != operator_name(source.replace("correction=0", "correction=1"))


@pytest.mark.parametrize(("shape", "groups"), [*SHAPES, ((1, 30, 8, 8), 4)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fake_kernel_gives_the_real_results_shape_dtype_and_layout(
    shape: tuple[int, ...], groups: int, layout: object, dtype: torch.dtype
) -> None:
    # Inductor compiles for the strides the fake kernel says: a wrong layout would compile wrong code.
    x = _input(shape).to(dtype).contiguous(memory_format=layout)
    weight, bias = torch.ones(shape[1], dtype=dtype), torch.zeros(shape[1], dtype=dtype)
    if shape[1] % groups:  # PyTorch's own refuses it, and so does the operator, on either kernel
        with pytest.raises(RuntimeError):
            SPLIT_GROUP_NORM_OP(x, groups, weight, bias, 1e-6)
        return
    real = SPLIT_GROUP_NORM_OP(x, groups, weight, bias, 1e-6)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = SPLIT_GROUP_NORM_OP(mode.from_tensor(x), groups, mode.from_tensor(weight), None, 1e-6)
    assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())


def test_fake_propagation_runs_one_operation_per_norm_not_the_two_stages() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Operations(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x = _input((1, 128, 32, 32)).float().contiguous(memory_format=torch.channels_last)
    with torch._subclasses.FakeTensorMode() as mode:
        fake_x = mode.from_tensor(x)
        with Operations() as operator_ops:
            SPLIT_GROUP_NORM_OP(fake_x, 32, None, None, 1e-6)
        with Operations() as function_ops:
            split_group_norm(fake_x, 32, None, None, 1e-6)
    assert operator_ops.seen == [str(SPLIT_GROUP_NORM_OP.default)]
    # What each norm cost dynamo's fake propagation before: the two stages, operation by operation.
    assert len(function_ops.seen) >= 10
    assert any("var_mean" in name for name in function_ops.seen)
