"""`occlab bench step` for every VAE of the kit (issue #10 §4): SEP-4D, OccSora and X-Scene's VAE at a tiny size
train (every parameter moves, the loss falls), encode+decode, give the JSON keys; the paper sizes are built; the
options and errors of the command line. DynamicCity's fast paths and its bench JSON: tests/test_fast_paths.py."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from occlab import cli
from occlab.bench import MODELS, RESULT_KEYS, STATIC, TRAIN_KW, BenchSpec, _vae, bench_sizes, cli_args, run, step_fn
from occlab.errors import OcclabError
from occlab.models import MODELS as REGISTRY

NEW = ("sep4d", "occsora", "xscene-vae")
REGISTRY_NAME = {"sep4d": "sep4d", "occsora": "occsora", "xscene-vae": "xscene"}
CPU = torch.device("cpu")


def tiny(model: str, **kw) -> BenchSpec:
    """The workload at the model's tiny preset on a 16x16x8 crop, T = 4 (X-Scene: one scene)."""
    return BenchSpec(model=model, widths="tiny", grid=(16, 16, 8), frames=4, **kw)


@pytest.mark.parametrize("model", NEW)
def test_tiny_train_step_trains(model):
    """The steps really train: 6 of them move every parameter (zero-initialised layers pass their first gradient on
    in the second step) and lower the loss."""
    torch.manual_seed(0)
    net, step = step_fn(tiny(model), CPU)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    losses = [float(step()) for _ in range(6)]
    assert [n for n, p in net.named_parameters() if torch.equal(p, before[n])] == []
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.98 * losses[0], losses


@pytest.mark.parametrize("model", NEW)
def test_tiny_encode_decode(model):
    """encode+decode runs without grad in eval mode and gives full-grid logits (X-Scene: per scene)."""
    net, step = step_fn(tiny(model, task="encode-decode"), CPU)
    logits = step()
    assert not net.training and not logits.requires_grad
    assert tuple(logits.shape) == ((1, 11, 16, 16, 8) if model in STATIC else (1, 11, 4, 16, 16, 8))


@pytest.mark.parametrize("model", NEW)
def test_tiny_run_json(model):
    """run() times the tiny workload and reports the issue's keys and the size it actually ran."""
    threads = torch.get_num_threads()
    try:
        result = run(tiny(model, steps=2, warmup=0, threads=threads))
    finally:
        torch.set_num_threads(threads)
    assert set(RESULT_KEYS) <= set(result)
    json.dumps(result)  # JSON-able
    assert result["s_min"] <= result["s_per_step"] <= result["s_max"]
    assert result["grid"] == [16, 16, 8] and result["widths"] == "tiny"
    assert result["frames"] == (1 if model in STATIC else 4) and result["static"] == (model in STATIC)
    entry = REGISTRY[REGISTRY_NAME[model]]
    expected = entry.model(entry.presets["tiny"]((16, 16, 8), result["frames"], num_classes=11))
    assert result["params"] == sum(p.numel() for p in expected.parameters())


@pytest.mark.parametrize("model", NEW)
def test_small_builds_the_paper_size(model):
    """--small: the paper preset of the method at 64x64x8, T = 8 (X-Scene: one scene), CarlaSC classes."""
    net, labels, _, _ = _vae(BenchSpec(model=model, small=True), CPU)
    frames = 1 if model in STATIC else 8
    assert net.config == REGISTRY[REGISTRY_NAME[model]].presets["paper"]((64, 64, 8), frames, num_classes=11)
    assert tuple(labels.shape) == (1, frames, 64, 64, 8) and int(labels.max()) < 11


def test_occ3d_geometry_sizes():
    assert bench_sizes(BenchSpec(model="sep4d", geometry="occ3d", frames=8)) == ((200, 200, 16), 8)
    assert bench_sizes(BenchSpec(model="xscene-vae", geometry="occ3d", frames=8)) == ((200, 200, 16), 1)
    with pytest.raises(OcclabError, match="larger than"):
        bench_sizes(BenchSpec(model="occsora", grid=(256, 16, 8)))
    with pytest.raises(OcclabError, match="cannot be built.*not divisible by its rate"):
        _vae(BenchSpec(model="occsora", frames=4), CPU)  # the paper's rates 8, 8, 8


