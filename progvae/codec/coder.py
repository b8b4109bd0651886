"""The progressive codec: a stage one trained with quantised latents (`--latents=quantized`) as
a real lossy image coder, one entropy-coded stream per latent group, so that a prefix of the
streams decodes to a coarser picture (paper 003's progressive coding, made concrete).

What is coded (Duan et al. 2023, eq. 9): for group i, the integer symbol round(mu_q - mu_p),
mu_q the posterior mean and mu_p the prior mean the top-down pass computes from the groups
above; the latent both sides continue with is mu_p + symbol. The symbol's probability is the
prior's Gaussian convolved with a unit box (Balle et al. 2018), centred on zero, so the prior
mean never enters the entropy model; only its scale does.

Determinism. The decoder must model each symbol with exactly the scale the encoder used, or the
stream is garbage. Both sides (1) compute each prior by the same operations on the same shapes
(the same tiles batched together, or the whole image), in float32 on CODER_THREADS threads
whatever --num_threads says (oneDNN's convolutions round differently with another thread count:
measured, 3e-6 in a prior's log scale between 1 and 2 threads, enough to fail a 512x600 photo),
and (2) round each scale to the nearest of SCALE_COUNT fixed values (log-spaced, as
learned-compression codecs do), so a difference between machines matters only if it straddles a
rounding boundary. Each group's
decoded symbols are checked against a CRC-32 the encoder stored, so a mismatch (or a corrupted
file) ends in an error, never in a wrong picture.

Entropy coder: constriction's range coder (`constriction.stream.queue`). A range coder is a
queue: symbols decode in the order they were written, which is the order in which the decoder
learns each symbol's scale (top-down, tile by tile). An ANS coder is a stack and would need every
group written in reverse; its few bits' saving per stream does not matter at these sizes.
Each scale has a table of the Gaussian's mass on each unit box over [-T-1, T+1], T =
ceil(8 sigma); +-(T+1) is an escape whose remaining magnitude follows in 20 uniform bits, so any
symbol can be coded while the typical ones pay nothing for the escape (its probability is
constriction's smallest, 2^-24).

Whole images. A fully convolutional model (`--fully_convolutional`, the `codec` preset and the
shipped weights) codes the whole image in one pass, padded (edge pixels repeated) to a multiple
of its coarsest group's stride and cropped after decoding. A plain VDVAE is not fully
convolutional (its top group is 1x1 and each resolution starts from a learned fixed-size
stream), so the image is padded to a multiple of the model's image size and cut into tiles
coded independently, which share nothing: at low rates their borders can show as seams.

File layout (.pvc, format version 2; integers little-endian):

    magic b"PVC\\0", version (u8), model hash (8 bytes: the start of a SHA-256 over the weights),
    height, width (u32), channels (u8), tile size (a fully convolutional model: the multiple
    the image is padded to), tiles per batch (1 for a whole image), groups (u16);
    per group: the stream's length in bytes and the CRC-32 of its symbols (u32, u32);
    a CRC-32 of everything above (u32); then the streams, top group first.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from progvae.core.errors import UserError
from progvae.models.distributions import box_gaussian_nll

MAGIC = b"PVC\x00"
FORMAT_VERSION = 2   # 1: float64 arithmetic, tiles only
HASH_BYTES = 8
_FIXED = struct.Struct("<4sB8sIIBHHH")   # magic, version, hash, height, width, channels, tile, batch, groups
_GROUP = struct.Struct("<II")            # stream length in bytes, CRC-32 of the symbols
_CRC = struct.Struct("<I")

SCALE_MIN, SCALE_MAX, SCALE_COUNT = 0.11, 256.0, 128
_LOG_MIN = math.log(SCALE_MIN)
_LOG_STEP = (math.log(SCALE_MAX) - _LOG_MIN) / (SCALE_COUNT - 1)
# Rounded to multiples of 2^-16 so that the table is the same exact numbers on every machine.
SCALES = np.round(np.exp(_LOG_MIN + _LOG_STEP * np.arange(SCALE_COUNT)) * 65536.0) / 65536.0
TAIL_SDS = 8
TAILS = np.ceil(TAIL_SDS * SCALES).astype(np.int64)
ESCAPE_BITS = 20

TILES_PER_BATCH = 32
MAX_PIXELS = 1 << 26        # 67 megapixels: the largest image a header may describe
MAX_FILE_BYTES = 1 << 30
MAX_TILES_PER_BATCH = 1024
CODER_THREADS = 2   # the network's threads while coding: fixed, so its arithmetic is too


@dataclass
class Encoded:
    """A compressed image: the .pvc bytes, the picture a full decode gives (H, W, C) uint8,
    and the sizes: the model's predicted code length (bits, from the exact prior scales) and
    each group's stream length (bytes)."""

    data: bytes
    reconstruction: np.ndarray
    predicted_bits: float
    header_bytes: int
    stream_bytes: list[int]


