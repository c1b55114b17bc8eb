"""Self-contained HTML: notebook exports with no CDN scripts, and the report index page.

Everything written here references only files inside the report folder (relative links), so the folder can be
zipped and shared; the pages load nothing from the network.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote

MAX_TABLE_ROWS = 60  # rows of a CSV shown inline; the file link has them all
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg")
ANIMATION_SUFFIXES = (".gif",)
VIDEO_SUFFIXES = (".mp4", ".webm")

# nbconvert's lab template loads require.js, MathJax, mermaid and the widget manager from CDNs; drop them.
# Cell outputs (images, tables) are already embedded; LaTeX in markdown shows as source text.
OFFLINE_TEMPLATE_NAME = "occlab_offline.html.j2"
OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{% block html_head_js %}{% endblock html_head_js %}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{% block html_head_js_mathjax %}{% endblock html_head_js_mathjax %}
{% block html_head_js_mermaidjs %}{% endblock html_head_js_mermaidjs %}
"""

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2.5rem; }
table { border-collapse: collapse; font-size: .9rem; margin: .4rem 0 1rem; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
table.meta td, table.meta th { text-align: left; }
.ok { color: #fff; background: #2e7d32; } .failed { color: #fff; background: #c62828; }
.pending { color: #fff; background: #888; }
.yes { color: #fff; background: #2e7d32; } .no { color: #fff; background: #c62828; }
.inconclusive { color: #222; background: #f2c94c; } .smoke, .not-run { color: #fff; background: #888; }
.status { padding: .05rem .5rem; border-radius: .6rem; font-size: .85rem; font-weight: 600; }
pre.error { background: #fdecea; border-left: 4px solid #c62828; padding: .6rem; white-space: pre-wrap; }
.scroll { overflow-x: auto; max-height: 28rem; overflow-y: auto; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; }
.figures figure { margin: 0; } figcaption { font-size: .8rem; color: #555; word-break: break-all; }
img.thumb { max-width: 260px; max-height: 200px; border: 1px solid #ddd; }
img.anim, video { max-width: 480px; border: 1px solid #ddd; }
.muted { color: #777; font-size: .9rem; }
"""


def notebook_to_html(notebook: str | os.PathLike, html_path: str | os.PathLike,
                     resource_dir: str | os.PathLike | None = None) -> Path:
    """Export a notebook to one HTML file with embedded images and no CDN scripts."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", embed_images=True, template_file=OFFLINE_TEMPLATE_NAME,
                            extra_loaders=[jinja2.DictLoader({OFFLINE_TEMPLATE_NAME: OFFLINE_TEMPLATE})])
    nb = _gifs_as_html(nbformat.read(str(notebook), as_version=4))
    path = str(resource_dir or Path(notebook).parent)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": Path(notebook).stem, "path": path}})
    html_path = Path(html_path)
    html_path.write_text(body, encoding="utf-8")
    return html_path


def _gifs_as_html(nb: Any) -> Any:
    """Give image/gif outputs an embedded <img> HTML form: nbconvert's HTML exporter drops image/gif."""
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/gif" in data and "text/html" not in data:
                gif = "".join(data["image/gif"]).replace("\n", "")
                data["text/html"] = f"<img src=\"data:image/gif;base64,{gif}\" alt=\"animation\">"
    return nb


def write_index(out_dir: str | os.PathLike, results: Any) -> Path:
    """Write <out_dir>/index.html for a run (a ReproduceResult or the dict stored in index.json)."""
    out = Path(out_dir)
    data: Mapping[str, Any] = results.to_dict() if hasattr(results, "to_dict") else results
    notebooks = data.get("notebooks", [])
    shown = {nb["name"] for nb in notebooks}
    parts = [_header(data), _summary(notebooks), _ledger(out, shown)]
    parts += [_notebook_section(out, nb) for nb in notebooks]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(_title(data))}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def _title(data: Mapping[str, Any]) -> str:
    """Page title naming the preset."""
    return f"occlab report: {data.get('preset', '?')} preset"


def _header(data: Mapping[str, Any]) -> str:
    """Title and the run's provenance (preset, data, date, version, git revision)."""
    rows = [("preset", data.get("preset")), ("dataset", data.get("dataset")), ("device", data.get("device")),
            ("seed", data.get("seed")), ("date", data.get("date")), ("occlab version", data.get("occlab_version")),
            ("git revision", data.get("git_revision") or "not available"),
            ("total time", _seconds(data.get("seconds", sum(nb.get("seconds", 0) for nb in data.get(
                "notebooks", [])))))]
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows if v is not None)
    return f"<h1>{_e(_title(data))}</h1>\n<table class=\"meta\">{body}</table>"


def _summary(notebooks: list[Mapping[str, Any]]) -> str:
    """One row per notebook: status, time, links."""
    rows = []
    for nb in notebooks:
        links = " · ".join(filter(None, [_link(nb.get("html"), "HTML"), _link(nb.get("notebook"), "notebook")]))
        rows.append(f"<tr><td><a href=\"#{_anchor(nb['name'])}\">{_e(nb['name'])}</a></td>"
                    f"<td>{_status(nb.get('status', 'pending'))}</td><td>{_seconds(nb.get('seconds', 0))}</td>"
                    f"<td>{links or '<span class=muted>none</span>'}</td></tr>")
    head = "<tr><th>notebook</th><th>status</th><th>time</th><th>output</th></tr>"
    return f"<h2>Notebooks</h2>\n<table>{head}{''.join(rows)}</table>"


def _ledger(out: Path, shown: set[str]) -> str:
    """The claims ledger: one row per claim, its verdict coloured, the paper's numbers beside ours.

    A claim's notebook links to its section when that notebook is on the page (`shown`), else it is plain text.
    """
    from occlab.report.claims import ledger

    led = ledger(out)
    rows = []
    for c in led["claims"]:
        ours = " vs ".join(_number(v) for v in c["ours"]) if c.get("ours") else ""
        paper = " vs ".join(_number(v) for v in c["paper_values"]) if c.get("paper_values") else ""
        runs = " ".join(c.get("run_ids") or [])
        rows.append(f"<tr><td>{_e(c['statement'])}</td><td>{_e(c['paper'])}</td><td>{_e(paper)}</td>"
                    f"<td>{_e(ours)}</td><td>{_e(_number(c.get('margin')))}</td>"
                    f"<td><span class=\"status {_e(c['holds']).replace(' ', '-')}\">{_e(c['holds'])}</span></td>"
                    f"<td>{_section_link(c['notebook'], shown)}</td>"
                    f"<td class=\"muted\">{_e(c.get('note', ''))} {_e(runs)}</td></tr>")
    head = ("<tr><th>claim</th><th>paper</th><th>paper's numbers</th><th>ours</th><th>margin</th><th>holds</th>"
            "<th>notebook</th><th>note · runs</th></tr>")
    summary = (f"held {led['held']} · failed {led['failed']} · inconclusive {led['inconclusive']} · "
               f"smoke {led['smoke']} · not run {led['not_run']}")
    return (f"<h2 id=\"claims\">Claims ledger</h2>\n<p class=\"muted\">{_e(summary)}. A claim holds when our margin in "
            "the paper's direction exceeds the seed-to-seed spread; smoke verdicts are never evidence.</p>\n"
            f"<div class=\"scroll\"><table>{head}{''.join(rows)}</table></div>")


def _section_link(name: str, shown: set[str]) -> str:
    """A link to a notebook's section on this page, or its plain name when the section is absent."""
    return f"<a href=\"#{_anchor(name)}\">{_e(name)}</a>" if name in shown else _e(name)


def _number(value: Any) -> str:
    """A short form of a number in the ledger ('' for none)."""
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _notebook_section(out: Path, nb: Mapping[str, Any]) -> str:
    """A notebook's status, error, links, inline tables and figures."""
    name, files = nb["name"], list(nb.get("files", []))
    parts = [f"<h2 id=\"{_anchor(name)}\">{_e(name)} {_status(nb.get('status', 'pending'))}</h2>",
             f"<p class=\"muted\">{_seconds(nb.get('seconds', 0))}"
             + "".join(f" · {link}" for link in [_link(nb.get("html"), "HTML report"),
                                                 _link(nb.get("notebook"), "executed notebook")] if link) + "</p>"]
    if nb.get("error"):
        parts.append(f"<pre class=\"error\">{_e(nb['error'])}</pre>")
    tables = [f for f in files if f.lower().endswith(".csv")]
    figures = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES + ANIMATION_SUFFIXES + VIDEO_SUFFIXES)]
    cards = {str(Path(t).with_name(Path(t).stem + ".protocol.json")) for t in tables}
    others = [f for f in files if f not in tables and f not in figures and f not in cards]
    parts += [_table(out, f) for f in tables]
    if figures:
        parts.append("<h3>Figures</h3>\n<div class=\"figures\">" + "".join(_figure(f) for f in figures) + "</div>")
    if others:
        parts.append("<h3>Other files</h3>\n<ul>" + "".join(f"<li>{_link(f, f)}</li>" for f in others) + "</ul>")
    return "\n".join(parts)


def _table(out: Path, rel: str) -> str:
    """A CSV file as a heading link plus its first rows as an escaped HTML table."""
    import pandas as pd

    try:
        frame = pd.read_csv(out / rel)
        shown = frame.to_html(index=False, escape=True, border=0, max_rows=MAX_TABLE_ROWS, na_rep="",
                              float_format=lambda x: f"{x:.6g}")
        note = f" ({len(frame)} rows, first {MAX_TABLE_ROWS} shown)" if len(frame) > MAX_TABLE_ROWS else ""
    except Exception as e:  # an empty or malformed CSV is reported, not fatal
        shown, note = f"<p class=\"muted\">could not read: {_e(type(e).__name__)}: {_e(e)}</p>", ""
    head = f"<h3>{_link(rel, Path(rel).name)}<span class=\"muted\">{_e(note)}</span></h3>"
    return f"{head}\n<div class=\"scroll\">{shown}</div>\n{_protocol(out, rel)}"


def _protocol(out: Path, rel: str) -> str:
    """The protocol card of a table (X.protocol.json beside X.csv) as a small key/value table."""
    import json

    card_rel = Path(rel).with_name(Path(rel).stem + ".protocol.json")
    try:
        card = json.loads((out / card_rel).read_text())
    except FileNotFoundError:
        return "<p class=\"muted protocol missing\">no protocol card for this table</p>"
    except ValueError as e:
        return f"<p class=\"muted protocol\">protocol card unreadable: {_e(e)}</p>"
    unstated = card.pop("unstated", [])
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_card_value(v))}</td></tr>" for k, v in card.items()
                   if v is not None)
    note = f"<p class=\"muted\">not stated: {_e(', '.join(unstated))}</p>" if unstated else ""
    return (f"<details class=\"protocol\" open><summary>protocol ({_link(card_rel.as_posix(), card_rel.name)})"
            f"</summary><table class=\"meta\">{rows}</table>{note}</details>")


def _card_value(value: Any) -> str:
    """A card value as text: lists joined by spaces."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _figure(rel: str) -> str:
    """A thumbnail (PNG/JPG/SVG), an inline animation (GIF) or a video player (MP4/WebM) with its link."""
    url, suffix = _url(rel), Path(rel).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        media = f"<video controls preload=\"metadata\" src=\"{url}\"></video>"
    elif suffix in ANIMATION_SUFFIXES:
        media = f"<a href=\"{url}\"><img class=\"anim\" src=\"{url}\" alt=\"{_e(rel)}\"></a>"
    else:
        media = f"<a href=\"{url}\"><img class=\"thumb\" loading=\"lazy\" src=\"{url}\" alt=\"{_e(rel)}\"></a>"
    return f"<figure>{media}<figcaption>{_link(rel, Path(rel).name)}</figcaption></figure>"


def _link(rel: str | None, text: str) -> str:
    """A relative link, or '' when there is no file."""
    return f"<a href=\"{_url(rel)}\">{_e(text)}</a>" if rel else ""


def _url(rel: str) -> str:
    """A path relative to the report folder, percent-encoded for an href/src attribute."""
    return html.escape(quote(Path(rel).as_posix(), safe="/"))


def _anchor(name: str) -> str:
    """The id of a notebook's section."""
    return "nb-" + quote(name, safe="")


def _status(status: str) -> str:
    """A coloured status badge."""
    return f"<span class=\"status {_e(status)}\">{_e(status)}</span>"


def _seconds(seconds: float) -> str:
    """Wall time as '12.3 s' or '4 min 05 s'."""
    seconds = float(seconds or 0)
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def _e(value: Any) -> str:
    """HTML-escape any value."""
    return html.escape(str(value))
