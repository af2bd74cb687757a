"""CCoT-style bundles: :func:`save_ccot_bundle` / :func:`load_ccot_bundle` write and read a
directory holding what a CCoT-style method trains on top of a base model (two LoRA valves,
an END head, the feedback layer, an optional projection); the format is documented in
README.md ("CCoT bundles").

Loading validates everything it reads against the model before it changes anything:
after an error, model, tokenizer and loaded valves are as they were.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .coconut import _keys
from .spec import Latent

BUNDLE_FILE = "cotrt_bundle.json"
BUNDLE_FORMAT = "cotrt-ccot/1"


def _linear_tensors(obj, what: str, n_out=None) -> dict:
    """{"weight": [out, in], "bias": [out]?} from an nn.Linear, a weight tensor or a dict."""
    if isinstance(obj, nn.Linear):
        d = {"weight": obj.weight, "bias": obj.bias}
    elif isinstance(obj, torch.Tensor):
        d = {"weight": obj}
    elif isinstance(obj, Mapping):
        d = dict(obj)
    else:
        raise ValueError(f"{what} must be an nn.Linear, a weight tensor or a {{'weight', 'bias'}} dict, "
                         f"got {type(obj).__name__}")
    if set(d) - {"weight", "bias"}:
        raise ValueError(f"{what}: unexpected keys {_keys(set(d) - {'weight', 'bias'})} (only 'weight', 'bias')")
    w, b = d.get("weight"), d.get("bias")
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"{what}: weight must be a 2-D float tensor [out, H], got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if n_out is not None and w.shape[0] not in n_out:
        raise ValueError(f"{what}: weight must be [1, H] (one END logit) or [2, H] (class 1 = END), "
                         f"got {list(w.shape)}")
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (w.shape[0],)):
        raise ValueError(f"{what}: bias must be [{w.shape[0]}], got "
                         f"{tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}")
    return {k: v.detach().cpu().contiguous() for k, v in (("weight", w), ("bias", b)) if v is not None}


def save_ccot_bundle(path, *, contemplate, answer, end_head, feedback_layer: int | str, max_steps: int,
                     projection=None, base: str | None = "default", tokens: Mapping | None = None,
                     insert_begin: bool = False, name: str | None = None, overwrite: bool = False) -> Path:
    """Write a CCoT bundle directory (format ``cotrt-ccot/1``, see README.md, "CCoT bundles").

    Args:
        contemplate, answer: the two LoRA valves: PEFT adapter folders (copied) or PEFT
            models (``save_pretrained`` into the bundle).
        end_head: nn.Linear(H, 1 or 2), or its weight tensor, or {"weight", "bias"}.
        feedback_layer: the decoder layer whose residual is fed back, or ``"final_norm"``
            (the final norm's output, the state the LM head reads).
        max_steps: the cap on contemplation steps.
        projection: None, nn.Linear, a weight tensor [E, H] or {"weight", "bias"}.
        base: the base model ("default", a path, or None: the loader must be given one).
        tokens: {"begin": ..., "end": ..., "latent": ...} token strings or None (default: none).
        name: the END head's registry name (default: the directory's name).
        overwrite: replace an existing bundle at ``path``.
    Returns the bundle's path. Validates everything before writing; writes into a temporary
    sibling directory and renames it into place.
    """
    path = Path(path)
    head = _linear_tensors(end_head, "end_head", n_out=(1, 2))
    proj = None if projection is None else _linear_tensors(projection, "projection")
    tokens = dict(tokens or {})
    _check_tokens(tokens)
    for vname, src in (("contemplate", contemplate), ("answer", answer)):
        if not hasattr(src, "save_pretrained") and not (
                isinstance(src, (str, os.PathLike)) and (Path(src) / "adapter_config.json").is_file()):
            raise ValueError(f"{vname}: {src!r} is neither a PEFT model nor a PEFT adapter folder "
                             "(no adapter_config.json)")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"{path} exists and is not empty (overwrite=True replaces it)")
    manifest = {"format": BUNDLE_FORMAT, "name": name or path.name, "base": base,
                "valves": {"contemplate": "valves/contemplate", "answer": "valves/answer"},
                "valve_during": {"contemplate": 1.0}, "valve_after": {"answer": 1.0},
                "end_head": "end_head.safetensors", "feedback_layer": feedback_layer,
                "projection": None if proj is None else "projection.safetensors", "max_steps": max_steps,
                "tokens": {k: tokens.get(k) for k in ("begin", "end", "latent")}, "insert_begin": insert_begin}
    _check_manifest(manifest, path)  # the loader's own checks, before anything is written
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for vname, src in (("contemplate", contemplate), ("answer", answer)):
            dest = tmp / "valves" / vname
            if hasattr(src, "save_pretrained"):
                src.save_pretrained(str(dest))
            else:
                shutil.copytree(src, dest)
        save_file(head, str(tmp / "end_head.safetensors"))
        if proj is not None:
            save_file(proj, str(tmp / "projection.safetensors"))
        (tmp / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _check_tokens(tokens):
    if not isinstance(tokens, Mapping) or set(tokens) - {"begin", "end", "latent"}:
        raise ValueError(f"tokens must be a dict with keys among 'begin', 'end', 'latent', got {tokens!r}")


def _inside(root: Path, rel, field: str) -> Path:
    """A bundle-relative path that stays inside the bundle."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ValueError(f"bundle {root}: {field} must be a relative path inside the bundle, got {rel!r}")
    return root / rel


