"""CLIP and T5 tokenisation with the `tokenizers` library (no transformers needed when the
exported folder holds tokenizer.json). Pads to max length and truncates with a warning,
as diffusers' FluxPipeline does."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from fluxc.errors import FluxcError


class TruncationWarning(UserWarning):
    pass


def _token_content(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


class PromptTokenizer:
    def __init__(self, folder: Path, max_length: int, label: str):
        self.folder = Path(folder)
        self.max_length = int(max_length)
        self.label = label
        if not self.folder.is_dir():
            raise FluxcError(f"tokenizer folder {self.folder} is missing; re-run fluxc export")
        cfg: dict = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            p = self.folder / name
            if p.is_file():
                try:
                    for k, v in json.loads(p.read_text()).items():
                        cfg.setdefault(k, v)
                except ValueError:
                    pass
        self._hf = None
        tj = self.folder / "tokenizer.json"
        if tj.is_file():
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(str(tj))
            self.tok.no_padding()
            self.tok.no_truncation()
            pad = _token_content(cfg.get("pad_token"))
            pad_id = self.tok.token_to_id(pad) if pad else None
            if pad_id is None:
                pad = _token_content(cfg.get("eos_token")) or "<|endoftext|>"
                pad_id = self.tok.token_to_id(pad)
            if pad_id is None:
                raise FluxcError(f"{tj}: cannot find the padding token; re-run fluxc export")
            self.pad, self.pad_id = pad, int(pad_id)
        else:  # e.g. a CLIP folder with only vocab.json + merges.txt: fall back to transformers
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise FluxcError(f"{self.folder} has no tokenizer.json and transformers is not installed; "
                                 "save the tokenizer with save_pretrained (fast) and re-export") from None
            self._hf = AutoTokenizer.from_pretrained(str(self.folder))

    def __call__(self, prompt: str) -> np.ndarray:
        """[1, max_length] int32 ids, padded, truncated (with a warning) if too long."""
        L = self.max_length
        if self._hf is not None:
            full = self._hf(prompt, padding="longest", return_tensors=None)["input_ids"]
            ids = self._hf(prompt, padding="max_length", max_length=L, truncation=True)["input_ids"]
            if len(full) > L:
                removed = self._hf.decode(full[L - 1:-1])
                self._warn(removed)
            return np.asarray(ids, dtype=np.int32)[None, :]
        full = self.tok.encode(prompt)
        self.tok.enable_truncation(max_length=L)
        self.tok.enable_padding(length=L, pad_id=self.pad_id, pad_token=self.pad)
        try:
            enc = self.tok.encode(prompt)
        finally:
            self.tok.no_padding()
            self.tok.no_truncation()
        if len(full.ids) > L:
            kept = sum(enc.attention_mask)
            removed_ids = [i for i, st in zip(full.ids, full.special_tokens_mask) if not st]
            n_kept = sum(1 for i, st in zip(enc.ids, enc.special_tokens_mask) if not st and kept)
            self._warn(self.tok.decode(removed_ids[n_kept:]))
        return np.asarray(enc.ids, dtype=np.int32)[None, :]

    def _warn(self, removed: str) -> None:
        warnings.warn(f"The following part of your input was truncated because {self.label} can only "
                      f"handle sequences up to {self.max_length} tokens: {removed!r}",
                      TruncationWarning, stacklevel=3)
