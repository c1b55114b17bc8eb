"""benchmarks/vs_released.py: the clear error for a bad --released PATH, the flash-attn shim, and (when the
authors' code is at hand) that their VAE is built at our configuration and trains one step through the script."""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from occlab.errors import OcclabError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "vs_released.py"
MIRROR = Path("/work/.mirror/3DTopia+DynamicCity/repo")  # a bare git mirror of 3DTopia/DynamicCity
ENV = "OCCLAB_DYNAMICCITY_RELEASED"  # or a checkout of it


def _script():
    spec = importlib.util.spec_from_file_location("vs_released", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # installs no shim: that happens only when their code is imported
    return mod


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """A checkout of the authors' code: $OCCLAB_DYNAMICCITY_RELEASED, or the mirror's HEAD extracted."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    if not (MIRROR / "HEAD").is_file():
        pytest.skip(f"the authors' DynamicCity code is not here (no {MIRROR}, no ${ENV})")
    out = tmp_path_factory.mktemp("released")
    archive = out / "head.tar"
    subprocess.run(["git", "-C", str(MIRROR), "archive", "-o", str(archive), "HEAD", "dynamic_city", "conf"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    archive.unlink()
    return out


def test_bad_path_names_path_and_what_is_expected(tmp_path):
    mod = _script()
    with pytest.raises(OcclabError, match=r"no such folder.*3DTopia/DynamicCity at eaf0c6e"):
        mod.check_released(tmp_path / "absent")
    (tmp_path / "dynamic_city" / "vae").mkdir(parents=True)
    (tmp_path / "dynamic_city" / "vae" / "vae.py").write_text("")
    with pytest.raises(OcclabError, match=r"no dynamic_city/trainer/vae_trainer.py.*not a checkout"):
        mod.check_released(tmp_path)
    with pytest.raises(SystemExit) as e:  # the command line says it in one line, no traceback
        mod.main(["--released", str(tmp_path / "absent")])
    assert str(tmp_path / "absent") in str(e.value) and "fetch github.com/3DTopia/DynamicCity" in str(e.value)


def test_flash_attn_shim_is_attention_in_flash_layout():
    mod = _script()
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 7, 3, 2, 8, generator=g)  # (B, N, 3, H, D)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, N, D)
    want = ((q @ k.transpose(-1, -2)) / 8 ** 0.5).softmax(-1) @ v
    torch.testing.assert_close(mod.flash_attn_qkvpacked_func(qkv), want.transpose(1, 2))
    kv = qkv[:, :, 1:]
    torch.testing.assert_close(mod.flash_attn_kvpacked_func(qkv[:, :, 0], kv), want.transpose(1, 2))


def test_yaml_floats_follow_omegaconf(tmp_path):
    (tmp_path / "c.yaml").write_text("eps: 1e-10\nlr: 1e-3\nw: {ce: 1.}\nname: x\n")
    conf = _script().load_yaml(tmp_path / "c.yaml")
    assert conf.eps == 1e-10 and conf.lr == 1e-3 and conf.w.ce == 1.0 and conf.name == "x"


def test_released_vae_built_at_our_configuration_and_trains(released):
    """In a fresh process (their modules and the shims stay out of pytest's): their parameter count at
    CarlaSC equals occlab's record of it, equals ours with our 11 classes, and a tiny step lowers their loss."""
    code = f"""
import json, sys, torch
sys.path.insert(0, {str(SCRIPT.parent)!r})
import vs_released as m
from occlab.bench import town_labels
from occlab.models.dynamiccity import RELEASED_PARAMS_CARLASC, DynamicCity, dynamiccity_paper
torch.set_num_threads(1)
root = m.check_released({str(released)!r})
full, _ = m.released_model(root, (128, 128, 8), 16, (2, 2, 2, 2))
full11, _ = m.released_model(root, (128, 128, 8), 16, (2, 2, 2, 2), 11)
model, step = m.released_step(root, (16, 16, 8), 4, (2, 2, 2, 2), town_labels("carlasc", (16, 16, 8), 4, 11))
before = [p.detach().clone() for p in model.parameters()]
losses = [step() for _ in range(3)]
changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
print(json.dumps(dict(full=m.count(full), full11=m.count(full11), ours=m.count(DynamicCity(dynamiccity_paper())),
                      record=RELEASED_PARAMS_CARLASC, losses=losses, changed=changed, n=len(before))))
"""
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["full"] == r["record"] == 1_699_288
    assert r["full11"] == r["ours"] == 1_699_191
    assert all(torch.isfinite(torch.tensor(r["losses"]))) and r["losses"][-1] < r["losses"][0]
    assert r["changed"] == r["n"]  # Adam moved every parameter: their backward_step ran
    assert not list(released.rglob("__pycache__")), "the script wrote bytecode into their checkout"


@pytest.mark.slow
def test_command_line_small_one_step_each(released):
    """The whole comparison at --small, one timed step each (tens of seconds on 2 cores); occlab's side checkpointed
    in chunks of 2 frames, as the flags ask."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--released", str(released), "--small", "--steps", "1",
                           "--threads", "1", "--json", "--no-memory", "--checkpoint", "--frame-chunk", "2"],
                          check=False, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["config"]["grid"] == [64, 64, 8] and r["config"]["frames"] == 8 and r["config"]["rates"] == [2, 2, 2, 2]
    assert r["params"]["released_with_occlab_classes"] == r["params"]["occlab"]
    assert r["released"]["s_per_step"] > 0 and r["occlab"]["s_per_step"] > 0
    assert r["ratio_time"] == pytest.approx(r["occlab"]["s_per_step"] / r["released"]["s_per_step"], abs=2e-3)
    assert any("parameters differ by +97" in n for n in r["notes"])
    assert r["config"]["occlab_compute"] == {"checkpoint": True, "frame_chunk": 2}


def test_dit_needs_their_diffusion_files(tmp_path):
    """--model dit names the DiT files a VAE-only folder lacks; the VAE check does not ask for them."""
    mod = _script()
    for f in mod.REQUIRED:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("")
    assert mod.check_released(tmp_path) == tmp_path.resolve()
    with pytest.raises(OcclabError, match=r"no dynamic_city/diffusion/models.py.*not a checkout"):
        mod.check_released(tmp_path, "dit")
    for f in mod.REQUIRED_DIT:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("")
    assert mod.check_released(tmp_path, "dit") == tmp_path.resolve()
    with pytest.raises(SystemExit, match="--small is a VAE size"):  # before anything of theirs is imported
        mod.main(["--released", str(tmp_path), "--model", "dit", "--small"])
    with pytest.raises(SystemExit, match="--checkpoint and --frame-chunk are options of the VAE step"):
        mod.main(["--released", str(tmp_path), "--model", "dit", "--checkpoint"])


def test_patch_embed_shim_is_timm_patch_embed():
    """timm's PatchEmbed for their call: a patch-strided conv, (B, N, D) tokens in row-major patch order."""
    mod = _script()
    embed = mod.PatchEmbed(6, 2, 3, 5, bias=True)
    assert embed.patch_size == (2, 2) and embed.grid_size == (3, 3) and embed.num_patches == 9
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    patches = x.unfold(2, 2, 2).unfold(3, 2, 2)  # (B, C, 3, 3, 2, 2)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 9, 12)  # (B, N, C*p*p), rows first
    want = patches @ embed.proj.weight.reshape(5, 12).T + embed.proj.bias
    torch.testing.assert_close(embed(x), want)
    with pytest.raises(ValueError, match="does not match"):
        embed(torch.randn(1, 3, 8, 8))


def test_released_dit_built_at_our_configuration_and_trains(released):
    """In a fresh process: their DiT-DC/2 as their DiTTrainer builds it at CarlaSC has our latent, rollout and
    tokens and our parameter count plus their frozen positional embedding and variance outputs; at a small grid
    one training step of theirs runs, gives a finite loss and moves the parameters that get a gradient."""
    code = f"""
import json, sys, torch
sys.path.insert(0, {str(SCRIPT.parent)!r})
import vs_released as m
from occlab.models.dit import DiT, dit_paper
torch.set_num_threads(2)
root = m.check_released({str(released)!r}, "dit")
full = m.released_dit_trainer(root, (128, 128, 8), 16, (2, 2, 2, 2))
ours = DiT(dit_paper())
info = dict(txyz=list(full.hex_txyz), map=list(full.rollout_mask.shape[-2:]), tokens=int(full.patch_mask[0].sum()),
            ours_map=list(ours.layout.map_shape), ours_tokens=ours.layout.num_tokens, full=m.count(full.model),
            ours=m.count(ours), pos=full.model.pos_embed.numel(), out=full.model.final_layer.linear.out_features,
            lr=full.optimizer.param_groups[0]["lr"], wd=full.optimizer.param_groups[0]["weight_decay"],
            opt=type(full.optimizer).__name__, conds=[full.model.hex_emb, full.model.layout_emb, full.model.traj_emb,
            full.model.cmd_emb].count(None), ema=m.count(full.ema))
del full, ours
model, step = m.released_dit_step(root, (16, 16, 8), 4, (2, 2, 2, 2))
before = [p.detach().clone() for p in model.parameters()]
losses = [step(), step()]
info.update(losses=losses, changed=sum(not torch.equal(a, b) for a, b in zip(before, model.parameters())),
            final=not torch.equal(before[-1], model.final_layer.linear.bias), n=len(before))
print(json.dumps(info))
"""
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["txyz"] == [8, 64, 64, 4] and r["map"] == r["ours_map"] == [76, 76]
    assert r["tokens"] == r["ours_tokens"] == 1416  # 1444 patches less their 28 padding patches
    assert r["full"] == r["ema"] == 43_730_432 and r["ours"] == 43_151_296
    assert r["pos"] == 38 * 38 * 384 and r["out"] == 2 * 2 * 32  # frozen pos. embedding; 2C outputs (learn_sigma)
    assert r["full"] == r["ours"] + r["pos"] + 384 * 64 + 64  # + the variance half of their final linear
    assert (r["opt"], r["lr"], r["wd"], r["conds"]) == ("AdamW", 1e-4, 0, 4)  # conf/dit/model/dit.yaml
    assert all(torch.isfinite(torch.tensor(r["losses"])))
    assert r["final"] and r["changed"] > 0  # AdamW moved their (zero-initialised) output layer
    assert not list(released.rglob("__pycache__")), "the script wrote bytecode into their checkout"


@pytest.mark.slow
def test_command_line_dit_one_step_each(released):
    """--model dit: both DiT-DC/2 steps at batch 2, one timed step each (about 30 s on 2 cores)."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--released", str(released), "--model", "dit", "--steps", "1",
                           "--threads", "2", "--json", "--no-memory"], check=False, capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["model"] == "dit" and r["config"]["batch"] == 2 and r["config"]["latent_txyz"] == [8, 64, 64, 4]
    assert r["config"]["tokens_released"] == r["config"]["tokens_occlab"] == 1416
    assert r["params"] == {"released": 43_730_432, "occlab": 43_151_296}
    assert r["released"]["s_per_step"] > 0 and r["occlab"]["s_per_step"] > 0
    assert r["ratio_time"] == pytest.approx(r["occlab"]["s_per_step"] / r["released"]["s_per_step"], abs=2e-3)
    assert any("the rest is the same count" in n for n in r["notes"])
