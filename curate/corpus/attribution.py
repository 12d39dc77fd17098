"""Where the conflict is: which weight matrices carry an example's gradient.

An example's squared gradient norm is the sum of its grad_norms entries squared (one entry per module and
layer, manifest `modules`), so an entry's share of it, ‖∇W‖² / Σ ‖∇W'‖², says where the update lands. The
routed rows carry their TOP_K entries (`top_modules`); the report averages the shares per layer and per
role for sft and rl."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import TOP_MODULE

TOP_K = 5


@dataclass
class Entries:
    """The grad_norms entries of a run: module name, PRISM role and layer of each, in column order."""

    names: list[str]
    roles: list[str]
    layers: list[int]

    @classmethod
    def of(cls, modules: list[str], probe_map: dict | None) -> Entries:
        """From the manifest's (or state's) `modules` and `probe_map`; without a probe map (older
        caches) the role is the module's last name and the layer the first number in its path (-1: none)."""
        layer_of = {name: layer["layer"] for layer in (probe_map or {}).get("layers", [])
                    for name in layer["roles"].values()}
        roles = (probe_map or {}).get("roles") or [m.rsplit(".", 1)[-1] for m in modules]
        layers = [layer_of.get(m, _first_number(m)) for m in modules]
        return cls(list(modules), list(roles), layers)


def _first_number(name: str) -> int:
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return int(match.group(1)) if match else -1


def norm_matrix(grad_norms: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A grad_norms column without nulls as a float64 (rows, entries) array."""
    flat = pc.list_flatten(grad_norms).to_numpy(zero_copy_only=False).astype(np.float64)
    return flat.reshape(len(grad_norms), -1) if len(grad_norms) else flat.reshape(0, 0)


def shares(norms: np.ndarray) -> np.ndarray:
    """Each entry's share of its row's squared gradient norm: (rows, entries), rows summing to 1 (0 for
    a row whose gradient is zero)."""
    sq = norms ** 2
    total = sq.sum(axis=1, keepdims=True)
    return np.divide(sq, total, out=np.zeros_like(sq), where=total > 0)


def top_modules(grad_norms: pa.ChunkedArray | pa.Array, entries: Entries, k: int = TOP_K) -> pa.Array:
    """Per row (no nulls), its k entries with the largest share, largest first (ties: the earlier entry):
    list<struct<module, role, layer, share>>."""
    s = shares(norm_matrix(grad_norms))
    k = min(k, s.shape[1])
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    picked = order.reshape(-1)
    structs = pa.StructArray.from_arrays(
        [pa.array(np.asarray(entries.names, dtype=object)[picked], pa.string()),
         pa.array(np.asarray(entries.roles, dtype=object)[picked], pa.string()),
         pa.array(np.asarray(entries.layers, dtype=np.int32)[picked], pa.int32()),
         pa.array(np.take_along_axis(s, order, axis=1).reshape(-1).astype(np.float32), pa.float32())],
        fields=list(TOP_MODULE))
    offsets = pa.array(np.arange(0, len(picked) + 1, k, dtype=np.int32) if k else np.zeros(s.shape[0] + 1, np.int32))
    return pa.ListArray.from_arrays(offsets, structs, type=pa.list_(TOP_MODULE))


def mean_shares(norms: np.ndarray, entries: Entries) -> dict[str, dict]:
    """The mean share of the squared gradient norm per layer and per role over a set of rows:
    {"layer": {layer: share}, "role": {role: share}} (each sums to 1 over its keys for a non-empty set)."""
    s = shares(norms).mean(axis=0) if len(norms) else np.zeros(len(entries.names))
    by_layer: dict[int, float] = {}
    by_role: dict[str, float] = {}
    for share, role, layer in zip(s, entries.roles, entries.layers):
        by_layer[layer] = by_layer.get(layer, 0.0) + float(share)
        by_role[role] = by_role.get(role, 0.0) + float(share)
    return {"layer": {str(k): round(v, 6) for k, v in sorted(by_layer.items())},
            "role": {k: round(v, 6) for k, v in by_role.items()}}
