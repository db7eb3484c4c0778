"""Per-sample symmetries of the square and centred zooms of image/mask batches, as index gathers (torch, any device).

The batch augmentation (``dlseg.augment.BatchAugment``) decides what to do to each sample; this module moves the
pixels: each output pixel reads one source pixel (symmetries, and the mask's nearest-neighbour zoom) or a bilinear
blend (the image's zoom), so image and mask stay aligned exactly. Free-form warps (small rotations, elastic
deformations) read image and mask at the same positions with :func:`warp_samples`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def zoom_positions(zoom: torch.Tensor, size: int) -> torch.Tensor:
    """float32 (N, size) source coordinates along one axis of a zoom by ``zoom`` about the centre.

    Pixel centres as ``affine_grid``/``grid_sample`` with ``align_corners=False``; clamped to the edge pixels
    (``padding_mode="border"``, cv2.BORDER_REPLICATE).
    """
    i = torch.arange(size, dtype=torch.float32, device=zoom.device)
    half = size / 2
    return ((i + (0.5 - half)) / zoom.float().view(-1, 1) + (half - 0.5)).clamp_(0, size - 1)


def flipped(flag: torch.Tensor, size: int) -> torch.Tensor:
    """int32 (N, size) positions ``0..size-1``, reversed where ``flag``."""
    i = torch.arange(size, dtype=torch.int32, device=flag.device)
    return torch.where(flag.view(-1, 1), size - 1 - i, i)


def source_index(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, out: torch.Tensor,
                 work: torch.Tensor) -> torch.Tensor:
    """int64 flat (N, H·W) source pixel of each output pixel, into ``out``: ``x[rows[i], cols[j]]``, or
    ``x[cols[j], rows[i]]`` where ``t`` (square slices); ``rows`` (N,H) and ``cols`` (N,W) integer.

    The sum is taken in the int32 buffer ``work`` (N,H,W): int64's broadcast add is slower on a CPU.
    """
    width = cols.shape[1]
    tt = t.view(-1, 1)
    row_term = torch.where(tt, rows, rows * width).to(torch.int32)
    col_term = torch.where(tt, cols * width, cols).to(torch.int32)
    torch.add(row_term.unsqueeze(2), col_term.unsqueeze(1), out=work)
    return out.copy_(work.view_as(out))


def _compose_dihedral_rules(hflip: torch.Tensor, vflip: torch.Tensor, transpose: torch.Tensor, rotate90: torch.Tensor,
                            quarter_turns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (transpose, flip rows, flip columns) equal to hflip → vflip → transpose → rot90^k.

    Normal form x ↦ Fc^c Fr^r T^t x. Rules: Fc·form: c ^= 1; Fr·form: r ^= 1; T·form: t ^= 1 and swap (r, c)
    (T Fc = Fr T); one quarter turn R = Fr T; a half turn R² = Fr Fc commutes with everything.
    """
    t = transpose.clone()
    r = vflip.clone()
    c = hflip.clone()
    r, c = torch.where(t, c, r), torch.where(t, r, c)
    k = torch.where(rotate90, quarter_turns, torch.zeros_like(quarter_turns))
    odd, half = (k % 2) == 1, k >= 2
    t = t ^ odd
    r, c = torch.where(odd, c, r), torch.where(odd, r, c)
    r = r ^ odd ^ half
    c = c ^ half
    return t, r, c


def _dihedral_table() -> torch.Tensor:
    """(32, 3) bool: (t, r, c) for every combination ``h + 2v + 4t + 8k`` of the draws (k = 0 when not rotated)."""
    i = torch.arange(32)
    t, r, c = _compose_dihedral_rules((i & 1) > 0, (i & 2) > 0, (i & 4) > 0, torch.ones(32, dtype=torch.bool),
                                      i >> 3)
    return torch.stack([t, r, c], dim=1)


_DIHEDRAL = {"cpu": _dihedral_table()}   # by device


