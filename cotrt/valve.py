"""Valves (CoT-Valve): LoRA adapters served unmerged, scaled per token row by alpha.

A valve is a LoRA delta ΔW = s · B A on some linears of a model. ``ValveSet(model)`` loads
adapters (PEFT folders or plain state dicts), swaps their target linears for
:class:`ValveLinear` (sharing the weight and bias Parameters, never copying them) and keeps
one bank per module: ``lora_a [n_adapters, r_max, K]``, ``lora_b [n_adapters, N, r_max]``
(ranks zero-padded, s folded into B). Before each forward the engine fills the model's one
:class:`ValveState` with per-token alpha and adapter index; every ValveLinear then computes

    y = x Wᵀ + bias + alpha[t] · (x A[a_t]ᵀ) B[a_t]ᵀ        (cotrt.ops.valve_lora)

The module itself (ValveState, ValveLinear) is cotrt.layers.valve_lora, re-exported here.
Loading validates everything (config, keys, shapes, ranks, values) before it swaps a
module or grows a bank: after an error the model is unchanged.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cotrt.layers.valve_lora import Conv1D, ValveLinear, ValveState
from cotrt.parallel.shard import sharded_valve_linear, valve_style

__all__ = ["ValveLinear", "ValveSet", "ValveState"]


# LoraConfig options whose forward is more than x Aᵀ Bᵀ · s on a linear: refused, not ignored.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) rescales W by a learned magnitude",
    "lora_bias": "lora_bias adds a bias to lora_B",
    "modules_to_save": "modules_to_save replaces whole modules, a valve only adds a LoRA delta",
    "trainable_token_indices": "trainable_token_indices changes embedding rows",
    "target_parameters": "target_parameters puts LoRA on raw parameters (e.g. MoE experts)",
    "layer_replication": "layer_replication changes the layer stack",
    "alora_invocation_tokens": "activated LoRA applies the delta only after invocation tokens",
    "use_qalora": "QALoRA pools the input before lora_A",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "arrow_config": "Arrow routes between adapters per token",
    "kasa_config": "KaSA changes the LoRA forward",
    "monteclora_config": "MonteCLoRA samples the LoRA factors",
    "velora_config": "VeLoRA changes the LoRA forward",
}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


@dataclass
class _Delta:
    module: str
    a: torch.Tensor  # [r, K]
    b: torch.Tensor  # [N, r]
    scale: float


class ValveSet:
    """The valves loaded into one model, by name -> adapter index (the ``adapter`` value
    of ValveState rows). Owns the model's ValveState (``.state``, on the device the model
    has when the set is made: move the model first).

        vs = ValveSet(model)
        short = vs.load("adapters/cot-valve", "short")         # -> 0
        vs.state.set_rows(alpha_b, adapter_b, tokens_per_row=S)  # before each forward
        vs.state.clear()                                       # plain model again
    """

    def __init__(self, model: nn.Module):
        self.model = model
        param = next(model.parameters(), None)
        self.state = ValveState(param.device if param is not None else None)
        self._slots: list[str | None] = []  # adapter index -> valve name (None: free)
        self._originals: dict[str, nn.Module] = {}  # swapped module name -> original linear
        self._module_slots: dict[str, set[int]] = {}  # swapped module name -> slots it holds
        self.info: dict[str, dict] = {}  # valve name -> {"index", "modules", "scales", "config"}
        # Bumped whenever banks or modules change (load, unload): captured decode graphs
        # hold the banks' addresses and are dropped when it moves.
        self.generation = 0

    @property
    def names(self) -> list[str]:
        return [n for n in self._slots if n is not None]

    def __contains__(self, name) -> bool:
        return name in self.info

    def index(self, name: str) -> int:
        if name not in self.info:
            raise KeyError(f"unknown valve {name!r}; loaded: {self.names}")
        return self.info[name]["index"]

    def load(self, source, name: str, *, scale: float | None = None) -> int:
        """Load a LoRA as valve ``name``; returns its adapter index.

        Args:
            source: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors
                or .bin), or a plain state dict with keys ``[base_model.model.]<module>.lora_A.weight``
                ([r, K]) and ``...lora_B.weight`` ([N, r]), <module> named as in ``model``.
            name: the valve's name (unique).
            scale: the LoRA scale s for a plain state dict (required there, refused for a
                folder, whose config gives lora_alpha / r or lora_alpha / sqrt(r)).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"ValveSet.load: name must be a non-empty string, got {name!r}")
        if name in self.info:
            raise ValueError(f"ValveSet.load: valve {name!r} is already loaded (unload it first)")
        if isinstance(source, Mapping):
            if not isinstance(scale, (int, float)) or not math.isfinite(scale):
                raise ValueError(f"valve {name!r}: a plain state dict needs scale= (a finite number), got {scale!r}")
            config, tensors = None, dict(source)
        elif isinstance(source, (str, os.PathLike)):
            if scale is not None:
                raise ValueError(f"valve {name!r}: scale= is for plain state dicts; a PEFT folder's "
                                 "scale comes from its adapter_config.json")
            config, tensors = _read_peft_folder(Path(source), name)
        else:
            raise TypeError(f"valve {name!r}: source must be a folder path or a state dict, "
                            f"got {type(source).__name__}")
        deltas = self._validate(config, tensors, scale, name)
        index = self._commit(deltas, name, config)
        self.generation += 1
        return index

    def unload(self, name: str) -> None:
        """Free valve ``name``'s index (a later load may reuse it); modules left with no valve
        get their original linear back."""
        slot = self.index(name)
        for mod in self.info.pop(name)["modules"]:
            self.model.get_submodule(mod).set_adapter(slot, None, None)
            self._module_slots[mod].discard(slot)
            if not self._module_slots[mod]:
                _set_module(self.model, mod, self._originals.pop(mod))
                del self._module_slots[mod]
        self._slots[slot] = None
        while self._slots and self._slots[-1] is None:
            self._slots.pop()
        self.generation += 1

    # -- validation: reads only, so a failure leaves the model as it was --------------------

    def _validate(self, config, tensors, scale, name) -> list[_Delta]:
        def fail(msg):
            raise ValueError(f"valve {name!r}: {msg}")

        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            m = _KEY.match(key) if isinstance(key, str) else None
            if m is None:
                fail(f"unexpected key {key!r}: expected '<module>.lora_A.weight' and '<module>.lora_B.weight' "
                     "(DoRA magnitudes, LoRA biases and embedding LoRA are not supported)")
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                fail(f"{key!r} must be a 2-D floating tensor, got {_desc(t)}")
            pairs.setdefault(m["module"], {})[m["which"]] = t
        if not pairs:
            fail("no lora_A / lora_B weights")
        modules = dict(self.model.named_modules())
        for mod in pairs:
            if mod not in modules:
                fail(f"unknown module {mod!r}: the model has no module of that name")
        if config is not None:
            targets = _peft_targets(config, self.model, modules)
            for mod in sorted(targets - pairs.keys()):
                fail(f"adapter_config.json targets module {mod!r} but the weights have no lora_A/lora_B for it")
            for mod in sorted(pairs.keys() - targets):
                fail(f"weights for module {mod!r}, which adapter_config.json's target_modules does not select")
        deltas = []
        for mod, ab in sorted(pairs.items()):
            lin = modules[mod]
            if not _is_linear(lin):
                fail(f"module {mod!r} is a {type(lin).__name__}; valves apply to nn.Linear / Conv1D only")
            try:  # a tensor-parallel shard: the plan's style must be one a valve follows
                valve_style(self.model, mod, lin)
            except ValueError as e:
                fail(str(e))
            for which in "AB":
                if which not in ab:
                    fail(f"module {mod!r} has lora_{'BA'[which == 'B']} but no lora_{which}")
            a, b = ab["A"], ab["B"]
            K, N = _in_out(lin)
            if a.shape[0] != b.shape[1]:
                fail(f"module {mod!r}: rank mismatch, lora_A {tuple(a.shape)} has r={a.shape[0]} "
                     f"but lora_B {tuple(b.shape)} has r={b.shape[1]}")
            if a.shape[1] != K or b.shape[0] != N:
                fail(f"module {mod!r} is [N={N}, K={K}]: expected lora_A [r, {K}] and lora_B [{N}, r], "
                     f"got lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}")
            r = a.shape[0]
            if r > 128:
                fail(f"module {mod!r}: rank {r} > 128, the most the valve_lora kernel supports")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                fail(f"module {mod!r}: lora_A or lora_B has non-finite values")
            s = scale if config is None else _peft_scale(config, mod, r, fail)
            deltas.append(_Delta(mod, a, b, float(s)))
        return deltas

    def _commit(self, deltas: list[_Delta], name: str, config) -> int:
        slot = self._slots.index(None) if None in self._slots else len(self._slots)
        for d in deltas:
            mod = self.model.get_submodule(d.module)
            if not isinstance(mod, ValveLinear):
                vl = sharded_valve_linear(self.model, d.module, mod, self.state) or ValveLinear(mod, self.state)
                _set_module(self.model, d.module, vl)
                self._originals[d.module], self._module_slots[d.module], mod = mod, set(), vl
            # Fold s into B in fp32, then store in the weight's dtype.
            mod.set_adapter(slot, d.a.float(), d.b.float() * d.scale)
            self._module_slots[d.module].add(slot)
        if slot == len(self._slots):
            self._slots.append(name)
        else:
            self._slots[slot] = name
        self.info[name] = {"index": slot, "modules": [d.module for d in deltas],
                           "scales": {d.module: d.scale for d in deltas}, "config": config}
        return slot


