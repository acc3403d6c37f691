"""Prefix caching: when adapters sit only on blocks ≥ k, run blocks < k once per sequence.

The hidden states entering block k do not change while only blocks ≥ k are trained, so
:class:`CachedTrunk` computes them once (no grad, the forward stopped at block k), keeps them
per sequence (real tokens only, keyed by the token ids), and on every later call runs the
decoder with blocks < k replaced by pass-throughs and the cached states as ``inputs_embeds``.
Positions come from the attention mask (left padding), so the result equals the full pass up
to float rounding (exactly, in float32 storage). ``dtype=torch.float16`` halves the memory.

Filling the cache shares work between the option sequences of one question (``options``
format: ``context + continuation`` per option). Their common leading tokens run through blocks
< k once, with a key/value cache; then every option's remaining tokens run against that cache.
Causal attention makes this equal to running each sequence on its own (up to float rounding),
and what is stored per sequence does not change. Letters (one sequence per question) and
questions whose options share no leading token take one padded pass, as before.

Warming a split (:meth:`CachedTrunk.warm_task`) visits its questions bucketed by length
(:meth:`CachedTrunk.fill_order`), so a batch's passes pad little: over ARC-Easy train + validation
(options, 16 questions a batch) 60% of the positions run were padding in the loader's order, 19% in
this one, half the positions in all (308k -> 150k; ``benchmarks/frozen_pass.py``). The stored states
are the same up to float rounding (padding changes only the summation order).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn
from transformers import DynamicCache

from ..adapters.inject import find_blocks
from ..errors import NumericalError
from .features import model_device, position_ids_from_mask
from .formats import Batch, EncodedTask, make_loader


class _StopForward(Exception):
    def __init__(self, hidden_states):
        super().__init__("prefix computed")
        self.hidden_states = hidden_states


class _PassThrough(nn.Module):
    """Stands in for a frozen lower block: returns the hidden states it is given."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _sequence_key(ids: torch.Tensor) -> str:
    return hashlib.sha1(ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()


def common_prefix_length(sequences: list[torch.Tensor]) -> int:
    """Leading tokens shared by all ``sequences``, leaving each at least one token of its own."""
    shortest = min(len(s) for s in sequences)
    stacked = torch.stack([s[:shortest] for s in sequences])  # (n, shortest)
    same = (stacked == stacked[0]).all(0).long()
    return min(int(same.cumprod(0).sum()), shortest - 1)


FILL_CHUNK_BATCHES = 8  # fill_order: batches per chunk of similar own length, re-sorted by context length


def _pad(sequences: list[torch.Tensor], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of 1-D token tensors, padded with 0 on the left or right."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span], mask[i, span] = s, 1
    return ids, mask


class CachedTrunk:
    """A trunk (``batch -> final hidden states``) that caches the inputs of block ``start_layer``.

    Parameters
    ----------
    model: the causal LM (with adapters only on blocks ≥ ``start_layer``).
    start_layer: k ≥ 1, the first block that is run on every call.
    dtype: storage dtype of the cached states (float32: exact; float16: half the memory).
    share_prefix: run the common context of a question's options once (module docstring);
        False runs every sequence in full (the reference, for tests and benchmarks).
    """

    def __init__(self, model, start_layer: int, dtype: torch.dtype = torch.float32, share_prefix: bool = True):
        _, self.blocks = find_blocks(model)
        if not 1 <= start_layer < len(self.blocks):
            raise ValueError(f"Expected 1 <= start_layer < {len(self.blocks)} but got {start_layer}")
        self.model, self.start_layer, self.dtype = model, start_layer, dtype
        self.share_prefix = share_prefix
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
        embed = self.model.get_input_embeddings().weight
        prefix = embed.new_zeros(*batch.input_ids.shape, embed.shape[1])  # (S, L, d) in the model's dtype
        for i, key in enumerate(keys):
            states = self.store[key]
            prefix[i, prefix.shape[1] - states.shape[0]:] = states.to(prefix.dtype)
        return self._run_top(prefix, batch.attention_mask)

    @torch.no_grad()
    def warm(self, loader, progress: bool = False, visited: set | None = None) -> int:
        """Compute the states of every sequence of ``loader`` now, in its (fixed) order; returns how many
        were added. ``visited`` collects the keys of the loader's sequences (see :meth:`save`).

        Filling the cache in one canonical order makes the stored states independent of the
        training order (padding changes float rounding), so a resumed run sees the same ones.
        """
        from tqdm.auto import tqdm

        before = len(self)
        for batch in tqdm(loader, desc="caching frozen blocks", disable=not progress, leave=False):
            keys = [_sequence_key(ids[mask.bool()]) for ids, mask in zip(batch.input_ids, batch.attention_mask)]
            if visited is not None:
                visited.update(keys)
            missing = [i for i, key in enumerate(keys) if key not in self.store]
            if missing:
                self._fill(batch, missing, keys)
        return len(self) - before

    def fill_order(self, encoded: EncodedTask, batch_size: int) -> list[int]:
        """Question indices of ``encoded`` bucketed by length, so that each pass of a batch pads little.

        With a shared context a batch makes two passes, the contexts (one row per question, padded to
        the longest) and the rest of every option (one row per option, padded to the longest rest).
        Questions are sorted by their longest rest, cut into chunks of ``FILL_CHUNK_BATCHES`` batches,
        and each chunk is sorted by context length; ties keep the task's order. A question that runs in
        one pass (letters, no shared context, ``share_prefix=False``) has context 0 and its full length
        as its rest. The order depends on the tokens alone, so it is the same in every run and process.
        """
        def parts(item) -> tuple[int, int]:
            sequences, shared = item.sequences, 0
            if self.share_prefix and len(sequences) > 1:  # common_prefix_length, on lists
                shared = min(len(os.path.commonprefix(sequences)), min(map(len, sequences)) - 1)
            return shared, max(map(len, sequences)) - shared

        sizes = [parts(item) for item in encoded.items]
        by_rest = sorted(range(len(sizes)), key=lambda i: (sizes[i][1], sizes[i][0]))
        chunk = FILL_CHUNK_BATCHES * batch_size
        return [i for start in range(0, len(by_rest), chunk)
                for i in sorted(by_rest[start:start + chunk], key=lambda i: sizes[i])]

    def warm_task(self, encoded: EncodedTask, tokenizer, batch_size: int, progress: bool = False,
                  visited: set | None = None) -> int:
        """:meth:`warm` over ``encoded`` in batches of ``batch_size`` questions, in :meth:`fill_order`."""
        order = self.fill_order(encoded, batch_size)
        return self.warm(make_loader(encoded, tokenizer, batch_size=batch_size, sampler=order), progress, visited)

    @torch.no_grad()
    def _fill(self, batch: Batch, rows: list[int], keys: list[str]) -> None:
        """Run blocks < k on the given rows and store each sequence's states for its real tokens."""
        shared, alone = self._share(batch, rows) if self.share_prefix else ([], rows)
        if shared:
            real = [[batch.input_ids[i][batch.attention_mask[i].bool()] for i in group] for group in shared]
            for i, states in zip([i for group in shared for i in group], self.shared_prefix_states(real)):
                self.store[keys[i]] = states.to(self.dtype)
        if alone:
            ids, mask = batch.input_ids[alone], batch.attention_mask[alone]
            hidden = self.prefix_states(ids, mask)
            for j, i in enumerate(alone):
                self.store[keys[i]] = hidden[j][mask[j].bool().to(hidden.device)].to(self.dtype).clone()
        bad = sum(not torch.isfinite(self.store[keys[i]]).all() for i in rows)
        if bad:
            raise NumericalError(f"the frozen blocks below block {self.start_layer} give NaN or Inf states for {bad} "
                                 f"sequence(s) (cache dtype {self.dtype}): the backbone or its inputs, not the "
                                 "training; try --cache-dtype float32")

    @staticmethod
    def _share(batch: Batch, rows: list[int]) -> tuple[list[list[int]], list[int]]:
        """Split rows into groups (the options of one question sharing leading tokens) and the rest."""
        question = (batch.slots // batch.choice_mask.shape[1]).tolist()
        groups: dict[int, list[int]] = {}
        for i in rows:
            groups.setdefault(question[i], []).append(i)
        shared, alone = [], []
        for group in groups.values():
            real = [batch.input_ids[i][batch.attention_mask[i].bool()] for i in group]
            if len(group) > 1 and common_prefix_length(real) > 0:
                shared.append(group)
            else:
                alone.extend(group)
        return shared, alone

    @torch.no_grad()
    def prefix_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block k, (S, L, d), by a forward stopped at that block."""
        return self._lower(input_ids, attention_mask, position_ids_from_mask(attention_mask))

    @torch.no_grad()
    def shared_prefix_states(self, groups: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """States entering block k, (L_s, d) per sequence, for groups of sequences (1-D token ids).

        Each group's common prefix runs once (left-padded with the other groups' prefixes),
        filling a key/value cache of blocks < k; the cache rows are repeated per sequence and
        every sequence's rest runs against them (right-padded: causal attention keeps the
        padding out of real tokens). Returned flat, in the order of the groups' sequences.
        """
        starts = [common_prefix_length(g) for g in groups]
        prefix_ids, prefix_mask = _pad([g[0][:p] for g, p in zip(groups, starts)], left=True)
        cache = DynamicCache(config=self.model.config)
        prefix = self._lower(prefix_ids, prefix_mask, position_ids_from_mask(prefix_mask), cache)  # (G, P, d)
        owner = torch.tensor([q for q, g in enumerate(groups) for _ in g])  # (S,) group of each sequence
        offset = torch.tensor(starts)[owner]  # (S,)
        rests = [s[p:] for g, p in zip(groups, starts) for s in g]
        rest_ids, rest_mask = _pad(rests, left=False)
        cache.batch_select_indices(owner.to(prefix.device))
        positions = offset.unsqueeze(1) + torch.arange(rest_ids.shape[1])
        rest = self._lower(rest_ids, torch.cat([prefix_mask[owner], rest_mask], 1), positions, cache)  # (S, R, d)
        width = prefix.shape[1]
        return [torch.cat([prefix[q, width - p:], rest[j, : len(r)]])
                for j, (q, p, r) in enumerate(zip(owner.tolist(), offset.tolist(), rests))]

    def _lower(self, input_ids, attention_mask, position_ids, cache=None) -> torch.Tensor:
        """Run the decoder on blocks < k only (a forward stopped at block k); ``cache`` is filled."""
        device = model_device(self.model)
        input_ids, attention_mask, position_ids = (t.to(device) for t in (input_ids, attention_mask, position_ids))

        def stop(module, args, kwargs):
            raise _StopForward(args[0] if args else kwargs["hidden_states"])

        handle = self.blocks[self.start_layer].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     cache=cache, use_cache=cache is not None)
        except _StopForward as stopped:
            return stopped.hidden_states
        finally:
            handle.remove()
        raise RuntimeError("the forward pass never reached the cached block")

    def _run_top(self, prefix: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        attention_mask = attention_mask.to(prefix.device)
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

    def save(self, path, keys=None) -> Path:
        """Write the cache (only the sequences ``keys``, when given: one split's) to one safetensors file,
        with the layer and dtype as metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent writers (table --jobs) never share one
        meta = {"start_layer": str(self.start_layer), "dtype": str(self.dtype)}
        kept = self.store if keys is None else {k: self.store[k] for k in keys}
        data = save({k: v.contiguous() for k, v in kept.items()}, metadata=meta)
        try:
            with open(tmp, "wb") as f:  # Python I/O: a full disk is an OSError, not a SafetensorError
                f.write(data)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def load(self, path) -> int:
        """Add the states of a file written by :meth:`save`; returns how many were added."""
        loaded = load_file(path)
        bad = sum(not torch.isfinite(v).all() for v in loaded.values())
        if bad:
            raise NumericalError(f"{path}: {bad} of {len(loaded)} cached sequences hold NaN or Inf states")
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
