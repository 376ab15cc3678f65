"""Per-row token history (prompt + output) shared by the samplers that read it.

`TokenHistory` holds, for each row of a batch, the prompt tokens followed by the output
tokens generated so far, on the logits' device. It is built once from Python lists and then
updated one step at a time with `append` (O(B) work per step, amortised over capacity
doubling; `append(token_ids, rows=mask)` advances only the masked rows, e.g. when some
rows produced no token this step). Samplers that need more than the raw tokens ask for
derived state, which is built from the full histories on first use and kept up to date
from then on:

- `output_counts()`  int32 [B, V]: how often each token occurs in the output (frequency and
  presence penalties). Maintained by `append` in O(B).
- `seen_mask()`      bool [B, V]: whether each token occurs in prompt or output (repetition
  penalty). Maintained by `append` in O(B).
- `seen_ids()`       int64 [N] (CPU only): the flat indices b * V + t of `seen_mask`'s True
  entries, listed, so that the repetition penalty touches the seen tokens without scanning
  the [B, V] mask. Maintained by `append` in O(B) (amortised over capacity doubling).
- `prefix_hashes()`  int64 [2, B, capacity + 1]: polynomial prefix hashes modulo two primes,
  for O(1) substring comparison. Maintained by `append` in O(B).
- `match_lengths()`  int32 [B, capacity]: for each position j of a row's history h,
  the length of the longest common suffix of h[:j] and h (no-repeat-ngram and DRY read
  only this). Built on first use by exact token comparison for matches shorter than 8
  tokens and a vectorised binary search on prefix hashes beyond; after that, brought up to
  date at query time by an exact O(B * len) recurrence per appended step (see
  `match_lengths`; each row catches up by the tokens it was given, so rows skipped by a
  masked append keep their state), so `append` itself stays O(B) and the per-step DRY /
  n-gram work is one pass over the history, whatever the text.

`select(rows)` and `merge(histories, source, rows)` make a history of rows taken from one
history or stitched from several, carrying every derived structure built (indexed, not
rebuilt; `merge` builds what one of its histories lacks over that history's rows only).

Hashing. P[b, j] = sum_{i < j} (h[i] + 1) * r^i mod M, for (M, r) in `HASH_MODULI`,
`HASH_BASES`. The substring h[a:b] is encoded by H(a, b) = P[b] - P[a] mod M, and for
equal lengths h[a:b] == h[c:d] (c >= a) implies H(a, b) * r^(c - a) == H(c, d) (mod M)
for both moduli. The converse can fail (a collision) only if r is a root of the nonzero
difference polynomial, of degree < len(h): for a base drawn at random that happens with
probability <= len(h) / M per modulus, so <= (len(h) / M)^2 ~ 1.5e-11 per comparison for a
history of 8192 tokens with both moduli (the bases here are fixed constants, so the bound
holds for inputs not chosen with knowledge of them). Collisions can only make a match look
longer. Hashes are consulted only when `match_lengths` is built from scratch, and only for
positions whose match is at least 8 tokens long, about log2(len) comparisons each: for a
batch of 64 rows of 8192 identical tokens (every position such a match) the union bound
for the whole build is ~ 64 * 8192 * 13 * 1.5e-11 ~ 1e-4; for ordinary text it is orders
of magnitude smaller. Every later update is exact.
"""

from __future__ import annotations

from itertools import chain
from typing import NamedTuple, Sequence, cast

import numpy as np
import torch

from ._device import default_device

__all__ = ["TokenHistory", "HASH_MODULI", "HASH_BASES"]

# Two primes below 2^31 (2^31 - 1 is a Mersenne prime; 2147483629 was checked prime by trial
# division up to its square root). A product of two residues is < 2^62 and fits in int64.
HASH_MODULI: tuple[int, int] = (2147483647, 2147483629)
# Fixed bases (arbitrary constants in [2^20, M)).
HASH_BASES: tuple[int, int] = (1_315_423_911, 916_132_831)

# Matches shorter than this many tokens are measured by direct token comparison when
# `match_lengths` is built from scratch; only longer ones use the hashes.
_EXACT_PREFIX = 8
# `match_lengths` catches up by the exact per-step recurrence when at most this many steps
# were appended since it was last brought up to date; otherwise it is rebuilt.
_MAX_CATCH_UP = 16
_MIN_CAPACITY = 16
# Tests only: when True, `match_lengths` takes the path it takes off the CPU (no host read)
# on CPU tensors too, so that path can be checked bit for bit against the CPU one.
_FORCE_SYNC_FREE = False

_POWERS_CACHE: dict[str, torch.Tensor] = {}
_MODULI_CACHE: dict[str, torch.Tensor] = {}


def _moduli(device: torch.device) -> torch.Tensor:
    """int64 [2]: HASH_MODULI on `device` (cached: no host-to-device copy per step)."""
    key = str(device)
    mod = _MODULI_CACHE.get(key)
    if mod is None:
        mod = _MODULI_CACHE[key] = torch.tensor(HASH_MODULI, dtype=torch.int64, device=device)
    return mod


def _powers(device: torch.device, n: int) -> torch.Tensor:
    """int64 [2, >= n]: r^i mod M for both (M, r); built by doubling, cached per device."""
    key = str(device)
    pw = _POWERS_CACHE.get(key)
    if pw is not None and pw.shape[1] >= n:
        return pw
    if pw is None:
        pw = torch.ones(2, 1, dtype=torch.int64, device=device)
    mod = _moduli(device)[:, None]
    base = torch.tensor(HASH_BASES, dtype=torch.int64, device=device)[:, None]
    while pw.shape[1] < n:
        # r^size = r^(size - 1) * r; then [r^size .. r^(2 size - 1)] = [1 .. r^(size-1)] * r^size.
        step = pw[:, -1:] * base % mod
        pw = torch.cat([pw, pw * step % mod], dim=1)
    _POWERS_CACHE[key] = pw
    return pw


def _capacity_for(n: int) -> int:
    cap = _MIN_CAPACITY
    while cap < n:
        cap *= 2
    return cap