def _check_manifest(m, root: Path) -> None:
    def fail(msg):
        raise ValueError(f"bundle {root}: {msg}")

    if not isinstance(m, dict):
        fail(f"{BUNDLE_FILE} must hold a JSON object")
    if m.get("format") != BUNDLE_FORMAT:
        fail(f"format must be {BUNDLE_FORMAT!r}, got {m.get('format')!r}")
    for key in ("valves", "end_head", "feedback_layer", "max_steps"):
        if key not in m:
            fail(f"{BUNDLE_FILE} has no {key!r}")
    known = {"format", "name", "base", "valves", "valve_during", "valve_after", "end_head", "feedback_layer",
             "projection", "max_steps", "tokens", "insert_begin"}
    if set(m) - known:
        fail(f"unknown field(s) {_keys(set(m) - known)}")
    if not isinstance(m["valves"], dict) or not m["valves"]:
        fail(f"valves must be a non-empty {{name: folder}} object, got {m['valves']!r}")
    for vname, rel in m["valves"].items():
        _inside(root, rel, f"valves[{vname!r}]")
    for key in ("valve_during", "valve_after"):
        for vname in m.get(key) or {}:
            if vname not in m["valves"]:
                fail(f"{key} names valve {vname!r}, which is not among valves {sorted(m['valves'])}")
    _inside(root, m["end_head"], "end_head")
    if m.get("projection") is not None:
        _inside(root, m["projection"], "projection")
    if m.get("name") is not None and (not isinstance(m["name"], str) or not m["name"]):
        fail(f"name must be a non-empty string, got {m['name']!r}")
    if m.get("base") is not None and not isinstance(m["base"], str):
        fail(f"base must be a string or null, got {m['base']!r}")
    fb = m["feedback_layer"]
    if fb != "final_norm" and (isinstance(fb, bool) or not isinstance(fb, int)):
        fail(f"feedback_layer must be an int (a decoder layer index) or 'final_norm', got {fb!r}")
    try:
        _check_tokens(m.get("tokens") or {})
    except ValueError as e:
        fail(str(e))
    # The Latent's own checks (types, ranges) with the bundle's values.
    try:
        _latent_from(m, end_head="check")
    except ValueError as e:
        fail(str(e))


def _latent_from(m, end_head, projection=None) -> Latent:
    tokens = m.get("tokens") or {}
    return Latent(end_head=end_head, max_steps=m["max_steps"], feedback=m["feedback_layer"], projection=projection,
                  begin_token=tokens.get("begin"), end_token=tokens.get("end"), latent_token=tokens.get("latent"),
                  insert_begin=m.get("insert_begin", False),
                  valve_during=m.get("valve_during", {"contemplate": 1.0}),
                  valve_after=m.get("valve_after", {"answer": 1.0}))


def _read_linear(file: Path, what: str, n_out=None) -> dict:
    from safetensors.torch import load_file

    if not file.is_file():
        raise ValueError(f"{what}: {file} is missing")
    return _linear_tensors(load_file(str(file)), f"{what} ({file.name})", n_out=n_out)


def _to_linear(t: dict, device) -> nn.Linear:
    out_f, in_f = t["weight"].shape
    lin = nn.Linear(in_f, out_f, bias="bias" in t, device=device, dtype=t["weight"].dtype)
    with torch.no_grad():
        lin.weight.copy_(t["weight"])
        if "bias" in t:
            lin.bias.copy_(t["bias"])
    return lin.eval().requires_grad_(False)


