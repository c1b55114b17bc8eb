"""Tables of the kit: our numbers beside the papers' (always labelled), written as CSV for the report."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

PAPER_TABLES = Path(__file__).parent / "paper_tables"


def paper_table(name: str) -> pd.DataFrame:
    """A table the papers print, e.g. "dynamiccity_t3_vae_structure" (see occlab/report/paper_tables/)."""
    path = PAPER_TABLES / f"{name}.csv"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PAPER_TABLES.glob("*.csv")))
        raise FileNotFoundError(f"no paper table {name!r}; known: {known}")
    return pd.read_csv(path)


def beside(ours: pd.DataFrame, paper: pd.DataFrame, on: list[str], columns: dict[str, str]) -> pd.DataFrame:
    """Our table with the paper's columns joined on `on`; `columns` maps a paper column to its label.

    Our columns are prefixed "ours: ", the paper's "paper: ", so no reader mistakes one for the other.
    """
    mine = ours.rename(columns={c: f"ours: {c}" for c in ours.columns if c not in on})
    theirs = paper[on + list(columns)].rename(columns={c: f"paper: {label}" for c, label in columns.items()})
    return mine.merge(theirs, on=on, how="left")


def write_table(df: pd.DataFrame, out_dir: str | Path, name: str, protocol: dict | None = None) -> Path:
    """Write `name`.csv and its protocol card `name`.protocol.json into a notebook's output folder.

    The report shows every CSV under its notebook with its card below it. `protocol` (or df.attrs["protocol"])
    states what the runs' configs cannot tell: split, classes, mask, preset, conditions, ... (PROTOCOL_FIELDS).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.csv"
    card = protocol_card(df, protocol)
    df.to_csv(path, index=False, float_format="%.4g")
    protocol_path(path).write_text(json.dumps(card, indent=2, default=str))
    return path


# ---- protocol cards: every table written here gets X.protocol.json beside X.csv --------------------------------
PROTOCOL_FIELDS = {
    "dataset": "dataset the numbers come from",
    "split": "split scored (train / val / test)",
    "geometry": "grid geometry and crop (X, Y, Z)",
    "classes_miou": "classes counted in mIoU",
    "classes_iou": "what IoU counts (occupied vs free)",
    "mask": "mask used when scoring: camera, lidar, visibility or none",
    "frames": "frames per sample",
    "horizon": "frames predicted / generated (None: reconstruction)",
    "preset": "smoke / study / paper",
    "seeds": "training / sampling seeds",
    "samples": "generated samples scored (generation metrics)",
    "metric_network": "version of the frozen metric network (generation metrics)",
    "conditions": "conditions given to the generator",
    "ground_truth_in_sampling": "anything derived from ground truth that entered sampling",
    "cost": "how s/iter and peak memory were measured (only on tables that show them)",
    "runs": "run ids behind the numbers (occlab runs show ID)",
}
COST_COLUMNS = ("s_per_iter", "peak_mem_gib")
TRAINING_LOG_COST = ("from each run's training log: s/iter the median step time, peak memory the training process's "
                     "peak (CPU: peak RSS, shared by runs trained in one process; GPU: the allocator's peak); times of "
                     "runs trained at different times on a shared machine do not rank them (occlab.studies.vae."
                     "step_cost does)")
RUN_COLUMNS = ("run_id", "run_ids", "run", "ours: run_id", "ours: run_ids")  # `beside` prefixes "ours: "


def geometry_label(geometry: str, crop=None) -> str:
    """A card's geometry: "carlasc", or "carlasc crop 32x32x8" for a window crop."""
    return geometry + (f" crop {'x'.join(map(str, crop))}" if crop else "")


def attach_protocol(card: dict, *tables: pd.DataFrame):
    """Give tables the protocol fields `card` states (None values dropped), for write_table; returns them."""
    unknown = sorted(set(card) - set(PROTOCOL_FIELDS))
    if unknown:
        raise ValueError(f"unknown protocol fields {unknown}; expected some of {', '.join(PROTOCOL_FIELDS)}")
    for table in tables:
        table.attrs["protocol"] = {k: v for k, v in card.items() if v is not None}
    return tables if len(tables) > 1 else tables[0]