def compose_dihedral(hflip: torch.Tensor, vflip: torch.Tensor, transpose: torch.Tensor, rotate90: torch.Tensor,
                     quarter_turns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (transpose, flip rows, flip columns) equal to hflip → vflip → transpose → rot90^k (per-sample
    bool draws; ``quarter_turns`` k in 0..3 counts where ``rotate90``).

    A lookup in the 32-entry table the composition rules (:func:`_compose_dihedral_rules`) give: three tensor
    ops per batch instead of thirty.
    """
    k = torch.where(rotate90, quarter_turns, 0)
    code = hflip.long() + 2 * vflip.long() + 4 * transpose.long() + 8 * k
    key = str(code.device)
    if key not in _DIHEDRAL:
        _DIHEDRAL[key] = _DIHEDRAL["cpu"].to(code.device)
    return _DIHEDRAL[key][code].unbind(1)


class Workspace:
    """Buffers reused between batches: on a CPU, fresh multi-MB tensors cost more (page faults) than the work."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The buffer ``name`` with this shape, dtype and device (made on first use or when they change)."""
        buf = self.buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = self.buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf


def gather_pixels(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``flat`` (N,C,P) read at ``index`` (N,Q), the same pixels in every channel → (N,C,Q)."""
    return flat.gather(2, index.unsqueeze(1).expand(-1, flat.shape[1], -1))


def zoom_bilinear(image: torch.Tensor, idx: torch.Tensor, py: torch.Tensor, px: torch.Tensor,
                  ws: Workspace) -> torch.Tensor:
    """Samples ``idx`` of ``image`` (N,C,H,W) sampled bilinearly at rows ``py`` (M,H) × columns ``px`` (M,W),
    separably, in float32 → a (M,C,H,W) workspace view.

    Rows: two whole-row copies (``index_select``) and a blend; columns: two gathers along the rows and a blend.
    """
    n, ch, height, width = image.shape
    m = idx.numel()
    bufs = [ws.get(f"zoom{i}", tuple(image.shape), torch.float32, image.device)[:m] for i in range(3)]
    sub, top, bottom = bufs
    if image.dtype == torch.float32:
        torch.index_select(image, 0, idx, out=sub)
    else:
        sub.copy_(image.index_select(0, idx))
    y0, x0 = py.floor(), px.floor()
    wy, wx = (py - y0).view(m, 1, height, 1), (px - x0).view(m, 1, 1, width)
    y0, x0 = y0.long(), x0.long()
    y1, x1 = (y0 + 1).clamp_(max=height - 1), (x0 + 1).clamp_(max=width - 1)
    plane = (torch.arange(m * ch, device=image.device) * height).view(m, ch, 1)
    rows = sub.view(-1, width)
    torch.index_select(rows, 0, (plane + y0.unsqueeze(1)).flatten(), out=top.view(-1, width))
    torch.index_select(rows, 0, (plane + y1.unsqueeze(1)).flatten(), out=bottom.view(-1, width))
    torch.lerp(top, bottom, wy, out=top)
    shape = (m, ch, height, width)
    torch.gather(top, 3, x0.view(m, 1, 1, width).expand(shape), out=sub)
    torch.gather(top, 3, x1.view(m, 1, 1, width).expand(shape), out=bottom)
    return torch.lerp(sub, bottom, wx, out=sub)


def resample(image: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, r: torch.Tensor, c: torch.Tensor,
             flag: torch.Tensor, zoom: torch.Tensor, ws: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom about the centre where ``flag`` (mask nearest, image bilinear), then the symmetry ``Fc^c Fr^r T^t``.

    The zoom commutes with the symmetries, so this equals the article's order up to how a sampling position that
    falls exactly halfway between pixels rounds. Image and mask read the same float32 positions (a bf16/fp16
    position would be off by up to a pixel at 256 px): the mask the nearest pixel (ties to even, as
    ``grid_sample``'s nearest), the image the bilinear blend in float32. The mask's zoom and symmetry are one
    gather; the image's symmetry is one gather after a separable zoom of the zoomed samples. Symmetries alone are
    exact permutations. One host sync (which samples are zoomed). Returns fresh tensors; intermediates live in
    ``ws``.
    """
    ws = Workspace() if ws is None else ws
    n, ch, height, width = image.shape
    dev = image.device
    shape = (n, height * width)
    a, b = flipped(r, height), flipped(c, width)   # positions in T^t(zoomed x) read by each output row / column
    idx = flag.nonzero().squeeze(1)
    source = image
    near_rows, near_cols = a, b
    if idx.numel() > 0:
        py, px = zoom_positions(zoom, height), zoom_positions(zoom, width)
        near_rows = torch.where(flag.view(-1, 1), py.round().to(torch.int32).gather(1, a.long()), a)
        near_cols = torch.where(flag.view(-1, 1), px.round().to(torch.int32).gather(1, b.long()), b)
        source = ws.get("staging", tuple(image.shape), image.dtype, dev).copy_(image)
        source.index_copy_(0, idx, zoom_bilinear(image, idx, py[idx], px[idx], ws).to(image.dtype))
    work = ws.get("sum", (n, height, width), torch.int32, dev)
    index = source_index(t, near_rows, near_cols, ws.get("index", shape, torch.int64, dev), work)
    out_mask = mask.reshape(n, -1).gather(1, index).view_as(mask)
    index = source_index(t, a, b, index, work)
    return gather_pixels(source.reshape(n, ch, -1), index).view_as(image), out_mask


def warp_samples(image: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor, x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``idx`` of (N,C,H,W) image and (N,H,W) mask read at pixel positions ``x``, ``y`` (M,H,W), pixel
    centres at integers: image bilinear, mask nearest, edges replicated (``grid_sample``, ``align_corners=True``,
    ``padding_mode="border"``, which is cv2's BORDER_REPLICATE); the other samples unchanged. Fresh tensors."""
    h, w = image.shape[-2:]
    # align_corners=True maps -1 / +1 to the centres of the first / last pixels
    grid = torch.stack([x * (2 / max(w - 1, 1)) - 1, y * (2 / max(h - 1, 1)) - 1], dim=-1).to(image.device)
    warped = F.grid_sample(image[idx].float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    labels = F.grid_sample(mask[idx].unsqueeze(1).float(), grid, mode="nearest", padding_mode="border",
                           align_corners=True)
    image, mask = image.clone(), mask.clone()
    image[idx] = warped.to(image.dtype)
    mask[idx] = labels.squeeze(1).round().to(mask.dtype)
    return image, mask
