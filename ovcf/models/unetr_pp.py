"""UNETR++ (Shaker et al. 2022, arXiv 2212.04497): a hierarchical 3D segmentation transformer built on efficient paired attention.

Global attention over every voxel of a CT patch is too costly, so UNETR++ pairs two cheap attentions on shared queries and keys:
a spatial one whose keys and values are squeezed from N tokens to `proj_size` tokens (cost linear in N), and a channel one
that attends across feature maps (cost independent of N). The squeeze is a Linear over the token axis, so each stage is built
for one token count: the network accepts exactly `img_size` patches, which is what sliding-window inference feeds it,
so it registers that rule (`fit_to_patch`): built for a patch size, `img_size` is that size.

Written from the paper; where the paper is silent we follow the authors' released configuration (shared E/F projection,
layer scale, learned position embeddings, BatchNorm inside the conv blocks, additive skips, a conv-only last decoder stage).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetResBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from torch import nn

from ovcf.errors import ConfigError
from ovcf.models.registry import register_model

STEM_STRIDE = 4  # the patch-embedding stem
STAGES = 4  # the stem, then three 2x downsamplings
TOTAL_STRIDE = STEM_STRIDE * 2 ** (STAGES - 1)  # 32: every axis of img_size must be a multiple of it


class EPA(nn.Module):
    """Efficient paired attention: spatial and channel attention that share their queries and keys.

    Sharing Q/K halves the projection cost and ties the two views of the same tokens together. Channel attention uses
    L2-normalised Q/K with a learned per-head temperature (its logits are sums over all N tokens, which a fixed 1/sqrt(d)
    cannot tame); spatial attention is the paper's scaled dot product against the `proj_size` projected keys.

    Args:
        hidden_size: channels C of the tokens; the two branches each return C/2 so their concatenation is C again.
        num_tokens: N, the token count of the stage; fixes the shape of the token projection.
        proj_size: P, how many tokens keys and values are squeezed to; P << N is what makes spatial attention cheap.
        num_heads: attention heads; must divide `hidden_size`.
        dropout: dropout on both attention maps.
    """

    def __init__(self, hidden_size: int, num_tokens: int, proj_size: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkvv = nn.Linear(hidden_size, 4 * hidden_size, bias=False)  # shared Q, shared K, V_channel, V_spatial
        self.token_proj = nn.Linear(num_tokens, proj_size)  # E = F: one projection for keys and values, as in the paper
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.drop_channel = nn.Dropout(dropout)
        self.drop_spatial = nn.Dropout(dropout)
        self.out_spatial = nn.Linear(hidden_size, hidden_size // 2)
        self.out_channel = nn.Linear(hidden_size, hidden_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.num_heads
        q, k, v_channel, v_spatial = self.qkvv(x).view(b, n, 4, self.num_heads, d).permute(2, 0, 3, 4, 1)  # each (B, h, d, N)

        k_proj, v_proj = self.token_proj(k), self.token_proj(v_spatial)  # (B, h, d, P)
        attn = (q.transpose(-2, -1) @ k_proj) / math.sqrt(d)  # (B, h, N, P)
        x_spatial = self.drop_spatial(attn.softmax(-1)) @ v_proj.transpose(-2, -1)  # (B, h, N, d)

        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature  # (B, h, d, d)
        x_channel = self.drop_channel(attn.softmax(-1)) @ v_channel  # (B, h, d, N)

        x_spatial = x_spatial.permute(0, 2, 1, 3).reshape(b, n, c)
        x_channel = x_channel.permute(0, 3, 1, 2).reshape(b, n, c)
        return torch.cat([self.out_spatial(x_spatial), self.out_channel(x_channel)], dim=-1)


class EPABlock(nn.Module):
    """One UNETR++ transformer block: EPA on tokens, then a 3x3x3 residual conv block on the voxel grid.

    Attention is global but blind to local texture; the conv block restores it. Layer scale starts the attention branch
    near zero so a fresh network trains like a plain residual CNN and lets attention grow in.
    """

    def __init__(self, hidden_size: int, num_tokens: int, proj_size: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_size))
        self.norm = nn.LayerNorm(hidden_size)
        self.epa = EPA(hidden_size, num_tokens, proj_size, num_heads, dropout)
        self.gamma = nn.Parameter(torch.full((hidden_size,), 1e-6))
        self.conv = UnetResBlock(3, hidden_size, hidden_size, kernel_size=3, stride=1, norm_name="batch")
        self.mix = nn.Sequential(nn.Dropout3d(dropout), nn.Conv3d(hidden_size, hidden_size, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *grid = x.shape
        tokens = x.flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, C)
        tokens = tokens + self.gamma * self.epa(self.norm(tokens))
        x = tokens.transpose(1, 2).reshape(b, c, *grid)
        return x + self.mix(self.conv(x))


class UpStage(nn.Module):
    """Decoder stage: transposed-conv upsampling, skip added (not concatenated, which keeps channels and cost flat), refine."""

    def __init__(self, in_channels: int, out_channels: int, factor: int, refine: nn.Module):
        super().__init__()
        self.up = get_conv_layer(
            3, in_channels, out_channels, kernel_size=factor, stride=factor, conv_only=True, is_transposed=True
        )
        self.refine = refine

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.refine(self.up(x) + skip)


def _epa_stage(channels: int, num_tokens: int, proj_size: int, num_heads: int, depth: int, dropout: float) -> nn.Sequential:
    # Projecting to more tokens than the stage has adds parameters and no information.
    p = min(proj_size, num_tokens)
    return nn.Sequential(*[EPABlock(channels, num_tokens, p, num_heads, dropout) for _ in range(depth)])


def _downsample(in_channels: int, out_channels: int, factor: int) -> nn.Sequential:
    # Non-overlapping strided conv, as a patch embedding; GroupNorm over channel pairs does not depend on the batch size.
    conv = get_conv_layer(3, in_channels, out_channels, kernel_size=factor, stride=factor, conv_only=True)
    return nn.Sequential(conv, nn.GroupNorm(out_channels // 2, out_channels))


def _check_img_size(img_size: Sequence[int]) -> tuple[int, int, int]:
    try:
        size = tuple(int(s) for s in img_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 3 or min(size) < 1 or list(size) != list(img_size):
        raise ConfigError(f"img_size {img_size} must be three positive ints (the patch size), e.g. (64, 64, 64)")
    for axis, s in enumerate(size, start=1):
        if s % TOTAL_STRIDE:
            near = tuple(max(TOTAL_STRIDE, round(v / TOTAL_STRIDE) * TOTAL_STRIDE) for v in size)
            raise ConfigError(
                f"img_size {size} is not divisible by {TOTAL_STRIDE} along axis {axis} ({s}): UNETR++ downsamples 4x then 2x "
                f"three times and sizes its attention for that token count; use multiples of {TOTAL_STRIDE}, e.g. {near}"
            )
    return size


class UNETRPP(nn.Module):
    """UNETR++ for 3D segmentation, MONAI-style arguments.

    Encoder: a 4x patch-embedding stem and three 2x downsamplings, each followed by `depths[i]` EPA blocks with
    2F, 4F, 8F, 16F channels (F = `feature_size`). Decoder: three upsampling stages with additive encoder skips and EPA
    blocks, then a 4x upsampling stage that adds a full-resolution conv stem of the input (fine boundaries that
    4x-downsampled tokens cannot carry) and refines with a conv block; a 1x1x1 head gives `out_channels` logits.

    Args:
        in_channels: input channels (CT: 1).
        out_channels: classes, background included; the network returns logits.
        img_size: the patch size; every axis a multiple of 32. Only this size is accepted (see module docstring).
        spatial_dims: must be 3; kept so MONAI-style configs pass through unchanged.
        feature_size: F; 16 gives the paper's 32-64-128-256 channel pyramid.
        depths: EPA blocks per encoder stage (the paper uses 3 each); the decoder mirrors them.
        num_heads: attention heads; must divide 2F.
        proj_size: tokens that spatial-attention keys/values are projected to (capped at each stage's token count).
        dropout: attention and block dropout (the paper trains with 0.1).
        deep_supervision: in training mode also return logits at 1/4 and 1/8 resolution, as a list
            [full, 1/4, 1/8] that `monai.losses.DeepSupervisionLoss` takes; eval mode always returns one tensor.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: Sequence[int],
        spatial_dims: int = 3,
        feature_size: int = 16,
        depths: Sequence[int] = (3, 3, 3, 3),
        num_heads: int = 4,
        proj_size: int = 64,
        dropout: float = 0.0,
        deep_supervision: bool = False,
    ):
        super().__init__()
        if spatial_dims != 3:
            raise ConfigError(f"spatial_dims={spatial_dims}: UNETR++ is 3D only; use spatial_dims=3")
        self.img_size = _check_img_size(img_size)
        if len(depths) != STAGES or min(depths) < 1:
            raise ConfigError(f"depths {tuple(depths)} must give {STAGES} stages of at least one block, e.g. (2, 2, 2, 2)")
        if feature_size < 1 or (2 * feature_size) % num_heads:
            raise ConfigError(f"num_heads={num_heads} must divide 2 * feature_size = {2 * feature_size}, e.g. num_heads=4")
        if proj_size < 1 or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"proj_size={proj_size} must be >= 1 and dropout={dropout} in [0, 1)")
        self.deep_supervision = deep_supervision

        dims = [feature_size * 2 ** (i + 1) for i in range(STAGES)]
        grids = [tuple(s // (STEM_STRIDE * 2**i) for s in self.img_size) for i in range(STAGES)]
        tokens = [math.prod(g) for g in grids]
        self._deepest = tokens[-1]

        self.downsample = nn.ModuleList(
            [_downsample(in_channels, dims[0], STEM_STRIDE)] + [_downsample(dims[i], dims[i + 1], 2) for i in range(STAGES - 1)]
        )
        self.encoder = nn.ModuleList(
            [_epa_stage(dims[i], tokens[i], proj_size, num_heads, depths[i], dropout) for i in range(STAGES)]
        )
        self.decoder = nn.ModuleList(
            [
                UpStage(dims[i + 1], dims[i], 2, _epa_stage(dims[i], tokens[i], proj_size, num_heads, depths[i], dropout))
                for i in reversed(range(STAGES - 1))
            ]
        )
        self.stem = UnetResBlock(3, in_channels, feature_size, kernel_size=3, stride=1, norm_name="instance")
        last = UnetResBlock(3, feature_size, feature_size, kernel_size=3, stride=1, norm_name="instance")
        self.last_up = UpStage(dims[0], feature_size, STEM_STRIDE, last)
        self.head = UnetOutBlock(3, feature_size, out_channels)
        if deep_supervision:
            self.ds_heads = nn.ModuleList([UnetOutBlock(3, dims[0], out_channels), UnetOutBlock(3, dims[1], out_channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if tuple(x.shape[2:]) != self.img_size:
            raise ConfigError(
                f"UNETR++ was built for img_size {self.img_size} but got an input of spatial size {tuple(x.shape[2:])}: "
                "its attention is sized for one token count; feed img_size patches "
                "(e.g. sliding-window inference with roi_size=img_size)"
            )
        if self.training and x.shape[0] * self._deepest == 1:
            raise ConfigError(
                f"img_size {self.img_size} leaves one voxel at the deepest stage, so BatchNorm cannot train on batch size 1: "
                "use batch size >= 2 or a larger img_size"
            )
        skips = []
        h = x
        for down, stage in zip(self.downsample, self.encoder):
            h = stage(down(h))
            skips.append(h)
        decoded = []
        for up, skip in zip(self.decoder, reversed(skips[:-1])):
            h = up(h, skip)
            decoded.append(h)  # 1/16, 1/8, 1/4 resolution
        logits = self.head(self.last_up(h, self.stem(x)))
        if self.deep_supervision and self.training:
            return [logits, self.ds_heads[0](decoded[2]), self.ds_heads[1](decoded[1])]
        return logits


def fit_to_patch(kwargs: dict, patch_size: list[int]) -> dict:
    """UNETR++'s input-size rule (see `ovcf.models.registry.register_model`): built for `img_size` alone, it must be
    built for the patch (training patches and sliding windows alike), so `img_size` defaults to `patch_size` and must
    equal it, with every axis a multiple of 32."""
    given = kwargs.get("img_size", patch_size)
    try:
        same = [int(s) for s in given] == list(patch_size)
    except (TypeError, ValueError):
        same = False
    if not same:
        raise ConfigError(
            f"unetr_pp img_size {given} differs from patch_size {patch_size}: UNETR++ only accepts img_size inputs, "
            "and sliding windows are patch_size; leave img_size unset"
        )
    try:
        size = _check_img_size(patch_size)
    except ConfigError as err:
        raise ConfigError(f"patch_size {patch_size} does not suit UNETR++: {err}") from err
    return {**kwargs, "img_size": list(size)}


@register_model("unetr_pp", task="segmentation", input_size=fit_to_patch)
def unetr_pp(
    in_channels: int = 1,
    out_channels: int = 2,
    img_size: Sequence[int] = (64, 64, 64),
    spatial_dims: int = 3,
    feature_size: int = 16,
    depths: Sequence[int] = (2, 2, 2, 2),
    num_heads: int = 4,
    proj_size: int = 32,
    dropout: float = 0.0,
    **kwargs,
) -> nn.Module:
    """UNETR++ sized to train on a CPU or a small GPU: the paper's widths and heads, two blocks per stage, 64^3 patches.

    For the paper's BraTS setting use depths=(3, 3, 3, 3), proj_size=64, dropout=0.1, img_size=(128, 128, 128).
    `kwargs` takes `deep_supervision`; anything else is a config typo and is reported as such.
    """
    unknown = set(kwargs) - {"deep_supervision"}
    if unknown:
        raise ConfigError(f"unetr_pp got unknown argument(s) {sorted(unknown)}; it also takes deep_supervision")
    return UNETRPP(
        in_channels=in_channels,
        out_channels=out_channels,
        img_size=img_size,
        spatial_dims=spatial_dims,
        feature_size=feature_size,
        depths=tuple(depths),
        num_heads=num_heads,
        proj_size=proj_size,
        dropout=dropout,
        **kwargs,
    )
