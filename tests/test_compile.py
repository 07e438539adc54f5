"""The compiled mode (--compile: torch.compile of the DiT blocks): no recompile when only the step changes, at most
one per new intervention structure, and the same output as eager (README: Speed)."""
import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from minivdit import solvers
from minivdit.cogvideox import PRESETS as COG_PRESETS, CogVideoXModel
from minivdit.guidance import Guidance
from minivdit.interventions import Steer, branch_point
from minivdit.pipeline import Pipeline, compile_blocks
from minivdit.wan import PRESETS, WanModel

from test_comparators import randomized  # noqa: E402 (tests/ is on sys.path under pytest)


def tiny(name, seed=0):
    """(Pipeline, context, latent x, grid) of a randomized tiny model of the family."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the initialization before `randomized`
    if name in COG_PRESETS:
        c = COG_PRESETS[name].config
        model, ctx = randomized(CogVideoXModel(c)), torch.randn(2, c.max_text_seq_length, c.text_embed_dim, generator=g)
        x, grid = torch.randn(1, c.in_channels, 3, 8, 8, generator=g), solvers.cogvideox_timesteps(4)
    else:
        c = PRESETS[name].config
        model, ctx = randomized(WanModel(c)), torch.randn(2, c.text_len, c.text_dim, generator=g)
        x, grid = torch.randn(1, c.in_dim, 3, 8, 8, generator=g), solvers.flow_sigmas(4, 5.0)
    return Pipeline(model, None, None, None, name, {}), ctx, x, grid


STAS = Steer(block=1, dims=(3,), alpha=2.5, p=8.0)
STRUCTURES = [  # (label, Guidance), run in this order on one compiled model
    ("cfg", Guidance("cfg", 5.0)),
    ("cfg+stas", Guidance("cfg", 5.0, stas=STAS, stas_steps=4)),  # steering acts between blocks: nothing new traced
    ("stg-R", Guidance("stg", 5.0, stg_blocks=(1,), stg_mode="R")),  # a one-row branch from block 2 on
    ("stg-A", Guidance("stg", 5.0, stg_blocks=(1,), stg_mode="A")),  # one row, block 1 with identity attention
    ("seg", Guidance("seg", 5.0, seg_blocks=(1,), seg_sigma=2.0)),  # one row, block 1 with blurred queries
    ("cfg again", Guidance("cfg", 5.0)),
]


def block_calls(g: Guidance, num_layers: int) -> set:
    """The distinct block calls of a step: (rows, identity attention, blur sigma) of every block that runs, for the
    [cond, uncond] pass (2 rows) and each one-row branch from its branch point on."""
    base, branches, _ = g.passes(0)
    calls = {(2, *base.inside(i)[1:]) for i in range(num_layers) if not base.inside(i)[0]}
    for _, p in branches:
        i0, after = branch_point(base, p, num_layers)
        calls |= {(1, *p.inside(i)[1:]) for i in range(i0 + after, num_layers) if not p.inside(i)[0]}
    return calls


@pytest.mark.parametrize("name", ["wan2.1-tiny", "cogvideox-tiny"])
def test_recompiles_once_per_structure_never_per_step(name):
    """A block is traced exactly once per distinct call structure (rows, identity attention, blur), never again when
    only the step (timestep, STAS window) changes: steering, zeroing and branch bookkeeping stay outside the graph."""
    pipe, ctx, x, grid = tiny(name)
    layers = len(pipe.model.blocks if hasattr(pipe.model, "blocks") else pipe.model.transformer_blocks)
    counter = CompileCounter()
    torch._dynamo.reset()
    compile_blocks(pipe.model, backend=counter)
    seen, log = set(), []
    for label, g in STRUCTURES:
        before = counter.frame_count
        for i in range(3):  # steps 0, 1, 2: the timestep (and STAS's step window) change, the structure does not
            with torch.no_grad():
                pipe.denoiser(ctx, g, grid)(x, grid[i].item())
            if i == 0:
                first = counter.frame_count
        new = block_calls(g, layers) - seen
        seen |= new
        log.append((label, first - before, len(new), counter.frame_count - first))
    print(log)
    assert all(later == 0 for *_, later in log), f"a later step recompiled: {log}"
    assert all(traced == expected for _, traced, expected, _ in log), f"(label, traced, new block calls): {log}"
    assert counter.frame_count == len(seen) >= 4  # it really compiled: plain, one-row, identity, blur


@pytest.mark.parametrize("name", ["wan2.1-tiny", "cogvideox-tiny"])
def test_inductor_equals_eager(name):
    """Inductor-compiled blocks give the eager prediction of a CFG+STAS step with an STG-R branch (two traced graphs):
    float32 within 1e-5. In bfloat16 inductor fuses element-wise chains and rounds once where eager rounds after every
    op, so the two differ by bf16 rounding (a few 1e-3 on this tiny model, as far as bf16 eager is from float32): the
    compiled bf16 prediction must be as close to the float32 one as eager bf16 is, and near eager."""
    pipe, ctx, x, grid = tiny(name)
    g = Guidance("stg", 5.0, stg_blocks=(2,), stg_mode="R", stas=STAS, stas_steps=4)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    step = lambda pipe: pipe.denoiser(ctx, g, grid)(x, grid[1].item())  # noqa: E731
    torch._dynamo.reset()
    pipe16 = Pipeline(copy.deepcopy(pipe.model), None, None, None, name, {})
    with torch.no_grad():
        eager32 = step(pipe)
        compile_blocks(pipe.model)
        compiled32 = step(pipe)
        print(f"{name} float32: compiled vs eager {rel(compiled32, eager32):.2e}")
        assert rel(compiled32, eager32) <= 1e-5
        if name == "cogvideox-tiny":  # its bf16 is diffusers' (every weight bf16); one bf16 case is enough here
            return
        for n, p in pipe16.model.named_parameters():
            if not any(k in n for k in pipe16.model.keep_fp32):
                p.data = p.data.to(torch.bfloat16)
        eager16 = step(pipe16)
        compile_blocks(pipe16.model)
        compiled16 = step(pipe16)
    print(f"bfloat16: eager vs float32 {rel(eager16, eager32):.2e}, compiled vs float32 {rel(compiled16, eager32):.2e},"
          f" compiled vs eager {rel(compiled16, eager16):.2e}")
    assert 0 < rel(compiled16, eager32) <= 1.25 * rel(eager16, eager32)
    assert rel(compiled16, eager16) <= 2 * rel(eager16, eager32)
