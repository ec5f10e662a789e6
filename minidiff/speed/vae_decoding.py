"""Decoding with the VAE around its plain `decode`: in overlapping tiles (bounded memory), and redone in float32
when a float16 decode overflows (the "black image" bug). `vae_decode` does both; the Pipeline decodes with it."""

import warnings

import torch

from minidiff.errors import MinidiffError
from minidiff.vae import check_latent


def vae_decode(vae, latent: torch.Tensor, tile_size: int | None = None, tile_overlap: int | None = None):
    """vae.decode(latent) (z unscaled -> image in [-1, 1]), in tiles if tile_size is given, float16 overflow redone.

    tile_size: decode overlapping tiles of this many latent pixels (bounded memory for large images), which
    overlap by tile_overlap latent pixels (default: a quarter of the tile).
    A float16 decode that overflows (NaN/inf anywhere: one device sync, after the whole decode) is redone after
    `decode_in_float32(vae)`, with a warning: the VAE's decoding half stays in float32 from then on (later decodes
    skip the float16 pass that overflowed). The redone image must be finite, else MinidiffError.
    """
    check_latent(latent, vae.config.latent_channels)
    if tile_size is not None:
        tile_overlap = tile_size // 4 if tile_overlap is None and isinstance(tile_size, int) else tile_overlap
        check_tiles(tile_size, tile_overlap)
    image = decode_maybe_tiled(vae, latent, tile_size, tile_overlap)
    if image.dtype != torch.float16 or torch.isfinite(image).all():
        return image
    warnings.warn("the float16 VAE decode overflowed (NaN/inf); the VAE decodes in float32 from now on "
                  "(minidiff.speed.decode_in_float32)", stacklevel=2)
    decode_in_float32(vae)
    image = decode_maybe_tiled(vae, latent, tile_size, tile_overlap)
    if not torch.isfinite(image).all():
        raise MinidiffError(f"the VAE decode gives NaN/inf in float32 too (latent max |z| "
                            f"{latent.float().abs().max().item():.3g}): the latents are broken (were they made "
                            "for this VAE, and scaled back with vae.scaling_factor?) or the VAE's weights are")
    return image


def decode_in_float32(vae) -> None:
    """Convert the VAE's decoding half (post_quant_conv and decoder) to float32, in place; the encoder stays."""
    vae.post_quant_conv.float()
    vae.decoder.float()


def decode_maybe_tiled(vae, latent, tile_size, tile_overlap):
    if tile_size is None or max(latent.shape[-2:]) <= tile_size:
        return vae.decode(latent)
    return decode_tiled(vae.decode, latent, tile_size, tile_overlap, vae.downsample_factor)


def check_tiles(tile_size, tile_overlap) -> None:
    """MinidiffError unless tile_size >= 8 latent pixels and 0 <= tile_overlap < tile_size."""
    valid = lambda n: isinstance(n, int) and not isinstance(n, bool)
    if not (valid(tile_size) and valid(tile_overlap)) or tile_size < 8 or not 0 <= tile_overlap < tile_size:
        raise MinidiffError(f"tile_size must be an integer of at least 8 latent pixels (64 px) and tile_overlap an "
                            f"integer from 0 to tile_size - 1, got tile_size={tile_size!r}, "
                            f"tile_overlap={tile_overlap!r}")


def tile_starts(size: int, tile: int, overlap: int) -> list:
    """Start offsets of tiles of length `tile` covering 0..size, neighbours overlapping by at least `overlap`."""
    if tile >= size:
        return [0]
    starts = list(range(0, size - tile + 1, tile - overlap))
    if starts[-1] + tile < size:
        starts.append(size - tile)  # the last tile ends at the border (overlapping its neighbour more)
    return starts


def blend_ramp(length: int, overlap: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """A 1-D blending weight: rising linearly over `overlap` pixels at each side that meets a neighbour, else 1."""
    weight = torch.ones(length)
    ramp = (torch.arange(overlap) + 0.5) / overlap
    if ramp_start:
        weight[:overlap] = ramp
    if ramp_end:
        weight[length - overlap:] = ramp.flip(0)
    return weight


def decode_tiled(decode, latent, tile_size: int, tile_overlap: int, scale: int) -> torch.Tensor:
    """Decode overlapping latent tiles and blend them with linear ramps in the overlaps (a weighted average).

    Each tile's GroupNorm statistics and attention see only that tile, so the result is close to, not equal
    to, the untiled decode; the overlap hides the seams. The image has the dtype `decode` returns.
    """
    batch, _, height, width = latent.shape
    rows, cols = tile_starts(height, tile_size, tile_overlap), tile_starts(width, tile_size, tile_overlap)
    image = weights = dtype = None
    for top in rows:
        for left in cols:
            tile = decode(latent[:, :, top : top + tile_size, left : left + tile_size])
            dtype, tile = tile.dtype, tile.float()
            tile_h, tile_w = tile.shape[-2:]
            overlap = tile_overlap * scale
            weight = (blend_ramp(tile_h, overlap, top > 0, top != rows[-1])[:, None]
                      * blend_ramp(tile_w, overlap, left > 0, left != cols[-1])[None, :]).to(tile.device)
            if image is None:
                image = tile.new_zeros(batch, tile.shape[1], height * scale, width * scale)
                weights = tile.new_zeros(height * scale, width * scale)
            y, x = top * scale, left * scale
            image[:, :, y : y + tile_h, x : x + tile_w] += tile * weight
            weights[y : y + tile_h, x : x + tile_w] += weight
    return (image / weights).to(dtype)
