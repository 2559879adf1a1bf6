"""Import of Microsoft's released LLM2CLIP checkpoints (the OpenAI-CLIP ones) into this package's formats.

The released Hugging Face repos microsoft/LLM2CLIP-Openai-B-16, -L-14-224 and -L-14-336 hold
config.json (model_type 'clip', architectures ['LLM2CLIPModel'], auto_map to their own
modeling_clip.py / configuration_clip.py, run there with trust_remote_code) and model.safetensors
(B-16 first shipped pytorch_model.bin, a pickle). Key layout, released -> ours:

    vision_model.<k>                        HF CLIPVisionTransformer      -> vision.<k>
    visual_projection.weight      [E, W]    Linear, no bias               -> visual_projection.weight
    text_adapter.adaptor.<i>.ln.*     [D]   block i, pre-LayerNorm        -> text_adapter.blocks.<i>.norm.*
    text_adapter.adaptor.<i>.fn.0.*   [XD, D] block i Linear (fn.1 GELU, fn.2 Dropout) -> ...blocks.<i>.fc1.*
    text_adapter.adaptor.<i>.fn.3.*   [D, XD] block i Linear          -> text_adapter.blocks.<i>.fc2.*
    text_adapter.adaptor.<n>.*        [D]   final LayerNorm               -> text_adapter.norm.*
    text_adapter.adaptor.<n+1>.*  [E, D]    Linear with bias              -> text_adapter.proj.*
    logit_scale                   []                                      -> logit_scale

The released text path is get_text_features(LLM vector) = adaptor(L2-normalise(vector)), which is
exactly our TextAdapter with a zero `center`. Sources (no upstream code is copied here):
github.com/microsoft/LLM2CLIP @ cba3b45 llm2clip/eva_clip/model.py (LinearBlock, TextProj: L2
normalisation, 4 blocks of width 2D, LayerNorm, Linear with bias); the HF repos' config.json, file
lists and model cards (@ 92512331 for L-14-336); third-party code indexing text_adapter.adaptor[5] as
the final Linear. Details and what is not supported (EVA02 releases): docs/CHECKPOINTS.md.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .errors import ConfigError, one_line
from .guards import load_tensor_pickle

LAYOUT = "microsoft/LLM2CLIP-Openai-* (modeling_clip.LLM2CLIPModel)"
_BLOCK = re.compile(r"^text_adapter\.adaptor\.(\d+)\.")
_IGNORED = ("text_model.", "text_projection.")  # CLIP's text tower, which the released text path never uses
_IGNORED_KEYS = ("vision_model.embeddings.position_ids",)  # a buffer older transformers saved
# vision_config keys only EVA towers have (EVA-CLIP's model_configs: rope, SwiGLU, sub-LN, xattn)
_EVA_KEYS = {"eva_model_name", "rope", "naiveswiglu", "subln", "xattn", "intp_freq", "pt_hw_seq_len", "fusedln"}
_FIX = "Fix: point SRC at a complete, unmodified LLM2CLIP-Openai-* checkpoint folder"


def _fail(message: str) -> ConfigError:
    return ConfigError(one_line(message))  # keys and paths are echoed: keep the message on one line


# -- reading the source folder -------------------------------------------------------------------------
def read_released_config(src: Path) -> dict:
    """config.json of a released checkpoint; refuses our own folders and the EVA02 releases."""
    path = src / "config.json"
    if not path.is_file():
        raise _fail(f"{src}: no config.json. {_FIX} (it holds config.json and model.safetensors)")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise _fail(f"{path}: not valid JSON ({e}). {_FIX}") from None
    if not isinstance(config, dict):
        raise _fail(f"{path}: must be a JSON object. {_FIX}")
    if config.get("model_type") == "llm2clip":
        raise _fail(f"{src} is already an llm2clip model folder; load it with LLM2CLIP.from_pretrained")
    vision = config.get("vision_config")
    named = " ".join(str(v) for v in [*(config.get("auto_map") or {}).values(), *(config.get("architectures") or [])])
    eva_keys = isinstance(vision, dict) and any(k.lower() in _EVA_KEYS for k in vision)
    if "eva" in named.lower() or eva_keys:
        raise _fail(f"{src}: an EVA02 release (EVA vision tower, modeling_evaclip.py) is not supported: its vision "
                    "encoder is not an HF CLIPVisionTransformer, so it cannot become a CLIPVisionModel. Fix: convert "
                    "an OpenAI-CLIP release (microsoft/LLM2CLIP-Openai-B-16, -L-14-224, -L-14-336)")
    if config.get("model_type") != "clip" or not isinstance(vision, dict) or \
            vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise _fail(f"{path}: expected the {LAYOUT} config (model_type 'clip' with a clip_vision_model "
                    f"vision_config), found model_type {config.get('model_type')!r}. {_FIX}")
    return config


def _weight_files(src: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    """(files, is_pickle): safetensors when present (single or sharded); pickles only when allowed."""
    for name, pickled in (("model.safetensors", False), ("pytorch_model.bin", True)):
        index = src / f"{name}.index.json"
        if index.is_file():
            try:
                files = sorted({src / f for f in json.loads(index.read_text())["weight_map"].values()})
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise _fail(f"{index}: not a weight index with a 'weight_map' ({e!r}). {_FIX}") from None
        elif (src / name).is_file():
            files = [src / name]
        else:
            continue
        if pickled and not allow_pickle:
            raise _fail(f"{src}: only {name} found, a pickle (unpickling can run code). Fix: re-save it as "
                        "model.safetensors, or pass --allow-pickle (allow_pickle=True) to read it with "
                        "torch.load(weights_only=True), which rebuilds tensors only")
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise _fail(f"{src}: weight shard {missing[0]} named in {index.name} is missing. {_FIX}")
        return files, pickled
    raise _fail(f"{src}: no model.safetensors (or pytorch_model.bin) found. {_FIX}")


def read_released_weights(src: Path, allow_pickle: bool = False) -> dict:
    """name -> tensor from the source folder. Pickles are read with weights_only=True, never plainly."""
    from safetensors.torch import load_file

    files, pickled = _weight_files(src, allow_pickle)
    state: dict = {}
    for path in files:
        state.update(load_tensor_pickle(path) if pickled else load_file(str(path)))
    return state


# -- the key mapping -----------------------------------------------------------------------------------
def _adapter_depth(keys) -> int:
    found = sorted({int(m.group(1)) for k in keys if (m := _BLOCK.match(k))})
    if not found:
        raise _fail(f"released key 'text_adapter.adaptor.0.ln.weight' is missing: no text adapter in the "
                    f"checkpoint. {_FIX}")
    return found[-1] - 1  # ..., final LayerNorm at depth, Linear at depth + 1


def _expected(config: dict, state: dict) -> tuple[dict, dict]:
    """(released key -> (our key, shape)), and the dims (llm_dim, embed_dim, depth, expansion)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    depth = _adapter_depth(state)
    if depth < 0:
        raise _fail(f"released key 'text_adapter.adaptor.1.weight' is missing (the adapter's final Linear). {_FIX}")
    final_norm = f"text_adapter.adaptor.{depth}.weight"
    if final_norm not in state or state[final_norm].dim() != 1:
        raise _fail(f"released key '{final_norm}' (the adapter's final LayerNorm, shape [D]) is missing or not "
                    f"1-D. {_FIX}")
    llm_dim = state[final_norm].shape[0]
    try:
        vision = CLIPVisionModel(CLIPVisionConfig.from_dict(config["vision_config"]))
    except (ValueError, TypeError) as e:
        raise _fail(f"config.json vision_config does not build a CLIP vision model ({str(e).splitlines()[0]}). "
                    f"{_FIX}") from None
    vision_cfg = vision.config
    embed_dim = int(config.get("projection_dim") or vision_cfg.projection_dim)
    expansion = 2
    if depth:
        fc1 = state.get("text_adapter.adaptor.0.fn.0.weight")
        if fc1 is None or fc1.dim() != 2 or fc1.shape[0] % llm_dim:
            raise _fail(f"released key 'text_adapter.adaptor.0.fn.0.weight' is missing or not [k*{llm_dim}, "
                        f"{llm_dim}]. {_FIX}")
        expansion = fc1.shape[0] // llm_dim
    ours = vision.state_dict()
    inside = "vision_model." if any(k.startswith("vision_model.") for k in ours) else ""  # transformers 4 kept it
    expected = {f"vision_model.{k[len(inside):]}": (f"vision.{k}", tuple(v.shape)) for k, v in ours.items()}
    expected["visual_projection.weight"] = ("visual_projection.weight", (embed_dim, vision_cfg.hidden_size))
    x = expansion * llm_dim
    for i in range(depth):
        a, b = f"text_adapter.adaptor.{i}", f"text_adapter.blocks.{i}"
        for released, mine, shape in (("ln", "norm", (llm_dim,)), ("fn.0", "fc1", (x,)), ("fn.3", "fc2", (llm_dim,))):
            expected[f"{a}.{released}.bias"] = (f"{b}.{mine}.bias", shape)
        expected[f"{a}.ln.weight"] = (f"{b}.norm.weight", (llm_dim,))
        expected[f"{a}.fn.0.weight"] = (f"{b}.fc1.weight", (x, llm_dim))
        expected[f"{a}.fn.3.weight"] = (f"{b}.fc2.weight", (llm_dim, x))
    for part in ("weight", "bias"):
        expected[f"text_adapter.adaptor.{depth}.{part}"] = (f"text_adapter.norm.{part}", (llm_dim,))
    expected[f"text_adapter.adaptor.{depth + 1}.weight"] = ("text_adapter.proj.weight", (embed_dim, llm_dim))
    expected[f"text_adapter.adaptor.{depth + 1}.bias"] = ("text_adapter.proj.bias", (embed_dim,))
    expected["logit_scale"] = ("logit_scale", ())
    dims = {"llm_dim": llm_dim, "embed_dim": embed_dim, "depth": depth, "expansion": expansion, "vision": vision}
    return expected, dims


