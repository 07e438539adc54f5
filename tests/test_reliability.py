"""Reliability of samplers/sample.py and the Python API on the tiny checkpoints (issue 11): never a wrong result with
exit code 0 (NaN / inf stop the run, options that do not apply and out-of-domain values are refused), errors before
heavy work with distinct messages, one-line CLI errors, sidecars that record what acted, interrupts and permissions
that leave nothing odd on disk."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minivdit import cli
from minivdit.checkpoints import CheckpointError
from minivdit.guidance import Guidance
from minivdit.pipeline import (NonFiniteError, Pipeline, SampleConfig, tiny_checkpoint, tiny_cogvideox_checkpoint,
                               write_once)
from minivdit.text import read_prompts
from minivdit.video import atomic_write, umask
from samplers import sample

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "samplers" / "sample.py")
SMALL = ["--frames", "1", "--height", "16", "--width", "16", "--steps", "2"]


@pytest.fixture(scope="module")
def wan():
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def cog():
    return tiny_cogvideox_checkpoint()


@pytest.fixture(scope="module")
def pipe(wan):
    return Pipeline.load(wan)


def no_outputs(folder: Path) -> bool:
    """No mp4, json or temporary (dot) file in folder (or the folder does not exist)."""
    return not folder.exists() or not [f for f in folder.iterdir()]


def fails(argv, match, kind=ValueError):
    with pytest.raises(kind, match=match):
        sample.main(argv)


def run_script(args, **kw):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=kw.pop("cwd", ROOT),
                          timeout=600, **kw)


# ------------------------------------------------------------------------------------------------------------
# non-finite values


def test_nan_in_a_dit_or_vae_weight_is_refused_at_load_naming_file_and_tensor(wan, tmp_path, monkeypatch):
    bad = tmp_path / "ckpt"
    shutil.copytree(wan, bad)
    sd = load_file(bad / "diffusion_pytorch_model.safetensors")
    sd["blocks.1.ffn.0.weight"][3, 5] = float("nan")
    save_file(sd, bad / "diffusion_pytorch_model.safetensors")
    out = tmp_path / "out"
    fails(["--ckpt", str(bad), "--output", str(out / "a.mp4"), *SMALL],
          r"diffusion_pytorch_model.safetensors: tensor 'blocks.1.ffn.0.weight' holds 1 NaN / inf", CheckpointError)
    shutil.copy(wan / "diffusion_pytorch_model.safetensors", bad)  # DiT fine again, now the VAE
    vae = torch.load(bad / "Wan2.1_VAE.pth", weights_only=True)
    key = next(k for k in vae if k.startswith("decoder.") and vae[k].is_floating_point())
    vae[key].view(-1)[0] = float("inf")
    torch.save(vae, bad / "Wan2.1_VAE.pth")
    fails(["--ckpt", str(bad), "--output", str(out / "a.mp4"), *SMALL], rf"Wan2.1_VAE.pth: tensor '{key}' holds 1",
          CheckpointError)
    assert no_outputs(out)


def test_nan_during_the_run_names_step_sigma_or_component(pipe):
    run = SampleConfig("a fox", frames=1, height=16, width=16, steps=3)
    w = pipe.model.head.head.weight
    keep = w.clone()
    try:
        with torch.no_grad():
            w[0, 0] = float("nan")  # finite at load, NaN in the run (as an overflow would be)
        with pytest.raises(NonFiniteError, match=r"in solver step 1 of 3 \(step index 0, sigma [\d.]+, DiT, guidance cfg\)"):
            pipe(run, Guidance(), progress=False)
    finally:
        with torch.no_grad():
            w.copy_(keep)
    context = pipe.encode(["a fox", ""])
    context[1, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="text embedding"):
        pipe.sample(run, Guidance(), context=context, progress=False)
    v = pipe.vae.decoder.head[-1].weight
    keep = v.clone()
    try:
        with torch.no_grad():
            v.view(-1)[0] = float("nan")
        with pytest.raises(NonFiniteError, match="decoded video"):
            pipe(run, Guidance(), progress=False)
    finally:
        with torch.no_grad():
            v.copy_(keep)
    assert torch.isfinite(pipe(run, Guidance(), progress=False)).all()  # restored: the checks pass a good run


def test_overflow_in_the_cli_run_writes_nothing_and_exits_1(wan, tmp_path):
    """Weights that are finite but overflow (1e38) pass the load check; the per-step check stops the script."""
    bad = tmp_path / "ckpt"
    shutil.copytree(wan, bad)
    sd = load_file(bad / "diffusion_pytorch_model.safetensors")
    sd["head.head.weight"].fill_(1e38)
    save_file(sd, bad / "diffusion_pytorch_model.safetensors")
    out = tmp_path / "out"
    r = run_script(["--ckpt", str(bad), "--output", str(out / "a.mp4"), *SMALL])
    assert r.returncode == 1, r.stderr
    assert "error: non-finite values (NaN / inf) in solver step 1 of 2 (step index 0, sigma" in r.stderr
    assert "Traceback" not in r.stderr and no_outputs(out)


# ------------------------------------------------------------------------------------------------------------
# the CLI


def test_script_user_error_is_one_line_exit_2_and_debug_shows_the_traceback(tmp_path):
    r = run_script(["--fps", "0", "--output", str(tmp_path / "a.mp4")])
    assert r.returncode == 2 and r.stderr.strip() == "error: fps=0 must be >= 1 (frames per second of the mp4)"
    with pytest.raises(ValueError, match="fps=0"):  # --debug: the exception (and its traceback) goes through
        cli.run(sample.main, ["--fps", "0", "--debug", "--output", str(tmp_path / "a.mp4")])
    assert no_outputs(tmp_path)


def test_cli_run_exit_codes(capsys):
    def user(argv):
        raise FileExistsError("x exists; pass --overwrite")

    def bug(argv):
        raise KeyError("a bug")

    with pytest.raises(SystemExit) as e:
        cli.run(user, [])
    assert e.value.code == 2 and capsys.readouterr().err == "error: x exists; pass --overwrite\n"
    with pytest.raises(KeyError):  # unexpected exceptions keep their traceback
        cli.run(bug, [])
    with pytest.raises(FileExistsError):
        cli.run(user, ["--debug"])


def test_help_gives_every_option_a_default():
    from minivdit.guidance import OPTIONS
    from samplers import analyze, compare
    guidance = {name for name, *_ in OPTIONS}  # their group's title: "default: the preset's settings"
    for script in (sample, compare, analyze):
        for a in script.parser()._actions:
            assert a.help, (script.__name__, a.dest)
            assert a.dest == "help" or a.dest in guidance or "default" in a.help, (script.__name__, a.dest)
    text = sample.parser().format_help()
    assert "'random'" in text and "default: the preset's settings" in text


# ------------------------------------------------------------------------------------------------------------
# options that do not apply, values out of their domain


@pytest.mark.parametrize("argv, match", [
    (["--dg-scale", "2"], "--dg-scale belongs to method 'dg'"),
    (["--stg-rescale"], "--stg-rescale belongs to method 'stg'"),
    (["--stas-alpha", "3"], r"--stas-alpha belongs to STAS \(add --stas\)"),
    (["--zero-init-steps", "1", "--method", "apg"], "belongs to method 'cfg-zero\\*'"),
    (["--steer-experts", "high"], "two-expert models"),
    (["--keep-experts"], "two-expert models"),
    (["--dynamic-cfg"], "dynamic CFG is CogVideoX's"),
    (["--fps", "0"], "fps=0 must be >= 1"),
    (["--steps", "0"], "steps=0 must be >= 1"),
    (["--guidance-scale", "-1"], "guidance_scale = -1.0 must be >= 0"),
    (["--frames", "4"], "4k\\+1"),
    (["--method", "cfg-zero*", "--zero-init-steps", "9", "--steps", "4"], "zero_init_steps = 9 exceeds"),
    (["--stas", "--stas-block", "7"], "block indices"),
    (["--device", "cuda:x"], "not a torch device"),
])
def test_options_that_do_not_apply_and_bad_values_are_refused(argv, match, tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "encode_prompts", lambda *a, **k: pytest.fail("heavy work before the checks"))
    fails([*argv, "--output", str(tmp_path / "a.mp4")], match)
    assert no_outputs(tmp_path)


def test_shift_refused_for_cogvideox(cog, tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "encode_prompts", lambda *a, **k: pytest.fail("heavy work before the checks"))
    fails(["--ckpt", str(cog), "--shift", "3", "--output", str(tmp_path / "a.mp4")], "CogVideoX has no flow shift")


@pytest.mark.parametrize("argv, match", [
    (["--seed", "-5"], "out of range"), (["--seed", "x"], "a seed is an integer"), (["--seed", str(2**63)], "out of range"),
    (["--guidance-scale", "nan"], "not a finite number"), (["--stas-alpha", "inf"], "not a finite number"),
    (["--shift=-inf"], "not a finite number"),
])
def test_argparse_domains(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        sample.parse(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_device_cuda_without_a_gpu_says_how_to_run_on_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fails(["--device", "cuda", "--output", str(tmp_path / "a.mp4")], "no CUDA GPU is visible.*--device cpu")


# ------------------------------------------------------------------------------------------------------------
# a full run: random seed, long prompt, default output name, sidecar contents, permissions


def test_run_records_seed_tokens_command_acting_settings_and_weights(wan, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "sample.mp4").write_bytes(b"taken")
    old = os.umask(0o022)
    try:
        with pytest.warns(UserWarning, match=r"prompt 1 .* is (\d+) tokens long; the umt5 reads 512: truncated, its "
                                             r"last \d+ tokens are dropped"):
            out = sample.main(["--seed", "random", "--prompt", "fox " * 600, *SMALL])
    finally:
        os.umask(old)
    assert out == Path("outputs/sample-1.mp4") and (tmp_path / "outputs" / "sample.mp4").read_bytes() == b"taken"
    meta = json.loads(out.with_suffix(".json").read_text())
    assert f"seed: {meta['seed']} (random" in capsys.readouterr().err and 0 <= meta["seed"] < 2**63
    assert meta["prompt_tokens"]["prompt"] == 512 and 0 < meta["prompt_tokens"]["negative_prompt"] < 512
    assert meta["command"].startswith("python samplers/sample.py --seed random --prompt 'fox fox")
    assert meta["guidance"] == {"method": "cfg", "guidance_scale": 5.0}  # no DG / STG / APG settings that did not act
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert meta["versions"]["minivdit_commit"].startswith(head.strip())
    f = wan / "diffusion_pytorch_model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert meta["weight_files"][str(f.resolve())] == {"bytes": len(raw), "of": "safetensors header",
                                                     "sha256": hashlib.sha256(raw[8:8 + n]).hexdigest()}
    assert any(k.endswith("Wan2.1_VAE.pth") for k in meta["weight_files"])
    for p in (out, out.with_suffix(".json")):
        assert p.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["sample-1.json", "sample-1.mp4", "sample.mp4"]


def test_sidecar_of_a_method_records_its_settings_only(pipe):
    from minivdit.pipeline import sidecar
    from minivdit.interventions import Steer, Zero
    g = Guidance(method="dg", dg=Zero(block=1, dims=(3,)), dg_scale=2.0, stas=Steer(block=1, dims=(3,)),
                 stas_steps=1)
    meta = sidecar(pipe, SampleConfig("x"), g)
    assert set(meta["guidance"]) == {"method", "guidance_scale", "dg", "dg_scale", "stas", "stas_steps"}
    assert meta["guidance"]["dg"] == {"block": 1, "dims": [3]}


# ------------------------------------------------------------------------------------------------------------
# fail before heavy work: output paths, files


def test_output_path_problems(tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "encode_prompts", lambda *a, **k: pytest.fail("heavy work before the checks"))
    (tmp_path / "dir.mp4").mkdir()
    fails(["--output", str(tmp_path / "dir.mp4")], "is a folder")
    (tmp_path / "file").write_text("x")
    fails(["--output", str(tmp_path / "file" / "sub" / "a.mp4")], "is a file, not a folder")
    (tmp_path / "a.mp4").write_text("x")
    fails(["--output", str(tmp_path / "a.mp4")], "already exists; choose another --output or pass --overwrite",
          FileExistsError)
    fails(["--output", str(tmp_path / "a.avi")], "must end in .mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "dir.mp4", "file"]


def test_corrupt_wrong_kind_and_unreadable_files_get_distinct_messages(wan, cog, tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "encode_prompts", lambda *a, **k: pytest.fail("heavy work before the checks"))
    parts = ["--vae", str(wan / "Wan2.1_VAE.pth"), "--text-encoder", str(wan / "models_t5_umt5-xxl-enc-bf16.pth"),
             "--tokenizer", str(wan / "google" / "umt5-xxl"), "--output", str(tmp_path / "o.mp4")]
    short = tmp_path / "short.safetensors"
    short.write_bytes((wan / "diffusion_pytorch_model.safetensors").read_bytes()[:1000])
    fails(["--ckpt", str(short), *parts], "short.safetensors: cannot read safetensors header .* truncated or corrupt")
    vae = cog / "vae" / "diffusion_pytorch_model.safetensors"
    fails(["--ckpt", str(vae), *parts], "this is a VAE checkpoint, not a DiT: give it with --vae, and the DiT with "
                                        "--ckpt")
    good = tmp_path / "dit.safetensors"
    shutil.copy(wan / "diffusion_pytorch_model.safetensors", good)
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != good)  # tests may run as root: chmod would not do
    fails(["--ckpt", str(good), *parts], "dit.safetensors: permission denied.*chmod")


def test_vae_of_the_other_family_and_missing_components(wan, cog, tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "encode_prompts", lambda *a, **k: pytest.fail("heavy work before the checks"))
    out = ["--output", str(tmp_path / "o.mp4")]
    fails(["--ckpt", str(wan), "--vae", str(cog / "vae"), *out], r"vae: a CogVideoX VAE .*, but wan2.1-tiny is a Wan "
                                                                  r"model: pass the Wan2.1 VAE \(Wan2.1_VAE.pth\) with --vae")
    fails(["--ckpt", str(cog), "--vae", str(wan / "Wan2.1_VAE.pth"), *out],
          "Wan2.1_VAE.pth: a Wan VAE, but cogvideox-tiny is a CogVideoX model: give the CogVideoX vae/ folder")
    fails(["--ckpt", str(wan), "--vae", str(wan / "models_t5_umt5-xxl-enc-bf16.pth"), *out],
          "this is a text encoder checkpoint, not a VAE: give it with --text-encoder")
    part = tmp_path / "cog"
    shutil.copytree(cog, part)
    shutil.rmtree(part / "text_encoder")
    fails(["--ckpt", str(part), *out], r"text_encoder: missing text_encoder of the diffusers checkpoint .* pass "
                                       r"--text-encoder or complete the download")
    shutil.copytree(cog / "text_encoder", part / "text_encoder")
    shutil.rmtree(part / "tokenizer")
    fails(["--ckpt", str(part), *out], "tokenizer: missing tokenizer of the diffusers checkpoint .* pass --tokenizer")


def test_prompt_file_without_a_usable_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n  \n# a comment\n")
    with pytest.raises(ValueError, match="no prompt in this file"):
        read_prompts(f)
    f.write_text("# c\n a cat \n\nthe sea\n")
    assert read_prompts(f) == ["a cat", "the sea"]


def test_compare_and_analyze_refuse_bad_input_before_loading(wan, tmp_path, monkeypatch):
    """An empty prompt file, --device cuda without a GPU and plot / A.1 indices outside the run are refused by
    compare.py and analyze.py before any model is loaded."""
    from samplers import analyze, compare

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(Pipeline, "load", no_load)
    monkeypatch.setattr(compare, "encode_prompts", no_load)  # each loads the text encoder
    monkeypatch.setattr(analyze, "encode_prompts", no_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    empty = tmp_path / "p.txt"
    empty.write_text("\n# only a comment\n")
    for script, argv in ((compare, ["--out", str(tmp_path / "c")]), (analyze, ["--out", str(tmp_path / "a")])):
        with pytest.raises(ValueError, match="no prompt in this file"):
            script.main(["--prompts", str(empty), *argv])
        with pytest.raises(ValueError, match="--device cpu"):
            script.main(["--device", "cuda", *argv])
    base = ["--steps", "3", "--out", str(tmp_path / "a")]
    with pytest.raises(ValueError, match=r"step 3 .* outside the run's steps 0..2"):
        analyze.main([*base, "--plot-step", "3"])
    with pytest.raises(ValueError, match=r"block 7 .* not recorded"):
        analyze.main([*base, "--blocks", "0", "1", "--a1", "1:7"])


def test_large_cpu_run_prints_an_estimate_first(wan, capsys):
    from minivdit.pipeline import family_of, find_checkpoint
    found = find_checkpoint(wan)
    fam = family_of("wan2.1-tiny")
    preset = fam.presets["wan2.1-tiny"]
    big, small = SampleConfig("x", frames=81, height=480, width=832), SampleConfig("x", frames=1, height=16, width=16)
    cost = sample.estimate(found, preset, big, Guidance(), fam, torch.float32)
    assert cost["tokens"] == 21 * 30 * 52 and cost["passes"] == 2
    sample.warn_if_large(cost, "cpu")
    assert "note: a large run for the CPU: 32760 video tokens" in capsys.readouterr().err
    sample.warn_if_large(sample.estimate(found, preset, small, Guidance(), fam, torch.float32), "cpu")
    sample.warn_if_large(cost, "cuda")
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------------------
# interrupts and permissions


def test_interrupt_while_writing_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "x.mp4"

    def write(tmp):
        Path(tmp).write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "run"
    monkeypatch.setattr(sample, "write_json", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # after the mp4, before its sidecar: the mp4 goes too
        sample.main(["--output", str(out / "a.mp4"), *SMALL])
    assert no_outputs(out)


def test_sigterm_during_sampling_exits_promptly_leaving_nothing(tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, SCRIPT, "--output", str(out / "a.mp4"), "--steps", "400"], cwd=ROOT,
                         stderr=subprocess.PIPE, text=True)
    err = ""
    while "sampling" not in err:  # tqdm ends its lines with \r: read characters
        ch = p.stderr.read(1)
        assert ch, f"the script ended before sampling: {err}"
        err += ch
    t = time.perf_counter()
    p.send_signal(signal.SIGTERM)
    rest = p.communicate(timeout=120)[1]
    assert p.returncode == 143 and "interrupted" in rest and "Traceback" not in rest
    assert time.perf_counter() - t < 60 and "loading diffusion_pytorch_model.safetensors" in err + rest
    assert no_outputs(out)


def test_tiny_checkpoint_folders_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        root = write_once(tmp_path / "ckpt", lambda tmp: (tmp / "sub").mkdir() or (tmp / "sub" / "f").write_text("x"))
    finally:
        os.umask(old)
    assert [(root / p).stat().st_mode & 0o777 for p in (".", "sub", "sub/f")] == [0o755, 0o755, 0o644]
    assert umask() == old
