"""Tables of the kit: our numbers beside the papers' (always labelled), written as CSV for the report."""
from __future__ import annotations

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


def write_table(df: pd.DataFrame, out_dir: str | Path, name: str) -> Path:
    """Write `name`.csv into a notebook's output folder (the report shows every CSV under its notebook)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.csv"
    df.to_csv(path, index=False, float_format="%.4g")
    return path