def _read_peft_folder(path: Path, name: str):
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise ValueError(f"valve {name!r}: {path} has no adapter_config.json")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"valve {name!r}: {cfg_path} is not valid JSON: {e}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"valve {name!r}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, why in _UNSUPPORTED.items():
        if config.get(key):
            raise ValueError(f"valve {name!r}: {key}={config[key]!r} is not supported ({why})")
    if config.get("bias", "none") != "none":
        raise ValueError(f"valve {name!r}: bias={config['bias']!r} is not supported (trained biases would "
                         "change the base model; only bias='none' adapters can be valves)")
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise ValueError(f"valve {name!r}: adapter_config.json has no {key!r}")
    if (path / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(path / "adapter_model.safetensors"))
    elif (path / "adapter_model.bin").is_file():
        tensors = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"valve {name!r}: {path} has neither adapter_model.safetensors nor adapter_model.bin")
    return config, tensors


def _peft_targets(config, model, modules) -> set[str]:
    """Module names PEFT would wrap (mirrors peft's check_target_module_exists)."""
    tm = config["target_modules"]
    if isinstance(tm, str) and tm.lower() == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        tm = [n for n, m in modules.items() if _is_linear(m) and m is not head]
    excl = config.get("exclude_modules")
    layers = config.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    patterns = config.get("layers_pattern")
    patterns = [patterns] if isinstance(patterns, str) else patterns
    found = set()
    for key in modules:
        if not key:
            continue
        if excl and (re.fullmatch(excl, key) if isinstance(excl, str) else
                     key in excl or any(key.endswith("." + e) for e in excl)):
            continue
        if isinstance(tm, str):
            ok = re.fullmatch(tm, key) is not None
        elif key in tm:
            ok = True  # an exact name: peft skips the layer filter here too
        else:
            ok = any(key.endswith("." + t) for t in tm)
            if ok and layers:
                if patterns:
                    m = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", key))), None)
                else:
                    m = re.match(r".*?\.[^.]*\.(\d+)\.", key)
                ok = m is not None and int(m.group(1)) in layers
        if ok:
            found.add(key)
    return found


