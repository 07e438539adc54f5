"""Sequence parallel (Ulysses) on CPU with gloo: 2 ranks give the 1-process forward and sampling loop.

One spawn of 2 processes (module fixture `sp_results`) runs every case with `distributed.sequence_parallel()`; each
rank saves what it got, and the tests compare with the same case computed here in one process (float32,
<= 1e-5 relative to the largest value).
"""
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from minivdit import distributed
from minivdit.cogvideox import PRESETS as COG_PRESETS, CogVideoXModel
from minivdit.guidance import Guidance
from minivdit.interventions import Perturb, Steer, TokenLayout, Zero
from minivdit.pipeline import Pipeline, SampleConfig, tiny_checkpoint, tiny_cogvideox_checkpoint
from minivdit.wan import PRESETS, WanConfig, WanModel
from samplers import sample

ROOT = Path(__file__).resolve().parent.parent
RANKS = 2


def randomized(model, seed=0):
    """Seeded model with every parameter perturbed (no identity-initialized norm or table hides a bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval().requires_grad_(False)


def models():
    torch.manual_seed(0)
    return {"wan2.1": randomized(WanModel(PRESETS["wan2.1-tiny"].config)),
            "wan2.2-ti2v": randomized(WanModel(PRESETS["wan2.2-ti2v-tiny"].config), 1),
            "cogvideox-2b": randomized(CogVideoXModel(COG_PRESETS["cogvideox-tiny"].config), 2),
            "cogvideox-5b": randomized(CogVideoXModel(COG_PRESETS["cogvideox-tiny-rope"].config), 3),
            "cogvideox1.5": randomized(CogVideoXModel(COG_PRESETS["cogvideox1.5-tiny"].config), 4),
            "wan2.1-odd": randomized(WanModel(PRESETS["wan2.1-tiny"].config), 5),
            "cogvideox-5b-odd": randomized(CogVideoXModel(COG_PRESETS["cogvideox-tiny-rope"].config), 6)}


def inputs(name, model):
    """(x, t, context): 2 rows (cond / uncond), a token grid split across the two ranks' boundary; '-odd': an odd
    token count, padded by one token on the second rank."""
    g = torch.Generator().manual_seed(5)
    odd = name.endswith("-odd")
    if name.startswith("wan"):
        c = model.config
        x = torch.randn(2, c.in_dim, 3, *((6, 6) if odd else (8, 8)), generator=g)  # 3 x 3 x 3 = 27 or 3 x 4 x 4 = 48
        t = torch.tensor([700.0, 700.0])
        if name == "wan2.2-ti2v":  # per-token timesteps: the first latent frame's 16 tokens at t = 0
            t = torch.full((2, 48), 700.0)
            t[:, :16] = 0
        return x, t, torch.randn(2, c.text_len, c.text_dim, generator=g)
    c = model.config
    x = torch.randn(2, c.in_channels, *((3, 6, 10) if odd else (2, 8, 12)), generator=g)  # 3 x 3 x 5 = 45 or 2
    # (1.5: 1) x 4 x 6 tokens
    return x, torch.tensor([500, 500]), torch.randn(2, c.max_text_seq_length, c.text_embed_dim, generator=g)


def cases(captured):
    """name -> (perturb, branches): clean, STAS (both rules), DG / STG-A / STG-R branches (shared prefix), SEG's
    blurred queries (finite sigma and the mean), capture."""
    capture = lambda i, h: captured.append(h.clone())  # noqa: E731
    return {"clean": (Perturb(), ()),
            "stas": (Perturb(steer=Steer(block=1, dims=(3, 17), alpha=2.5, p=20.0)), ()),
            "stas-scaling": (Perturb(steer=Steer(block=2, dims=(5,), rule="scaling", tokens="boundary", p=20.0)), ()),
            "branches": (Perturb(steer=Steer(block=1, dims=(3,), tokens="first")),
                         ((0, Perturb(zero=Zero(block=1, dims=(3,)))), (1, Perturb(identity_attn=frozenset({2}))),
                          (0, Perturb(skip=frozenset({2}))))),
            "seg": (Perturb(), ((0, Perturb(blur_attn=frozenset({1}), blur_sigma=1.0)),  # SEG: blurred queries
                                (1, Perturb(blur_attn=frozenset({2}), blur_sigma=math.inf)))),
            "capture": (Perturb(capture=capture), ())}


def steer_padded():
    """STAS on a stream of 5 tokens (rank 1 under sp 2: 2 tokens and 1 padding row, which is set to 1e6 here): the
    max and the token set B(20%) = {0, 4} must leave the padding out."""
    h = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(7))
    mine = distributed.shard(h)
    if distributed.sp_world() > 1:
        mine[:, distributed.sp_valid():] = 1e6
    steer = Steer(block=0, dims=(1, 4), alpha=2.0, p=20.0, tokens="boundary")
    return distributed.gather(steer(mine, TokenLayout(frames=1, height=1, width=5)))


def forwards():
    """Every (model, case) forward, the captured block outputs, STAS on a padded shard: {key: tensor}."""
    out = {"steer-padded": steer_padded()}
    for name, model in models().items():
        x, t, context = inputs(name, model)
        captured = []
        for case, (perturb, branches) in cases(captured).items():
            out[f"{name}/{case}"] = model(x, t, context, perturb, branches)
        out[f"{name}/captured"] = torch.stack(captured)
    return out


def loops(ckpts):
    """3-step sampling loops (tiny Wan with CFG + DG + STAS; tiny CogVideoX-5B-style with CFG): the final latents."""
    out = {}
    for name, ckpt, guidance in (("wan", ckpts["wan"], Guidance("dg", 5.0, stas=Steer(block=1, dims=(3,)), stas_steps=2,
                                                                dg=Zero(block=2, dims=(3,)))),
                                 ("cogvideox", ckpts["cogvideox"], Guidance(guidance_scale=6.0))):
        pipe = Pipeline.load(ckpt)
        run = SampleConfig.from_preset(pipe.preset, "a fox", steps=3)
        out[f"loop/{name}"] = pipe.sample(run, guidance, progress=False)
    return out


def worker(rank, store, ckpts, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=RANKS)
    with distributed.sequence_parallel():
        got = {**forwards(), **loops(ckpts)}
        try:
            heads_not_divisible()(*heads_inputs())
            got["error/heads"] = "no error"
        except ValueError as e:
            got["error/heads"] = str(e)
    torch.save(got, Path(results) / f"rank{rank}.pt")
    dist.destroy_process_group()


def heads_not_divisible():
    torch.manual_seed(0)
    return WanModel(WanConfig(dim=48, ffn_dim=64, num_heads=3, num_layers=1, text_dim=32)).eval().requires_grad_(False)


def heads_inputs():
    return torch.randn(1, 16, 1, 4, 6), torch.tensor([10.0]), torch.randn(1, 512, 32)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {"wan": tiny_checkpoint(root / "wan"),
            "cogvideox": tiny_cogvideox_checkpoint(root / "cogvideox-tiny-rope", preset="cogvideox-tiny-rope")}


@pytest.fixture(scope="module")
def sp_results(tmp_path_factory, ckpts):
    """What each of 2 gloo ranks computed under sequence parallel: [rank 0's dict, rank 1's dict]."""
    tmp = tmp_path_factory.mktemp("sp")
    torch.multiprocessing.start_processes(worker, args=(str(tmp / "store"), ckpts, str(tmp)), nprocs=RANKS,
                                          start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(RANKS)]


@pytest.fixture(scope="module")
def one_process(ckpts):
    return {**forwards(), **loops(ckpts)}


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("model", ["wan2.1", "wan2.2-ti2v", "cogvideox-2b", "cogvideox-5b", "cogvideox1.5",
                                   "wan2.1-odd", "cogvideox-5b-odd"])
@pytest.mark.parametrize("case", ["clean", "stas", "stas-scaling", "branches", "seg", "captured"])
def test_sp2_forward_equals_one_process(sp_results, one_process, model, case):
    want = one_process[f"{model}/{case}"]
    for got in sp_results:
        assert got[f"{model}/{case}"].shape == want.shape
        assert rel(got[f"{model}/{case}"], want) <= 1e-5


def test_interventions_change_the_forward(one_process):
    """The cases above are not vacuous: each intervention moves the prediction (so a rank that ignored it fails)."""
    for model in ("wan2.1", "wan2.2-ti2v", "cogvideox-5b"):
        clean = one_process[f"{model}/clean"]
        for case in ("stas", "stas-scaling"):
            assert rel(one_process[f"{model}/{case}"], clean) > 1e-3
        branches = one_process[f"{model}/branches"]
        for row in range(2, 5):  # DG, STG-A, STG-R rows differ from their parent row's STAS-first pass
            assert rel(branches[row], branches[0 if row != 3 else 1]) > 1e-3
        seg = one_process[f"{model}/seg"]
        for row in (2, 3):  # SEG rows (sigma 1, infinite) differ from their clean parent rows
            assert rel(seg[row], seg[row - 2]) > 1e-3


def test_sp2_stas_leaves_the_padding_out(sp_results, one_process):
    for got in sp_results:
        assert rel(got["steer-padded"], one_process["steer-padded"]) <= 1e-6


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_sp2_sampling_loop_equals_one_process(sp_results, one_process, name):
    for got in sp_results:
        assert rel(got[f"loop/{name}"], one_process[f"loop/{name}"]) <= 1e-5


def test_sp_errors_name_the_numbers(sp_results):
    for got in sp_results:
        assert "3 attention heads are not divisible by 2" in got["error/heads"]
        assert "--sp [1, 3]" in got["error/heads"]  # the sizes that work for 3 heads
    with pytest.raises(ValueError, match=r"12 attention heads are not divisible by 5.*--sp \[1, 2, 3, 4, 6, 12\]"):
        distributed.check_sp(5, 12)
    with pytest.raises(ValueError, match="N must be >= 1"):
        distributed.check_sp(0, 12)
    distributed.check_sp(8, 40)  # Wan2.1-14B on 8 ranks


def test_sp_without_torchrun_is_refused(tmp_path, ckpts, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="--sp 2 needs torchrun"):
        sample.main(["--ckpt", str(ckpts["wan"]), "--output", str(tmp_path / "v.mp4"), "--sp", "2"])
    with pytest.raises(ValueError, match="4 attention heads are not divisible by 3"):
        sample.main(["--ckpt", str(ckpts["wan"]), "--output", str(tmp_path / "v.mp4"), "--sp", "3"])
    assert not any(tmp_path.iterdir())


def test_torchrun_sample_sp2_writes_the_one_process_video(tmp_path, ckpts):
    """samplers/sample.py --sp 2 under torchrun: rank 0 writes the video of one process and a sidecar with sp 2
    (3 x 3 x 3 = 27 tokens: the second rank's share is padded)."""
    args = ["--ckpt", str(ckpts["wan"]), "--steps", "3", "--frames", "9", "--height", "48", "--width", "48"]
    sample.main([*args, "--output", str(tmp_path / "one.mp4")])
    torchrun = shutil.which("torchrun") or pytest.fail("torchrun not on PATH")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(ROOT / "samplers" / "sample.py"),
                           *args, "--sp", "2", "--output", str(tmp_path / "sp.mp4")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "sp.mp4").read_bytes() == (tmp_path / "one.mp4").read_bytes()  # the same frames, bit for bit
    meta = json.loads((tmp_path / "sp.json").read_text())
    assert meta["sp"] == 2 and json.loads((tmp_path / "one.json").read_text())["sp"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "one.mp4", "sp.json", "sp.mp4"]
