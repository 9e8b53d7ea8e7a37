"""What ``pairforge publish`` and ``pairforge export`` read: a build dir or a plain set of
canonical rows, as a :class:`PairSet`.

A build dir is the ``--out`` folder of a finished ``pairforge build`` or ``pairforge merge``
(:mod:`pairforge.engine`): ``manifest.json`` (run identity, settings, models, prompt templates,
seed, source, sessions with their commands), ``summary.json`` (counts, rejects by stage, recipe
stats, diagnostics), ``rejects.jsonl`` and ``dataset/``, read through
:func:`pairforge.engine.load_build`. Its rejects are counted by stage and reason kind (as the
summary counts them) and must reconcile with the summary's counts. A plain set is a
``save_to_disk`` folder or a ``.parquet`` file of canonical rows (an audited set, or rows made
elsewhere); it has no manifest, so its card takes provenance from the rows alone.

Configs: a recipe whose pairs come in kinds publishes one config per kind
(:data:`CONFIG_COLUMNS`: P2-DPO ``focus`` / ``robust``; CW-DPO ``stage1`` (SFT-C rows with
gentle negatives) / ``stage2`` (DPO pairs)); every other set is one ``default`` config. Each
config has one split, ``train``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, Features

from pairforge.engine.manifest import MANIFEST, Manifest
from pairforge.errors import PairforgeError
from pairforge.errors import first_line as _first_line
from pairforge.recipes import RECIPES
from pairforge.safety import checked_images
from pairforge.schema import COLUMN_GROUPS, CORE_FEATURES, features
from pairforge.sources.sft import ReasonTally

#: recipe → (column, {column value: config name}); a row with another value is an error.
CONFIG_COLUMNS = {
    "p2dpo": ("p2dpo_kind", {"focus": "focus", "robust": "robust"}),
    "cwdpo": ("cwdpo_stage", {1: "stage1", 2: "stage2"}),
}
#: The split every config has.
SPLIT = "train"
#: Card template of sets not made by a pairforge recipe.
AUDIT = "audit"

#: Every canonical column and its type (core columns and all groups).
_CANONICAL = features(*COLUMN_GROUPS)


@dataclass
class PairSet:
    """A set of canonical pair rows and what is known about how it was made.

    ``recipe``: the pairforge recipe that made it, or ``None`` (card template "audit").
    ``manifest`` / ``summary``: the build's ``manifest.json`` / ``summary.json`` (``{}`` for a
    plain set). ``rejects``: ``(stage, reason kind) → count`` of the build's ``rejects.jsonl``
    (empty when none).
    """

    name: str
    where: str
    dataset: Dataset
    recipe: str | None
    is_build: bool
    manifest: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    rejects: Counter = field(default_factory=Counter)
    #: rows dropped because of an image (``on_bad_image="skip"``): (row, id, BadInput)
    image_skips: list = field(default_factory=list)

    @property
    def template(self) -> str:
        """Name of the card template in ``dataset_cards/`` (without ``.md``)."""
        return self.recipe or AUDIT

    def configs(self) -> dict[str, Dataset]:
        """Config name → its rows, in dataset order (see the module docstring)."""
        return split_configs(self.dataset, self.recipe, self.where)


def is_build_dir(path: str | os.PathLike) -> bool:
    """A folder with a build manifest (finished or not: :func:`open_pairset` tells which)."""
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def open_pairset(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                 on_bad_image: str = "fail") -> PairSet:
    """Read a build dir, a ``save_to_disk`` folder or a ``.parquet`` file of canonical rows.

    Every image is checked and embedded by :func:`pairforge.safety.checked_images`: a path must
    resolve inside ``image_root`` (default: the build dir, the saved folder, the parquet
    file's folder), stay under the size limit and decode. A row that fails stops the whole
    read (``on_bad_image="fail"``, publish: nothing is staged) or is dropped and listed in
    ``PairSet.image_skips`` (``"skip"``, export). Problems a user can fix raise a one-line
    :class:`PairforgeError`."""
    where = os.fspath(path)
    p = Path(where)
    pset = _open(p, where)
    root = Path(image_root) if image_root is not None else (p.parent if p.is_file() else p)
    if image_root is not None and not root.is_dir():
        raise PairforgeError(f"--image-root {image_root}: not a folder; pass the folder the "
                             f"set's image paths are relative to")
    pset.dataset, pset.image_skips = checked_images(pset.dataset, root, where,
                                                    on_bad=on_bad_image)
    return pset


def _open(p: Path, where: str) -> PairSet:
    if is_build_dir(p):
        return open_build_dir(p, where)
    if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
        ds = _load_saved(p, where)
    elif p.is_file() and p.suffix.lower() == ".parquet":
        ds = _load_parquet(p, where)
    elif p.exists():
        raise PairforgeError(f"{where}: not a build dir (no {MANIFEST}), a save_to_disk "
                             f"folder or a .parquet file of canonical pair rows; pass one of "
                             f"those (other formats: read them with pairforge.sources first)")
    else:
        raise PairforgeError(f"{where}: no such file or folder; check the path")
    ds = canonical(ds, where)
    return PairSet(p.resolve().stem if p.is_file() else p.resolve().name, where, ds,
                   _recipe({}, ds, where), False)


def open_build_dir(p: Path, where: str) -> PairSet:
    """A finished build (or merge) folder: its rows through ``load_build`` (which refuses an
    unfinished build or a foreign manifest), manifest, summary and rejects, reconciled."""
    from pairforge.engine import load_build

    ds = load_build(p)
    manifest = Manifest.load(p).data
    summary = _read_json(p / "summary.json", where)
    rejects = read_rejects(p / "rejects.jsonl")
    reconcile(where, len(ds), summary, rejects)
    recipe = _recipe(manifest, ds, where)
    return PairSet(p.resolve().name, where, canonical(ds, where), recipe, True, manifest,
                   summary, rejects)


def reconcile(where: str, n_rows: int, summary: dict, rejects: Counter) -> None:
    """The build's files agree with ``summary.json``: rows = ``counts.pairs``, the records of
    ``rejects.jsonl`` = ``counts.rejected``, and per stage = ``rejects_by_stage[stage].n``."""
    counts = summary.get("counts")
    by_stage = summary.get("rejects_by_stage")
    if not isinstance(counts, dict) or not isinstance(by_stage, dict):
        raise PairforgeError(f"{where}: summary.json has no counts / rejects_by_stage; it was "
                             f"not written by this pairforge: rerun the build with --overwrite")
    fix = "the folder changed after the build; rerun its `pairforge build` command with --overwrite"
    if n_rows != counts.get("pairs"):
        raise PairforgeError(f"{where}: dataset/ holds {n_rows:,} pairs, summary.json counts "
                             f"{counts.get('pairs')}; {fix}")
    if sum(rejects.values()) != counts.get("rejected"):
        raise PairforgeError(f"{where}: rejects.jsonl holds {sum(rejects.values()):,} records, "
                             f"summary.json counts {counts.get('rejected')} rejected; {fix}")
    got: Counter = Counter()
    for (stage, _), n in rejects.items():
        got[stage] += n
    for stage in sorted(set(got) | set(by_stage)):
        want = (by_stage.get(stage) or {}).get("n", 0)
        if got[stage] != want:
            raise PairforgeError(f"{where}: rejects.jsonl holds {got[stage]:,} rejects of stage "
                                 f"{stage!r}, summary.json counts {want}; {fix}")


def canonical(ds: Dataset, where: str) -> Dataset:
    """``ds`` with the canonical feature types (cast when a column's type differs); its
    columns must be canonical ones and include all core columns."""
    missing = [c for c in CORE_FEATURES if c not in ds.column_names]
    if missing:
        raise PairforgeError(f"{where}: not canonical pair rows (missing columns "
                             f"{', '.join(missing)}); publish and export take pairforge's "
                             f"canonical rows (a build dir or a dataset of such rows)")
    unknown = [c for c in ds.column_names if c not in _CANONICAL]
    if unknown:
        raise PairforgeError(f"{where}: column '{unknown[0]}' is not a canonical column "
                             f"(groups: {', '.join(COLUMN_GROUPS)}); drop it before publishing")
    want = Features({c: _CANONICAL[c] for c in ds.column_names})
    if ds.features == want:
        return ds
    try:
        return ds.cast(want)
    except Exception as e:  # noqa: BLE001 - a cast failure is a data problem the user can see
        raise PairforgeError(f"{where}: columns do not cast to the canonical types "
                             f"({_first_line(e)}); rebuild the set with pairforge") from None


def split_configs(ds: Dataset, recipe: str | None, where: str) -> dict[str, Dataset]:
    """Config name → rows (see :data:`CONFIG_COLUMNS`); ``{"default": ds}`` otherwise."""
    if recipe not in CONFIG_COLUMNS:
        return {"default": ds}
    column, names = CONFIG_COLUMNS[recipe]
    allowed = ", ".join(map(repr, names))
    if column not in ds.column_names:
        raise PairforgeError(f"{where}: {recipe} rows need the column '{column}' ({allowed}) "
                             f"to split them into configs; rebuild the set")
    values = list(ds[column])
    bad = [i for i, v in enumerate(values) if v not in names]
    if bad:
        raise PairforgeError(f"{where}: row {bad[0]} field '{column}' is {values[bad[0]]!r}; "
                             f"expected one of {allowed} ({len(bad)} such rows)")
    out = {}
    for value, name in names.items():
        idx = [i for i, v in enumerate(values) if v == value]
        if idx:
            out[name] = ds.select(idx, keep_in_memory=True)
    return out


def read_rejects(path: Path) -> Counter:
    """``(stage, reason) → count`` of a ``rejects.jsonl`` (empty when the file is absent).
    Reasons are grouped by kind (:func:`~pairforge.sources.sft.reason_kind`, as the build
    summary groups them) and shown with their numbers put back: the number when every reason
    of the kind has it, else its range (``answer has 3–7 words``), never a bare ``N``."""
    tally = ReasonTally()
    if not path.is_file():
        return Counter()
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise PairforgeError(f"{path}: line {i + 1} is not JSON; fix or remove it "
                                     f"(every rejected example is one JSON object)") from None
            if not isinstance(rec, dict):
                raise PairforgeError(f"{path}: line {i + 1} is not a JSON object")
            tally.add(str(rec.get("stage", "?")), str(rec.get("reason", "?")))
    return tally.counts()


# ----------------------------------------------------------------------------- helpers


def _read_json(path: Path, where: str) -> dict:
    if not path.is_file():
        raise PairforgeError(f"{where}: the build dir has no {path.name}; finish the build "
                             f"(rerun `pairforge build` with the same command)")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise PairforgeError(f"{path}: not valid JSON ({_first_line(e)}); rerun the "
                             f"build") from None
    if not isinstance(value, dict):
        raise PairforgeError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _load_saved(p: Path, where: str) -> Dataset:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(os.fspath(p))
    except Exception as e:  # noqa: BLE001 - any loader failure is a file-level problem
        raise PairforgeError(f"{where}: cannot load the saved dataset ({_first_line(e)}); "
                             f"re-save it with Dataset.save_to_disk") from None
    if isinstance(ds, DatasetDict):
        if list(ds) != [SPLIT]:
            raise PairforgeError(f"{where}: has splits {sorted(ds)}; publish one split "
                                 f"(save ds['{SPLIT}'] or the split you mean on its own)")
        ds = ds[SPLIT]
    return ds


def _load_parquet(p: Path, where: str) -> Dataset:
    try:
        return Dataset.from_parquet(os.fspath(p))
    except Exception as e:  # noqa: BLE001
        raise PairforgeError(f"{where}: not a readable parquet file ({_first_line(e)})") from None


def _recipe(manifest: dict, ds: Dataset, where: str) -> str | None:
    """The recipe named by the manifest, else the one value of the ``recipe`` column when it
    names a pairforge recipe; ``None`` for sets made elsewhere."""
    name = manifest.get("recipe")
    if name is not None:
        if name not in RECIPES:
            raise PairforgeError(f"{where}: manifest names recipe {name!r}, which pairforge "
                                 f"does not know (recipes: {', '.join(RECIPES)})")
        return name
    values = ds.unique("recipe") if len(ds) else []
    return values[0] if len(values) == 1 and values[0] in RECIPES else None
