"""Reference log-probs, computed once before training (images included) and cached.

A :class:`RefTable` holds, per row of the pair set, the reference log-prob of each *role* a
loss needs (``chosen``, ``rejected``, P2-DPO's ``rejected@enhanced`` / ``rejected@degraded``;
NaN where a role does not apply) and, for ASPO, the chosen answer's per-sentence sums.

The cache key (:func:`reference_key`) is the dataset fingerprint, the reference model's name,
revision and weights identity, the loss and its roles; never batch size or device. Tables live
under ``$PAIRFORGE_CACHE/ref-logps/<key>.npz`` and a copy is kept in the run folder, so a
resumed run finds them even when the reference policy (CW-DPO's Stage-1 policy) is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pairforge.models.local import cache_root

FORMAT_VERSION = 1
SENTENCES = "chosen_sentences"


@dataclass
class RefTable:
    """``logps[role]`` float64 (N,) (NaN: not applicable / not computed); ``sentences[i]`` the
    chosen answer's per-sentence reference sums of row i (ASPO), None elsewhere; ``source``
    says where the numbers came from (for the log)."""

    logps: dict[str, np.ndarray]
    sentences: list[np.ndarray | None] = field(default_factory=list)
    source: str = ""

    def get(self, role: str, indices: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(self.logps[role][list(indices)])

    def sentence_matrix(self, indices: Sequence[int], width: int) -> torch.Tensor:
        """Per-sentence sums of rows ``indices`` as a (B, width) tensor padded with 0."""
        out = torch.zeros((len(indices), width), dtype=torch.float64)
        for j, i in enumerate(indices):
            s = self.sentences[i]
            out[j, :len(s)] = torch.from_numpy(s)
        return out

    # --------------------------------------------------------------------- files

    def save(self, path: Path) -> None:
        """Write atomically (temporary name, then rename)."""
        arrays = {f"logps/{k}": v for k, v in self.logps.items()}
        if self.sentences:
            lengths = np.array([-1 if s is None else len(s) for s in self.sentences], dtype=np.int64)
            flat = [s for s in self.sentences if s is not None]
            arrays["sentences/lengths"] = lengths
            arrays["sentences/values"] = np.concatenate(flat) if flat else np.zeros(0)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, source: str = "") -> "RefTable":
        with np.load(path) as z:
            logps = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("logps/")}
            sentences: list[np.ndarray | None] = []
            if "sentences/lengths" in z.files:
                values, start = z["sentences/values"], 0
                for n in z["sentences/lengths"].tolist():
                    if n < 0:
                        sentences.append(None)
                    else:
                        sentences.append(values[start:start + n])
                        start += n
        return cls(logps, sentences, source or f"cache {path}")


def reference_key(dataset_fingerprint: str, model_identity: str, loss: str, roles: Sequence[str],
                  extra: str = "") -> str:
    """The cache key: dataset fingerprint, reference model identity, loss and roles (plus
    ``extra``, e.g. the Stage-1 weights hash of CW-DPO)."""
    payload = json.dumps([FORMAT_VERSION, dataset_fingerprint, model_identity, loss, list(roles), extra])
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def cache_path(key: str) -> Path:
    return cache_root() / "ref-logps" / f"{key}.npz"


def model_identity(name: str, revision: str, source: str | None = None) -> str:
    """Name + revision; for a local folder also the names, sizes and mtimes of its weight and
    config files, so retrained weights in the same folder never hit a stale cache."""
    parts = [name, revision]
    if source and Path(source).is_dir():
        for f in sorted(Path(source).iterdir()):
            if f.suffix in (".safetensors", ".bin", ".json", ".gguf"):
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def weights_hash(model: torch.nn.Module) -> str:
    """Hash of the trainable tensors' bytes (e.g. the Stage-1 LoRA adapter)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def from_columns(rows_chosen: Sequence[float | None], rows_rejected: Sequence[float | None]) -> RefTable | None:
    """A table from the dataset's ``ref_chosen_logps`` / ``ref_rejected_logps`` columns, or None
    when any value is missing (then everything is computed, so the numbers share one model)."""
    if any(v is None for v in rows_chosen) or any(v is None for v in rows_rejected):
        return None
    return RefTable({"chosen": np.asarray(rows_chosen, dtype=np.float64),
                     "rejected": np.asarray(rows_rejected, dtype=np.float64)},
                    source="dataset columns ref_chosen_logps / ref_rejected_logps")


@torch.no_grad()
def compute_reference(n_rows: int, indices: Sequence[int], roles: Sequence[str],
                      batch_logps: Callable[[Sequence[int], Sequence[str]], dict],
                      *, batch_size: int, with_sentences: bool = False,
                      reference_mode: Callable[[], AbstractContextManager] = nullcontext,
                      progress: bool = True, desc: str = "reference log-probs") -> RefTable:
    """Reference log-probs of ``roles`` for rows ``indices`` (of ``n_rows``), ``batch_size``
    rows per forward pass. ``batch_logps(rows, roles)`` runs one forward over the roles' sequences
    and returns ``{role: (B,) tensor (NaN where n/a)}`` plus, when asked, ``SENTENCES``: a list
    of per-sentence tensors; ``reference_mode()`` is entered around it (e.g. the LoRA adapter
    disabled)."""
    from tqdm.auto import tqdm

    logps = {r: np.full(n_rows, np.nan) for r in roles}
    sentences: list[np.ndarray | None] = [None] * n_rows if with_sentences else []
    chunks = [list(indices[s:s + batch_size]) for s in range(0, len(indices), batch_size)]
    with tqdm(total=len(indices), desc=desc, unit="pair", disable=not progress) as bar, reference_mode():
        for chunk in chunks:
            out = batch_logps(chunk, roles)
            for r in roles:
                logps[r][chunk] = out[r].double().cpu().numpy()
            if with_sentences:
                for i, s in zip(chunk, out[SENTENCES]):
                    sentences[i] = s.double().cpu().numpy()
            bar.update(len(chunk))
    return RefTable(logps, sentences, source="computed")


def load_or_compute(key: str, run_copy: Path, compute: Callable[[], RefTable]) -> tuple[RefTable, bool]:
    """The table of ``key``: from the run folder's copy, else the cache, else ``compute()``
    (then saved to both). Returns (table, hit) where hit means nothing was computed."""
    for path, where in ((run_copy, "run folder"), (cache_path(key), "cache")):
        if path.is_file():
            try:
                table = RefTable.load(path, source=f"{where} {path}")
            except (OSError, ValueError, KeyError):
                continue  # unreadable (e.g. a half-written file of a killed run): recompute
            if path != run_copy:
                table.save(run_copy)
            return table, True
    table = compute()
    table.save(cache_path(key))
    table.save(run_copy)
    return table, False
