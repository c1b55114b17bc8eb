"""The latent pipeline of the HexPlane DiT: encode a split with a trained VAE, train the DiT on the cached latents
(learning, EMA, exact resumption, divergence stop), sample and decode to npz files, the command line, errors."""
import csv
import json

import numpy as np
import pytest
import torch

from occlab import checkpoint
from occlab.cli import main
from occlab.diffusion import Diffusion
from occlab.errors import OcclabError
from occlab.models import dit as D
from occlab.planes import PLANES
from occlab.train.dit_trainer import TrainingDiverged, condition_drops, dit_setup, load_dit, train_dit
from occlab.train.latents import LatentDataset, encode_latents, layout_features, normalise, read_cache

T, GRID = 4, (16, 16, 8)  # the smoke preset's windows; the tiny VAE's latent is (T', X', Y', Z') = (2, 8, 8, 4), C 4


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """A DynamicCity VAE trained 2 steps at the smoke preset, through the command line."""
    base = tmp_path_factory.mktemp("latent_pipeline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OCCLAB_CACHE", str(base / "town"))
        assert main(["train", "vae", "--preset", "smoke", "--steps", "2", "--threads", "1",
                     "--out", str(base / "vae")]) == 0
    return base / "vae" / "checkpoint.pt"


@pytest.fixture(autouse=True)
def town_cache(vae, monkeypatch):
    monkeypatch.setenv("OCCLAB_CACHE", str(vae.parents[1] / "town"))


def tiny(vae, rollout="pro", conditions=(), **kw):
    dit, cfg = dit_setup(vae, "smoke", rollout, conditions)
    cfg.threads, cfg.ckpt_every = 1, 4
    for k, v in kw.items():
        setattr(cfg, k, v)
    return dit, cfg


