"""Hugging Face transformers: a model directory (config.json, safetensors weights, tokenizer files).

Runs on the torch backend with the model and tokenizer used directly, never the network
(``local_files_only=True``) and never code from the directory (``trust_remote_code=False``).
Pickled ``pytorch_model.bin`` weights are refused unless the user opts in with ``--allow-pickle``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modelpod.errors import FrameworkError
from modelpod.frameworks import Packed, PackRequest
from modelpod.frameworks._util import (
    MODEL_DIR,
    as_text,
    bytes_array,
    copy_tree,
    int_option,
    one_line,
    unreadable,
    wrong_format,
)
from modelpod.model import Batch, Model
from modelpod.pod import Pod, Signature, TensorSpec
from modelpod.safety import check_load_allowed, refuse_pickle, scan_pickle

NAME = "transformers"
EXTRA = "transformers"
IMPORTS = ("transformers", "torch")
DISTRIBUTIONS = ("transformers", "torch", "tokenizers", "safetensors")
TABLES = False  # takes arrays, not a DataFrame
TAKES_TRUST = False  # no --trust: the format has no list of trusted types
EXPECTED = "a Hugging Face model directory (config.json and safetensors weights)"
TASKS = ("text-classification", "feature-extraction")
POOLING = ("mean", "cls")
PICKLED = "pickled PyTorch weights (pytorch_model.bin)"

PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")
# Weights for other runtimes, and training state: never needed to serve with torch.
OTHER_WEIGHTS = (".h5", ".msgpack", ".onnx", ".ot", ".tflite", ".mlmodel", ".pb")
NOT_SERVED = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth")


def _config(path: Path) -> dict[str, Any] | None:
    file = path / "config.json"
    try:
        if not file.is_file() or file.stat().st_size > 1 << 20:
            return None
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _weights(path: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickled weight files) directly in the directory."""
    files = [p for p in sorted(path.iterdir()) if p.is_file() and p.name not in NOT_SERVED]
    return ([p for p in files if p.suffix == ".safetensors"],
            [p for p in files if p.suffix in PICKLE_WEIGHTS])


def detect(path: Path) -> bool:
    if not path.is_dir():
        return False
    config = _config(path)
    if config is None or not ("model_type" in config or "architectures" in config):
        return False
    safe, pickled = _weights(path)
    return bool(safe or pickled)


def infer_task(config: Mapping[str, Any]) -> str:
    """The serving task of a config's first architecture (``BertModel`` -> feature-extraction)."""
    arch = str((config.get("architectures") or [""])[0])
    if arch.endswith("ForSequenceClassification"):
        return "text-classification"
    if not arch or (arch.endswith("Model") and "For" not in arch and "Head" not in arch):
        return "feature-extraction"
    raise FrameworkError(
        f"cannot tell the task of architecture {arch}; modelpod serves {', '.join(TASKS)}: "
        "pass --option task=feature-extraction to serve its embeddings, or use --framework python"
    )


def _signature(task: str, config: Mapping[str, Any]) -> Signature:
    text = (TensorSpec("text", "BYTES", (-1,)),)
    if task == "text-classification":
        labels = config.get("id2label") or {}
        width = len(labels) or int(config.get("num_labels") or -1)
        names = [str(labels.get(str(i), labels.get(i, i))) for i in range(len(labels))]
        params = {"class_labels": names} if names else {}
        outputs = (TensorSpec("logits", "FP32", (-1, width)), TensorSpec("label", "BYTES", (-1,)))
        return Signature(text, outputs, params)
    hidden = config.get("hidden_size") or config.get("d_model") or config.get("dim") or -1
    return Signature(text, (TensorSpec("embedding", "FP32", (-1, int(hidden))),))


def _check_safetensors(files: list[Path]) -> None:
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:  # reads only the header
                f.keys()
        except Exception as exc:  # safetensors raises SafetensorError and OSError
            raise unreadable(file, "safetensors weights", exc) from None