def test_losses_as_the_studies_train_them():
    """OccSora: unweighted CE x 10 + Lovász + VQ; the others class-weighted CE + Lovász + KL (studies/vae.py)."""
    from occlab.studies.vae import TRAIN_KW as STUDY_TRAIN_KW

    assert TRAIN_KW == STUDY_TRAIN_KW
    _, _, occsora_loss, _ = _vae(tiny("occsora"), CPU)
    assert occsora_loss.ce == 10.0 and occsora_loss.weights.numel() == 0
    _, _, sep4d_loss, _ = _vae(tiny("sep4d"), CPU)
    assert sep4d_loss.ce == 1.0 and sep4d_loss.kl == 0.005 and sep4d_loss.weights.numel() == 11


def test_unknown_model_lists_all_five(capsys):
    with pytest.raises(OcclabError) as err:
        BenchSpec(model="nope")
    assert all(name in str(err.value) for name in MODELS) and len(MODELS) == 5
    assert cli.BENCH_MODELS == MODELS
    with pytest.raises(SystemExit) as ex:
        cli.main(["bench", "step", "--model", "nope"])
    assert ex.value.code == 2
    message = capsys.readouterr().err
    assert all(name in message for name in MODELS)


def test_options_of_other_models_rejected(capsys):
    """DynamicCity's paths and rates are refused elsewhere (SEP-4D takes rates); X-Scene takes no --frames."""
    with pytest.raises(OcclabError, match="checkpoint"):
        BenchSpec(model="occsora", checkpoint=True)
    with pytest.raises(OcclabError, match="rates"):
        BenchSpec(model="xscene-vae", rates=(1, 2, 2, 2))
    with pytest.raises(OcclabError, match="encode-decode"):
        BenchSpec(model="dynamiccity-dit", task="encode-decode")
    with pytest.raises(OcclabError, match="paper size only"):
        BenchSpec(model="dynamiccity-dit", widths="tiny")
    assert bench_sizes(BenchSpec(model="sep4d", rates=(1, 2, 2, 2), frames=4)) == ((128, 128, 8), 4)
    assert cli.main(["bench", "step", "--model", "xscene-vae", "--frames", "4"]) == 2
    assert "static" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("model", NEW)
def test_cli_small_paper_size(model):
    """`occlab bench step --model M --small --json` in a fresh process at the paper size."""
    cmd = [sys.executable, "-m", "occlab", "bench", "step", "--model", model, "--small", "--steps", "1",
           "--warmup", "0", "--threads", "1", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(RESULT_KEYS) <= set(result) and result["model"] == model and result["grid"] == [64, 64, 8]
    assert result["params"] > 400_000 and 0.2 < result["peak_mem_gib"] < 16


@pytest.mark.parametrize("spec", [
    BenchSpec(),
    BenchSpec(widths="small", grid=(32, 32, 8), frames=8, encoder="avgpool", decoder="query", rates=(1, 2, 2, 1),
              threads=1, steps=1, attn_dropout=0.1, precision="bf16"),
    BenchSpec(model="sep4d", task="encode-decode", rates=(1, 1, 1, 1), small=True, warmup=0),
    BenchSpec(model="xscene-vae", widths="tiny", grid=(16, 16, 8), batch=2, checkpoint=False),
    BenchSpec(reference=True, checkpoint=True, frame_chunk=2, geometry="occ3d", device="cuda"),
])
def test_cli_args_rebuild_the_spec(spec):
    """cli_args is the inverse of `occlab bench step`'s parser: the fresh process step_cost starts measures the
    same workload."""
    args = cli.build_parser().parse_args(["bench", "step", *cli_args(spec)])
    assert cli.bench_spec(args) == spec


def test_cli_sizes_a_study_variant(capsys):
    """--widths, --grid, --frames and DynamicCity's --encoder/--decoder/--rates reach the workload."""
    assert cli.main(["bench", "step", "--widths", "tiny", "--grid", "16", "16", "8", "--frames", "4", "--encoder",
                     "avgpool", "--decoder", "query", "--rates", "1,2,2,1", "--steps", "1", "--warmup", "0",
                     "--threads", str(torch.get_num_threads()), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["grid"] == [16, 16, 8] and result["frames"] == 4 and result["widths"] == "tiny"
    assert (result["encoder"], result["decoder"], result["rates"]) == ("avgpool", "query", [1, 2, 2, 1])
    assert cli.main(["bench", "step", "--encoder", "pooling"]) == 2
    assert "encoder must be one of" in capsys.readouterr().err