def load_ccot_bundle(path, model=None, tokenizer=None, runtime=None, *, valves=None):
    """Load a CCoT bundle; returns ``(model, tokenizer, Latent)``.

    The model and tokenizer are ``runtime``'s when a runtime is given, else the ones passed,
    else the bundle's ``base`` ("default" or a path, relative to the bundle) loaded fresh.
    The bundle's valves are loaded into, in this order of preference: ``runtime.load_valve``
    (when the runtime has it); ``valves`` (a :class:`cotrt.valve.ValveSet`); the model's
    ``cotrt_valves`` set from an earlier load; a new ValveSet, kept as ``model.cotrt_valves``.
    The END head is registered as ``model.cotrt_end_heads[name]`` (so that
    ``Latent(end_head=name, ...)`` binds) and is also the returned Latent's ``end_head``.

    Validates the manifest, the END head and projection files, the spec against the model
    (``Latent.bind``) and both valves before loading any: after an error nothing is changed.
    """
    from cotrt.valve import ValveSet, _read_peft_folder

    root = Path(path)
    if not (root / BUNDLE_FILE).is_file():
        raise ValueError(f"bundle {root}: no {BUNDLE_FILE}")
    try:
        m = json.loads((root / BUNDLE_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"bundle {root}: {BUNDLE_FILE} is not valid JSON: {e}") from None
    _check_manifest(m, root)

    if runtime is not None:
        for given, have, what in ((model, runtime.model, "model"), (tokenizer, runtime.tokenizer, "tokenizer")):
            if given is not None and given is not have:
                raise ValueError(f"load_ccot_bundle: {what}= differs from runtime.{what}; pass one or the other")
        model, tokenizer = runtime.model, runtime.tokenizer
    elif model is None:
        if m.get("base") is None:
            raise ValueError(f"bundle {root}: it names no base model; pass model= and tokenizer=")
        from cotrt.models import load_model

        base = m["base"]
        if base != "default" and not Path(base).is_absolute() and (root / base).exists():
            base = str(root / base)
        loaded, loaded_tok = load_model(base, quiet=True)
        model, tokenizer = loaded, tokenizer or loaded_tok
    elif tokenizer is None:
        raise ValueError("load_ccot_bundle: model= needs tokenizer= too")

    device = next(model.parameters()).device
    head = _to_linear(_read_linear(_inside(root, m["end_head"], "end_head"), "end_head", n_out=(1, 2)), device)
    proj = None
    if m.get("projection") is not None:
        proj = _to_linear(_read_linear(_inside(root, m["projection"], "projection"), "projection"), device)
    latent = _latent_from(m, head, proj)
    latent.bind(model, tokenizer)  # feedback layer, head and projection sizes, tokens: reads only

    # The valves: read and check all against the model before loading any.
    use_rt = runtime is not None and hasattr(runtime, "load_valve")
    target = None if use_rt else valves if valves is not None else getattr(model, "cotrt_valves", None)
    if target is not None and not isinstance(target, ValveSet):
        raise ValueError(f"load_ccot_bundle: valves must be a cotrt.valve.ValveSet, got {type(target).__name__}")
    # A runtime refuses a clashing name itself, in load_valve (undone below).
    loaded = target.names if target is not None else ()
    clash = sorted(set(m["valves"]) & set(loaded))
    if clash:
        raise ValueError(f"bundle {root}: valve name(s) {clash} are already loaded")
    checker = ValveSet(model)  # never committed to: its _validate only reads
    folders = {}
    for vname, rel in m["valves"].items():
        folders[vname] = _inside(root, rel, f"valves[{vname!r}]")
        checker._validate(*_read_peft_folder(folders[vname], vname), None, vname)

    new_set = not use_rt and target is None
    if new_set:
        target = ValveSet(model)
    load, unload = (runtime.load_valve, getattr(runtime, "unload_valve", None)) if use_rt else \
        (lambda folder, name: target.load(folder, name), target.unload)
    done = []
    try:
        for vname, folder in folders.items():
            load(str(folder), name=vname)
            done.append(vname)
    except Exception:
        # Only a clash inside the runtime gets here (all was validated): undo what loaded.
        for vname in reversed(done if unload is not None else []):
            unload(vname)
        raise
    if new_set:
        model.cotrt_valves = target
    model.cotrt_end_heads = {**(getattr(model, "cotrt_end_heads", None) or {}), m.get("name") or root.name: head}
    return model, tokenizer, latent
