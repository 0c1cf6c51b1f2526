"""U-Mamba (Ma, Li, Wang 2024, arXiv 2401.04722): an nnU-Net-like residual U-Net with Mamba state-space layers.

Convolutions see only a local neighbourhood; a selective state-space model (Mamba's S6) reads the whole flattened
volume as one token sequence in linear time, which is how U-Mamba adds long-range context to an nnU-Net.

The scan runs on `mamba_ssm`'s CUDA kernel when it is installed and the tensors are on a GPU; everywhere else a
pure-PyTorch scan (autograd-friendly) gives the same numbers, so the model trains and tests without that package.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetResBlock, UnetUpBlock
from monai.networks.nets import DynUNet
from torch import nn

from ovcf.errors import ConfigError
from ovcf.models.registry import check_divisible, register_model

try:  # the fused kernel is optional: it needs CUDA and a compiled extension
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _kernel_scan
except (ImportError, OSError):
    _kernel_scan = None

VARIANTS = ("bot", "enc")
FEATURES = (16, 32, 64, 128, 256)
_NORM = "instance"
_ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


def _loop_scan(log_a: torch.Tensor, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence step by step along `dim`, vectorised over everything else; also returns the last state.

    `unbind` (not x[t]) and the separately returned last state keep the backward free of full-size zero tensors.
    """
    h, states = torch.zeros_like(x.select(dim, 0)), []
    for a_t, x_t in zip(log_a.exp().unbind(dim), x.unbind(dim)):
        h = torch.addcmul(x_t, a_t, h)
        states.append(h)
    return torch.stack(states, dim), h


