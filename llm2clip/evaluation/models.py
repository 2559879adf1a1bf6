"""Any model folder as a benchmark model: `load_eval_model(folder) -> EvalModel`.

    kind             detected from FOLDER/config.json                       text side
    llm2clip         model_type 'llm2clip' (ours, incl. converted releases)  stage-1 LLM vectors -> adapter
    knowledge_clip   model_type 'clip' + knowledge_config.json              CLIP text tower, 77 tokens
    clip             model_type 'clip' (a stock HF CLIPModel folder)        CLIP text tower, 77 tokens
    siglip           model_type 'siglip' (SiglipModel)                      padded to max_length (64)
    siglip2          model_type 'siglip2' (Siglip2Model, NaFlex)            lowercased, padded to max_length

Anything else (a vision tower alone, an unconverted microsoft/LLM2CLIP-* folder, another model type)
is refused with a one-line ConfigError that names the fix.

SigLIP's text tower was trained on ids padded to its full length with no attention mask (it pools
the last position), so only input_ids are passed, as big_vision and open_clip do; SigLIP 2 was
trained on lowercased text (transformers' Siglip2Tokenizer lowercases too; hub folders that name
GemmaTokenizer do not).

LLM2CLIP text: the stage-1 embedder recorded in the folder at save time (its fingerprint checked), or
`embedder` (`--embedder PATH`), e.g. for converted released checkpoints, which record none. Running
the LLM is the expensive part, so with `text_cache` its caption vectors (before the adapter) are kept
on disk:

    <text_cache>/<fingerprint id>/fingerprint.json        llm2clip.cache.fingerprint(embedder, 'float32')
    <text_cache>/<fingerprint id>/vectors-<id>.safetensors  'vectors' [N, D] float32; metadata 'keys':
                                                          JSON list of sha1(text, utf-8) per row

The fingerprint id is a sha256 of the fingerprint, and a folder whose fingerprint.json is not exactly
the expected one is never read. Files are written to a temporary name, fsynced and renamed (no
pickle anywhere), so a killed run leaves whole files only; a damaged file is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, one_line

log = logging.getLogger(__name__)
KINDS = ("llm2clip", "knowledge_clip", "clip", "siglip", "siglip2")
VECTOR_DTYPE = "float32"  # the text cache keeps the LLM's float32 output as it is: cached == live
_FIX_FOLDER = ("Fix: point --model at an LLM2CLIP, Knowledge-CLIP, CLIP or SigLIP model folder (config.json "
               "model_type llm2clip, clip, siglip or siglip2)")


# -- folder kinds ---------------------------------------------------------------------------------------
def detect_kind(folder: str | Path) -> str:
    """One of KINDS, from config.json (and knowledge_config.json); ConfigError for anything else."""
    from ..knowledge.model import HEAD_CONFIG
    from ..vision import FAMILIES

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(one_line(f"{folder} is not a model folder (no config.json). {_FIX_FOLDER}"))
    try:
        config = json.loads((folder / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(one_line(f"{folder}/config.json is not valid JSON ({e}). {_FIX_FOLDER}")) from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type == "llm2clip":
        return "llm2clip"
    if model_type == "clip":
        if "LLM2CLIPModel" in (config.get("architectures") or []):
            raise ConfigError(one_line(f"{folder} is a released microsoft/LLM2CLIP-* checkpoint. Fix: convert it "
                                       "first (llm2clip convert released SRC OUT), then evaluate OUT with "
                                       "--embedder PATH"))
        return "knowledge_clip" if (folder / HEAD_CONFIG).is_file() else "clip"
    if model_type in ("siglip", "siglip2"):
        return model_type
    if model_type in FAMILIES:  # a vision-only folder
        raise ConfigError(one_line(f"{folder} is a vision tower alone (model_type {model_type!r}) with no text "
                                   "encoder. Fix: evaluate the LLM2CLIP or CLIP folder it was exported from"))
    raise ConfigError(one_line(f"{folder} has model_type {model_type!r}, which cannot be evaluated. {_FIX_FOLDER}"))


# -- the model --------------------------------------------------------------------------------------------
class EvalModel:
    """A loaded folder: `processor` (one [3, H, W] tensor per image), `encode_images(pixels [B, 3, H, W])`
    and `encode_texts(texts)` -> [B, E] unit float32 features on `device`."""

    def __init__(self, name: str, kind: str, pretrained: Path, module: nn.Module, processor, device: torch.device,
                 batch_size: int, embed_dim: int, image_fn: Callable, text_fn: Callable, embedder: dict | None = None):
        self.name, self.kind, self.pretrained, self.module = name, kind, pretrained, module
        self.processor, self.device, self.batch_size, self.embed_dim = processor, device, batch_size, embed_dim
        self._image_fn, self._text_fn, self.embedder = image_fn, text_fn, embedder

    def describe(self) -> dict:
        """For the results JSON: model (folder name), kind, pretrained (the folder) and the embedder used."""
        return {"model": self.name, "kind": self.kind, "pretrained": str(self.pretrained), "embedder": self.embedder}

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, E] unit vectors."""
        with torch.inference_mode():
            out = F.normalize(self._image_fn(pixels.to(self.device)).float(), dim=-1)
        return out.clone()  # a normal tensor: callers may update it in place outside inference mode

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """texts -> [B, E] unit vectors, in input order; batches of `batch_size`, longest texts first."""
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.embed_dim, device=self.device)
        with torch.inference_mode():
            out = F.normalize(self._text_fn(texts).float(), dim=-1)
        return out.clone()