# our key -> what is written when the released key is absent (neither changes the features' function)
OPTIONAL = {"logit_scale": "absent: CLIP's ln(1/0.07) is written (it does not change the features)",
            "text_adapter.proj.bias": "absent: a zero bias is written (the same function as a Linear without bias)"}


def map_released_state(config: dict, state: dict) -> tuple[dict, dict, dict]:
    """Released state dict -> (our state dict, dims, notes). Raises ConfigError naming the first bad key."""
    import torch

    expected, dims = _expected(config, state)
    notes: dict = {"ignored_keys": sorted(k for k in state if k.startswith(_IGNORED) or k in _IGNORED_KEYS)}
    for key in sorted(state):
        if key not in expected and key not in notes["ignored_keys"]:
            raise _fail(f"unknown key '{key}' in the checkpoint: the {LAYOUT} layout has vision_model.*, "
                        f"visual_projection.weight, text_adapter.adaptor.* and logit_scale. {_FIX} "
                        "(EVA02 and other layouts are not supported)")
    mapped = {}
    for released, (mine, shape) in expected.items():
        if released not in state:
            if mine in OPTIONAL:
                notes[released] = OPTIONAL[mine]
                continue
            raise _fail(f"released key '{released}' is missing from the checkpoint (expected shape {list(shape)}, "
                        f"from config.json and the adapter's widths). {_FIX}")
        tensor = state[released]
        if tuple(tensor.shape) != shape:
            raise _fail(f"released key '{released}' has shape {list(tensor.shape)}, expected {list(shape)} from "
                        "config.json (vision_config, projection_dim) and the adapter's widths. Fix: use the "
                        "config.json shipped with these weights")
        if not tensor.is_floating_point():
            raise _fail(f"released key '{released}' holds {tensor.dtype}, not floating point weights. {_FIX}")
        mapped[mine] = tensor.float()
    mapped.setdefault("text_adapter.proj.bias", torch.zeros(dims["embed_dim"]))
    mapped.setdefault("logit_scale", torch.tensor(math.log(1 / 0.07)))
    mapped["text_adapter.center"] = torch.zeros(dims["llm_dim"])  # the released adapter does not centre
    return mapped, dims, notes