def log_losses(out):
    with open(out / "log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------------------
# latents
# ---------------------------------------------------------------------------------------------------------

def test_latents_have_the_vae_shapes_and_train_normalisation(vae):
    paths = encode_latents(vae, progress=False)
    train, val = read_cache(paths["train"]), read_cache(paths["val"])
    shapes = {"tx": (2, 8), "ty": (2, 8), "tz": (2, 4), "xy": (8, 8), "xz": (8, 4), "yz": (8, 4)}
    assert {n: tuple(v.shape) for n, v in train["planes"].items()} == {n: (4, 4, *ab) for n, ab in shapes.items()}
    assert val["planes"]["xy"].shape == (2, 4, 8, 8)
    for n in PLANES:  # the train statistics, stored in (and applied to) every split
        assert torch.equal(train["stats"]["mean"][n], val["stats"]["mean"][n])
        z = normalise(train["planes"], train["stats"])[n].double()  # float32: a 2-step VAE's nearly constant
        assert z.mean((0, 2, 3)).abs().max() < 5e-3  # channels (|mean| / std ~ 1e4) lose a few digits
        assert (z.std((0, 2, 3), unbiased=False) - 1).abs().max() < 5e-3
    ds = LatentDataset(paths["train"], "pro", 2)
    item = ds[1]
    assert item["x"].shape == (4, 14, 14)  # padded rollout (X+T+Z, Y+Z+T)
    assert torch.equal(ds.layout.from_map(item["x"][None])["xy"][0], ds.planes_of(1)["xy"])
    assert item["cond"]["command"].dtype == torch.long and item["cond"]["trajectory"].shape == (T, 3)
    assert item["cond"]["layout"].shape == (11, 8, 8)
    assert torch.allclose(item["cond"]["layout"].sum(0), torch.ones(8, 8), atol=1e-2)  # class fractions
    assert not bool(ds.has_previous.any()) and not item["has_previous"]  # town scenes are one window long
    assert LatentDataset(paths["train"], None)[0]["x"]["tz"].shape == (4, 2, 4)
    mtime = paths["train"].stat().st_mtime_ns  # a valid cache is reused
    assert encode_latents(vae, progress=False) == paths and paths["train"].stat().st_mtime_ns == mtime


def test_previous_window_comes_from_the_same_scene(vae, tmp_path):
    opts = {"seq_len": 2 * T, "num_sequences": 1}  # one scene of 8 frames: windows start at 0..4
    paths = encode_latents(vae, tmp_path, ("train",), data_options=opts, progress=False)
    ds = LatentDataset(paths["train"], "vconcat", 2)
    assert ds.previous.tolist() == [-1, -1, -1, -1, 0]
    item = ds[4]
    assert item["has_previous"] and torch.equal(item["cond"]["previous"], ds[0]["x"])
    assert not ds[2]["has_previous"] and torch.count_nonzero(ds[2]["cond"]["previous"]) == 0  # null: zeros
    batch = {"x": torch.zeros(2, 1), "has_previous": torch.tensor([True, False])}
    dit = D.dit_tiny(previous_cond=True, command_cond=True, cond_dropout=0.0)
    drops = condition_drops(dit, batch, torch.device("cpu"))
    assert drops["previous"].tolist() == [False, True] and drops["command"].tolist() == [False, False]


def test_layout_features_are_class_fractions():
    lay = torch.zeros(2, 4, 4, dtype=torch.uint8)
    lay[0, :2, :2] = 3
    lay[1, 0, 0] = 255  # ignore: no class
    f = layout_features(lay, 11, (2, 2))
    assert f.shape == (11, 2, 2)
    assert f[3, 0, 0] == pytest.approx(0.5) and f[0, 0, 0] == pytest.approx(0.5 * 3 / 4)
    assert f[:, 1, 1].sum() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------

def fixed_loss(model, x0, diffusion, mask):
    g = torch.Generator().manual_seed(123)
    t = torch.linspace(0, diffusion.steps - 1, 16).long()
    noise = torch.randn(16, *x0.shape[1:], generator=g)
    with torch.no_grad():
        return float(diffusion.loss(lambda x, s: model(x, s), x0.expand(16, -1, -1, -1), t=t, noise=noise, mask=mask))


def test_the_dit_learns_a_fixed_latent_and_keeps_an_ema(vae, tmp_path):
    dit, cfg = tiny(vae, steps=30, batch_size=4, lr=2e-3, data_options={"num_sequences": 1})
    res = train_dit(vae, tmp_path / "run", dit, cfg, progress=False)
    ds = LatentDataset(json.loads((tmp_path / "run" / "config.json").read_text())["latents"], dit.rollout)
    assert len(ds) == 1  # one window: every batch holds the same latent
    x0 = ds[0]["x"][None]
    diffusion = Diffusion(cfg.diffusion_steps)
    torch.manual_seed(0)
    untrained = D.DiT(dit).eval()  # adaLN-Zero: predicts zero, loss = E[noise^2] ~ 1
    trained, state = load_dit(res.checkpoint, ema=False)
    before = fixed_loss(untrained, x0, diffusion, untrained.loss_mask())
    after = fixed_loss(trained, x0, diffusion, trained.loss_mask())
    assert before == pytest.approx(1.0, abs=0.1) and after < 0.75 * before
    losses = log_losses(tmp_path / "run")
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5])
    ema, _ = load_dit(res.checkpoint)
    assert any(not torch.equal(a, b) for a, b in zip(ema.parameters(), trained.parameters()))
    assert all(torch.isfinite(p).all() for p in ema.parameters())
    assert state["step"] == 30 and state["vae_fingerprint"] and set(state["stats"]) >= {"mean", "std"}
    meta = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert meta["steps"] == 30 and meta["params"] == sum(p.numel() for p in trained.parameters())