def _linear_scan(log_a: torch.Tensor, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """All states of h_t = exp(log_a_t) * h_{t-1} + x_t (h_{-1} = 0) along dim 0.

    A Python loop over the whole sequence costs one interpreter round trip per token. Instead the sequence is cut
    into chunks: one loop of `chunk` steps scans every chunk at once from a zero state, the chunks' end states are
    chained by the same scan one level up (recursively, so the loop count stays ~chunk * log_chunk(L)), and each
    chunk then adds its incoming state decayed by the cumulative log-decay inside the chunk. Only sums of log-decays
    are exponentiated (all <= 0), so nothing overflows however strong the decay.
    """
    length = x.shape[0]
    if length <= chunk:
        return _loop_scan(log_a, x, 0)[0]
    n_chunks = math.ceil(length / chunk)
    pad = n_chunks * chunk - length
    if pad:  # padded steps neither decay nor add anything, and are cut off below
        log_a = torch.cat([log_a, log_a.new_zeros(pad, *log_a.shape[1:])])
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    log_a = log_a.view(n_chunks, chunk, *log_a.shape[1:])
    x = x.view(n_chunks, chunk, *x.shape[1:])
    local, local_end = _loop_scan(log_a, x, 1)  # every chunk from a zero state, all chunks at once
    ends = _linear_scan(log_a.sum(1), local_end, chunk)  # true state at the end of each chunk
    incoming = torch.cat([torch.zeros_like(ends[:1]), ends[:-1]])
    states = local + log_a.cumsum(1).exp() * incoming[:, None]
    return states.view(n_chunks * chunk, *states.shape[2:])[:length]


def _prepare_delta(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(delta.dtype)
    return F.softplus(delta) if delta_softplus else delta


def _finish(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Mamba's selective scan (S6), laid out as `mamba_ssm`'s `selective_scan_fn` so either can serve the layer.

    Args:
        u: Input, (batch, d_inner, L).
        delta: Step sizes before `delta_bias` and softplus, (batch, d_inner, L).
        A: Continuous-time state matrix (diagonal per channel, negative), (d_inner, d_state).
        B: Input-dependent input matrix, (batch, d_state, L).
        C: Input-dependent output matrix, (batch, d_state, L).
        D: Skip weight per channel, (d_inner,).
        z: Gate, (batch, d_inner, L); the output is multiplied by silu(z).
        delta_bias: Added to delta per channel before softplus, (d_inner,).
        delta_softplus: Keeps step sizes positive, as Mamba does.
        chunk_size: Chunk length of the pure-PyTorch scan; trades loop count against padding. Ignored by the kernel.

    Returns:
        y, (batch, d_inner, L), in u's dtype. Low-precision inputs are scanned in float32, as the kernel does.
    """
    if _kernel_scan is not None and u.is_cuda:
        return _kernel_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u_, delta_, A_, B_, C_ = (t.to(dtype) for t in (u, delta, A, B, C))
    delta_ = _prepare_delta(delta_, delta_bias, delta_softplus)
    length = u.shape[2]
    # zero steps (no decay, no input) at the end, so that the big (L, ..., d_state) tensors need no padding later
    pad = -length % chunk_size if length > chunk_size else 0
    # time first, (L, batch, d_inner[, d_state]): the scan slices along the leading dim
    delta_t, du_t, B_t = (F.pad(t, (0, pad)).permute(2, 0, 1).contiguous() for t in (delta_, delta_ * u_, B_))
    states = _linear_scan(delta_t[..., None] * A_, du_t[..., None] * B_t[:, :, None], chunk_size)[:length]
    y = (states * C_.permute(2, 0, 1)[:, :, None]).sum(-1).permute(1, 2, 0)  # not einsum: bmm loops over L on CPU
    return _finish(y, u_, D, z).to(u.dtype)


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
) -> torch.Tensor:
    """The recurrence of the Mamba paper one step at a time: slow, but obviously right; the tests' yardstick."""
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for u_t, delta_t, B_t, C_t in zip(u.unbind(2), delta.unbind(2), B.unbind(2), C.unbind(2)):
        a_bar = torch.exp(delta_t[..., None] * A)
        h = a_bar * h + delta_t[..., None] * B_t[:, None] * u_t[..., None]
        ys.append((h * C_t[:, None]).sum(-1))
    return _finish(torch.stack(ys, dim=-1), u, D, z)


class MambaLayer(nn.Module):
    """A pre-norm residual Mamba block over all voxels of a feature map, read as one sequence of tokens.

    The sequence order is the tensor's memory order (last spatial axis fastest); Mamba is causal, so what a voxel
    sees depends on that order, as in U-Mamba.

    Args:
        dim: Channels of the feature map (the token width).
        d_state: State size per channel; 16 as in Mamba.
        d_conv: Width of the causal depthwise conv that mixes neighbouring tokens before the scan.
        expand: Inner width over `dim`.
        dt_min: Smallest initial step size; with `dt_max` it spreads the channels' memory lengths.
        dt_max: Largest initial step size.
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_min: float = 1e-3, dt_max: float = 0.1):
        super().__init__()
        d_inner, self.d_state = expand * dim, d_state
        self.dt_rank = math.ceil(dim / 16)
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        # step sizes start log-uniform in [dt_min, dt_max], so channels begin with short and long memories
        nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        # S4D-real: A = -(1..d_state) per channel; stored as a log so that A stays negative (stable) while it trains
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))

    def mamba(self, tokens: torch.Tensor) -> torch.Tensor:
        """The Mamba block on (batch, L, dim) tokens."""
        length = tokens.shape[1]
        x, z = self.in_proj(tokens).transpose(1, 2).chunk(2, dim=1)  # (batch, d_inner, L) each
        x = F.silu(self.conv1d(x)[..., :length])  # cut the right padding: token t sees only tokens <= t
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.T).transpose(1, 2)  # bias goes in as delta_bias, before softplus
        y = selective_scan(
            x,
            delta,
            -torch.exp(self.A_log.float()),
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        return self.out_proj(y.transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (B, C, *spatial) -> (B, L, C)
        tokens = tokens + self.mamba(self.norm(tokens))
        return tokens.transpose(1, 2).reshape(x.shape)


class UMamba(nn.Module):
    """U-Mamba: nnU-Net's residual encoder-decoder with Mamba layers for long-range context.

    "bot" (U-Mamba_Bot) puts one Mamba layer at the bottleneck, where the sequence is short and cheap. "enc"
    (U-Mamba_Enc) adds one after every encoder stage, which sees context at full resolution but scans X*Y*Z tokens
    there.

    Args:
        spatial_dims: 3 for volumes (2 works too).
        in_channels: Input channels.
        out_channels: Classes; the head returns one logit map per class at input resolution.
        features: Channels per stage; each stage after the first halves the resolution.
        variant: "bot" or "enc".
        deep_supervision: In training mode, also return logits of the coarser decoder stages (nnU-Net style):
            a list, full resolution first. In eval mode the output is always the single full-resolution map.
        blocks_per_stage: Residual blocks per encoder stage; U-Mamba's building block has two.
        d_state: Mamba state size.
        d_conv: Mamba causal conv width.
        expand: Mamba inner width factor.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features: tuple[int, ...] = FEATURES,
        variant: str = "bot",
        deep_supervision: bool = False,
        blocks_per_stage: int = 2,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(
                f"unknown U-Mamba variant '{variant}': use 'bot' (Mamba at the bottleneck) or 'enc' (after every encoder stage)"
            )
        if len(features) < 2:
            raise ConfigError(f"U-Mamba needs at least 2 stages in features, got {tuple(features)}")
        self.features, self.deep_supervision = tuple(features), deep_supervision
        self.stages = nn.ModuleList()
        for i, ch in enumerate(features):
            # the first block of each later stage downsamples with a strided conv, as nnU-Net's residual encoder
            blocks = [
                UnetResBlock(spatial_dims, in_channels if i == 0 else features[i - 1], ch, 3, 1 if i == 0 else 2, _NORM, _ACT)
            ]
            blocks += [UnetResBlock(spatial_dims, ch, ch, 3, 1, _NORM, _ACT) for _ in range(blocks_per_stage - 1)]
            if variant == "enc" or i == len(features) - 1:
                blocks.append(MambaLayer(ch, d_state, d_conv, expand))
            self.stages.append(nn.Sequential(*blocks))
        self.ups = nn.ModuleList(
            UnetUpBlock(spatial_dims, features[i + 1], features[i], 3, 1, 2, _NORM, _ACT)
            for i in reversed(range(len(features) - 1))
        )
        n_heads = len(features) - 1 if deep_supervision else 1
        self.heads = nn.ModuleList(UnetOutBlock(spatial_dims, features[i], out_channels) for i in range(n_heads))
        self.apply(DynUNet.initialize_weights)  # nnU-Net's He init (slope 0.01, zero bias), as U-Mamba's code

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        factor = 2 ** (len(self.features) - 1)
        size = tuple(x.shape[2:])
        if any(s % factor for s in size):
            raise ConfigError(
                f"U-Mamba input size {size} is not divisible by 2**(len(features)-1) = {factor}: "
                f"every spatial size must be a multiple of {factor} (pad or crop the input, or use fewer stages)"
            )
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        outs = []
        for up, skip in zip(self.ups, reversed(skips[:-1])):
            x = up(x, skip)
            outs.append(x)
        if not (self.deep_supervision and self.training):
            return self.heads[0](outs[-1])
        return [head(out) for head, out in zip(self.heads, reversed(outs))]


def fit_to_patch(kwargs: dict, patch_size: list[int]) -> dict:
    """U-Mamba's input-size rule (see `ovcf.models.registry.register_model`): the patch must pass `UMamba.forward`'s
    check, every axis a multiple of 2**(len(features)-1), so a config that cannot train fails when it is built."""
    try:
        factor = 2 ** (len(kwargs.get("features", FEATURES)) - 1)
    except TypeError:
        return kwargs  # UMamba names the bad features
    check_divisible(patch_size, factor, "2**(len(features)-1): each stage halves it exactly")
    return kwargs


@register_model("umamba", task="segmentation", input_size=fit_to_patch)
def umamba(
    in_channels: int = 1,
    out_channels: int = 2,
    spatial_dims: int = 3,
    features: tuple[int, ...] = FEATURES,
    variant: str = "bot",
    d_state: int = 16,
    **kwargs,
) -> nn.Module:
    """U-Mamba for segmentation; the defaults train on a CPU. Extra keywords go to `UMamba`."""
    return UMamba(spatial_dims, in_channels, out_channels, tuple(features), variant, d_state=d_state, **kwargs)