# -- the conversion ------------------------------------------------------------------------------------
def load_released_llm2clip(src: str | Path, allow_pickle: bool = False):
    """(LLM2CLIP model, notes) from a released checkpoint folder, weights checked key by key."""
    from .model import LLM2CLIP, ModelConfig

    src = Path(src)
    if not src.is_dir():
        raise _fail(f"{src} is not a folder. {_FIX}")
    config = read_released_config(src)
    state = read_released_weights(src, allow_pickle)
    mapped, dims, notes = map_released_state(config, state)
    cfg = ModelConfig(embed_dim=dims["embed_dim"], adapter_depth=dims["depth"], adapter_expansion=dims["expansion"],
                      center_vectors=False, loss="clip", init_logit_scale=float(mapped["logit_scale"]))
    model = LLM2CLIP(dims["vision"], dims["llm_dim"], cfg, embedder_ref=None)
    model.load_state_dict(mapped, strict=True)  # every parameter comes from the checkpoint
    return model.eval(), notes


def convert_released_llm2clip(src: str | Path, out: str | Path, vision_out: str | Path | None = None,
                              allow_pickle: bool = False) -> Path:
    """A released LLM2CLIP-Openai-* folder -> an llm2clip model folder at `out` (LLM2CLIP.from_pretrained)
    and, with `vision_out`, a plain HF CLIP vision folder (CLIPVisionModel.from_pretrained). The text side
    reads LLM vectors of the released LLM (the model names no stage-1 embedder)."""
    from .data.images import make_image_processor
    from .export import export_vision_tower
    from .files import atomic_dir

    src = Path(src)
    model, notes = load_released_llm2clip(src, allow_pickle)
    # the source's preprocessor_config.json when it ships one (the L-14-336 repo does not), else OpenAI's
    processor = make_image_processor(model.vision.config.image_size, pretrained=src)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, processor)
        record = {"source": str(src.resolve()), "layout": LAYOUT, "llm_dim": model.llm_dim,
                  "text_input": "pooled LLM vectors of the released LLM; L2-normalised inside the adapter", **notes}
        (tmp / "conversion.json").write_text(json.dumps(record, indent=1) + "\n")
    if vision_out is not None:
        export_vision_tower(model, vision_out, processor)
    return Path(out)


# -- command line --------------------------------------------------------------------------------------
def _cmd_released(args) -> int:
    out = convert_released_llm2clip(args.src, args.out, args.vision_out, allow_pickle=args.allow_pickle)
    print(f"llm2clip model: {out}")
    if args.vision_out:
        print(f"vision tower:   {args.vision_out}")
    return 0


def add_parser(groups) -> None:
    convert = groups.add_parser("convert", help="import released checkpoints").add_subparsers(dest="cmd",
                                                                                              required=True)
    released = convert.add_parser("released", help="microsoft/LLM2CLIP-Openai-* folder -> llm2clip folders",
                                  description="See docs/CHECKPOINTS.md for the key mapping and what is supported.")
    released.add_argument("src", help="local folder of a released checkpoint (config.json + model.safetensors)")
    released.add_argument("--out", required=True, help="llm2clip model folder to write")
    released.add_argument("--vision-out", help="also write a plain HF CLIP vision folder here")
    released.add_argument("--allow-pickle", action="store_true",
                          help="accept pytorch_model.bin (read with torch.load(weights_only=True))")
    released.set_defaults(func=_cmd_released)