def _flatten_rows(
    rows: Sequence[Sequence[int]], vocab_size: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-row id lists; validate every id is in [0, vocab_size)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    total = int(lengths.sum())
    flat = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=total)
    bad = np.flatnonzero((flat < 0) | (flat >= vocab_size))
    if bad.size:
        pos = int(bad[0])
        row = int(np.searchsorted(np.cumsum(lengths), pos, side="right"))
        raise ValueError(
            f"{name}[{row}] contains token id {int(flat[pos])}, outside [0, vocab_size={vocab_size})"
        )
    return flat, lengths


class _Part(NamedTuple):
    """Rows one history gives to `TokenHistory._gather`'s result: ``rows`` (on the history's
    device) and ``host`` (the same on the host) are the history's row indices, ``dest`` the
    result's rows they become (None: all of them, in order)."""

    history: "TokenHistory"
    rows: torch.Tensor
    host: np.ndarray
    dest: np.ndarray | None


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` holds integers (token ids, rows): not floating, complex or bool."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_history(history: object, logits: torch.Tensor, sampler: str) -> None:
    """``ValueError`` naming ``sampler`` unless ``history`` is a :class:`TokenHistory` of the
    ``[B, V]`` ``logits``' rows: ``B`` rows, on the logits' device, with a vocabulary of at
    most ``V`` (a larger one's ids would index past the row)."""
    if not isinstance(history, TokenHistory):
        raise ValueError(f"{sampler}: history must be a TokenHistory, got {type(history).__name__}")
    b, v = logits.shape
    if history.batch_size != b:
        raise ValueError(f"{sampler}: history has {history.batch_size} rows, the logits {b}")
    if history.tokens.device != logits.device:
        raise ValueError(f"{sampler}: history is on {history.tokens.device}, the logits on {logits.device}")
    if history.vocab_size > v:
        raise ValueError(f"{sampler}: history vocab_size {history.vocab_size} exceeds the logits' {v} columns")


class TokenHistory:
    """Token history (prompt + output) of each row of a batch, on a device.

    Args:
        prompt_token_ids: per row, the prompt token ids.
        output_token_ids: per row, the output token ids generated so far.
        vocab_size: V; every id must be in [0, V) (ValueError naming the row and the id).
        device: where the tensors live (that of the logits; None: torch's default device).

    Attributes:
        tokens: int64 [B, capacity], row b's history h_b = prompt + output left-aligned in
            tokens[b, :lengths[b]], padding -1 after it. capacity >= max length, doubled
            when an append needs more room.
        lengths: int64 [B], len(h_b).
        prompt_lengths: int64 [B], len(prompt_b).
        output_lengths: int64 [B] (property), lengths - prompt_lengths.
        vocab_size, device, batch_size, capacity, max_length (Python int, max(lengths)).

    Derived state (`output_counts`, `seen_mask`, `seen_ids`, `prefix_hashes`, `match_lengths`) is built
    on first use and kept up to date by `append`; see the module docstring.
    """

    def __init__(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str | None = None,
    ) -> None:
        if len(prompt_token_ids) != len(output_token_ids):
            raise ValueError(
                f"prompt_token_ids has {len(prompt_token_ids)} rows but output_token_ids has "
                f"{len(output_token_ids)}"
            )
        if int(vocab_size) < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.device = torch.device(device) if device is not None else default_device()

        p_flat, p_len = _flatten_rows(prompt_token_ids, self.vocab_size, "prompt_token_ids")
        o_flat, o_len = _flatten_rows(output_token_ids, self.vocab_size, "output_token_ids")
        lengths = p_len + o_len
        batch = len(lengths)
        max_len = int(lengths.max()) if batch else 0
        cap = _capacity_for(max_len + 1)

        tokens = np.full((batch, cap), -1, dtype=np.int64)
        # Row and column of every prompt / output id, without a loop over rows.
        p_rows = np.repeat(np.arange(batch), p_len)
        p_cols = np.arange(p_flat.size) - np.repeat(np.cumsum(p_len) - p_len, p_len)
        tokens[p_rows, p_cols] = p_flat
        o_rows = np.repeat(np.arange(batch), o_len)
        o_cols = np.arange(o_flat.size) - np.repeat(np.cumsum(o_len) - o_len, o_len) + p_len[o_rows]
        tokens[o_rows, o_cols] = o_flat

        self.tokens = torch.from_numpy(tokens).to(self.device)
        self.lengths = torch.from_numpy(lengths).to(self.device)
        self.prompt_lengths = torch.from_numpy(p_len).to(self.device)
        self._host_lengths = lengths.copy()  # lengths on the host: exact max_length, no sync
        self._max_len = max_len
        self._steps = 0  # number of append() calls so far
        self._counts: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None
        # CPU only: the flat indices of _seen's True entries in _seen_buf[:_seen_n] (None: not built).
        self._seen_buf: np.ndarray | None = None
        self._seen_n = 0
        self._seen_view: torch.Tensor | None = None  # seen_ids()'s tensor (None: made on next call)
        self._hashes: torch.Tensor | None = None
        self._match: torch.Tensor | None = None
        self._match_steps = 0  # value of _steps when _match was last up to date
        # int64 [B]: per row, the history length _match is up to date with (set with _match).
        self._match_len: torch.Tensor | None = None
        self._masked_since_match = False  # a masked append happened since _match_len was set
        # CPU only: (rows, cols) of the nonzero entries of _match, row-major (None: not known).
        self._match_nz: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_tensors(
        cls, tokens: torch.Tensor, lengths: torch.Tensor, prompt_lengths: torch.Tensor,
        vocab_size: int, max_length: int,
    ) -> "TokenHistory":
        """A history over token tensors already on the device (no host copy, no sync).

        tokens: int [B, W], row b's history in tokens[b, :lengths[b]] (ids in [0, V), not
        checked: checking would need a sync); what lies beyond lengths[b] is ignored.
        lengths, prompt_lengths: int [B] on the same device. max_length: a host-side upper
        bound of max(lengths) (W at most); the derived state is built on first use from
        positions below it. For an engine's device buffers, e.g. vLLM's per-slot token ids.
        """
        b, w = tokens.shape
        if not 0 <= max_length <= w:
            raise ValueError(f"max_length must be in [0, {w}] (the width of tokens), got {max_length}")
        device = tokens.device
        cap = _capacity_for(max_length + 1)
        ar = torch.arange(min(w, cap), device=device)
        lengths = lengths.to(torch.int64)
        body = torch.where(ar[None, :] < lengths[:, None], tokens[:, : ar.numel()].to(torch.int64), -1)
        padded = torch.full((b, cap), -1, dtype=torch.int64, device=device)
        padded[:, : ar.numel()] = body
        new = cls.__new__(cls)
        new.vocab_size = int(vocab_size)
        new.device = device
        new.tokens = padded
        new.lengths = lengths
        new.prompt_lengths = prompt_lengths.to(torch.int64)
        # An upper bound in place of the exact host lengths: every use of it only sizes work.
        new._host_lengths = np.full(b, max_length, dtype=np.int64)
        new._max_len = int(max_length)
        new._steps = 0
        new._counts = new._seen = new._hashes = new._match = new._match_len = None
        new._seen_buf, new._seen_n, new._seen_view = None, 0, None
        new._match_steps = 0
        new._masked_since_match = False
        new._match_nz = None
        return new

    # ------------------------------------------------------------------ basic properties
    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1]

    @property
    def max_length(self) -> int:
        """max(lengths) as a Python int (tracked on the host: no device sync)."""
        return self._max_len

    @property
    def output_lengths(self) -> torch.Tensor:
        """int64 [B]: number of output tokens of each row."""
        return self.lengths - self.prompt_lengths

    def __len__(self) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        return (
            f"TokenHistory(batch_size={self.batch_size}, max_length={self._max_len}, "
            f"capacity={self.capacity}, vocab_size={self.vocab_size}, device={self.device})"
        )

    def to_lists(self) -> list[list[int]]:
        """Each row's full history as a Python list (for debugging and tests)."""
        toks = self.tokens.cpu().tolist()
        return [row[:n] for row, n in zip(toks, self.lengths.cpu().tolist())]

    # ------------------------------------------------------------------ updates
    def _grow(self, needed: int) -> None:
        cap = self.capacity
        if needed <= cap:
            return
        new_cap = cap
        while new_cap < needed:
            new_cap *= 2
        extra = new_cap - cap
        b = self.batch_size
        self.tokens = torch.cat(
            [self.tokens, torch.full((b, extra), -1, dtype=torch.int64, device=self.device)], dim=1
        )
        if self._hashes is not None:
            pad = torch.zeros(2, b, extra, dtype=torch.int64, device=self.device)
            self._hashes = torch.cat([self._hashes, pad], dim=2)
        if self._match is not None:
            pad = torch.zeros(b, extra, dtype=torch.int32, device=self.device)
            self._match = torch.cat([self._match, pad], dim=1)

    def append(self, token_ids: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Append one token to every row, or to the rows of a mask: h_b += [token_ids[b]].

        token_ids: int64 [B] on any device (moved to this history's device). On a CPU device
        the ids of the rows appended to are checked to be in [0, vocab_size) (ValueError);
        elsewhere they are not checked, to avoid a device sync.
        rows: optional bool [B] mask (None = every row). Only the rows where it is True get
        their token; the others (whose entry of ``token_ids`` is ignored, any value) keep
        their history and every derived structure unchanged, as if they had not been in
        the call. Pass the mask on the CPU (it is copied to the device; on the host it keeps
        ``max_length`` exact without a device sync); a mask on an accelerator costs one sync.

        Work is O(B) (plus a copy when the capacity doubles): the tokens, lengths and every
        derived structure already built except `match_lengths` are updated here;
        `match_lengths` catches up when next asked for.
        """
        b = self.batch_size
        tok = torch.as_tensor(token_ids, device=self.device)
        if not is_integer_dtype(tok.dtype):
            raise ValueError(f"append: token_ids must be an integer tensor, got dtype {tok.dtype}")
        if tok.dim() > 1:
            raise ValueError(
                f"append: token_ids must be a 1-D tensor of {b} ids, got shape {tuple(tok.shape)}"
            )
        tok = tok.to(torch.int64).reshape(-1)
        if tok.shape[0] != b:
            raise ValueError(f"append expects {b} token ids (one per row), got {tok.shape[0]}")
        mask = mask_host = None
        if rows is not None:
            mask = torch.as_tensor(rows)
            if mask.dtype != torch.bool:
                raise ValueError(
                    f"append: rows must be a bool mask (one entry per row), got dtype {mask.dtype}"
                )
            if mask.shape != (b,):
                raise ValueError(
                    f"append: rows must have shape [{b}] (one entry per row), got {tuple(mask.shape)}"
                )
            mask_host = mask.cpu().numpy()  # free for a CPU mask
            if mask_host.all():
                mask = mask_host = None  # every row: the plain path
            else:
                mask = mask.to(self.device, non_blocking=True)
        if self.device.type == "cpu" and b:
            bad = (tok < 0) | (tok >= self.vocab_size)
            if mask is not None:
                bad &= mask
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"append: row {row} token id {int(tok[row])} outside [0, vocab_size={self.vocab_size})"
                )
        if mask_host is not None and not mask_host.any():
            return  # no row advances: nothing changes
        if self._seen_buf is not None:
            self._list_new_seen(tok, mask_host)  # reads _seen before it is updated below
        self._grow(self._max_len + 1)
        ar = torch.arange(b, device=self.device)
        pos = self.lengths  # each row's next position (< capacity after _grow)
        if mask is None:
            self.tokens[ar, pos] = tok
            if self._counts is not None:
                self._counts[ar, tok] += 1
            if self._seen is not None:
                self._seen[ar, tok] = True
            if self._hashes is not None:
                pw = _powers(self.device, self.capacity + 1)
                mod = _moduli(self.device)[:, None]
                prev = self._hashes[:, ar, pos]  # [2, B]
                nxt = (prev + (tok + 1)[None, :] * pw[:, pos] % mod) % mod
                self._hashes[:, ar, pos + 1] = nxt
            self.lengths = self.lengths + 1
            self._host_lengths = self._host_lengths + 1
            self._max_len += 1
        else:
            # Skipped rows: write back what is there (their position is padding, -1), add 0.
            tok = torch.where(mask, tok, self.tokens[ar, pos])
            safe = torch.where(mask, tok, 0)  # an index in [0, V) for every row
            self.tokens[ar, pos] = tok
            if self._counts is not None:
                self._counts[ar, safe] += mask.to(torch.int32)
            if self._seen is not None:
                self._seen[ar, safe] |= mask
            if self._hashes is not None:
                pw = _powers(self.device, self.capacity + 1)
                mod = _moduli(self.device)[:, None]
                prev = self._hashes[:, ar, pos]  # [2, B]
                nxt = (prev + (safe + 1)[None, :] * pw[:, pos] % mod) % mod
                old = self._hashes[:, ar, pos + 1]
                self._hashes[:, ar, pos + 1] = torch.where(mask[None, :], nxt, old)
            self.lengths = self.lengths + mask.to(torch.int64)
            self._host_lengths = self._host_lengths + mask_host
            self._max_len = int(self._host_lengths.max())
            self._masked_since_match = True
        self._steps += 1

    def _list_new_seen(self, tok: torch.Tensor, mask_host: np.ndarray | None) -> None:
        """Add to `seen_ids` the (row, token) pairs this append sees for the first time (CPU;
        ``tok`` holds every row's id, ``mask_host`` the rows that advance or None for all).
        One token per row, so the new flat indices are distinct."""
        b = self.batch_size
        tk = tok.numpy()
        rows = np.arange(b)
        # (called with the list built; it is built from the mask, so both are there)
        seen, buf = cast(torch.Tensor, self._seen), cast(np.ndarray, self._seen_buf)
        fresh = ~seen.numpy()[rows, np.where(mask_host, tk, 0) if mask_host is not None else tk]
        if mask_host is not None:
            fresh &= mask_host
        new = (rows * self.vocab_size + tk)[fresh]
        if not new.size:
            return
        n = self._seen_n
        if n + new.size > buf.size:
            grown = np.empty(max(2 * buf.size, n + new.size, _MIN_CAPACITY), dtype=np.int64)
            grown[:n] = buf[:n]
            self._seen_buf = buf = grown
        buf[n : n + new.size] = new
        self._seen_n = n + new.size
        self._seen_view = None

    def select(
        self, rows: torch.Tensor | Sequence[int], host_rows: np.ndarray | Sequence[int] | None = None
    ) -> "TokenHistory":
        """A new TokenHistory holding the given rows (in that order; repeats allowed).

        Every derived structure already built is carried over (indexed, not rebuilt).
        host_rows: the same row indices on the host, when the caller has them (e.g. built
        from host lists). The host-side bookkeeping is indexed with them, so a ``rows``
        tensor on an accelerator is not read back (a device sync). They must equal ``rows``:
        only their number is checked. Not needed when ``rows`` is a list or a CPU tensor.
        """
        idx = torch.as_tensor(rows, dtype=torch.int64, device=self.device).reshape(-1)
        if host_rows is not None:
            host = np.asarray(host_rows, dtype=np.int64).reshape(-1)
            if host.shape[0] != idx.shape[0]:
                raise ValueError(f"select: host_rows has {host.shape[0]} rows but rows has {idx.shape[0]}")
        elif isinstance(rows, torch.Tensor):
            host = rows.to(torch.int64).cpu().numpy().reshape(-1)  # free for a CPU tensor
        else:
            host = np.asarray(rows, dtype=np.int64).reshape(-1)
        return TokenHistory._gather([_Part(self, idx, host, None)])

    @staticmethod
    def merge(
        histories: Sequence["TokenHistory"],
        source: np.ndarray | Sequence[int],
        rows: np.ndarray | Sequence[int],
    ) -> "TokenHistory":
        """A new TokenHistory whose row r is row ``rows[r]`` of ``histories[source[r]]``.

        histories: on one device, with one vocab_size. source, rows: host int arrays of
        the result's length (ValueError when their lengths differ or an entry points
        outside ``histories`` or outside its history's rows).

        Derived state: a structure built in any of the histories is built in the result,
        each row's copied from its history; a history that lacks it builds it first, over
        its own rows only, and every history's `match_lengths` is brought up to date first
        (the result's is then up to date). So stitching a few new rows into a large
        carried history costs the new rows' state, O(new rows * (history + V)), plus one
        copy of the rows taken. No device sync. The histories keep their contents (only
        state they would build on first use, or bring up to date, may be built).
        """
        if not histories:
            raise ValueError("merge: histories is empty")
        src = np.asarray(source, dtype=np.int64).reshape(-1)
        at = np.asarray(rows, dtype=np.int64).reshape(-1)
        if src.shape != at.shape:
            raise ValueError(f"merge: source has {src.size} entries but rows has {at.size}")
        first = histories[0]
        for k, h in enumerate(histories):
            if h.vocab_size != first.vocab_size or h.device != first.device:
                raise ValueError(
                    f"merge: histories[{k}] has vocab_size {h.vocab_size} on {h.device}, "
                    f"histories[0] has {first.vocab_size} on {first.device}"
                )
        if src.size and (src.min() < 0 or src.max() >= len(histories)):
            raise ValueError(
                f"merge: source entries must be in [0, {len(histories)}), got {src.min()}..{src.max()}"
            )
        parts = []
        for k, h in enumerate(histories):
            dest = np.flatnonzero(src == k)
            if not dest.size:
                continue
            host = at[dest]
            if host.min() < 0 or host.max() >= h.batch_size:
                raise ValueError(
                    f"merge: rows taken from histories[{k}] must be in [0, {h.batch_size}), "
                    f"got {host.min()}..{host.max()}"
                )
            parts.append(_Part(h, torch.from_numpy(host).to(h.device, non_blocking=True), host, dest))
        if not parts:
            return first.select([])
        if len(parts) == 1 and np.array_equal(cast(np.ndarray, parts[0].dest), np.arange(src.size)):
            return TokenHistory._gather([parts[0]._replace(dest=None)])
        return TokenHistory._gather(parts)

    @staticmethod
    def _gather(parts: list["_Part"]) -> "TokenHistory":
        """The history of `select` (one part, its rows in order: ``dest`` None) or of `merge`
        (each part's rows placed at the result's rows ``dest``, which cover 0..B-1 once)."""
        first = parts[0].history
        dev = first.device
        b = sum(p.host.size for p in parts)
        one = parts[0].dest is None
        dest = [] if one else [torch.from_numpy(p.dest).to(dev, non_blocking=True) for p in parts]

        if not one and any(p.history._match is not None for p in parts):
            for p in parts:  # built or brought up to date: one bookkeeping then holds for all
                p.history.match_lengths()

        def carried(attr: str, build) -> bool:
            """Whether the result has ``attr``: whether any part has it (the others build it)."""
            if all(getattr(p.history, attr) is None for p in parts):
                return False
            for p in parts:
                if getattr(p.history, attr) is None:
                    build(p.history)
            return True

        # Merging: the part with the most rows is copied once, every row of the result taking
        # one of its rows (its own or, for the rows of the other parts, row 0), and the other
        # parts' rows are written over it: one pass over the large part instead of two.
        if not one:
            base = max(range(len(parts)), key=lambda k: parts[k].host.size)
            base_rows = np.zeros(b, dtype=np.int64)
            base_rows[parts[base].dest] = parts[base].host
            base_index = torch.from_numpy(base_rows).to(dev, non_blocking=True)

        def assemble(attr: str, row_dim: int = 0, fill: int = 0) -> torch.Tensor:
            whole = [getattr(p.history, attr) for p in parts]
            if one:
                return whole[0].index_select(row_dim, parts[0].rows)
            ragged = whole[0].dim() - 1 != row_dim  # capacities may differ (V does not)
            width = max(x.shape[-1] for x in whole) if ragged else 0
            over = [k for k in range(len(parts)) if k != base]
            if not ragged or whole[base].shape[-1] == width:
                out = whole[base].index_select(row_dim, base_index)
            else:
                shape = list(whole[base].shape)
                shape[row_dim], shape[-1] = b, width
                out = torch.full(shape, fill, dtype=whole[base].dtype, device=dev)
                over.insert(0, base)
            for k in over:
                x = whole[k].index_select(row_dim, parts[k].rows)
                target = out
                if ragged and x.shape[-1] < width:
                    out.index_fill_(row_dim, dest[k], fill)
                    target = out.narrow(-1, 0, x.shape[-1])
                target.index_copy_(row_dim, dest[k], x)
            return out

        new = TokenHistory.__new__(TokenHistory)
        new.vocab_size = first.vocab_size
        new.device = dev
        new.tokens = assemble("tokens", fill=-1)
        new.lengths = assemble("lengths")
        new.prompt_lengths = assemble("prompt_lengths")
        new._host_lengths = np.empty(b, dtype=np.int64)
        for p in parts:
            new._host_lengths[slice(None) if one else p.dest] = p.history._host_lengths[p.host]
        new._max_len = int(new._host_lengths.max()) if b else 0
        new._counts = assemble("_counts") if carried("_counts", TokenHistory.output_counts) else None
        new._seen = assemble("_seen") if carried("_seen", TokenHistory.seen_mask) else None
        new._hashes = assemble("_hashes", row_dim=1) if carried("_hashes", TokenHistory.prefix_hashes) else None
        new._match = assemble("_match") if carried("_match", TokenHistory.match_lengths) else None
        if one:
            new._steps, new._match_steps = first._steps, first._match_steps
            new._match_len = first._match_len[parts[0].rows] if first._match_len is not None else None
            new._masked_since_match = first._masked_since_match
        else:
            new._steps = new._match_steps = 0
            new._match_len = new.lengths if new._match is not None else None
            new._masked_since_match = False
        new._match_nz = None
        # (listed where the CPU's incremental update keeps the list: not on the sync-free path)
        if new._match is not None and not first._sync_free_match() and (not one or first._match_nz is not None):
            new._match_nz = TokenHistory._gathered_match_nz(parts, b)
        new._seen_buf = None
        if dev.type == "cpu" and carried("_seen_buf", TokenHistory.seen_ids):
            new._seen_buf = TokenHistory._gathered_seen_ids(parts)
        new._seen_n = new._seen_buf.size if new._seen_buf is not None else 0
        new._seen_view = None
        return new

    @staticmethod
    def _gathered_match_nz(parts: list["_Part"], b: int) -> tuple[np.ndarray, np.ndarray]:
        """`_match_nz` of `_gather`'s result (CPU): each row's entries are those of the row it
        copies, so the parts' row-major lists are cut into rows and laid out in the result's
        row order (O(entries + B), no pass over the match tables that list them already; a
        part without its list, such as rows just built, is listed first)."""
        starts = np.empty(b, dtype=np.int64)
        counts = np.empty(b, dtype=np.int64)
        cols, offset = [], 0
        for p in parts:
            h = p.history
            if h._match_nz is None:
                match = cast(torch.Tensor, h._match)  # (every part's is built: see _gather)
                h._match_nz = np.divmod(np.flatnonzero(match.numpy()), match.shape[1])
            nz_r, nz_c = h._match_nz
            per_row = np.bincount(nz_r, minlength=h.batch_size)
            first = np.cumsum(per_row) - per_row + offset
            at = slice(None) if p.dest is None else p.dest
            starts[at] = first[p.host]
            counts[at] = per_row[p.host]
            cols.append(nz_c)
            offset += nz_c.size
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        taken = np.repeat(starts, counts) + within
        return np.repeat(np.arange(b), counts), np.concatenate(cols)[taken]

    @staticmethod
    def _gathered_seen_ids(parts: list["_Part"]) -> np.ndarray | None:
        """`seen_ids` of `_gather`'s result from its parts' lists: each part's entries of the
        rows it gives, renumbered to their rows in the result; None (left to be built
        again on first use) when a part gives a row twice (its entries would be listed twice)."""
        lists = []
        for p in parts:
            ids = p.history._select_seen_ids(p.host)  # renumbered to 0..len(p.host)-1
            if ids is None:
                return None
            if p.dest is not None:
                v = p.history.vocab_size
                row = ids // v
                ids = ids + (p.dest[row] - row) * v
            lists.append(ids)
        return lists[0] if len(lists) == 1 else np.concatenate(lists)

    def follow(self, source: "TokenHistory", host_rows: np.ndarray, max_steps: int = 8) -> bool:
        """Catch up with ``source``: append to each row ``b`` the tokens that ``source``'s row
        ``host_rows[b]`` holds past this row's length, one `append` per position (a loop over
        steps, at most ``max_steps``, never over rows). Returns False, changing nothing, when
        some row is longer than its source row or more than ``max_steps`` behind.

        For a history made by ``source.select(rows, host_rows)``: a history only grows by
        `append`, so this one then equals ``source.select`` of the same rows again (tokens,
        lengths and every derived structure it keeps), at the cost of a few O(B) appends
        instead of copying the rows' ``[B, V]`` counts and seen mask."""
        host = np.asarray(host_rows, dtype=np.int64).reshape(-1)
        if host.shape[0] != self.batch_size:
            raise ValueError(f"follow: host_rows has {host.shape[0]} rows, this history {self.batch_size}")
        if source.vocab_size != self.vocab_size:
            raise ValueError(f"follow: source vocab_size {source.vocab_size} != this history's {self.vocab_size}")
        behind = source._host_lengths[host] - self._host_lengths
        if host.size and (int(behind.min()) < 0 or int(behind.max()) > max_steps):
            return False
        index = torch.from_numpy(host).to(self.device, non_blocking=True)
        last = source.capacity - 1
        for step in range(int(behind.max(initial=0))):
            due = behind > step
            pos = self.lengths.clamp_max(last)  # (a row not due may sit at its source's end)
            self.append(source.tokens[index, pos], rows=None if due.all() else torch.from_numpy(due))
        return True

    # ------------------------------------------------------------------ derived state
    def _valid(self, width: int) -> torch.Tensor:
        """bool [B, width]: position is inside the row's history."""
        ar = torch.arange(width, device=self.device)
        return ar[None, :] < self.lengths[:, None]

    def output_counts(self) -> torch.Tensor:
        """int32 [B, V]: counts[b, t] = number of occurrences of t in row b's output.

        Built on first call (O(B * (V + len))), then maintained by `append`. The returned
        tensor is this history's state: do not modify it.
        """
        if self._counts is None:
            w = self._max_len
            ar = torch.arange(w, device=self.device)
            out_pos = (ar[None, :] >= self.prompt_lengths[:, None]) & (ar[None, :] < self.lengths[:, None])
            tok = self.tokens[:, :w]
            counts = torch.zeros(self.batch_size, self.vocab_size, dtype=torch.int32, device=self.device)
            counts.scatter_add_(1, torch.where(out_pos, tok, 0), out_pos.to(torch.int32))
            self._counts = counts
        return self._counts

    def seen_mask(self) -> torch.Tensor:
        """bool [B, V]: seen[b, t] = t occurs in row b's prompt or output.

        Built on first call, then maintained by `append`. Do not modify the returned tensor.
        """
        if self._seen is None:
            w = self._max_len
            valid = self._valid(w)
            tok = self.tokens[:, :w]
            hits = torch.zeros(self.batch_size, self.vocab_size, dtype=torch.int32, device=self.device)
            hits.scatter_add_(1, torch.where(valid, tok, 0), valid.to(torch.int32))
            self._seen = hits > 0
        return self._seen

    def seen_ids(self) -> torch.Tensor | None:
        """int64 [N]: the flat indices b * V + t of the True entries of `seen_mask` (every
        (row, token) seen in the row's prompt or output), each once. Row-major when built
        (``np.flatnonzero(seen_mask)``), then each pair an `append` sees for the first time is
        added at the end, so the order is not specified. CPU only: None on other devices
        (where the dense mask is what the penalty reads; listing it would need a sync).

        Built on first call (with `seen_mask`), then maintained by `append` in O(B). The
        returned tensor shares this history's state: do not modify it.
        """
        if self.device.type != "cpu":
            return None
        if self._seen_buf is None:
            self._seen_buf = np.flatnonzero(self.seen_mask().numpy())
            self._seen_n = self._seen_buf.size
            self._seen_view = None
        if self._seen_view is None:  # kept between calls: a step without a new pair reuses it
            self._seen_view = torch.from_numpy(self._seen_buf[: self._seen_n])
        return self._seen_view

    def _select_seen_ids(self, sel: np.ndarray) -> np.ndarray | None:
        """`seen_ids` of `select` of the rows ``sel`` (host indices) from this history's list
        (the selected rows' entries, renumbered, in their order), or None (left to be built
        again on first use) when there is no list or ``sel`` repeats a row."""
        if self._seen_buf is None:
            return None
        b = self.batch_size
        new_row = np.full(b, -1, dtype=np.int64)
        new_row[sel] = np.arange(sel.size)
        if sel.size and (new_row >= 0).sum() != sel.size:
            return None  # a repeated row: its entries would be listed twice
        ids = self._seen_buf[: self._seen_n]
        v = self.vocab_size
        row = ids // v
        to = new_row[row]
        keep = to >= 0
        return ids[keep] + (to[keep] - row[keep]) * v

    def _compute_hashes(self) -> torch.Tensor:
        cap = self.capacity
        pw = _powers(self.device, cap + 1)[:, :cap]
        mod = _moduli(self.device)[:, None, None]
        valid = self._valid(cap)
        terms = torch.where(valid, self.tokens + 1, 0)[None] * pw[:, None, :] % mod  # [2, B, cap]
        csum = torch.cumsum(terms, dim=2) % mod  # sums of < 2^31 terms of < 2^31: no overflow
        zeros = torch.zeros(2, self.batch_size, 1, dtype=torch.int64, device=self.device)
        return torch.cat([zeros, csum], dim=2)

    def prefix_hashes(self) -> torch.Tensor:
        """int64 [2, B, capacity + 1]: P[k, b, j] = sum_{i<j} (h_b[i] + 1) * r_k^i mod M_k.

        (M_k, r_k) = (HASH_MODULI[k], HASH_BASES[k]). Valid for j <= lengths[b] (beyond that
        the values are unspecified). Built on first call, then maintained by `append` in O(B).
        Do not modify the returned tensor.
        """
        if self._hashes is None:
            self._hashes = self._compute_hashes()
        return self._hashes

    def _build_match_lengths(self) -> torch.Tensor:
        """From scratch: exact for matches < _EXACT_PREFIX, hashed binary search beyond."""
        b, cap = self.batch_size, self.capacity
        dev = self.device
        match = torch.zeros(b, cap, dtype=torch.int32, device=dev)
        w = self._max_len
        if w < 2 or b == 0:
            return match
        lens = self.lengths
        tok = self.tokens[:, :w]
        j = torch.arange(w, device=dev)
        cand = (j[None, :] >= 1) & (j[None, :] < lens[:, None])  # candidate positions 1..len-1
        # Exact run of agreement for k = 1 .. _EXACT_PREFIX: h[j-k] == h[len-k].
        run = torch.zeros(b, w, dtype=torch.int32, device=dev)
        alive = cand
        for k in range(1, _EXACT_PREFIX + 1):
            if k > w - 1:
                break
            ref = self.tokens.gather(1, (lens - k).clamp(min=0)[:, None])  # [B, 1] h[len-k]
            shifted = torch.full_like(tok, -2)
            shifted[:, k:] = tok[:, :-k]  # shifted[j] = h[j-k], -2 where j-k < 0
            alive = alive & (shifted == ref) & (lens[:, None] >= k)
            run += alive.to(torch.int32)
        if self._sync_free_match():
            match[:, :w] = self._search_long_matches_everywhere(run)
            return match
        match[:, :w] = run
        # Matches that reached _EXACT_PREFIX may be longer: binary search with hashes.
        long_b, long_j = (run >= _EXACT_PREFIX).nonzero(as_tuple=True)
        if long_b.numel():
            hashes = self._hashes if self._hashes is not None else self._compute_hashes()
            pw = _powers(dev, cap + 1)
            ln = lens[long_b]
            at_j = long_b * hashes.shape[2] + long_j  # flat index of P[b, j]
            at_len = at_j + (ln - long_j)  # flat index of P[b, len]
            # h[j-k:j] == h[len-k:len] (hashed) iff, for both (M, r),
            # (P[j] - P[j-k]) * r^(len-j) - (P[len] - P[len-k]) == 0 (mod M).
            # |(P[j] - P[j-k]) * r^(len-j)| < 2^62, so the sum fits in int64: one remainder.
            flat = [hashes[k].reshape(-1) for k in range(2)]  # contiguous per modulus
            p_j = [f.index_select(0, at_j) for f in flat]
            p_len = [f.index_select(0, at_len) for f in flat]
            shift = [pw[k].index_select(0, ln - long_j) for k in range(2)]  # r^(len - j)
            lo = torch.full_like(long_j, _EXACT_PREFIX)  # h[j-lo:j] == h[len-lo:len] known true
            hi = long_j.clone()  # a match cannot be longer than j
            iters = int((long_j.max() - _EXACT_PREFIX + 1).item()).bit_length()
            for _ in range(iters):
                mid = (lo + hi + 1) >> 1
                ia, ic = at_j - mid, at_len - mid  # P[j - mid], P[len - mid]
                eq: list[torch.Tensor] = []
                for k in range(2):
                    diff = (p_j[k] - flat[k].index_select(0, ia)) * shift[k]
                    diff -= p_len[k] - flat[k].index_select(0, ic)
                    eq.append(diff.remainder_(HASH_MODULI[k]) == 0)
                ok = eq[0] & eq[1]
                lo = torch.where(ok, mid, lo)
                hi = torch.where(ok, hi, mid - 1)
            match[long_b, long_j] = lo.to(torch.int32)
        return match

    def _sync_free_match(self) -> bool:
        """Whether `match_lengths` must avoid every host read: off the CPU, where one would
        be a device sync each step (and rule out graph capture), or when tests force it."""
        return self.device.type != "cpu" or _FORCE_SYNC_FREE

    def _search_long_matches_everywhere(self, run: torch.Tensor) -> torch.Tensor:
        """int32 [B, w]: ``run`` (the exact match lengths capped at _EXACT_PREFIX, w =
        max_length >= 2), with every entry that reached the cap replaced by the hashed binary
        search's result, computed without reading anything back to the host.

        The search is the one `_build_match_lengths` runs on the CPU over the listed long
        positions (same bounds, same midpoints, same arithmetic), here run at every position
        for a host-known number of iterations, bit_length(w - _EXACT_PREFIX): enough for the
        longest possible match (j <= w - 1). Positions outside the search start with
        lo = hi = 0 (mid = 0 compares two empty strings: always equal, so they stay put), and
        a search that has converged (lo == hi) stays put too, so the extra iterations change
        nothing and the result is bit-identical. O(B * w * log w) work, no sync.
        """
        b, w = run.shape
        if w <= _EXACT_PREFIX:
            return run  # m[j] <= j <= w - 1 < _EXACT_PREFIX: no match reaches the cap
        dev = self.device
        hashes = self._hashes if self._hashes is not None else self._compute_hashes()  # [2, B, cap + 1]
        pw = _powers(dev, self.capacity + 1)
        mod = _moduli(dev)[:, None, None]
        lens = self.lengths[:, None]  # [B, 1]
        j = torch.arange(w, device=dev).expand(b, w)
        long = run >= _EXACT_PREFIX
        # P[j], P[len] and r^(len - j) (len - j clamped: out-of-history positions are not searched).
        p_j = hashes[:, :, :w]
        p_len = hashes.gather(2, lens.expand(2, b, 1))
        shift = pw[:, (lens - j).clamp(min=0)]  # [2, B, w]
        lo = torch.where(long, _EXACT_PREFIX, 0)  # h[j-lo:j] == h[len-lo:len] known true
        hi = torch.where(long, j, 0)  # a match cannot be longer than j
        for _ in range((w - _EXACT_PREFIX).bit_length()):
            mid = (lo + hi + 1) >> 1
            # h[j-mid:j] == h[len-mid:len] (hashed) iff, for both (M, r),
            # (P[j] - P[j-mid]) * r^(len-j) - (P[len] - P[len-mid]) == 0 (mod M); int64 as above.
            p_a = hashes.gather(2, (j - mid).expand(2, b, w))
            p_c = hashes.gather(2, (lens - mid).expand(2, b, w))
            diff = (p_j - p_a) * shift
            diff -= p_len - p_c
            ok = (diff.remainder_(mod) == 0).all(dim=0)
            lo = torch.where(ok, mid, lo)
            hi = torch.where(ok, hi, mid - 1)
        return torch.where(long, lo.to(torch.int32), run)

    def _advance_match(self, match: torch.Tensor, upto: torch.Tensor, lag: int) -> None:
        """Exact recurrence, in place: bring each row b of `match` from history length
        upto[b] (the length it is up to date with) to lengths[b], one token per iteration;
        `lag` (>= max(lengths - upto), the number of append calls since) iterations.

        Appending x to h (old length t) gives m'(0) = 0 and, for 1 <= j <= t,
        m'(j) = (h[j-1] == x) ? m(j-1) + 1 : 0, where m is the old array: the longest common
        suffix of h[:j] and h + [x] is the one of h[:j-1] and h, extended by x. A row with
        nothing left to apply (a row skipped by a masked append) is left as it is.
        """
        w = self._max_len
        if w < 2 or self.batch_size == 0:
            return  # every m is 0
        ar = torch.arange(1, w, device=self.device)
        rows = torch.arange(self.batch_size, device=self.device)
        tok = self.tokens[:, : w - 1]
        pos = upto.clone()  # where each row's next token to apply sits = its old length t
        # Without a masked append since `upto`, every row has `lag` tokens to apply.
        every_row = not self._masked_since_match
        for _ in range(lag):
            active = pos < self.lengths
            x = self.tokens[rows, pos.clamp(max=self.capacity - 1)]
            keep = (tok == x[:, None]) & (ar[None, :] <= pos[:, None])
            new = torch.where(keep, match[:, : w - 1] + 1, 0)
            if every_row:
                match[:, 1:w] = new
            else:
                match[:, 1:w] = torch.where(active[:, None], new, match[:, 1:w])
            match[:, 0] = 0
            pos += active.to(torch.int64)

    def _advance_match_sparse(self, match: torch.Tensor, upto: torch.Tensor, lag: int) -> None:
        """`_advance_match` on the CPU, writing only what changes. After appending x, the
        nonzero entries of m' are exactly the j = i + 1 with h[i] == x (i < t), and every
        other entry is 0: so each step finds the occurrences of x (one comparison over the
        rows' tokens), reads m there, clears the previous step's nonzero entries (kept in
        `_match_nz`) and writes the new ones. O(B * len) comparisons, but no O(B * len)
        arithmetic or writes, and the nonzero entries come out listed for `match_entries`."""
        w = self._max_len
        b = self.batch_size
        if w < 2 or b == 0:
            return  # every m is 0
        m = match.numpy()  # shares memory with `match`
        cap = m.shape[1]
        toks = self.tokens.numpy()
        lengths = self.lengths.numpy()
        pos = upto.numpy().copy()  # each row's old length t = where its next token sits
        if self._match_nz is None:
            self._match_nz = np.divmod(np.flatnonzero(m), cap)
        nz_r, nz_c = self._match_nz
        before = toks[:, : w - 1]  # h[i] for the candidate positions j = i + 1 <= w - 1
        rows = np.arange(b)
        for _ in range(lag):
            active = pos < lengths
            x = toks[rows, np.minimum(pos, cap - 1)]
            hit = before == x[:, None]
            if lag == 1:
                # i < t. One step to apply: past the new length t + 1 a row holds only the -1
                # padding, which no token id equals, so of the positions i >= t only t itself
                # (the token x) is left to clear, instead of a [B, len] mask of them all.
                inside = np.flatnonzero(pos < w - 1)
                hit[inside, pos[inside]] = False
            else:
                hit &= np.arange(w - 1)[None, :] < pos[:, None]  # i < t
            if not active.all():
                hit &= active[:, None]
            hr, hi = np.divmod(np.flatnonzero(hit), w - 1)
            new = m[hr, hi] + 1  # m(j - 1) + 1, read before anything is cleared
            stale = active[nz_r]
            m[nz_r[stale], nz_c[stale]] = 0
            m[hr, hi + 1] = new
            if stale.all():
                nz_r, nz_c = hr, hi + 1
            else:  # rows that did not advance keep their entries
                nz_r = np.concatenate([nz_r[~stale], hr])
                nz_c = np.concatenate([nz_c[~stale], hi + 1])
                order = np.lexsort((nz_c, nz_r))
                nz_r, nz_c = nz_r[order], nz_c[order]
            pos += active
        self._match_nz = (nz_r, nz_c)

    def match_entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The nonzero entries of `match_lengths` (brought up to date first), row-major:
        ``(rows, cols, lengths)``, int64 / int64 / int32 ``[N]``. On the CPU they are kept
        by the incremental update (no pass over the histories); elsewhere found with
        ``nonzero`` (a device sync)."""
        if self.device.type != "cpu":
            match = self.match_lengths()
            rows, cols = match.nonzero(as_tuple=True)
            return rows, cols, match[rows, cols]
        at_rows, at_cols, lengths = self.match_entries_host()
        return torch.from_numpy(at_rows), torch.from_numpy(at_cols), torch.from_numpy(lengths)

    def match_entries_host(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`match_entries` of a CPU history as numpy arrays (the same entries, the same
        dtypes), for callers that go on in numpy."""
        if self.device.type != "cpu":
            raise ValueError(f"match_entries_host: the history is on {self.device}, not the CPU")
        match = self.match_lengths().numpy()
        if self._match_nz is None:
            self._match_nz = np.divmod(np.flatnonzero(match), match.shape[1])
        rows, cols = self._match_nz
        return rows, cols, match[rows, cols]

    def match_lengths(self) -> torch.Tensor:
        """int32 [B, capacity]: m[b, j] = the longest k with h[j-k:j] == h[len-k:len].

        That is, the length of the longest common suffix of h[:j] and h, for
        0 <= j < len = lengths[b] (so m[b, 0] = 0 and m[b, j] <= j); 0 for j >= len.
        The token h[j] is the one that followed an earlier occurrence of the last m tokens.

        Built on first call (exact token comparison up to 8 tokens, then a vectorised
        binary search on `prefix_hashes`); afterwards each appended step is applied by an
        exact O(B * len) recurrence when this is next called (rebuilt instead if more than
        16 steps were appended meanwhile). Off the CPU neither reads anything back to the
        host (no device sync; the search then runs at every position, O(B * len * log len)),
        with the same result as on the CPU. Do not modify the returned tensor.
        """
        lag = self._steps - self._match_steps
        if self._match is None or self._match_len is None or lag > _MAX_CATCH_UP:
            self._match = self._build_match_lengths()
            self._match_nz = None
        elif lag > 0:
            if not self._sync_free_match():
                self._advance_match_sparse(self._match, self._match_len, lag)
            else:
                self._advance_match(self._match, self._match_len, lag)
                self._match_nz = None  # this update does not keep the nonzero entries listed
        self._match_steps = self._steps
        self._match_len = self.lengths
        self._masked_since_match = False
        return self._match