def protocol_card(df: pd.DataFrame, protocol: dict | None = None, runs_root: str | Path | None = None) -> dict:
    """The protocol of a table: df.attrs["protocol"], then `protocol`, then what its runs' configs say.

    Unknown keys are an error (a typo would silently drop a field). Fields nobody stated stay None and are listed
    under "unstated", so a reader sees what the card does not promise. `ground_truth_in_sampling` defaults to
    "never"; the run ids come from the table's run_id / run_ids / run column.
    """
    given = {**dict(df.attrs.get("protocol", {})), **dict(protocol or {})}
    unknown = sorted(set(given) - set(PROTOCOL_FIELDS))
    if unknown:
        raise ValueError(f"unknown protocol fields {unknown}; expected some of {', '.join(PROTOCOL_FIELDS)}")
    card = {k: None for k in PROTOCOL_FIELDS}
    card["ground_truth_in_sampling"] = "never"
    runs = _run_ids(df)
    runs += [r for r in (given.get("runs") if isinstance(given.get("runs"), list) else []) if r not in runs]
    card.update(_from_runs(runs, runs_root))
    if "network_version" in df.columns:  # generation metrics: one frozen network per table, or no table
        versions = sorted(set(df["network_version"].dropna().astype(str)))
        if len(versions) > 1:
            raise ValueError(f"the table mixes generation metrics of different metric networks {versions}; "
                             f"recompute them with one network")
        card["metric_network"] = versions[0] if versions else None
    if runs:
        card["runs"] = runs
    if any(c.endswith(cost) for c in df.columns for cost in COST_COLUMNS):
        card["cost"] = TRAINING_LOG_COST
    else:
        del card["cost"]  # no time or memory column: nothing to state
    card.update({k: _jsonable(v) for k, v in given.items()})
    card["unstated"] = [k for k, v in card.items() if v is None]
    return card


def _run_ids(df: pd.DataFrame) -> list[str]:
    """The run ids named in a table's run columns, in order of first appearance."""
    ids: list[str] = []
    for col in RUN_COLUMNS:
        if col in df.columns:
            for cell in df[col].dropna().astype(str):
                ids += [i for i in cell.split() if i not in ids]
    return ids


def _from_runs(ids: list[str], root: str | Path | None) -> dict:
    """Protocol fields every listed run agrees on, read from their config.json (missing runs are skipped)."""
    from occlab.train.runs import runs_dir

    base = Path(root) if root else runs_dir()
    seen: dict[str, set] = {"dataset": set(), "geometry": set(), "frames": set(), "seeds": set()}
    for i in ids:
        path = base / i / "config.json"
        if not path.is_file():
            continue
        cfg = json.loads(path.read_text())
        data, train = cfg.get("data", {}), cfg.get("train", {})
        if "dataset" in data:
            seen["dataset"].add(data["dataset"])
        if "geometry" in data:
            seen["geometry"].add(geometry_label(data["geometry"], data.get("crop")))
        if "frames" in data:
            seen["frames"].add(data["frames"])
        if "seed" in train:
            seen["seeds"].add(train["seed"])
    out: dict = {}
    for key, values in seen.items():
        if key == "seeds" and values:
            out[key] = sorted(values)
        elif len(values) == 1:
            out[key] = values.pop()
        elif values:
            out[key] = sorted(values, key=str)
    return out


def _jsonable(value):
    """Tuples to lists, numpy scalars to Python, so the card is plain JSON."""
    if isinstance(value, (tuple, list, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value.item() if hasattr(value, "item") else value


def protocol_path(csv_path: str | Path) -> Path:
    """X.protocol.json beside X.csv."""
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.stem + ".protocol.json")


def read_protocol(csv_path: str | Path) -> dict | None:
    """The card of a table, or None when it has none."""
    path = protocol_path(csv_path)
    return json.loads(path.read_text()) if path.is_file() else None