def pack(src: Path, dest: Path, request: PackRequest) -> Packed:
    if not detect(src):
        raise wrong_format(src, NAME, EXPECTED)
    config = _config(src)
    assert config is not None
    task = str(request.options.get("task") or infer_task(config))
    if task not in TASKS:
        raise FrameworkError(f"option task={task!r}: modelpod serves {', '.join(TASKS)}")
    pooling = str(request.options.get("pooling") or "mean")
    if pooling not in POOLING:
        raise FrameworkError(f"option pooling={pooling!r}: use one of {', '.join(POOLING)}")
    safe, pickled = _weights(src)
    if not safe:
        if not request.allow_pickle:
            raise refuse_pickle(pickled[0], PICKLED)
        for file in pickled:
            scan_pickle(file)
    _check_safetensors(safe)

    def skip(p: Path) -> bool:
        # Only what serving needs: no remote code, no other runtimes' weights, and no pickles
        # when safetensors weights are there.
        return (p.suffix == ".py" or p.suffix in OTHER_WEIGHTS or p.name in NOT_SERVED
                or (bool(safe) and p.suffix in PICKLE_WEIGHTS))

    target = copy_tree(src, dest, skip)
    _check_loads(target)
    roles = {
        p.relative_to(dest).as_posix(): "config"
        for p in target.rglob("*")
        if p.is_file() and p.suffix not in (".safetensors", *PICKLE_WEIGHTS)
    }
    options = {"task": task, "pooling": pooling, "file": MODEL_DIR, "pickled_weights": not safe}
    return Packed(signature=_signature(task, config), roles=roles, options=options)


def _check_loads(directory: Path) -> None:
    """Config and tokenizer load from the staged copy alone (weights are checked by header)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FrameworkError(f"{directory.name}: cannot load the config or tokenizer: {one_line(exc)}") from None


class TransformersModel(Model):
    def load(self) -> None:
        assert self.pod is not None
        import torch
        import transformers
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        opts: Mapping[str, Any] = self.pod.manifest.options
        path = self.pod.file(str(opts.get("file") or MODEL_DIR))
        pickled = bool(opts.get("pickled_weights"))
        if pickled:
            for file in _weights(path)[1]:
                check_load_allowed(file, self.pod.manifest.allow_pickle, PICKLED)
        threads = int_option(opts, "threads")
        if threads:
            torch.set_num_threads(threads)
        self.task = str(opts.get("task") or "feature-extraction")
        self.pooling = str(opts.get("pooling") or "mean")
        self.device = torch.device(str(opts.get("device") or "cpu"))
        logging: Any = transformers.utils.logging
        logging.disable_progress_bar()  # a server's log is no terminal
        cls = AutoModelForSequenceClassification if self.task == "text-classification" else AutoModel
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            self.net = cls.from_pretrained(
                path, local_files_only=True, trust_remote_code=False, use_safetensors=not pickled
            ).to(self.device).eval()
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise unreadable(path, EXPECTED, exc) from None
        limits = [int(x) for x in (self.tokenizer.model_max_length,
                                   getattr(self.net.config, "max_position_embeddings", None)) if x]
        self.max_length = int_option(opts, "max_length") or min(limits)
        self.id2label = {int(k): str(v) for k, v in (self.net.config.id2label or {}).items()}
        super().load()

    def predict(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Batch:
        import torch

        texts = as_text(inputs["text"])
        if not texts:
            return self._empty()
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.net(**enc)
        if self.task == "text-classification":
            logits = out.logits.float().cpu().numpy()
            labels = [self.id2label.get(int(i), str(int(i))) for i in logits.argmax(axis=-1)]
            return {"logits": logits, "label": bytes_array(labels)}
        hidden = out.last_hidden_state.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return {"embedding": pooled.cpu().numpy()}

    def _empty(self) -> Batch:
        if self.task == "text-classification":
            return {"logits": np.zeros((0, len(self.id2label)), np.float32), "label": bytes_array([])}
        return {"embedding": np.zeros((0, int(self.net.config.hidden_size)), np.float32)}

    def unload(self) -> None:
        for attr in ("net", "tokenizer"):
            self.__dict__.pop(attr, None)
        super().unload()


def load(pod: Pod) -> Model:
    return TransformersModel(pod)
