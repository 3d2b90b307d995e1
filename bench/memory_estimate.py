"""Memory of Stable Diffusion 1.5 LoRA training at 512 px, estimated on a CPU with nothing downloaded.

    python bench/memory_estimate.py                     # ~6 min on 2 cores, <7 GB RAM -> bench/memory_estimate.json
    python bench/memory_estimate.py --math-attention    # also the unfused attention path (~9 min)
    python bench/memory_estimate.py --reanalyze bench/memory_estimate.json   # redo the arithmetic only

Method
------
1. Parameters, exactly. The SD 1.5 UNet, VAE and CLIP ViT-L/14 text encoder are built from their public
   configs (written out below; the values of runwayml/stable-diffusion-v1-5's config.json files) with
   random weights, and the LoRA is attached the way the trainer attaches it (rank 4 on to_q, to_k, to_v,
   to_out.0).
2. Activation memory of one training step, measured. The real SD-1.5-shaped UNet runs forward and
   backward on the CPU (fp32 unless stated; the trainer's loss path: gradients flow to the LoRA only) at
   latent 16x16 and 32x32 (128 and 256 px) with one UNet row, and at 16x16 with two rows. Every tensor
   autograd saves for the backward is recorded with ``torch.autograd.graph.saved_tensors_hooks``, counted
   once per storage, parameters and inputs excluded: the memory a step holds between forward and backward.
3. Extrapolation to 64x64 (512 px) and to B rows with the measured scaling. The runs save the same tensors
   in the same order, so each tensor's own growth is measured: with the number of latent pixels P (x1 for
   text-side tensors such as cross-attention keys/values and for weight copies, x4 per doubling of the side
   for P-proportional tensors, x16 for self-attention maps, P^2, with unfused attention) and with the rows
   (x1 for weight copies, x2 for everything per sample). Each tensor is extrapolated by its own law,
   s(B, L) = s(1, 16) (L/16)^(2a) B^b; a growth that is not one of these stops the script (none is).
4. Gradient checkpointing (``model.gradient_checkpointing``): diffusers checkpoints every resnet and every
   transformer block. Held after the forward: tensors saved outside checkpointed blocks + the inputs the
   checkpoints keep (recorded by wrapping the checkpoint function). The backward adds the recomputation
   of one block: the largest single block's saved tensors (from the run without checkpointing).
5. Cross-check: the increase of the process's resident memory (sampled every millisecond) over the step,
   which includes the backward's transient buffers; reported with its ratio to the saved tensors.
6. Attention: torch's fused SDPA (CPU flash kernel here; flash / memory-efficient kernels on GPUs in
   fp16/bf16) saves O(P); ``--math-attention`` also measures the unfused path, which saves the
   (heads, P, P) maps (older GPUs, fp32 on some setups, or attention processors without SDPA).
7. bf16 autocast (what ``model.mixed_precision = "bf16"`` does to the UNet forward; the frozen weights stay
   fp32 in this trainer) is measured the same way on the CPU's autocast.
8. Also measured: the inference peaks of sampling (one UNet row, no gradients) and of a VAE decode (one
   image), by resident memory, extrapolated linearly in P (their attention is fused).

Limits
------
- CPU autocast casts per its own op lists, close to but not identical with CUDA's; fp16 ~ bf16 in bytes.
- A GPU adds what a CPU run cannot show: the CUDA context and kernels (~0.3-1 GB), cuDNN/cuBLAS
  workspaces, the caching allocator's fragmentation (typically 5-20 % over live tensors) and NCCL buffers
  under DDP (~ the gradient bucket size, 25 MB default, tiny for a LoRA).
- Saved tensors are the memory between forward and backward; the true peak adds the backward's
  transient buffers (the resident-memory column shows how much on this CPU).
- Everything is per UNet row: a trajectory with classifier-free guidance is 2 rows (both halves in one
  UNet call), so ``train.batch_size`` B costs 2B rows. Activations scale linearly in rows.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, act_fn="silu", norm_num_groups=32,
    layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
CLIP_VIT_L14_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    attention_dropout=0.0, dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
    pad_token_id=1, bos_token_id=0, eos_token_id=2,
)
GiB, MiB = 2**30, 2**20


# ------------------------------------------------------------------------------------------------------
# Measuring


class SavedTensors:
    """Storages autograd saves for backward, in order of first appearance (parameters/inputs excluded)."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.sizes, self.seen = exclude, [], set()
        self.owner: list[str | None] = []
        self.scope: list[str] = []  # checkpointable block currently running (for per-block totals)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        key = s.data_ptr()
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.sizes.append(s.nbytes())
            self.owner.append(self.scope[0] if self.scope else None)
        return t

    @contextmanager
    def recording(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self

    def total(self) -> int:
        return sum(self.sizes)


class ResidentPeak:
    """Peak resident memory of this process over a block, sampled every millisecond."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    @contextmanager
    def measure(self):
        _trim()
        base = self.rss()
        self.peak, stop = base, threading.Event()

        def sample():
            while not stop.is_set():
                self.peak = max(self.peak, self.rss())
                time.sleep(0.001)
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.peak = max(self.peak, self.rss())
            self.increase = self.peak - base


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so resident memory tracks live tensors
    except OSError:
        pass


def _checkpointable(unet) -> list[torch.nn.Module]:
    """The modules diffusers runs through its checkpoint function: resnets and transformer blocks."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    return [m for m in unet.modules() if isinstance(m, ResnetBlock2D | BasicTransformerBlock)]


def training_step(unet, size: int, rows: int, checkpointing: bool, attention: str, autocast: bool) -> dict:
    """One forward + backward of ``rows`` UNet rows at latent ``size`` x ``size``; what it saves and holds."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(rows, 4, size, size, generator=gen)
    text = torch.randn(rows, 77, 768, generator=gen)
    t = torch.tensor([500] * rows)
    exclude = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    exclude |= {b.untyped_storage().data_ptr() for b in unet.buffers()}
    exclude |= {x.untyped_storage().data_ptr() for x in (latents, text, t)}
    saved = SavedTensors(exclude)
    held_inputs: dict[int, int] = {}  # storages the checkpoints keep for their recomputation
    hooks = []
    if checkpointing:
        def checkpoint_recording(module, *args):
            for a in args:
                if torch.is_tensor(a):
                    key = a.untyped_storage().data_ptr()
                    if key not in exclude:
                        held_inputs.setdefault(key, a.untyped_storage().nbytes())
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
        unet.enable_gradient_checkpointing(checkpoint_recording)
    else:
        unet.disable_gradient_checkpointing()
        for i, m in enumerate(_checkpointable(unet)):  # attribute saved tensors to blocks
            name = f"{type(m).__name__}#{i}"
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: saved.scope.append(name) and None))
            hooks.append(m.register_forward_hook(lambda mod, args, out: saved.scope.pop() and None))
    backend = {"fused": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
               "math": [SDPBackend.MATH]}[attention]
    rss = ResidentPeak()
    start = time.time()
    try:
        with rss.measure(), sdpa_kernel(backend):
            with saved.recording(), (torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()):
                out = unet(latents, t, encoder_hidden_states=text).sample
            loss = out.float().square().mean()
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
        unet.disable_gradient_checkpointing()
    lora_grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert lora_grads and all(g is not None for g in lora_grads), "no gradient reached the LoRA"
    unet.zero_grad(set_to_none=True)
    result = {"size": size, "rows": rows, "checkpointing": checkpointing, "attention": attention,
              "bf16_autocast": autocast, "saved_sizes": saved.sizes, "owners": saved.owner, "saved": saved.total(),
              "held_inputs": [b for k, b in held_inputs.items() if k not in saved.seen],  # in call order
              "rss_increase": rss.increase, "seconds": time.time() - start}
    del out, loss
    _trim()
    return result


@torch.no_grad()
def inference_peak(fn, size: int) -> int:
    rss = ResidentPeak()
    with rss.measure():
        fn(size)
    return rss.increase


# ------------------------------------------------------------------------------------------------------
# Extrapolating


def growth(small: list[int], large: list[int], allowed: tuple[int, ...]) -> list[int]:
    """Per tensor: its growth between two runs, snapped to one of ``allowed`` (or an error)."""
    if len(small) != len(large):
        raise RuntimeError(f"the runs saved different numbers of tensors ({len(small)} vs {len(large)})")
    out = []
    for a, b in zip(small, large):
        f = b / a
        snapped = min(allowed, key=lambda c: abs(c - f))
        if abs(snapped - f) > 0.05 * snapped:
            raise RuntimeError(f"a saved tensor grew x{f:.3f}, not one of {allowed}: extrapolation unsafe")
        out.append(snapped)
    return out


def extrapolate(base: dict, larger: dict, wider: dict, size: int, rows: int) -> dict:
    """Saved tensors at latent ``size`` and ``rows`` rows, from runs (16, 1), (32, 1) and (16, 2).

    Returns the total, split by the pixel law (P^0, P^1, P^2), and the largest checkpointable block."""
    key = "saved_sizes"
    by_p = growth(base[key], larger[key], (1, 4, 16))
    by_b = growth(base[key], wider[key], (1, 2))
    doublings = math.log2(size / base["size"])
    split = {1: 0.0, 4: 0.0, 16: 0.0}
    blocks: dict[str, float] = {}
    for s, fp, fb, owner in zip(base[key], by_p, by_b, base["owners"]):
        v = s * fp**doublings * (rows if fb == 2 else 1)
        split[fp] += v
        if owner is not None:
            blocks[owner] = blocks.get(owner, 0.0) + v
    out = {"total": sum(split.values()), "p0": split[1], "p1": split[4], "p2": split[16],
           "largest_block": max(blocks.values(), default=0.0)}
    if base["held_inputs"] or larger["held_inputs"]:
        held = growth(base["held_inputs"], larger["held_inputs"], (1, 4, 16))
        wide = growth(base["held_inputs"], wider["held_inputs"], (1, 2))
        out["held_inputs"] = sum(s * fp**doublings * (rows if fb == 2 else 1)
                                 for s, fp, fb in zip(base["held_inputs"], held, wide))
    else:
        out["held_inputs"] = 0.0
    return out


def linear_fit(p1: float, y1: float, p2: float, y2: float, p: float) -> float:
    slope = (y2 - y1) / (p2 - p1)
    return y2 + slope * (p - p2)


# ------------------------------------------------------------------------------------------------------


def build(log):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffalign.pipeline import attach_lora

    torch.manual_seed(0)
    t0 = time.time()
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD15_VAE)
    text = CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L14_TEXT))
    log(f"built SD 1.5 UNet, VAE, CLIP ViT-L/14 text encoder with random weights in {time.time() - t0:.0f} s")
    for m in (unet, vae, text):
        m.requires_grad_(False).eval()
    counts = {"unet": sum(p.numel() for p in unet.parameters()), "vae": sum(p.numel() for p in vae.parameters()),
              "text_encoder": sum(p.numel() for p in text.parameters())}
    lora = attach_lora(unet, rank=4, alpha=4.0)
    counts["lora_rank4"] = sum(p.numel() for p in lora)
    return unet, vae, text, counts


RUNS = ((16, 1), (32, 1), (16, 2))  # (latent side, UNet rows) measured per configuration


def measure(args, log) -> dict:
    unet, vae, _, counts = build(log)
    for k, v in counts.items():
        log(f"  {k:<14}{v:>14,d} parameters")
    variants = [("fused", False)] + ([("math", False)] if args.math_attention else []) + \
        ([] if args.no_bf16 else [("fused", True)])
    raw = []
    for attention, bf16 in variants:
        for checkpointing in (False, True):
            for size, rows in RUNS:
                m = training_step(unet, size, rows, checkpointing, attention, bf16)
                raw.append(m)
                log(f"  step {size}x{size} x{rows} {attention:<5} {'bf16' if bf16 else 'fp32'} "
                    f"{'checkpointing' if checkpointing else 'plain':<13} saved {m['saved'] / MiB:8.1f} MiB  "
                    f"checkpoint inputs {sum(m['held_inputs']) / MiB:5.1f} MiB  resident +{m['rss_increase'] / MiB:7.1f} MiB"
                    f"  ({m['seconds']:.0f} s)")

    def sampling(size):  # one CFG trajectory: 2 rows, no gradients
        unet(torch.randn(2, 4, size, size), torch.tensor([500]), encoder_hidden_states=torch.randn(2, 77, 768))

    def decode(size):  # one image
        vae.decode(torch.randn(1, 4, size, size))

    inference = {name: {str(size): inference_peak(fn, size) for size in (16, 32)}
                 for name, fn in (("sampling_step_cfg_trajectory", sampling), ("vae_decode_image", decode))}
    return {"parameters": counts, "raw": raw, "inference_rss_increase": inference}


def analyze(data: dict, log) -> dict:
    counts = data["parameters"]
    runs: dict[tuple, dict] = {}
    for m in data["raw"]:
        runs[(m["attention"], m["bf16_autocast"], m["checkpointing"], m["size"], m["rows"])] = m
    configs = sorted({k[:3] for k in runs})
    per_step = {}
    for attention, bf16, checkpointing in configs:
        plain = [runs[(attention, bf16, False, *r)] for r in RUNS]
        this = [runs[(attention, bf16, checkpointing, *r)] for r in RUNS]
        name = f"{attention}/{'bf16' if bf16 else 'fp32'}/{'checkpointing' if checkpointing else 'plain'}"
        per_step[name] = {}
        for rows in (1, 2, 4, 8):
            e = extrapolate(*this, size=64, rows=rows)
            e["held"] = e["total"] + e["held_inputs"]
            # The backward recomputes one checkpointed block at a time: its saved tensors come on top.
            e["recompute"] = extrapolate(*plain, size=64, rows=rows)["largest_block"] if checkpointing else 0.0
            e["peak_estimate"] = e["held"] + e["recompute"]
            per_step[name][rows] = e
        # Cross-check: resident increase at 16 and 32 (1 row), extrapolated linearly in P.
        r16, r32 = this[0]["rss_increase"], this[1]["rss_increase"]
        per_step[name]["resident_1row_linear_fit"] = linear_fit(16**2, r16, 32**2, r32, 64**2)
        per_step[name]["measured_1row"] = {str(m["size"]): {"saved": m["saved"], "resident": m["rss_increase"]}
                                           for m in this[:2]}
    inference = {k: linear_fit(16**2, v["16"], 32**2, v["32"], 64**2) for k, v in data["inference_rss_increase"].items()}
    static = {"unet_fp32": counts["unet"] * 4, "vae_half": counts["vae"] * 2, "text_encoder_half": counts["text_encoder"] * 2,
              "vae_fp32": counts["vae"] * 4, "text_encoder_fp32": counts["text_encoder"] * 4,
              "lora_params_grads_adam_fp32": counts["lora_rank4"] * 16}
    log("\nParameters: " + ", ".join(f"{k} {v:,d}" for k, v in counts.items()))
    log("Static memory: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in static.items()))
    log("\nOne training step at 512 px (64x64 latents), memory held for the backward, GiB; rows = UNet rows "
        "(a trajectory with CFG is 2 rows):")
    log(f"  {'configuration':<28}" + "".join(f"{f'{r} row' + ('s' if r > 1 else ''):>10}" for r in (1, 2, 4, 8))
        + "    split at 2 rows (P^0 / P^1 / P^2)   recompute@2   CPU resident fit@1")
    for name, by_rows in per_step.items():
        e2 = by_rows[2]
        log(f"  {name:<28}" + "".join(f"{by_rows[r]['peak_estimate'] / GiB:10.2f}" for r in (1, 2, 4, 8))
            + f"    {e2['p0'] / GiB:5.2f} / {e2['p1'] / GiB:5.2f} / {e2['p2'] / GiB:5.2f}"
            + f"        {e2['recompute'] / GiB:5.2f}        {by_rows['resident_1row_linear_fit'] / GiB:5.2f}")
    for k, v in inference.items():
        log(f"  inference {k:<30} {v / GiB:5.2f} GiB (CPU resident increase, linear fit in P)")
    return {"parameters": counts, "static_bytes": static, "per_step_at_512px": per_step,
            "inference_at_512px": inference}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--math-attention", action="store_true", help="also measure unfused (math) attention")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast measurement")
    ap.add_argument("--reanalyze", help="a previous output JSON: redo the extrapolation from its raw measurements")
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    log = print
    if args.reanalyze:
        data = json.loads(Path(args.reanalyze).read_text())
    else:
        data = measure(args, log)
    result = {**analyze(data, log), "raw": data["raw"], "inference_rss_increase": data["inference_rss_increase"],
              "torch": torch.__version__}
    Path(args.out).write_text(json.dumps(result, indent=None, separators=(",", ":")))
    log(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