def test_an_interrupted_run_resumes_exactly(vae, tmp_path, monkeypatch):
    dit, cfg = tiny(vae, "unfold", ("command", "trajectory", "layout"), steps=8, batch_size=2)
    train_dit(vae, tmp_path / "straight", dit, cfg, progress=False)
    calls = {"n": 0}
    forward = D.DiT.forward

    def interrupting(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return forward(self, *a, **kw)

    monkeypatch.setattr(D.DiT, "forward", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train_dit(vae, tmp_path / "resumed", dit, cfg, progress=False)
    assert checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")["step"] == 5
    monkeypatch.setattr(D.DiT, "forward", forward)
    train_dit(vae, tmp_path / "resumed", dit, cfg, progress=False)
    assert log_losses(tmp_path / "resumed") == log_losses(tmp_path / "straight")
    a, b = (checkpoint.load(tmp_path / r / "checkpoint.pt") for r in ("straight", "resumed"))
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(vae, tmp_path, monkeypatch):
    dit, cfg = tiny(vae, steps=8, batch_size=2)
    calls = {"n": 0}
    loss = Diffusion.loss

    def poisoned(self, *a, **kw):
        calls["n"] += 1
        out = loss(self, *a, **kw)
        return out * float("nan") if calls["n"] == 6 else out

    monkeypatch.setattr(Diffusion, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 6.*last good checkpoint"):
        train_dit(vae, tmp_path, dit, cfg, progress=False)
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 4


def test_the_layout_condition_trains_under_bf16_autocast(vae, tmp_path):
    dit, cfg = tiny(vae, conditions=("layout",), steps=1, batch_size=2, precision="bf16")
    train_dit(vae, tmp_path, dit, cfg, progress=False)


def _ddp_worker(rank, port, vae, out, cache):
    import os

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OCCLAB_CACHE=cache)
    torch.set_num_threads(1)
    dit, cfg = tiny(vae, steps=4, batch_size=2)
    train_dit(vae, out, dit, cfg, progress=False)
    torch.distributed.destroy_process_group()


def test_two_process_gloo_ddp(vae, tmp_path):
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(port, vae, tmp_path, os.environ["OCCLAB_CACHE"]), nprocs=2)
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["step"] == 4 and len(state["rng_ranks"]) == 2
    assert not torch.equal(state["rng_ranks"][0]["cpu"], state["rng_ranks"][1]["cpu"])  # own noise per rank
    assert len(log_losses(tmp_path)) == 4


# ---------------------------------------------------------------------------------------------------------
# generation and the command line
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dit_ckpt(vae, tmp_path_factory):
    out = tmp_path_factory.mktemp("dit")
    dit, cfg = tiny(vae, conditions=("command", "trajectory"), steps=6, batch_size=2, diffusion_steps=50)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OCCLAB_CACHE", str(vae.parents[1] / "town"))
        return train_dit(vae, out, dit, cfg, progress=False).checkpoint


def read_labels(paths):
    out = []
    for p in paths:
        with np.load(p) as z:
            out.append(z["labels"])
    return out


def test_generate_writes_deterministic_npz_files(dit_ckpt, tmp_path):
    from occlab.generate import generate
    from occlab.metrics.generation import LabelSamples

    a = generate(dit_ckpt, 2, tmp_path / "a", steps=4, seed=3, progress=False)
    b = generate(dit_ckpt, 2, tmp_path / "b", steps=4, seed=3, batch_size=1, progress=False)
    assert [p.name for p in a] == ["sample_00000.npz", "sample_00001.npz"]
    la, lb = read_labels(a), read_labels(b)
    assert all(x.dtype == np.uint8 and x.shape == (T, *GRID) and x.max() < 11 for x in la)
    assert all(np.array_equal(x, y) for x, y in zip(la, lb))  # DDIM: sample i does not depend on the batch
    assert len(LabelSamples(a, frame_stride=2)) == 4  # what `occlab eval gen` reads
    meta = json.loads((tmp_path / "a" / "generate.json").read_text())
    assert meta["seed"] == 3 and meta["sampler"] == "ddim" and meta["files"] == [p.name for p in a]
    cond = {"command": "left", "trajectory": np.tile([[0.0, 0.0, 0.0], [0.4, 0.0, 0.1]], (2, 1))}
    c = generate(dit_ckpt, 2, tmp_path / "c", sampler="ddpm", guidance=2.0, cond=cond, seed=3, progress=False)
    with np.load(c[0]) as z:
        assert int(z["command"]) == 2 and np.allclose(z["trajectory"], cond["trajectory"], atol=1e-5)
    again = generate(dit_ckpt, 2, tmp_path / "d", sampler="ddpm", guidance=2.0, cond=cond, seed=3, progress=False)
    assert all(np.array_equal(x, y) for x, y in zip(read_labels(c), read_labels(again)))


def test_latents_follow_the_seed(dit_ckpt):
    from occlab.generate import sample_latents

    model, state = load_dit(dit_ckpt)
    diffusion = Diffusion(state["diffusion_steps"])
    one = sample_latents(model, diffusion, 2, steps=3, seed=0)
    assert torch.equal(one, sample_latents(model, diffusion, 2, steps=3, seed=0))
    assert not torch.equal(one, sample_latents(model, diffusion, 2, steps=3, seed=1))
    assert one.shape == (2, 4, 14, 14)


def test_clip_bounds_the_sampled_latents(dit_ckpt):
    """With x_0 clipped at every step, the last DDIM step returns the clipped x_0 itself (and DDPM adds no noise
    at t = 0), so every sample lies inside the bound; the unclipped samples of the same noise do not."""
    from occlab.generate import sample_latents

    model, state = load_dit(dit_ckpt)
    diffusion = Diffusion(state["diffusion_steps"])
    bound = 0.05
    assert sample_latents(model, diffusion, 2, steps=3, seed=0).abs().max() > bound
    for sampler in ("ddim", "ddpm"):
        x = sample_latents(model, diffusion, 2, steps=3, seed=0, sampler=sampler, clip=bound)
        assert x.abs().max() <= bound + 1e-6


def test_command_line_round_trip(vae, tmp_path, capsys):
    run = tmp_path / "dit"
    assert main(["train", "dit", "--vae-ckpt", str(vae), "--preset", "smoke", "--rollout", "vconcat",
                 "--conditions", "command,layout", "--steps", "3", "--threads", "1", "--out", str(run)]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["steps"] == 3 and trained["ckpt"] == str(run / "checkpoint.pt")
    assert main(["generate", "--ckpt", trained["ckpt"], "--n", "2", "--out", str(tmp_path / "gen"), "--steps", "3",
                 "--command", "right", "--guidance", "1.5", "--seed", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == 2
    assert len(list((tmp_path / "gen").glob("*.npz"))) == 2
    assert main(["generate", "--ckpt", trained["ckpt"], "--n", "1", "--out", str(tmp_path / "bad"),
                 "--sampler", "ddim", "--command", "north"]) == 2
    assert "unknown command 'north'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------

def test_clear_errors(vae, dit_ckpt, tmp_path, capsys):
    from occlab.generate import generate

    with pytest.raises(OcclabError, match="no such file; train a HexPlane VAE"):
        encode_latents(tmp_path / "none.pt")
    assert main(["train", "dit", "--vae-ckpt", str(tmp_path / "none.pt"), "--steps", "1"]) == 2
    assert "no such file" in capsys.readouterr().err
    info = {"name": "sep4d", "config": {}, "code": "x"}
    checkpoint.save_atomic({"model": {}, "model_info": info, "data": {}}, tmp_path / "sep4d.pt")
    with pytest.raises(OcclabError, match="has no latent the DiT takes"):
        encode_latents(tmp_path / "sep4d.pt")

    paths = encode_latents(vae, progress=False)
    dit = D.dit_tiny()  # latent (2, 4, 4, 2) x 4: not the VAE's (2, 8, 8, 4)
    with pytest.raises(OcclabError, match=r"sizes .* = \(2, 8, 8, 4\) .* expects \(2, 4, 4, 2\)"):
        LatentDataset(paths["train"], dit.rollout).check(dit)
    broken = tmp_path / "train.pt"
    broken.write_bytes(paths["train"].read_bytes()[:200])
    with pytest.raises(OcclabError, match="corrupt"):
        LatentDataset(broken)
    fixed = encode_latents(vae, tmp_path, ("train",), progress=False)  # a corrupt cache is encoded again
    assert len(LatentDataset(fixed["train"])) == 4

    with pytest.raises(OcclabError, match="not a DiT checkpoint"):
        load_dit(vae)
    with pytest.raises(OcclabError, match="without the layout condition"):
        generate(dit_ckpt, 1, tmp_path / "g", cond={"layout": np.zeros((T, 16, 16), np.uint8)}, progress=False)
    with pytest.raises(OcclabError, match=r"trajectory must be \(4, 3\)"):
        generate(dit_ckpt, 1, tmp_path / "g", cond={"trajectory": np.zeros((3, 3))}, progress=False)
    state = checkpoint.load(dit_ckpt)
    moved = tmp_path / "moved.pt"
    checkpoint.save_atomic({**state, "vae_ckpt": str(tmp_path / "gone.pt")}, moved)
    with pytest.raises(OcclabError, match="no longer exists"):
        generate(moved, 1, tmp_path / "g", progress=False)
    vae_state = checkpoint.load(vae)
    vae_state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in vae_state["model"].items()}
    checkpoint.save_atomic(vae_state, tmp_path / "other_vae.pt")
    checkpoint.save_atomic({**state, "vae_ckpt": str(tmp_path / "other_vae.pt")}, moved)
    with pytest.raises(OcclabError, match="has changed since its latents were encoded"):
        generate(moved, 1, tmp_path / "g", progress=False)


# ---------------------------------------------------------------------------------------------------------
# OccSora's latent grid: the same cache, trainer and sampler (issue #7 section 4)
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def occsora_vae(vae):
    """An OccSora tokenizer trained 2 steps at the smoke preset (latent (D, T', X', Y') = (16, 2, 4, 4))."""
    out = vae.parents[1] / "occsora"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OCCLAB_CACHE", str(vae.parents[1] / "town"))
        assert main(["train", "vae", "--model", "occsora", "--preset", "smoke", "--steps", "2", "--threads", "1",
                     "--out", str(out)]) == 0
    return out / "checkpoint.pt"


def test_occsora_latents_round_trip_to_the_tokenizers_reconstruction(occsora_vae):
    from occlab.train.latents import decode_latent, denormalise, load_vae
    from occlab.train.runs import load_trained
    from occlab.train.trainer import model_input

    paths = encode_latents(occsora_vae, progress=False)
    train = read_cache(paths["train"])
    assert train["latent_kind"] == "grid" and tuple(train["planes"]["grid"].shape) == (4, 16, 2, 4, 4)
    raw = train["planes"]["grid"].double()  # per-channel train statistics (a 2-step tokenizer may use one code:
    mean, std = raw.mean((0, 2, 3, 4)), raw.std((0, 2, 3, 4), unbiased=False)  # constant channels, std floored)
    assert torch.allclose(train["stats"]["mean"]["grid"].double(), mean, atol=1e-6)
    assert torch.allclose(train["stats"]["std"]["grid"].double(), std.clamp_min(1e-6), atol=1e-6)
    z = normalise(train["planes"], train["stats"])["grid"]
    assert torch.allclose(z.double(), (raw - mean[:, None, None, None]) / std.clamp_min(1e-6)[:, None, None, None],
                          atol=1e-3)
    ds = LatentDataset(paths["train"], "grid", 2)
    assert ds[0]["x"].shape == (16, 4, 8)  # frames side by side: (D, X', T' * Y')
    with pytest.raises(OcclabError, match="holds grid latents"):
        LatentDataset(paths["train"], "pro", 2)
    # dataset map -> latent -> un-normalised -> snapped and decoded == the tokenizer's own reconstruction
    vae, rec = load_vae(occsora_vae)
    _, _, windows = load_trained(occsora_vae, "train")
    labels = torch.as_tensor(np.asarray(windows[1]["labels"]))[None].long()
    latent = denormalise(ds.layout.from_map(ds[1]["x"][None]), ds.stats)
    with torch.no_grad():
        ours = decode_latent(vae, latent, "grid").argmax(1)
        own = vae(model_input(labels))["logits"].argmax(1)  # ignored voxels enter as free, as when encoded
        assert torch.equal(ours, own)
        # a sampled (off-code) vector decodes as its nearest code
        g = torch.Generator().manual_seed(0)
        noisy = {"grid": latent["grid"] + 0.3 * torch.randn(latent["grid"].shape, generator=g)}
        flat = noisy["grid"].permute(0, 2, 3, 4, 1).reshape(-1, 16)
        nearest = torch.cdist(flat, vae.quantizer.codebook.weight).argmin(1).view(1, 2, 4, 4)
        assert torch.allclose(decode_latent(vae, noisy, "grid"), vae.decode_indices(nearest))


def test_a_dit_fits_one_occsora_latent_and_generates(occsora_vae, tmp_path):
    from occlab.generate import generate

    dit, cfg = dit_setup(occsora_vae, "smoke")
    assert dit.rollout == "grid" and dit.sizes == (2, 4, 4) and dit.channels == 16
    with pytest.raises(OcclabError, match="token layout 'grid' only"):
        dit_setup(occsora_vae, "smoke", "vconcat")
    cfg.threads, cfg.ckpt_every, cfg.steps, cfg.batch_size, cfg.lr = 1, 30, 60, 4, 2e-3
    cfg.data_options = {"num_sequences": 1}
    res = train_dit(occsora_vae, tmp_path / "run", dit, cfg, progress=False)
    ds = LatentDataset(json.loads((tmp_path / "run" / "config.json").read_text())["latents"], "grid")
    assert len(ds) == 1
    x0 = ds[0]["x"][None]
    diffusion = Diffusion(cfg.diffusion_steps)
    untrained = D.DiT(dit).eval()
    trained, _ = load_dit(res.checkpoint, ema=False)
    before = fixed_loss(untrained, x0, diffusion, untrained.loss_mask())
    after = fixed_loss(trained, x0, diffusion, trained.loss_mask())
    assert before == pytest.approx(1.0, abs=0.1) and after < 0.75 * before, (before, after)
    paths = generate(res.checkpoint, 2, tmp_path / "samples", steps=4, progress=False)
    labels = read_labels(paths)
    assert len(labels) == 2 and labels[0].shape == (T, *GRID) and labels[0].dtype == np.uint8
