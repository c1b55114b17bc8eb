"""The reproduction runner: Papermill execution, failure handling, the HTML index and notebook 00."""
from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest

from occlab.errors import OcclabError
from occlab.report.html import write_index
from occlab.reproduce import PRESETS, execution_order, find_notebooks, reproduce, select_notebooks

REPO = Path(__file__).resolve().parents[1]
PARAMETERS = 'preset = "smoke"\ndataset = "synthetic_town"\ndata_root = None\ndevice = "cpu"\nseed = 0\nout_dir = "."'
WRITES = """\
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
out = Path(out_dir)
pd.DataFrame({"method": ["ours <b>", "paper"], "mIoU": [53.2, 79.6]}).to_csv(out / "table one.csv", index=False)
fig, ax = plt.subplots(figsize=(2, 2))
ax.plot([0, 1], [1, 0])
fig.savefig(out / "curve.png")
print(preset, seed)
"""


def make_notebook(path: Path, *cells: str) -> Path:
    """A notebook with a `parameters` cell followed by the given code cells."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, str(path))
    return path


@pytest.fixture
def notebooks(tmp_path: Path) -> Path:
    """01_writes (a CSV and a PNG), 02_raises (fails in its second cell) and 03_after (prints)."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    make_notebook(folder / "01_writes.ipynb", WRITES)
    make_notebook(folder / "02_raises.ipynb", "x = 1", "raise RuntimeError('boom on purpose')")
    make_notebook(folder / "03_after.ipynb", "print('still running')")
    (folder / "README.md").write_text("not a notebook")
    return folder


