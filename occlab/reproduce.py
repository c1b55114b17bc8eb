"""Run the numbered notebooks with Papermill, export each to HTML and write the report index.

`reproduce(preset="smoke")` executes `notebooks/NN_*.ipynb` in order (a notebook whose metadata names others under
`occlab.run_after` runs just after those of them that are selected). Each notebook gets its own output folder
`<out>/<NN_name>/` (passed as the `out_dir` parameter) for its tables and figures; the executed copy and its
HTML export land there too. A failed notebook is recorded and the run goes on. `<out>/index.html` and
`<out>/index.json` are rewritten after every notebook, so an interrupted run still has an index.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from occlab.errors import OcclabError

PRESETS = ("smoke", "study", "paper")
KERNEL_NAME = "python3"  # DESIGN.md §5: notebooks keep this name and execution asks for it
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NOTEBOOKS = REPO_ROOT / "notebooks"
KERNEL_QUIET = ["--log-level=ERROR"]  # ipykernel 7 warns on stderr about unencrypted localhost TCP
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
ARTIFACT_SUFFIXES = (".csv", ".png", ".jpg", ".jpeg", ".svg", ".gif", ".mp4", ".webm", ".json", ".txt")


@dataclass
class NotebookResult:
    """The outcome of one notebook: status, wall time and the files it wrote (paths relative to the report)."""

    name: str
    status: str = "pending"  # "ok" | "failed" | "pending"
    seconds: float = 0.0
    notebook: str | None = None  # executed copy
    html: str | None = None
    files: list[str] = field(default_factory=list)  # tables and figures the notebook wrote
    error: str | None = None


@dataclass
class ReproduceResult:
    """All notebooks of one run plus what the index needs to describe it."""

    preset: str
    out_dir: Path
    notebooks: list[NotebookResult]
    dataset: str = "synthetic_town"
    device: str = "cpu"
    seed: int = 0
    date: str = ""
    occlab_version: str = "unknown"
    git_revision: str | None = None
    index_html: Path | None = None
    index_json: Path | None = None

    @property
    def ok(self) -> bool:
        """True when every notebook finished without error."""
        return all(nb.status == "ok" for nb in self.notebooks)

    @property
    def failed(self) -> list[str]:
        """Names of the notebooks that did not finish."""
        return [nb.name for nb in self.notebooks if nb.status != "ok"]

    def to_dict(self) -> dict[str, Any]:
        """The machine-readable form written to index.json."""
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["seconds"] = round(sum(nb.seconds for nb in self.notebooks), 2)
        d["ok"] = self.ok
        for key in ("index_html", "index_json"):
            d.pop(key)
        return d


def reproduce(preset: str = "smoke", only: list[str] | None = None, out_dir: str | os.PathLike = "reports",
              dataset: str = "synthetic_town", data_root: str | None = None, device: str = "cpu", seed: int = 0,
              notebooks_dir: str | os.PathLike = DEFAULT_NOTEBOOKS, progress: bool = True,
              timeout: float | None = None) -> ReproduceResult:
    """Execute the numbered notebooks at a preset and write the HTML report; failures are recorded, not raised."""
    if preset not in PRESETS:
        raise OcclabError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    notebooks = select_notebooks(find_notebooks(notebooks_dir), only)
    out = prepare_out_dir(out_dir)
    result = ReproduceResult(preset, out, [NotebookResult(p.stem) for p in notebooks], dataset, device, seed,
                             _dt.datetime.now().isoformat(timespec="seconds"), occlab_version(), git_revision())
    params = dict(preset=preset, dataset=dataset, data_root=None if data_root is None else str(data_root),
                  device=device, seed=seed)
    write_reports(result)
    from tqdm.auto import tqdm

    pairs = dict(zip(notebooks, result.notebooks))  # the report keeps the numbered order; execution may differ
    bar = tqdm([(p, pairs[p]) for p in execution_order(notebooks)], desc=f"reproduce {preset}", unit="notebook",
               disable=not progress)
    for path, record in bar:
        bar.set_postfix_str(record.name)
        run_notebook(path, out, params, record, progress=progress, timeout=timeout)
        if progress:
            bar.write(f"{record.name}: {record.status} in {record.seconds:.1f} s"
                      + (f" ({record.error})" if record.error else ""))
        write_reports(result)
    bar.close()
    return result


def find_notebooks(notebooks_dir: str | os.PathLike) -> list[Path]:
    """The notebooks named NN_*.ipynb in a folder, in order."""
    folder = Path(notebooks_dir)
    found = sorted(folder.glob(NOTEBOOK_GLOB)) if folder.is_dir() else []
    if not found:
        raise OcclabError(f"no notebooks named NN_*.ipynb in {folder}; pass notebooks_dir= the kit's notebooks/")
    return found


def select_notebooks(notebooks: list[Path], only: list[str] | None) -> list[Path]:
    """Keep the notebooks named in `only` ("00", "00_quickstart" or "quickstart"), in their order."""
    if not only:
        return notebooks
    wanted = {name.removesuffix(".ipynb") for name in only}
    unknown = {w for w in wanted if not any(w in _aliases(p.stem) for p in notebooks)}
    if unknown:
        raise OcclabError(f"unknown notebook {', '.join(sorted(unknown))}; available: "
                          f"{', '.join(p.stem for p in notebooks)}")
    return [p for p in notebooks if wanted & _aliases(p.stem)]


def execution_order(notebooks: list[Path]) -> list[Path]:
    """The notebooks in their numbered order, except that the selected ones that a notebook's metadata names under
    `occlab.run_after` run just before it: notebook 01's verdict yardstick is notebook 03's two seeds, so 03
    trains them within its own budget instead of 01 training them first."""
    order: list[Path] = []

    def visit(path: Path, chain: tuple[str, ...] = ()) -> None:
        if path in order:
            return
        if path.stem in chain:
            raise OcclabError(f"notebooks {' -> '.join(chain + (path.stem,))} name each other in run_after")
        after = json.loads(path.read_text()).get("metadata", {}).get("occlab", {}).get("run_after", [])
        for before in notebooks:
            if before is not path and _aliases(before.stem) & set(after):
                visit(before, chain + (path.stem,))
        order.append(path)

    for path in notebooks:
        visit(path)
    return order


def _aliases(stem: str) -> set[str]:
    """The names a notebook answers to: '00_quickstart', '00' and 'quickstart'."""
    number, _, title = stem.partition("_")
    return {stem, number, title}


def prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    """Create the report folder and prove it is writable, or raise a one-line OcclabError."""
    out = Path(out_dir).expanduser().resolve()
    probe = out / ".occlab-write-test"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OcclabError(f"cannot write to report folder {out}: {e.strerror or e}; pass a writable --out") from None
    return out


def run_notebook(path: Path, out: Path, params: dict[str, Any], record: NotebookResult, progress: bool = True,
                 timeout: float | None = None) -> NotebookResult:
    """Execute one notebook into <out>/<name>/, export it to HTML and fill `record` (never raises)."""
    import papermill as pm

    folder = out / record.name
    executed, html = folder / f"{record.name}.ipynb", folder / f"{record.name}.html"
    start = time.time()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in (executed, html):  # never report a previous run's copy as this one's
            stale.unlink(missing_ok=True)
        with kernel_environment():
            pm.execute_notebook(
                str(path), str(executed), parameters={**params, "out_dir": str(folder)},
                kernel_name=KERNEL_NAME, cwd=str(path.parent), log_output=False, execution_timeout=timeout,
                progress_bar=_cell_progress(record.name) if progress else False,
                extra_arguments=KERNEL_QUIET)
        record.status = "ok"
    except pm.PapermillExecutionError as e:
        record.status, record.error = "failed", f"{e.ename}: {e.evalue} (cell In [{e.exec_count}])"
    except Exception as e:  # a dead kernel, a timeout, an unreadable notebook: record it and go on
        record.status, record.error = "failed", f"{type(e).__name__}: {e}".strip()
    record.seconds = round(time.time() - start, 2)
    if executed.is_file():
        record.notebook = executed.relative_to(out).as_posix()
        record.html = _export_html(executed, html, out, record)
    record.files = list_artifacts(folder, out, since=start, exclude={executed, html})
    return record


def _cell_progress(name: str) -> dict[str, Any] | bool:
    """Papermill's per-cell bar below the notebook bar on a terminal; none in logs, where it would be noise."""
    return dict(desc=name, leave=False, position=1) if sys.stderr.isatty() else False