@dataclass
class Header:
    model_hash: bytes
    height: int
    width: int
    channels: int
    tile: int
    batch: int
    stream_bytes: list[int]
    symbol_crcs: list[int]

    @property
    def size(self) -> int:
        return _FIXED.size + len(self.stream_bytes) * _GROUP.size + _CRC.size

    def pack(self) -> bytes:
        body = _FIXED.pack(MAGIC, FORMAT_VERSION, self.model_hash, self.height, self.width,
                           self.channels, self.tile, self.batch, len(self.stream_bytes))
        body += b"".join(_GROUP.pack(n, crc) for n, crc in zip(self.stream_bytes, self.symbol_crcs))
        return body + _CRC.pack(zlib.crc32(body))


class Codec:
    """Compress and decompress images with one trained quantised VDVAE (a stage-one or plain
    VDVAE run); see the module docstring for what it writes."""

    def __init__(self, model: nn.Module, source: str = "the model"):
        if getattr(model, "conditional", True) or not getattr(model.decoder, "quantized", False):
            raise UserError(f"{source} was not trained with quantised latents, so it has no "
                            "discrete code; train a stage one with --latents=quantized (e.g. "
                            "--config=codec32).")
        self.source = source
        self.model_hash = weights_hash(model)
        # float32 in the channels-last layout (oneDNN's fastest on the CPU: 1.51 against 1.22
        # megapixels/s encoding grace_hopper), whatever layout the run trained in, so a file
        # decodes with exactly the arithmetic that encoded it.
        self.network = copy.deepcopy(model).float().eval().requires_grad_(False).to(
            memory_format=torch.channels_last)
        self.whole = getattr(model, "fully_convolutional", False)
        self.patch = getattr(model, "patch_size", 1)
        # A whole image is padded to a multiple of the coarsest group's stride; tiles are the
        # model's training size.
        coarsest = min(model.decoder.group_resolutions)
        self.tile = model.decoder.image_size // coarsest * self.patch if self.whole \
            else model.image_size
        self.channels = model.image_channels
        self.n_groups = model.n_groups

    # --- compress ----------------------------------------------------------------------------
    def compress(self, image: np.ndarray, batch: int = TILES_PER_BATCH) -> Encoded:
        """(H, W, C) uint8 -> Encoded."""
        height, width = image.shape[:2]
        image = self.channels_of(image)
        if height * width > MAX_PIXELS:
            raise UserError(f"The image is {width}x{height}, more than the codec's "
                            f"{MAX_PIXELS:,} pixels; cut it into smaller pictures.")
        tiles, rows, cols = (whole_image(image, self.tile) if self.whole
                             else to_tiles(image, self.tile))
        batch = 1 if self.whole else batch
        coders = [_coder().RangeEncoder() for _ in range(self.n_groups)]
        crcs = [0] * self.n_groups
        predicted_nats = 0.0
        decoded_tiles = []
        for start in range(0, len(tiles), batch):
            x = tiles[start:start + batch].float().div(127.5).sub(1.0)
            picked: list[tuple[np.ndarray, np.ndarray]] = []
            nats = []

            def rule(index: int):
                def pick(prior_mean, prior_logstd, posterior_mean):
                    symbols = torch.round(posterior_mean - prior_mean)
                    latent = prior_mean + symbols
                    nats.append(box_gaussian_nll(latent, prior_mean, prior_logstd).sum().item())
                    picked.append((symbols.flatten().to(torch.int64).numpy(),
                                   scale_indices(prior_logstd)))
                    return latent
                return pick

            with torch.no_grad(), pinned_threads():
                features = self.network.decoder.run_with_rule(
                    rule, encoder_activations=self.network.encoder(x))["features"]
                decoded_tiles.append(self._pixels(features))
            for index, (symbols, scales) in enumerate(picked):
                _encode_group(coders[index], symbols, scales)
                crcs[index] = zlib.crc32(symbols.astype("<i4").tobytes(), crcs[index])
            predicted_nats += sum(nats)
        streams = [coder.get_compressed().astype("<u4").tobytes() for coder in coders]
        header = Header(self.model_hash, height, width, image.shape[2], self.tile, batch,
                        [len(s) for s in streams], crcs)
        reconstruction = from_tiles(torch.cat(decoded_tiles), rows, cols, height, width)
        return Encoded(header.pack() + b"".join(streams), reconstruction,
                       predicted_nats / math.log(2), header.size, header.stream_bytes)

    # --- decompress --------------------------------------------------------------------------
    def decompress(self, data: bytes, groups: int | None = None, source: str = "the file"
                   ) -> tuple[np.ndarray, Header, int]:
        """The picture from the first `groups` streams (all when None; later groups at their
        prior means): ((H, W, C) uint8, the header, the groups decoded)."""
        header = read_header(data, source)
        self._check_header(header, source)
        available = complete_streams(header, len(data))
        wanted = self.n_groups if groups is None else groups
        if not 0 <= wanted <= self.n_groups:
            raise UserError(f"--groups={groups} is outside 0..{self.n_groups}, the latent groups "
                            f"of this model.")
        if available < wanted:
            raise UserError(
                f"{source} is truncated: it holds {available} of its {self.n_groups} groups' "
                f"streams; pass --groups={available} or less to decode that prefix, or fetch the "
                "whole file.")
        offsets = np.cumsum([header.size] + header.stream_bytes)
        decoders = [_coder().RangeDecoder(np.frombuffer(data[offsets[i]:offsets[i + 1]], "<u4")
                                          .astype(np.uint32))
                    for i in range(wanted)]
        crcs = [0] * wanted
        rows, cols = -(-header.height // self.tile), -(-header.width // self.tile)
        grid = None
        if self.whole:   # one piece, the padded image, at the finest group's grid
            grid = (rows * self.tile // self.patch, cols * self.tile // self.patch)
            rows = cols = 1
        decoded_tiles = []
        for start in range(0, rows * cols, header.batch):
            n = min(header.batch, rows * cols - start)

            def rule(index: int):
                def pick(prior_mean, prior_logstd, posterior_mean):
                    if index >= wanted:
                        return prior_mean
                    symbols = _decode_group(decoders[index], scale_indices(prior_logstd), source)
                    crcs[index] = zlib.crc32(symbols.astype("<i4").tobytes(), crcs[index])
                    return prior_mean + torch.from_numpy(symbols).to(prior_mean).view_as(prior_mean)
                return pick

            with torch.no_grad(), pinned_threads():
                features = self.network.decoder.run_with_rule(rule, n=n, grid=grid)["features"]
                decoded_tiles.append(self._pixels(features))
        for index in range(wanted):
            if crcs[index] != header.symbol_crcs[index]:
                raise UserError(
                    f"{source} does not decode: group {index + 1}'s symbols fail their checksum, "
                    "so the file is corrupted (or was written by a machine whose arithmetic "
                    "differs from this one's); compress the image again.")
        image = from_tiles(torch.cat(decoded_tiles), rows, cols, header.height, header.width)
        return image, header, wanted

    # --- helpers -----------------------------------------------------------------------------
    def _pixels(self, features: torch.Tensor) -> torch.Tensor:
        """The decoded tiles (or whole image) as uint8 (N, C, h, w), kept batch by batch."""
        mean = self.network.head.mean(self.network.head(features))
        return mean.add(1.0).mul(127.5).clamp(0, 255).round().to(torch.uint8)

    def channels_of(self, image: np.ndarray) -> np.ndarray:
        if image.shape[2] == self.channels:
            return image
        if image.shape[2] == 1:   # grayscale into an RGB model: the same value in every channel
            return np.repeat(image, 3, axis=2)
        raise UserError(f"The image is RGB but {self.source} codes grayscale images; convert it "
                        "to grayscale first.")

    def _check_header(self, header: Header, source: str) -> None:
        if header.model_hash != self.model_hash:
            raise UserError(f"{source} was made by another model (weights {header.model_hash.hex()}"
                            f", not {self.model_hash.hex()}); decompress it with the run that "
                            "compressed it.")
        if (header.tile != self.tile or len(header.stream_bytes) != self.n_groups
                or header.channels not in (1, 3) or (self.whole and header.batch != 1)):
            raise UserError(f"{source} describes tiles of {header.tile} pixels in "
                            f"{len(header.stream_bytes)} groups, which this model does not make; "
                            "the file is corrupted.")


@contextlib.contextmanager
def pinned_threads():
    """Run the network on CODER_THREADS threads (see the module docstring), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(CODER_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_header(data: bytes, source: str) -> Header:
    """The header of a .pvc file's bytes, checked before anything is allocated from it."""
    if data[:4] != MAGIC:
        raise UserError(f"{source} is not a progvae compressed image (.pvc); pass a file "
                        "written by `progvae compress`.")
    if len(data) < _FIXED.size:
        raise UserError(f"{source} is truncated inside its header; fetch the whole file.")
    magic, version, model_hash, height, width, channels, tile, batch, groups = \
        _FIXED.unpack_from(data)
    if version != FORMAT_VERSION:
        raise UserError(f"{source} is in .pvc format version {version}; this progvae reads "
                        f"version {FORMAT_VERSION}, so decompress it with the progvae that wrote "
                        "it.")
    size = _FIXED.size + groups * _GROUP.size + _CRC.size
    if len(data) < size:
        raise UserError(f"{source} is truncated inside its header; fetch the whole file.")
    (stored,) = _CRC.unpack_from(data, size - _CRC.size)
    if zlib.crc32(data[:size - _CRC.size]) != stored:
        raise UserError(f"{source}'s header fails its checksum: the file is corrupted.")
    if not (0 < height and 0 < width and height * width <= MAX_PIXELS
            and 0 < batch <= MAX_TILES_PER_BATCH and tile > 0):
        raise UserError(f"{source} describes a {width}x{height} image in batches of {batch}, "
                        "beyond what progvae writes; the file is corrupted.")
    pairs = [_GROUP.unpack_from(data, _FIXED.size + i * _GROUP.size) for i in range(groups)]
    return Header(model_hash, height, width, channels, tile, batch,
                  [n for n, _ in pairs], [crc for _, crc in pairs])


def complete_streams(header: Header, file_bytes: int) -> int:
    """How many streams, from the top group down, a file of `file_bytes` holds in full."""
    end = header.size
    for count, length in enumerate(header.stream_bytes):
        if length % 4:
            return count
        end += length
        if end > file_bytes:
            return count
    return len(header.stream_bytes)


def prefix_bytes(header: Header, groups: int) -> int:
    """The size of the file's prefix that decodes the first `groups` groups."""
    return header.size + sum(header.stream_bytes[:groups])


def read_pvc(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' does not exist; pass a .pvc file written by `progvae compress`.")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise UserError(f"'{path}' is larger than any .pvc progvae writes; it is not one.")
    return path.read_bytes()


# --- tiles ---------------------------------------------------------------------------------------
def to_tiles(image: np.ndarray, tile: int) -> tuple[torch.Tensor, int, int]:
    """(H, W, C) uint8 -> tiles (N, C, tile, tile) uint8 in raster order, padded by repeating
    the edge pixels, and the tile rows and columns."""
    height, width, channels = image.shape
    padded = np.pad(image, ((0, -height % tile), (0, -width % tile), (0, 0)), mode="edge")
    rows, cols = padded.shape[0] // tile, padded.shape[1] // tile
    tiles = padded.reshape(rows, tile, cols, tile, channels).transpose(0, 2, 4, 1, 3)
    tiles = torch.from_numpy(np.ascontiguousarray(tiles.reshape(-1, channels, tile, tile)))
    return tiles, rows, cols


def whole_image(image: np.ndarray, multiple: int) -> tuple[torch.Tensor, int, int]:
    """(H, W, C) uint8 -> (1, C, H', W') uint8, padded by repeating the edge pixels to sides
    that are multiples of `multiple`: one piece, so `from_tiles` crops it back."""
    height, width, _ = image.shape
    padded = np.pad(image, ((0, -height % multiple), (0, -width % multiple), (0, 0)), mode="edge")
    return torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))[None], 1, 1


def from_tiles(tiles: torch.Tensor, rows: int, cols: int, height: int, width: int) -> np.ndarray:
    """The inverse of `to_tiles` (or `whole_image`) on uint8 pieces, cropped to (height, width):
    (H, W, C) uint8."""
    _, channels, tile_height, tile_width = tiles.shape
    pixels = tiles.numpy()
    canvas = pixels.reshape(rows, cols, channels, tile_height, tile_width).transpose(0, 3, 1, 4, 2)
    return np.ascontiguousarray(
        canvas.reshape(rows * tile_height, cols * tile_width, channels)[:height, :width])


# --- entropy coding ------------------------------------------------------------------------------
def scale_indices(logstd: torch.Tensor) -> np.ndarray:
    """Each element's prior scale as an index into SCALES (nearest in log space), flattened."""
    index = torch.round((logstd.flatten().double() - _LOG_MIN) / _LOG_STEP)
    return index.clamp(0, SCALE_COUNT - 1).to(torch.int64).numpy()


def _encode_group(coder, symbols: np.ndarray, scales: np.ndarray) -> None:
    """Append one batch's symbols of a group: grouped by scale (stable order), then the escaped
    magnitudes."""
    order = np.argsort(scales, kind="stable")
    symbols, scales = symbols[order], scales[order]
    tails = TAILS[scales]
    for index, start, stop in _runs(scales):
        tail = TAILS[index]
        coder.encode((np.clip(symbols[start:stop], -tail - 1, tail + 1) + tail + 1)
                     .astype(np.int32), _gaussian(index))
    escaped = np.abs(symbols) > tails
    if escaped.any():
        magnitudes = np.abs(symbols[escaped]) - tails[escaped] - 1
        if magnitudes.max() >= 1 << ESCAPE_BITS:
            raise UserError("A latent lies further than 2^20 from its prior mean, so the model is "
                            "broken (diverged); it cannot code this image.")
        coder.encode(magnitudes.astype(np.int32), _escape())


def _decode_group(coder, scales: np.ndarray, source: str) -> np.ndarray:
    """The inverse of `_encode_group` for one batch: the symbols in their original order."""
    order = np.argsort(scales, kind="stable")
    ordered = scales[order]
    symbols = np.empty(len(scales), dtype=np.int64)
    try:
        for index, start, stop in _runs(ordered):
            symbols[start:stop] = coder.decode(_gaussian(index), stop - start) - TAILS[index] - 1
        tails = TAILS[ordered]
        escaped = np.abs(symbols) > tails
        if escaped.any():
            magnitudes = coder.decode(_escape(), int(escaped.sum())).astype(np.int64)
            symbols[escaped] = np.sign(symbols[escaped]) * (tails[escaped] + 1 + magnitudes)
    except (ValueError, RuntimeError, AssertionError):
        raise UserError(f"{source} does not decode: its streams are corrupted.") from None
    restored = np.empty_like(symbols)
    restored[order] = symbols
    return restored


def _runs(sorted_values: np.ndarray):
    """(value, start, stop) of each run of equal values in a sorted array."""
    if len(sorted_values) == 0:
        return
    starts = np.flatnonzero(np.diff(sorted_values)) + 1
    bounds = np.concatenate([[0], starts, [len(sorted_values)]])
    for start, stop in zip(bounds[:-1], bounds[1:]):
        yield int(sorted_values[start]), int(start), int(stop)


@functools.lru_cache(maxsize=None)
def _gaussian(index: int):
    """The symbol model of scale SCALES[index]: a categorical over -T-1..T+1 (symbol + T + 1),
    the Gaussian's mass on each unit box and, at the two escape ends, the tails beyond. A
    table decodes several times faster than constriction's QuantizedGaussian, which evaluates
    the Gaussian's CDF while searching; the probabilities are rounded to multiples of 2^-30
    so that machines whose erf differs in the last bit still build the same table."""
    from scipy.special import ndtr

    tail, scale = int(TAILS[index]), float(SCALES[index])
    edges = ndtr((np.arange(-tail - 1, tail + 2) + 0.5) / scale)   # upper edge of each box
    probabilities = np.diff(np.concatenate([[0.0], edges[:-1], [1.0]]))
    probabilities = np.maximum(np.round(probabilities * 2.0 ** 30), 1.0)
    return _coder_models().Categorical(probabilities / probabilities.sum(), perfect=False)


@functools.lru_cache(maxsize=None)
def _escape():
    return _coder_models().Uniform(1 << ESCAPE_BITS)


def _coder():
    import constriction
    return constriction.stream.queue


def _coder_models():
    import constriction
    return constriction.stream.model


def weights_hash(model: nn.Module) -> bytes:
    """The first HASH_BYTES of a SHA-256 over the model's weights (names, shapes, values), so a
    file names the model that can decode it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(value.shape)};".encode())
        digest.update(value.numpy().tobytes())
    return digest.digest()[:HASH_BYTES]