class Links(HTMLParser):
    """Collects every href and src of a page, and every id."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("href", "src") and v is not None]
        self.ids |= {v for k, v in attrs if k == "id" and v}


def assert_links_resolve(page: Path) -> list[str]:
    """Every href/src of the page is relative and names an existing file or an id on the page; no http(s)."""
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "//cdn" not in text
    parser = Links()
    parser.feed(text)
    files = []
    for url in parser.urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, url
        if not parts.path and parts.fragment:
            assert parts.fragment in parser.ids, f"{url}: no element with this id on the page"
        if parts.path:
            target = page.parent / unquote(parts.path)
            assert target.is_file(), f"{url} -> {target} does not exist"
            files.append(unquote(parts.path))
    return files


def test_runner_records_failure_and_continues(notebooks: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    result = reproduce("smoke", out_dir=out, notebooks_dir=notebooks, seed=3, progress=False)
    status = {nb.name: nb.status for nb in result.notebooks}
    assert status == {"01_writes": "ok", "02_raises": "failed", "03_after": "ok"}
    assert not result.ok and result.failed == ["02_raises"]
    failed = result.notebooks[1]
    assert "RuntimeError: boom on purpose" in failed.error
    assert (out / "02_raises" / "02_raises.ipynb").is_file() and (out / "02_raises" / "02_raises.html").is_file()
    writes = result.notebooks[0]
    assert sorted(writes.files) == ["01_writes/curve.png", "01_writes/table one.csv"]
    assert all(nb.seconds > 0 for nb in result.notebooks)
    executed = nbformat.read(str(out / "01_writes" / "01_writes.ipynb"), as_version=4)
    assert "smoke 3" in "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))

    index = json.loads((out / "index.json").read_text())
    assert index["preset"] == "smoke" and index["ok"] is False
    assert [(nb["name"], nb["status"]) for nb in index["notebooks"]] == list(status.items())
    assert index["notebooks"][0]["files"] == writes.files

    linked = assert_links_resolve(out / "index.html")
    assert {"01_writes/01_writes.html", "01_writes/table one.csv", "01_writes/curve.png",
            "02_raises/02_raises.html"} <= set(linked)
    page = (out / "index.html").read_text()
    assert "ours &lt;b&gt;" in page and "boom on purpose" in page  # CSV shown inline, escaped; error shown
    for name in status:  # notebook exports load nothing from a CDN
        text = (out / name / f"{name}.html").read_text()
        assert "cdnjs" not in text and "unpkg" not in text and "<script src=" not in text


def test_python3_kernel_is_this_environment(notebooks: Path, tmp_path: Path, monkeypatch) -> None:
    """A user's own `python3` kernel spec (here a broken one) must not shadow this environment's kernel."""
    spec = tmp_path / "user-data" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": ["/nonexistent/python", "-m", "ipykernel_launcher", "-f",
                                                           "{connection_file}"], "display_name": "broken",
                                                  "language": "python"}))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "user-data"))
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "0")  # user folder first, as outside a venv
    result = reproduce("smoke", only=["03"], out_dir=tmp_path / "r", notebooks_dir=notebooks, progress=False)
    assert result.ok, result.notebooks[0].error


def test_index_from_json_escapes_and_lists_media(tmp_path: Path) -> None:
    (tmp_path / "01_a").mkdir()
    for name in ("anim.gif", "clip.mp4", "empty.csv", "x.png"):
        (tmp_path / "01_a" / name).write_bytes(b"")
    data = {"preset": "study", "notebooks": [{"name": "01_a", "status": "failed", "seconds": 75.0,
                                              "error": "ValueError: <script>", "files": [
                                                  "01_a/anim.gif", "01_a/clip.mp4", "01_a/empty.csv", "01_a/x.png"]}]}
    page = write_index(tmp_path, data)
    text = page.read_text()
    assert "<video" in text and "&lt;script&gt;" in text and "1 min 15 s" in text and "could not read" in text
    assert_links_resolve(page)


def test_only_filters_and_unknown_name(notebooks: Path) -> None:
    found = find_notebooks(notebooks)
    assert [p.stem for p in found] == ["01_writes", "02_raises", "03_after"]
    for names in (["01"], ["01_writes"], ["writes"], ["01_writes.ipynb"]):
        assert [p.stem for p in select_notebooks(found, names)] == ["01_writes"]
    assert [p.stem for p in select_notebooks(found, ["after", "01"])] == ["01_writes", "03_after"]
    with pytest.raises(OcclabError, match="available: 01_writes, 02_raises, 03_after"):
        select_notebooks(found, ["nope"])
    with pytest.raises(OcclabError, match="unknown notebook"):
        reproduce("smoke", only=["99"], notebooks_dir=notebooks)


def _run_after(path: Path, names: list[str]) -> None:
    nb = json.loads(path.read_text())
    nb["metadata"]["occlab"] = {"run_after": names}
    path.write_text(json.dumps(nb))


def test_run_after_moves_a_prerequisite_first(notebooks: Path, tmp_path: Path) -> None:
    """01 naming 03 in its metadata: 03 runs just before 01 when both are selected; the report keeps 01, 02, 03."""
    found = find_notebooks(notebooks)
    assert [p.stem for p in execution_order(found)] == ["01_writes", "02_raises", "03_after"]
    _run_after(found[0], ["03"])
    assert [p.stem for p in execution_order(found)] == ["03_after", "01_writes", "02_raises"]
    assert [p.stem for p in execution_order(select_notebooks(found, ["01", "02"]))] == ["01_writes", "02_raises"]
    result = reproduce("smoke", only=["01", "03"], out_dir=tmp_path / "r", notebooks_dir=notebooks, progress=False)
    assert [r.name for r in result.notebooks] == ["01_writes", "03_after"] and result.ok
    _run_after(found[2], ["writes"])
    with pytest.raises(OcclabError, match="01_writes -> 03_after -> 01_writes name each other"):
        execution_order(found)
    # the kit's own: notebook 01 after notebook 03 (03's two seeds are 01's verdict yardstick)
    kit = find_notebooks(Path(__file__).resolve().parents[1] / "notebooks")
    assert [p.stem[:2] for p in execution_order(kit)][:3] == ["00", "03", "01"]


def test_only_runs_the_selection(notebooks: Path, tmp_path: Path) -> None:
    result = reproduce("smoke", only=["03"], out_dir=tmp_path / "r", notebooks_dir=notebooks, progress=False)
    assert [(nb.name, nb.status) for nb in result.notebooks] == [("03_after", "ok")] and result.ok
    assert not (tmp_path / "r" / "01_writes").exists()


def test_bad_preset_and_out_dir(notebooks: Path, tmp_path: Path) -> None:
    assert PRESETS == ("smoke", "study", "paper")
    with pytest.raises(OcclabError, match="unknown preset 'fast'; expected one of smoke, study, paper"):
        reproduce("fast", notebooks_dir=notebooks)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OcclabError, match="cannot write to report folder") as err:
        reproduce("smoke", out_dir=blocker / "sub", notebooks_dir=notebooks)
    assert "\n" not in str(err.value)
    with pytest.raises(OcclabError, match="no notebooks"):
        reproduce("smoke", notebooks_dir=tmp_path / "missing")


def test_quickstart_notebook_is_stored_clean() -> None:
    nb = nbformat.read(str(REPO / "notebooks" / "00_quickstart.ipynb"), as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert "parameters" in nb.cells[1].metadata.get("tags", []) or "parameters" in nb.cells[0].metadata.get(
        "tags", [])
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")


def test_quickstart_smoke_through_papermill(quickstart_report) -> None:
    record = quickstart_report.notebooks[0]
    assert record.status == "ok", record.error
    suffixes = {Path(f).suffix for f in record.files}
    assert {".png", ".gif", ".csv"} <= suffixes
    assert_links_resolve(quickstart_report.out_dir / "index.html")
    card = json.loads((quickstart_report.out_dir / "00_quickstart" / "class_stats.protocol.json").read_text())
    assert card["unstated"] == [] and card["dataset"] == "synthetic_town" and card["preset"] == "smoke"