def _by_length(texts: list[str], batch_size: int, fn: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
    """fn over length-sorted batches (less padding), results put back in input order -> [N, E]."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    parts = [fn([texts[i] for i in order[s:s + batch_size]]) for s in range(0, len(order), batch_size)]
    out = torch.cat(parts)  # [N, E] in sorted order
    return out[torch.tensor(order, device=out.device).argsort()]


def load_eval_model(folder: str | Path, embedder: str | Path | None = None, device: str | torch.device = "cpu",
                    text_cache: str | Path | None = None, batch_size: int = 64,
                    instruction: str | None = None) -> EvalModel:
    """Load any folder of KINDS for evaluation. `embedder`/`text_cache`/`instruction` concern LLM2CLIP
    folders only (other kinds ignore them, with a warning for the first two); `instruction` (default: the
    one the model was trained with, else the embedder's) is the caption instruction of the LLM."""
    from ..data.images import make_image_processor
    from ..vision import image_size

    folder, device = Path(folder), torch.device(device)
    kind = detect_kind(folder)
    if kind != "llm2clip" and (embedder is not None or instruction is not None):
        # not an error: one `llm2clip eval` run may score LLM2CLIP folders beside their CLIP baselines
        log.warning("%s is a %s folder with its own text encoder: the embedder/instruction given is not used",
                    folder, kind)
    if kind == "llm2clip":
        module, image_fn, text_fn, emb_info = _llm2clip(folder, embedder, device, text_cache, batch_size,
                                                        instruction)
        vision_config, family, dim = module.vision.config, _family(module.vision.config), module.cfg.embed_dim
    elif kind in ("clip", "knowledge_clip"):
        module, image_fn, text_fn, emb_info = _clip(folder, kind, device, batch_size)
        vision_config, family, dim = module.clip.config.vision_config, "clip", module.clip.config.projection_dim
    else:
        module, image_fn, text_fn, emb_info = _siglip(folder, kind, device, batch_size)
        vision_config, family = module.config.vision_config, kind
        text_config = module.config.text_config
        dim = getattr(text_config, "projection_size", None) or text_config.hidden_size
    processor = make_image_processor(image_size(vision_config), pretrained=folder, family=family)
    return EvalModel(folder.resolve().name, kind, folder.resolve(), module, processor, device, batch_size, dim,
                     image_fn, text_fn, emb_info)


def _family(vision_config) -> str:
    from ..vision import vision_family

    return vision_family(vision_config.to_dict())


def _clip(folder: Path, kind: str, device: torch.device, batch_size: int):
    from ..baseline import BaselineCLIP
    from ..knowledge.model import KnowledgeCLIP

    model = (KnowledgeCLIP if kind == "knowledge_clip" else BaselineCLIP).from_pretrained(folder)
    model = model.to(device).eval()  # the tokenizer truncates to the text tower's 77 positions
    return model, model.encode_image, lambda texts: _by_length(texts, batch_size, model.encode_text), None


def _siglip(folder: Path, kind: str, device: torch.device, batch_size: int):
    import transformers

    from ..vision import vision_inputs

    model = getattr(transformers, "Siglip2Model" if kind == "siglip2" else "SiglipModel").from_pretrained(str(folder))
    model = model.to(device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    length = model.config.text_config.max_position_embeddings  # 64 for the released SigLIP / SigLIP 2

    def text_fn(texts: list[str]) -> torch.Tensor:
        texts = [t.lower() for t in texts] if kind == "siglip2" else texts
        ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt")["input_ids"]  # [B, 64]; no mask, as trained
        out = model.get_text_features(input_ids=ids.to(device))
        return getattr(out, "pooler_output", out)  # transformers 5 returns an output object

    def image_fn(pixels: torch.Tensor) -> torch.Tensor:
        out = model.get_image_features(**vision_inputs(model.config.vision_config, pixels))  # NaFlex: patchified
        return getattr(out, "pooler_output", out)

    return model, image_fn, lambda texts: _by_length(texts, batch_size, text_fn), None


# -- LLM2CLIP ------------------------------------------------------------------------------------------------
def _llm2clip(folder: Path, embedder: str | Path | None, device: torch.device, text_cache, batch_size: int,
              instruction: str | None):
    from ..cache import fingerprint
    from ..embedder import EmbedderConfig, read_embedder_config
    from ..model import LLM2CLIP

    model = LLM2CLIP.from_pretrained(folder, device).eval()
    ref = model.embedder_ref
    if embedder is not None:
        emb_cfg = read_embedder_config(embedder)
        if ref and "instruction" in ref["config"]:  # the adapter was trained on vectors made with this one
            emb_cfg = replace(emb_cfg, instruction=ref["config"]["instruction"])
    elif ref:
        emb_cfg = EmbedderConfig(**ref["config"])
    else:
        raise ConfigError(f"{folder} records no stage-1 embedder (e.g. a converted released checkpoint). Fix: pass "
                          "--embedder PATH, the embedder folder whose LLM vectors its adapter reads")
    if instruction is not None:
        emb_cfg = replace(emb_cfg, instruction=instruction)
    emb_cfg = replace(emb_cfg, device=str(device))  # device is not part of the fingerprint
    fp = fingerprint(emb_cfg, VECTOR_DTYPE)  # hashes the LLM's files: once
    _check_recorded(folder, emb_cfg, fp, ref, replaced=embedder is not None, overridden=instruction is not None)
    text_side = LLMText(emb_cfg, fp, text_cache, batch_size)

    def text_fn(texts: list[str]) -> torch.Tensor:
        vectors = text_side.vectors(texts)  # [N, D] float32 on CPU
        return torch.cat([model.encode_text(vectors[s:s + batch_size].to(device), normalize=False)
                          for s in range(0, len(texts), batch_size)])  # [N, E]

    info = {"model": emb_cfg.model, "adapters": list(emb_cfg.adapters), "instruction": emb_cfg.instruction,
            "fingerprint": fp}
    model.llm_text = text_side  # reachable for tests and callers: e.g. how many texts the LLM embedded
    return model, model.encode_image, text_fn, info


def _check_recorded(folder: Path, emb_cfg, fp: dict, ref: dict | None, replaced: bool, overridden: bool) -> None:
    """The recorded embedder must exist (unless `replaced` by --embedder) and be unchanged; a replaced or
    `overridden` (instruction) one that differs is only logged."""
    from ..embedder import _HUB_ID

    if not ref:
        return
    expected = ref["fingerprint"]
    missing = [p for p in (emb_cfg.model, *emb_cfg.adapters)
               if not Path(p).expanduser().exists() and (p.startswith(("/", ".", "~")) or not _HUB_ID.match(p))]
    if missing and not replaced:
        raise ConfigError(one_line(f"the stage-1 embedder recorded in {folder} is gone ({missing[0]} does not "
                                   "exist). Fix: restore it, or pass --embedder PATH"))
    found = {**fp, "storage_dtype": expected.get("storage_dtype")}  # the record names the training cache's dtype
    diffs = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    if diffs and (replaced or overridden):
        log.warning("the embedder used for %s differs from the one it was trained against in %s", folder,
                    ", ".join(diffs))
    elif diffs:
        raise ConfigError(one_line(f"the stage-1 embedder recorded in {folder} ({emb_cfg.model}) changed since "
                                   f"training ({', '.join(diffs)} differ). Fix: restore it, or pass --embedder PATH "
                                   "to evaluate with another embedder on purpose"))


class LLMText:
    """Caption -> LLM vector [D], from the text cache or the stage-1 LLM (loaded on the first miss)."""

    def __init__(self, emb_cfg, fp: dict, text_cache: str | Path | None, batch_size: int):
        self.emb_cfg, self.batch_size, self._embedder = emb_cfg, batch_size, None
        self.cache = TextCache(text_cache, fp) if text_cache is not None else None
        self.embedded = 0  # texts the LLM embedded (cache misses)

    def vectors(self, texts: list[str]) -> torch.Tensor:
        """-> [N, D] float32 on CPU, in input order; each distinct text is embedded at most once."""
        unique = list(dict.fromkeys(texts))
        found = self.cache.get(unique) if self.cache is not None else {}
        missing = [t for t in unique if t not in found]
        if missing:
            if self._embedder is None:
                from ..embedder import CaptionEmbedder

                self._embedder = CaptionEmbedder.load(self.emb_cfg)
            with torch.autocast(self._embedder.device.type, enabled=False):  # the embedder's own precision only
                fresh = self._embedder.encode(missing, batch_size=self.batch_size)  # [M, D], length-sorted inside
            self.embedded += len(missing)
            if self.cache is not None:
                self.cache.put(missing, fresh)
            found.update(zip(missing, fresh, strict=True))
        return torch.stack([found[t] for t in texts])


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


class TextCache:
    """LLM vectors by sha1(text) under root/<fingerprint id>/ (layout: module docstring)."""

    def __init__(self, root: str | Path, fp: dict):
        blob = json.dumps(fp, sort_keys=True)
        self.fp, self.folder = fp, Path(root) / hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.usable, self.index = True, {}  # index: key -> (shard file, row)
        stamp = self.folder / "fingerprint.json"
        if stamp.is_file():
            try:
                self.usable = json.loads(stamp.read_text()) == fp
            except (ValueError, UnicodeDecodeError):
                self.usable = False
            if not self.usable:
                log.warning("text cache %s was made with another embedder setup: not read or written", self.folder)
                return
        for shard in sorted(self.folder.glob("vectors-*.safetensors")):
            self._add(shard)

    def _add(self, shard: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(shard), framework="pt") as f:
                keys = json.loads(f.metadata()["keys"])
                rows = f.get_slice("vectors").get_shape()[0]
            if len(keys) != rows:
                raise ValueError(f"{len(keys)} keys for {rows} rows")
        except Exception as e:  # a damaged file costs a recomputation, never the evaluation
            log.warning("text cache file %s is unreadable (%s): skipped", shard, one_line(str(e))[:200])
            return
        self.index.update((k, (shard, row)) for row, k in enumerate(keys))

    def get(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The cached vectors [D] of those `texts` the cache holds."""
        from safetensors import safe_open

        wanted: dict[Path, list[tuple[str, int]]] = {}
        for t in texts:
            if self.usable and (hit := self.index.get(text_key(t))) is not None:
                wanted.setdefault(hit[0], []).append((t, hit[1]))
        out = {}
        for shard, items in wanted.items():
            try:
                with safe_open(str(shard), framework="pt") as f:
                    vectors = f.get_slice("vectors")  # memory-mapped: only the asked rows are read
                    out.update((t, vectors[row:row + 1][0].float()) for t, row in items)
            except Exception as e:
                log.warning("text cache file %s is unreadable (%s): recomputing its vectors", shard,
                            one_line(str(e))[:200])
        return out

    def put(self, texts: list[str], vectors: torch.Tensor) -> None:
        """Add vectors [N, D] of `texts` as one new file; non-finite rows are left out."""
        from safetensors.torch import save

        from ..files import atomic_write_bytes

        keep = torch.isfinite(vectors).all(-1)  # [N]
        keys = [text_key(t) for t, ok in zip(texts, keep.tolist(), strict=True) if ok]
        if not self.usable or not keys:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp = self.folder / "fingerprint.json"
        if not stamp.is_file():  # written before any vectors
            atomic_write_bytes(stamp, (json.dumps(self.fp, indent=1, sort_keys=True) + "\n").encode())
        shard = self.folder / f"vectors-{hashlib.sha1(''.join(keys).encode()).hexdigest()[:20]}.safetensors"
        data = save({"vectors": vectors[keep].float().contiguous()}, metadata={"keys": json.dumps(keys)})
        atomic_write_bytes(shard, data)
        self.index.update((k, (shard, row)) for row, k in enumerate(keys))