def _export_html(executed: Path, html: Path, out: Path, record: NotebookResult) -> str | None:
    """Export the executed notebook to HTML; an export failure is added to the record's error."""
    from occlab.report.html import notebook_to_html

    try:
        notebook_to_html(executed, html)
    except Exception as e:
        record.status = "failed"
        record.error = "; ".join(filter(None, [record.error, f"HTML export failed: {type(e).__name__}: {e}"]))
        return None
    return html.relative_to(out).as_posix()


@contextlib.contextmanager
def kernel_environment() -> Iterator[None]:
    """Make the `python3` kernel resolve to this interpreter's environment, whatever the user's Jupyter setup.

    jupyter_client starts a spec whose argv[0] is `python` with sys.executable, but a `python3` spec in the
    user's own Jupyter folder (~/.local/share/jupyter) would shadow the environment's one. JUPYTER_PATH is
    searched before that folder, so this environment's share/jupyter goes first while notebooks run.
    """
    share = str(Path(sys.prefix) / "share" / "jupyter")
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [share, old]))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old


def list_artifacts(folder: Path, out: Path, since: float = 0.0, exclude: set[Path] = frozenset()) -> list[str]:
    """Tables and figures written in `folder` since `since` (older leftovers of earlier runs are not listed)."""
    if not folder.is_dir():
        return []
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in ARTIFACT_SUFFIXES
             and p not in exclude and p.stat().st_mtime >= since - 1.0
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return [p.relative_to(out).as_posix() for p in files]


def write_reports(result: ReproduceResult) -> None:
    """Write index.json and index.html for the run so far."""
    from occlab.report.html import write_index

    data = result.to_dict()
    result.index_json = result.out_dir / "index.json"
    result.index_json.write_text(json.dumps(data, indent=2) + "\n")
    result.index_html = write_index(result.out_dir, data)


def occlab_version() -> str:
    """The installed occlab version, or 'unknown'."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("occlab")
    except PackageNotFoundError:
        return "unknown"


def git_revision(repo: Path = REPO_ROOT) -> str | None:
    """`git describe --always --dirty` of the kit's checkout, or None outside a repository."""
    try:
        run = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    revision = run.stdout.strip() if run.returncode == 0 else ""
    return revision or None
