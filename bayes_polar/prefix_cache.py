"""Prefix caching: when adapters sit only on blocks ≥ k, run blocks < k once per sequence.

The hidden states entering block k do not change while only blocks ≥ k are trained, so
:class:`CachedTrunk` computes them once (no grad, the forward stopped at block k), keeps them
per sequence (real tokens only, keyed by the token ids), and on every later call runs the
decoder with blocks < k replaced by pass-throughs and the cached states as ``inputs_embeds``.
Positions come from the attention mask (left padding), so the result equals the full pass up
to float rounding (exactly, in float32 storage). ``dtype=torch.float16`` halves the memory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters.inject import find_blocks
from .features import position_ids_from_mask
from .formats import Batch


class _StopForward(Exception):
    def __init__(self, hidden_states):
        super().__init__("prefix computed")
        self.hidden_states = hidden_states


class _PassThrough(nn.Module):
    """Stands in for a frozen lower block: returns the hidden states it is given."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _sequence_key(ids: torch.Tensor) -> str:
    return hashlib.sha1(ids.to(torch.int64).numpy().tobytes()).hexdigest()


class CachedTrunk:
    """A trunk (``batch -> final hidden states``) that caches the inputs of block ``start_layer``.

    Parameters
    ----------
    model: the causal LM (with adapters only on blocks ≥ ``start_layer``).
    start_layer: k ≥ 1, the first block that is run on every call.
    dtype: storage dtype of the cached states (float32: exact; float16: half the memory).
    """

    def __init__(self, model, start_layer: int, dtype: torch.dtype = torch.float32):
        _, self.blocks = find_blocks(model)
        if not 1 <= start_layer < len(self.blocks):
            raise ValueError(f"Expected 1 <= start_layer < {len(self.blocks)} but got {start_layer}")
        self.model, self.start_layer, self.dtype = model, start_layer, dtype
        self.store: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.store)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())

    def __call__(self, batch: Batch) -> torch.Tensor:
        keys = [_sequence_key(ids[mask.bool()]) for ids, mask in zip(batch.input_ids, batch.attention_mask)]
        missing = [i for i, key in enumerate(keys) if key not in self.store]
        if missing:
            self._fill(batch, missing, keys)
        prefix = torch.zeros(*batch.input_ids.shape, self.model.config.hidden_size)
        for i, key in enumerate(keys):
            states = self.store[key]
            prefix[i, prefix.shape[1] - states.shape[0]:] = states.float()
        return self._run_top(prefix, batch.attention_mask)

    @torch.no_grad()
    def warm(self, loader, progress: bool = False) -> int:
        """Compute the states of every sequence of ``loader`` now, in its (fixed) order.

        Filling the cache in one canonical order makes the stored states independent of the
        training order (padding changes float rounding), so a resumed run sees the same ones.
        """
        from tqdm.auto import tqdm

        before = len(self)
        for batch in tqdm(loader, desc="caching frozen blocks", disable=not progress, leave=False):
            keys = [_sequence_key(ids[mask.bool()]) for ids, mask in zip(batch.input_ids, batch.attention_mask)]
            missing = [i for i, key in enumerate(keys) if key not in self.store]
            if missing:
                self._fill(batch, missing, keys)
        return len(self) - before

    @torch.no_grad()
    def _fill(self, batch: Batch, rows: list[int], keys: list[str]) -> None:
        """Run blocks < k on the given rows and store each sequence's states for its real tokens."""
        ids, mask = batch.input_ids[rows], batch.attention_mask[rows]
        hidden = self.prefix_states(ids, mask)
        for j, i in enumerate(rows):
            self.store[keys[i]] = hidden[j][mask[j].bool()].to(self.dtype).clone()

    @torch.no_grad()
    def prefix_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block k, (S, L, d), by a forward stopped at that block."""
        def stop(module, args, kwargs):
            raise _StopForward(args[0] if args else kwargs["hidden_states"])

        handle = self.blocks[self.start_layer].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        except _StopForward as stopped:
            return stopped.hidden_states
        finally:
            handle.remove()
        raise RuntimeError("the forward pass never reached the cached block")

    def _run_top(self, prefix: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with self._lower_blocks_skipped():
            out = self.model.get_decoder()(inputs_embeds=prefix, attention_mask=attention_mask,
                                           position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return out.last_hidden_state

    @contextlib.contextmanager
    def _lower_blocks_skipped(self):
        saved = [self.blocks[i] for i in range(self.start_layer)]
        try:
            for i in range(self.start_layer):
                self.blocks[i] = _PassThrough()
            yield
        finally:
            for i, block in enumerate(saved):
                self.blocks[i] = block

    def save(self, path) -> Path:
        """Write the cache to one safetensors file (with the layer and dtype as metadata)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        meta = {"start_layer": str(self.start_layer), "dtype": str(self.dtype)}
        save_file({k: v.contiguous() for k, v in self.store.items()}, tmp, metadata=meta)
        tmp.replace(path)
        return path

    def load(self, path) -> int:
        """Add the states of a file written by :meth:`save`; returns how many were added."""
        loaded = load_file(path)
        self.store.update({k: v.to(self.dtype) for k, v in loaded.items()})
        return len(loaded)


def model_fingerprint(model, start_layer: int, dtype: torch.dtype) -> str:
    """A key for on-disk caches: the config, the cached block and a checksum of the frozen weights below it."""
    _, blocks = find_blocks(model)
    digest = hashlib.sha1(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(f"{start_layer}:{dtype}".encode())
    embed = model.get_input_embeddings().weight
    digest.update(embed.detach().double().sum().item().hex().encode())
    for block in list(blocks)[:start_layer]:
        for p in block.parameters():
            digest.update(p.detach().double().sum().item().hex().encode())
    return digest.hexdigest()[:16]
