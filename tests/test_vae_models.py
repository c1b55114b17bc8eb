"""Every registered 4D VAE goes through the same trainer, run cache and command line."""
import json

import pytest

from occlab.cli import VAE_MODELS, main
from occlab.models import MODELS
from occlab.studies.vae import vae_setup


def test_the_command_line_lists_the_registered_models():
    assert VAE_MODELS == tuple(MODELS)


@pytest.mark.parametrize("name", VAE_MODELS)
def test_model_info_at_the_paper_configuration(name, capsys):
    assert main(["model", "info", name, "--frames", "16", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    config = MODELS[name].presets["paper"]((128, 128, 8), 16)
    assert info["parameters"] > 100_000 and info["compression_ratio"] == pytest.approx(config.compression_ratio())


@pytest.mark.parametrize("name", VAE_MODELS)
def test_train_and_eval_from_the_command_line(name, tmp_path, capsys):
    out = tmp_path / name
    assert main(["train", "vae", "--model", name, "--preset", "smoke", "--steps", "2", "--threads", "1",
                 "--out", str(out)]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= trained["miou"] <= 1 and (out / "checkpoint.pt").is_file()
    assert main(["eval", "vae", "--ckpt", str(out / "checkpoint.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["miou"] == pytest.approx(trained["miou"])


def test_occsora_trains_with_its_loss_weights():
    _, _, train = vae_setup("occsora", "smoke")
    assert train.ce_weight == 10.0 and not train.class_weighted  # CE x 10 + Lovász + VQ (DESIGN §3), as released
    assert vae_setup("sep4d", "smoke")[2].ce_weight == 1.0


def test_an_unknown_model_is_named():
    from occlab.errors import OcclabError

    with pytest.raises(OcclabError, match="unknown model 'occworld'; expected one of dynamiccity, sep4d, occsora"):
        vae_setup("occworld", "smoke")


def test_a_vq_model_reports_its_codebook_use(tmp_path):
    from occlab.train.trainer import train
    from occlab.train.runs import model_spec
    from occlab.models import OccSora

    config, data, tc = vae_setup("occsora", "smoke")
    tc.steps = 2
    result = train(OccSora(config), model_spec("occsora", config), data, tc, tmp_path, progress=False)
    use = result.metrics["val"]["codebook"]
    assert use["used"] + use["dead_codes"] == config.codebook_size and 1 <= use["perplexity"] <= use["used"]
    assert json.loads((tmp_path / "metrics.json").read_text())["val"]["codebook"] == use