def _peft_scale(config, mod, r, fail) -> float:
    def pattern(p):  # peft's get_pattern_key: the first key matching a suffix of mod
        return next((k for k in (p or {}) if re.match(rf"(.*\.)?({k})$", mod)), None)

    rk, ak = pattern(config.get("rank_pattern")), pattern(config.get("alpha_pattern"))
    r_cfg = config["rank_pattern"][rk] if rk is not None else config["r"]
    lora_alpha = config["alpha_pattern"][ak] if ak is not None else config["lora_alpha"]
    if r_cfg != r:
        fail(f"module {mod!r}: adapter_config.json says r={r_cfg} but lora_A has r={r}")
    return lora_alpha / math.sqrt(r) if config.get("use_rslora") else lora_alpha / r


def _is_linear(m) -> bool:
    return isinstance(m, (nn.Linear, ValveLinear, Conv1D)) if Conv1D else isinstance(m, (nn.Linear, ValveLinear))


def _in_out(m) -> tuple[int, int]:
    """(K, N) of a linear: nn.Linear weight [N, K], Conv1D weight [K, N]."""
    if isinstance(m, ValveLinear):
        return m.in_features, m.out_features
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    return m.weight.shape[0], m.weight.shape[1]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _desc(t) -> str:
    return f"shape {tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
