"""Load a diffusers pipeline of a supported family and attach a LoRA to its denoiser with peft.

``load_pipeline("toy")`` loads the tiny pipeline shipped inside the package; anything else (a hub id or a
local directory in diffusers layout, the same code path for both) is loaded with the pipeline class its
``model_index.json`` names, if a family in ``families/`` drives it. The VAE and the text encoders stay
frozen; only the LoRA trains.

The LoRA is saved with the family pipeline's ``save_lora_weights`` so that stock
``pipe.load_lora_weights(directory)`` applies it (tested).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

TOY_MODEL_DIR = Path(str(resources.files("diffalign.toy") / "model"))
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class ModelLoadError(RuntimeError):
    pass


def resolve_model(model_id: str) -> str:
    if model_id == "toy":
        if not (TOY_MODEL_DIR / "model_index.json").is_file():
            raise ModelLoadError(
                f"the embedded toy pipeline is missing at {TOY_MODEL_DIR}; train it with "
                f"`diffalign toy train --export {TOY_MODEL_DIR}` or set model.id to a diffusers directory"
            )
        return str(TOY_MODEL_DIR)
    return model_id


def load_pipeline(model_id: str = "toy", revision: str | None = None, dtype: torch.dtype = torch.float32):
    """A pipeline of a supported family (families/) from 'toy', a local directory or a hub id, safety checker
    off, set up for training by its family (stochastic scheduler, frozen parts). The pipeline class comes from
    ``model_index.json``; a class no family drives is refused here, naming it and the supported ones."""
    source = resolve_model(model_id)
    local = Path(source)
    looks_local = local.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local and not (local / "model_index.json").is_file():
        raise ModelLoadError(
            f"model.id {model_id!r}: {local} is not a diffusers pipeline directory (no model_index.json); "
            f"give a directory saved with save_pretrained, a hub id like 'org/name', or 'toy'"
        )
    index = _check_components(local, model_id) if looks_local else _hub_index(source, revision, model_id)
    family_cls = _family_of_index(index, model_id)
    try:
        # Components saved as [null, null] (an SD3 without T5, no image encoder) must be passed as None, or
        # from_pretrained refuses the directory as incomplete.
        absent = {k: None for k, v in index.items()
                  if not k.startswith("_") and isinstance(v, list) and v and v[0] is None}
        pipe = family_cls.pipeline_class().from_pretrained(source, revision=revision, torch_dtype=dtype,
                                                           **(absent | family_cls.load_kwargs))
    except OSError as e:
        if looks_local:  # the directory is there, so a file in it is unreadable, not a hub problem
            raise ModelLoadError(
                f"could not load model.id {model_id!r}: {str(e).strip()} Its files look damaged: re-save the "
                f"pipeline with save_pretrained (or copy it again), or point model.id at a good copy."
            ) from None
        raise ModelLoadError(
            f"could not load model.id {model_id!r}: {e}. A hub id needs network access or a filled cache "
            f"(HF_HUB_OFFLINE=1 uses the cache only); a local path must hold a diffusers pipeline."
        ) from None
    except Exception as e:  # damaged weights or configs raise anything (safetensors, JSON, shape errors)
        raise ModelLoadError(
            f"could not load model.id {model_id!r}: {type(e).__name__}: {str(e)[:300]}. Its files look damaged: "
            f"re-save the pipeline with save_pretrained (or copy it again), or point model.id at a good copy."
        ) from None
    family_cls(pipe).prepare(model_id)
    return pipe


def _family_of_index(index: dict, model_id: str):
    from .families import family_class, supported_classes

    name = index.get("_class_name")
    family_cls = family_class(name) if isinstance(name, str) else None
    if family_cls is None:
        raise ModelLoadError(
            f"model.id {model_id!r} is a {name} (model_index.json's _class_name), which diffalign does not "
            f"support yet; supported pipelines: {', '.join(supported_classes())}. See docs/families.md."
        )
    return family_cls


def _hub_index(source: str, revision: str | None, model_id: str) -> dict:
    """model_index.json of a hub id (one small file; the weights download only once the class is known)."""
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(source, revision=revision))
    except Exception as e:  # offline without a cache, unknown repo, gated repo
        raise ModelLoadError(
            f"could not load model.id {model_id!r}: {e}. A hub id needs network access or a filled cache "
            f"(HF_HUB_OFFLINE=1 uses the cache only); a local path must hold a diffusers pipeline."
        ) from None


def _check_components(directory: Path, model_id: str) -> dict:
    """Name a missing or unreadable part of a local pipeline before diffusers fails on it vaguely."""
    import json

    try:
        index = json.loads((directory / "model_index.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"model.id {model_id!r}: {directory / 'model_index.json'} is not valid JSON ({e}); "
                             f"re-save the pipeline with save_pretrained") from None
    if not isinstance(index, dict):
        raise ModelLoadError(f"model.id {model_id!r}: {directory / 'model_index.json'} is not a JSON object; "
                             f"re-save the pipeline with save_pretrained")
    optional = {"safety_checker", "feature_extractor", "image_encoder"}
    for name, value in index.items():
        if name.startswith("_") or name in optional or not isinstance(value, list) or value[0] is None:
            continue
        if not (directory / name).is_dir():
            raise ModelLoadError(f"model.id {model_id!r}: component {name!r} is listed in model_index.json but "
                                 f"{directory / name} is missing; copy the whole pipeline directory")
    return index


def attach_lora(unet, rank: int = 4, alpha: float = 4.0, target_modules: list[str] | None = None,
                adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """Add a LoRA adapter to the denoiser (a UNet or a transformer, diffusers' peft integration); returns its
    trainable parameters."""
    from peft import LoraConfig

    targets = target_modules or ["to_q", "to_k", "to_v", "to_out.0"]
    names = {n for n, _ in unet.named_modules()}
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"model.lora_target_modules: {missing} match no module of the {type(unet).__name__} "
                         f"(e.g. to_q, to_k, to_v, to_out.0)")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets),
                     adapter_name=adapter_name)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    from .families import Family

    return Family(None).lora_state_dict(unet)


def save_lora(unet, directory: str | Path, family=None) -> Path:
    """Write the LoRA in diffusers format with the family pipeline's ``save_lora_weights`` (Stable Diffusion's
    by default): the stock ``pipe.load_lora_weights(directory)`` applies it."""
    from .families import StableDiffusionFamily

    return (family or StableDiffusionFamily(None)).save_lora(unet, directory)


def set_lora_enabled(unet, enabled: bool) -> None:
    """Switch the adapter off to evaluate the frozen base model (D3PO's reference, drift)."""
    if enabled:
        unet.enable_adapters()
    else:
        unet.disable_adapters()
