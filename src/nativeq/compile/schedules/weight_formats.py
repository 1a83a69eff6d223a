"""How a constant int8 matmul weight is stored in the artifact: dense, 4-bit packed, block-sparse.

Used by `pack_weights.PackInt8Weights` (kernel_relax_passes), which picks the format from the weight's
values (no flag): the kernels unpack and skip inside the tile loop (`matmul.py`), so the artifact and
the memory it is loaded into hold only these bytes.

The unit is the dot instruction's tile, `lanes` output channels x `kstep` consecutive inputs (16 x 4
for AVX-512 VNNI's `vpdpbusd`, 8 x 2 for AVX2's `vpmaddwd`, 4 x 4 for ARM's `sdot` / NEON):

    dense     values [N/lanes, K/kstep, lanes, kstep]   every tile, in K order (`pack_weight`)
    sparse    values [N/lanes, W, lanes, kstep]         only the W non-zero tiles of each column block,
              blocks [N/lanes/g, W] int16               and the k-step index of each one (one list per g
                                                         column blocks: 4 on ARM for 16 x 4 blocks)
    4-bit     the same values with two tiles per byte   tile 2i in the low nibble, tile 2i+1 in the high one
    wider     values [N/lanes, W/j, lanes, j*kstep]     a kernel with k along the lanes (Pi 4: 4 x 16 tiles):
              blocks [N/lanes/g, W] int16               j = 4 listed blocks joined per tile, W padded to a
                                                         multiple of j (`with_wider_tiles`, `unit` = kstep)

Block-sparse pays only when whole tiles are zero: the kernel then skips their dot instructions and
their bytes. A weight pruned in 16 x 4 blocks with the same number of blocks kept per 16 output
channels (`nativeq finetune --sparsity` with a balanced block pattern) has equal W in every column
block; otherwise column blocks with fewer non-zero tiles are padded with zero tiles (index 0) up to
the largest W. Sparse is chosen when W / (K/kstep) <= `SPARSE_MAX_DENSITY` (wider tiles, whose kernel gathers
the listed activations first: `WIDE_SPARSE_MAX_DENSITY`, after the padding); 2:4 or unstructured
sparsity leaves almost no zero tile, so those weights stay dense (their zeros are still multiplied).

4-bit is chosen when every value lies in [-8, 7] (an int4 QDQ weight, widened to int8 on import):
lossless, so the choice needs no flag either.

N is padded with zero columns to whole column blocks, on x86 a few blocks further when their count has no divisor
a full-rate register tile can use (`intrinsics.padded_column_blocks`: 2000 columns are 125 blocks of 16, which only
a tile one block wide divides); the kernel's epilogue crops them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# NOTE: at this density the sparse kernel still beats the dense one (benchmarks/sparse_matmul.py, 75 rows:
# rpi5 1.11-1.14x fewer instructions at 25% of the tiles zero; x86 1.30x faster at 50%).
SPARSE_MAX_DENSITY = 0.75
# NOTE: the wider tiles of a kernel with k along the lanes (`with_wider_tiles`) cost a gather of the listed activations
# per row tile and list, and pad each list to whole tiles: rpi4, 75 rows, 50% of the 16 x 4 blocks zero, K x N =
# 576 x 144: 1.53x fewer instructions than dense at density 0.5, 144 x 576 (density 0.56): 1.33x, 99 x 64 (0.64):
# 0.96x.
WIDE_SPARSE_MAX_DENSITY = 0.6
TILE_LIST_DTYPE = "int16"  # the k-step index list of a block-sparse weight (signed: see pack_weights._listed_block)
INT4_MIN, INT4_MAX = -8, 7


@dataclass(frozen=True)
class PackedWeight:
    """A [K, N] int8 weight in the kernel's layout (see the module docstring).

    values: int8 [N/lanes, W, lanes, kstep], or with `int4` the same tiles two per byte,
        [N/lanes, ceil(W/2), lanes, kstep].
    blocks: int16 [N/lanes/group, W] k-step index of each listed tile (sparse), or None (dense: tile w is k-step w).
    k: K padded to whole k-steps (the activation's zero padding); n: the real N (columns past it are zero).
    """

    values: np.ndarray
    blocks: np.ndarray | None
    int4: bool
    k: int
    n: int
    lanes: int
    kstep: int
    group: int = 1  # column blocks sharing one tile list (blocks has N/lanes/group rows)
    unit: int = 0  # k per listed block (sparse); 0: kstep. A smaller unit: `kstep // unit` listed blocks per tile

    @property
    def list_unit(self) -> int:
        return self.unit or self.kstep

    @property
    def tiles(self) -> int:
        """W: tiles per column block the kernel multiplies."""
        if self.blocks is None:
            return self.k // self.kstep
        return self.blocks.shape[1] * self.list_unit // self.kstep

    @property
    def density(self) -> float:
        """Fraction of the K/kstep tiles of each column block that the kernel multiplies."""
        return self.tiles * self.kstep / self.k

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + (self.blocks.nbytes if self.blocks is not None else 0)

    def format_name(self) -> str:
        bits = "int4" if self.int4 else str(self.values.dtype)
        return f"{bits} block-sparse {self.density:.0%}" if self.blocks is not None else f"{bits} dense"


def pack_weight(w: np.ndarray, lanes: int, kstep: int) -> np.ndarray:
    """[K, N] int8 -> [N/lanes, K/kstep, lanes, kstep]: packed[n0, k0, n1, k1] = w[k0*kstep + k1, n0*lanes + n1]."""
    k, n = w.shape
    return np.ascontiguousarray(w.reshape(k // kstep, kstep, n // lanes, lanes).transpose(2, 0, 3, 1))


def pack_int4_pairs(tiles: np.ndarray) -> np.ndarray:
    """[..., W, lanes, kstep] int8 in [-8, 7] -> [..., ceil(W/2), lanes, kstep]: tile 2i in the low nibble
    of each byte, tile 2i+1 in the high nibble (zero for an odd W)."""
    if tiles.min(initial=0) < INT4_MIN or tiles.max(initial=0) > INT4_MAX:
        raise ValueError("4-bit packing needs every value in [-8, 7]")
    w = tiles.shape[-3]
    if w % 2:
        tiles = np.concatenate([tiles, np.zeros_like(tiles[..., :1, :, :])], axis=-3)
    low = tiles[..., 0::2, :, :].astype(np.uint8) & 0x0F
    high = tiles[..., 1::2, :, :].astype(np.uint8) << 4
    return np.ascontiguousarray((low | high).view(np.int8))


def unpack_int4_pairs(packed: np.ndarray, tiles: int) -> np.ndarray:
    """Inverse of `pack_int4_pairs` (the kernel's arithmetic: a left shift then an arithmetic right shift)."""
    low = (packed << 4).astype(np.int8) >> 4
    high = packed >> 4
    both = np.stack([low, high], axis=-3)  # [..., W/2, 2, lanes, kstep]
    shape = both.shape
    return both.reshape(*shape[:-4], shape[-4] * 2, *shape[-2:])[..., :tiles, :, :]


def nonzero_tiles(dense: np.ndarray) -> np.ndarray:
    """[N/lanes, K/kstep] bool: which tiles of a packed dense weight hold a non-zero value."""
    return dense.any(axis=(2, 3))


def pack_for_kernel(weight: np.ndarray, lanes: int, kstep: int, *, allow_sparse: bool = True,
                    allow_int4: bool = True, n_blocks: int = 0) -> PackedWeight:
    """The weight [K, N] int8 in the best format the kernel reads (see the module docstring); a float32
    weight (the float kernel) is packed dense. `n_blocks`: column blocks to pack N as, at least ceil(N / lanes)
    (`intrinsics.padded_column_blocks`); 0: that many."""
    k, n = weight.shape
    padded_k, padded_n = -(-k // kstep) * kstep, max(-(-n // lanes), n_blocks) * lanes
    dense = pack_weight(np.pad(weight, ((0, padded_k - k), (0, padded_n - n))), lanes, kstep)
    int4 = allow_int4 and weight.dtype == np.int8 and weight.size > 0 and INT4_MIN <= int(weight.min()) and int(weight.max()) <= INT4_MAX
    values, blocks = dense, None
    group = 1
    if allow_sparse and weight.dtype == np.int8 and padded_k // kstep <= np.iinfo(TILE_LIST_DTYPE).max:
        group, present = _list_groups(nonzero_tiles(dense))
        width = max(int(present.sum(axis=1).max(initial=0)), 1)
        if width / (padded_k // kstep) <= SPARSE_MAX_DENSITY:
            blocks = np.zeros((present.shape[0], width), TILE_LIST_DTYPE)
            values = np.zeros((dense.shape[0], width, lanes, kstep), np.int8)
            for listed in range(present.shape[0]):
                kept = np.flatnonzero(present[listed])
                blocks[listed, :len(kept)] = kept
                for col in range(listed * group, (listed + 1) * group):
                    values[col, :len(kept)] = dense[col, kept]
        else:
            group = 1
    weight = PackedWeight(values, blocks, False, padded_k, n, lanes, kstep, group)
    return to_int4(weight) if int4 else weight


def with_wider_tiles(packed: PackedWeight, kstep: int) -> PackedWeight:
    """A block-sparse `packed` weight with its listed tiles joined `kstep // packed.kstep` at a time into tiles of
    `kstep` consecutive listed inputs (each list padded with zero tiles, index 0, to a multiple): the layout of a
    kernel with k along the lanes, which reads `kstep` activations of the listed blocks gathered into one vector.
    The listed unit stays `packed.kstep`."""
    if packed.blocks is None or packed.int4 or kstep % packed.kstep:
        raise ValueError("wider tiles need an 8-bit block-sparse weight and a multiple of its k-step")
    joined = kstep // packed.kstep
    listed = packed.blocks.shape[1]
    width = -(-listed // joined) * joined
    blocks = np.pad(packed.blocks, ((0, 0), (0, width - listed)))
    values = np.pad(packed.values, ((0, 0), (0, width - listed), (0, 0), (0, 0)))
    n_blocks, _, lanes, unit = values.shape
    # [N/lanes, width, lanes, unit] -> [N/lanes, width/joined, lanes, joined * unit]
    values = values.reshape(n_blocks, width // joined, joined, lanes, unit).transpose(0, 1, 3, 2, 4)
    values = np.ascontiguousarray(values.reshape(n_blocks, width // joined, lanes, kstep))
    return PackedWeight(values, blocks, False, packed.k, packed.n, lanes, kstep, packed.group, unit)


def to_int4(packed: PackedWeight) -> PackedWeight:
    """`packed` with its tiles stored two per byte (every value must lie in [-8, 7])."""
    return PackedWeight(pack_int4_pairs(packed.values), packed.blocks, True, packed.k, packed.n, packed.lanes,
                        packed.kstep, packed.group, packed.unit)


def _list_groups(present: np.ndarray) -> tuple[int, np.ndarray]:
    """The most column blocks (4, 2 or 1) that can share one tile list at no extra tile, and the lists' pattern.

    Column blocks that share a list share the activation broadcast of each listed k-step too (the register
    tile spans them): on ARM (4-column tiles) a weight pruned in 16 x 4 blocks shares lists four by four.
    """
    n_blocks = present.shape[0]
    for group in (4, 2):
        if n_blocks % group == 0:
            shared = present.reshape(n_blocks // group, group, -1).any(axis=1)
            if shared.sum(axis=1).max(initial=0) <= present.sum(axis=1).max(initial=0):
                return group, shared
    return 1, present


def unpack_to_dense(packed: PackedWeight) -> np.ndarray:
    """The [K, N] int8 weight a `PackedWeight` stands for (K padded to whole k-steps): the reference for tests."""
    tiles = unpack_int4_pairs(packed.values, packed.tiles) if packed.int4 else packed.values
    unit = packed.list_unit
    n_blocks = tiles.shape[0]
    if packed.blocks is None:
        dense = tiles
    else:
        # the listed blocks of each tile: [N/lanes, W, lanes, kstep] -> [N/lanes, W * kstep/unit, lanes, unit]
        joined = packed.kstep // unit
        tiles = tiles.reshape(n_blocks, -1, packed.lanes, joined, unit).transpose(0, 1, 3, 2, 4)
        tiles = tiles.reshape(n_blocks, -1, packed.lanes, unit)
        dense = np.zeros((n_blocks, packed.k // unit, packed.lanes, unit), np.int8)
        for col in range(n_blocks):
            for slot, block in enumerate(packed.blocks[col // packed.group]):
                dense[col, block] += tiles[col, slot]  # padding slots hold zeros
    weight = dense.transpose(1, 3, 0, 2).reshape(packed.k, n_blocks * packed.lanes)
    return weight[:, :packed.n]
