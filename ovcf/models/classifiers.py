"""Acute-vs-chronic image encoders. Each takes the ROI cube (B, C, X, Y, Z) and returns features (B, F).

The head (and the clinical fusion) lives in `ovcf.tasks.ClassificationTask`, so every encoder
exposes `num_features`. 2D networks see the cube as 2.5D: a few sagittal slices through the body
stacked as channels, which is how radiologists read a compression fracture (height loss,
endplates, the band under the endplate). 3D networks see the whole cube. Nothing is ever
downloaded: `pretrained` needs `weights`, a local file.

Every encoder also says where Grad-CAM should look and how a map there returns to the cube
(`cam_layers`, `cam_to_cube`), because only the network knows its own layers and what part of the
cube it saw; `ovcf.eval.gradcam` then needs no knowledge of any family, and a new network adds
these two methods in its own file:

- CNNs offer the output of each stage (DenseNet's dense blocks, VGG's input of each pooling),
  shallow to deep; Grad-CAM takes the deepest that is still fine enough to point at something.
- ViTs and Swin offer their patch embedding: its output is still a spatial grid of tokens and its
  gradient carries every transformer block above it, one value per patch. Unlike attention
  rollout, this weighs tokens by their effect on the logit, so all families' maps read the same way.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121, ViT
from safetensors import SafetensorError, safe_open
from torch import nn

from ovcf.errors import ConfigError
from ovcf.models.registry import register_model

_POOLS = (nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool2d)
ENCODER_PREFIX = "net."  # what `ovcf.tasks.ClassificationTask` calls its encoder in its state dict


def before_pools(net: nn.Module, path: str = "features") -> list[str]:
    """Names of the activations that end each stage of the VGG-like sequence `net.<path>`: the input of
    each pooling, shallow to deep (the stages' last features at full resolution)."""
    mods = list(net.get_submodule(path).named_children())
    return [f"{path}.{name}" for (name, _), (_, nxt) in zip(mods, mods[1:]) if isinstance(nxt, _POOLS)]


def dense_blocks(net: nn.Module, path: str = "features") -> list[str]:
    """Names of the dense blocks of the DenseNet sequence `net.<path>`, shallow to deep (timm and MONAI
    name them alike); each ends a stage before its transition halves the resolution."""
    return [f"{path}.{name}" for name, _ in net.get_submodule(path).named_children() if name.startswith("denseblock")]


def patch_grid(net: nn.Module) -> list[str]:
    """A timm ViT's or Swin's patch projection: its output is the token grid (see the module docstring)."""
    return ["patch_embed.proj"]


def upsample_cube(raw: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """A 3D network's (B, 1, x, y, z) map, trilinearly resized to the (B, X, Y, Z) cube."""
    return F.interpolate(raw.float(), size=shape, mode="trilinear", align_corners=False)[:, 0]


class SagittalStack(nn.Module):
    """Feeds `n_slices` sagittal planes, `slice_step` voxels apart around the centre, to a 2D net.

    `cam_layers` names the 2D net's Grad-CAM candidates (relative to it, shallow to deep); the factory
    that builds the net knows them (see `_register_sagittal`).
    """

    def __init__(self, net: nn.Module, n_slices: int, slice_step: int, cam_layers: list[str]):
        super().__init__()
        self.net, self.n_slices, self.slice_step = net, n_slices, slice_step
        self.num_features = net.num_features
        self._cam_layers = list(cam_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x.shape[2] // 2
        idx = centre + self.slice_step * (torch.arange(self.n_slices, device=x.device) - self.n_slices // 2)
        planes = x.index_select(2, idx.clamp(0, x.shape[2] - 1))  # (B, C, n, Y, Z)
        return self.net(planes.flatten(1, 2))

    def cam_layers(self) -> list[str]:
        """Grad-CAM candidates, shallow to deep, as module names inside this encoder."""
        return [f"net.{name}" for name in self._cam_layers]

    def reads(self, size: int) -> tuple[int, int]:
        """The X rows (lo, hi) that `forward` reads of a cube `size` wide (20-28 of 48 by default):
        the training augmentation makes only these."""
        idx = (size // 2 + self.slice_step * (torch.arange(self.n_slices) - self.n_slices // 2)).clamp(0, size - 1)
        return int(idx.min()), int(idx.max()) + 1

    def cam_to_cube(self, raw: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """The (B, 1, y, z) map over the sagittal plane, resized and placed on the slab of sagittal planes
        the network saw; (B, X, Y, Z), zero elsewhere, since nothing there reached the network."""
        x, y, z = shape
        plane = F.interpolate(raw.float(), size=(y, z), mode="bilinear", align_corners=False)[:, 0]
        cube = torch.zeros(raw.shape[0], x, y, z)
        half = self.slice_step * (self.n_slices // 2) + self.slice_step // 2
        lo, hi = max(0, x // 2 - half), min(x, x // 2 + half + 1)
        cube[:, lo:hi] = plane[:, None]
        return cube


def _weights_file(weights: str | None, pretrained: bool) -> Path | None:
    if weights is None:
        if pretrained:
            raise ConfigError(
                "pretrained=true needs model.model_kwargs.weights=PATH to a local weight file (nothing is downloaded)"
            )
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"weight file {path} not found: set model.model_kwargs.weights to a local timm/torchvision/MONAI checkpoint "
            "or a file of python -m ovcf.pretrain"
        )
    return path


def timm_2d(arch: str, in_chans: int, pretrained: bool, weights: str | None, **kwargs) -> nn.Module:
    """A timm network without its classifier; timm loads local weights and adapts the first conv to `in_chans`."""
    path = _weights_file(weights, pretrained)
    if path is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    try:
        return timm.create_model(arch, in_chans=in_chans, num_classes=0, **kwargs)
    except RuntimeError as exc:  # a checkpoint of another architecture
        raise ConfigError(f"weight file {path} does not fit timm's {arch}: {exc}") from exc


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A conv kernel made for another input channel count: the channel sum spread evenly, so that
    identical inputs on every channel give the response the kernel had (as timm does for 2D)."""
    return (weight.sum(1, keepdim=True) / in_channels).expand(-1, in_channels, *weight.shape[2:]).clone()


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a local weight file: safetensors, or a checkpoint read by torch's weights-only
    loader (a `state_dict` inside is unwrapped); nothing in either can run code."""
    try:
        with safe_open(str(path), "pt", device="cpu") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}, dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        pass  # not safetensors: a torch checkpoint
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ConfigError(
            f"weight file {path} is neither safetensors nor a plain torch checkpoint ({type(exc).__name__}); "
            "nothing in it was run"
        ) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ConfigError(f"weight file {path} holds no tensors by name (a state dict)")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}


def _matching(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of `state` whose names and shapes match `own`; a kernel that differs only in input
    channels (a mask channel, a grey-scale net) is adapted."""
    usable = {}
    for key, value in state.items():
        if key not in own:
            continue
        target = own[key].shape
        if value.shape == target:
            usable[key] = value
        elif value.ndim >= 3 and value.shape[0] == target[0] and value.shape[2:] == target[2:]:
            usable[key] = adapt_first_conv(value, target[1])
    return usable


def load_matching(model: nn.Module, path: Path) -> nn.Module:
    """Loads the tensors of a local checkpoint whose names and shapes match (heads differ); see `_matching`."""
    usable = _matching(model.state_dict(), read_weights(path)[0])
    if not usable:
        raise ConfigError(f"no tensor of {path} matches the model's layers: is it a checkpoint of this architecture?")
    model.load_state_dict(usable, strict=False)
    return model


def load_encoder(encoder: nn.Module, state: dict, meta: dict, path: Path, name: str) -> nn.Module:
    """Loads the encoder of an ovcf weight file (tensors named `net.*`: a `python -m ovcf.pretrain` file or a
    classification checkpoint) into `encoder`, the network `name` builds; every tensor must fit, since a
    half-loaded encoder would train as something neither pretrained nor from scratch.

    Raises:
        ConfigError: the file holds another network's encoder (it names the file and what it holds).
    """
    held = meta.get("model_name")
    if held and held != name:
        raise ConfigError(
            f"weight file {path} holds a {held} encoder (written by python -m ovcf.pretrain model={held}); "
            f"model={name} cannot load it: train with model={held}, or pretrain {name}"
        )
    own = encoder.state_dict()
    usable = _matching(own, {k.removeprefix(ENCODER_PREFIX): v for k, v in state.items() if k.startswith(ENCODER_PREFIX)})
    missing = [key for key in own if key not in usable]
    if missing:
        raise ConfigError(
            f"weight file {path} holds {'a ' + held if held else 'an ovcf'} encoder that does not fit model={name} "
            f"as configured: {len(missing)} of its {len(own)} tensors are missing or of another shape "
            f"(first: {missing[0]}); use the model and model_kwargs it was trained with"
        )
    encoder.load_state_dict(usable)
    return encoder


def register_encoder(name: str):
    """Registers a classification network factory (as `register_model`) whose `weights` may also be an ovcf
    file: the tensors named `net.*` (a `python -m ovcf.pretrain` file, or an `ovcf.train` checkpoint) load
    into the whole network it builds (see `load_encoder`); any other file goes to the factory, which reads
    it its own way (timm for 2D networks, `load_matching` for 3D ones)."""

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        @functools.wraps(factory)
        def build(*args, weights: str | None = None, pretrained: bool = False, **kwargs) -> nn.Module:
            path = _weights_file(weights, pretrained)
            state, meta = read_weights(path) if path is not None else ({}, {})
            if not any(key.startswith(ENCODER_PREFIX) for key in state):
                return factory(*args, weights=weights, pretrained=pretrained, **kwargs)
            return load_encoder(factory(*args, **kwargs), state, meta, path, name)

        register_model(name)(build)
        return factory

    return add


def make_conv_stem(spatial_dims: int, in_channels: int, out_channels: int, patch_size: int, width: int = 24) -> nn.Sequential:
    """A convolutional stem in place of a ViT's patchify layer (Xiao et al. 2021, "Early convolutions
    help transformers see better"): log2(patch_size) stride-2 3x3 convolutions with batch norm,
    doubling from `width` channels, then a 1x1 projection to the token width. It gives the same token
    grid as the patchify layer, but its local inductive bias lets a ViT learn from a few hundred
    vertebrae instead of millions of images."""
    steps = int(patch_size).bit_length() - 1
    if patch_size < 2 or 2**steps != patch_size:
        raise ConfigError(f"conv_stem needs patch_size a power of 2 (got {patch_size}), or set conv_stem=false")
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
    layers, c_in = [], in_channels
    for i in range(steps):
        c_out = width * 2**i
        layers += [conv(c_in, c_out, 3, stride=2, padding=1, bias=False), norm(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    return nn.Sequential(*layers, conv(c_in, out_channels, 1))


def _register_sagittal(
    name: str, arch: str, doc: str, cam: Callable[[nn.Module], list[str]], pooled: bool = False, **defaults
) -> None:
    """Registers `name`: timm's `arch` on 2.5D sagittal slices. `cam` gives the built timm net's Grad-CAM
    candidates (names inside it, shallow to deep). `defaults` are timm keyword arguments (ROI-sized
    `img_size`, `patch_size`, `window_size`) that the model config may override; `pooled` replaces the
    network's pre-logits block by the global average pooling of its head."""

    def factory(
        in_channels: int = 1,
        n_slices: int = 5,
        slice_step: int = 2,
        arch: str = arch,
        pretrained: bool = False,
        weights: str | None = None,
        conv_stem: bool = False,
        **timm_kwargs,
    ) -> nn.Module:
        timm_kwargs = defaults | timm_kwargs
        net = timm_2d(arch, n_slices * in_channels, pretrained, weights, **timm_kwargs)
        if pooled:
            net.pre_logits = nn.Identity()
        if conv_stem:
            proj = net.patch_embed.proj
            net.patch_embed.proj = make_conv_stem(2, proj.in_channels, proj.out_channels, proj.stride[0])
        return SagittalStack(net, n_slices, slice_step, cam(net))

    factory.__doc__ = doc
    register_encoder(name)(factory)


_register_sagittal("densenet121", "densenet121", "timm DenseNet-121 on 2.5D sagittal slices.", dense_blocks)
_register_sagittal(
    "vgg16",
    "vgg16_bn",
    """timm VGG-16 (with batch norm: plain VGG does not train from scratch) on 2.5D slices.

    The 4096-wide fully connected block is dropped for global average pooling of the last
    convolutions: at ROI size its 7x7 kernel would see one pixel, and it holds 100 M of the 134 M
    parameters, far too many for a few hundred vertebrae.""",
    before_pools,
    pooled=True,
)
_register_sagittal(
    "vit",
    "vit_tiny_patch16_224",
    """A timm ViT at the ROI size on 2.5D slices: ViT-Ti (192 wide, 12 blocks) with 8-pixel patches by default.

    `arch` takes any timm ViT (e.g. `vit_base_patch16_224` for ViT-B); timm resamples a local
    checkpoint's patch and position embeddings to `patch_size` and `img_size`.""",
    patch_grid,
    img_size=48,
    patch_size=8,
)
_register_sagittal(
    "swin",
    "swin_tiny_patch4_window7_224",
    """A timm Swin Transformer (Swin-T) at the ROI size: 2-pixel patches and 3x3 windows give
    24, 12, 6 and 3 tokens per side over the four stages of a 48-pixel plane.""",
    patch_grid,
    img_size=48,
    patch_size=2,
    window_size=3,
)


class Features3d(nn.Module):
    """A 3D network's feature extractor with its `num_features` (the head is the task's) and its
    Grad-CAM candidates `cam_layers` (names inside `net`, shallow to deep), which its factory knows."""

    def __init__(self, net: nn.Module, num_features: int, cam_layers: list[str]):
        super().__init__()
        self.net, self.num_features = net, num_features
        self._cam_layers = list(cam_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def cam_layers(self) -> list[str]:
        """Grad-CAM candidates, shallow to deep, as module names inside this encoder."""
        return [f"net.{name}" for name in self._cam_layers]

    def cam_to_cube(self, raw: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """The 3D map, trilinearly resized to the (B, X, Y, Z) cube."""
        return upsample_cube(raw, shape)


@register_encoder("densenet121_3d")
def densenet121_3d(
    in_channels: int = 1,
    spatial_dims: int = 3,
    pretrained: bool = False,
    weights: str | None = None,
) -> nn.Module:
    """MONAI DenseNet-121 on the whole ROI cube."""
    path = _weights_file(weights, pretrained)
    net = DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1)
    if path is not None:
        load_matching(net, path)
    num_features = net.class_layers.out.in_features
    net.class_layers.out = nn.Identity()
    return Features3d(net, num_features, dense_blocks(net))


VGG16_CHANNELS = (64, 128, 256, 512, 512)
VGG16_CONVS = (2, 2, 3, 3, 3)


class VGG3d(nn.Module):
    """VGG-16's layout in 3D: five stages of 3x3x3 convolutions (2, 2, 3, 3, 3), each closed by max
    pooling, with batch norm, then global average pooling."""

    def __init__(self, in_channels: int, width: float):
        super().__init__()
        layers, c_in = [], in_channels
        for channels, convs in zip(VGG16_CHANNELS, VGG16_CONVS):
            c_out = max(8, int(round(channels * width)))
            for _ in range(convs):
                layers += [nn.Conv3d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
            layers.append(nn.MaxPool3d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.num_features = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3, 4))

    def cam_layers(self) -> list[str]:
        """Grad-CAM candidates: the last features of each stage (the input of its pooling), shallow to deep."""
        return before_pools(self, "features")

    def cam_to_cube(self, raw: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """The 3D map, trilinearly resized to the (B, X, Y, Z) cube."""
        return upsample_cube(raw, shape)


@register_encoder("vgg16_3d")
def vgg16_3d(in_channels: int = 1, width: float = 0.25, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    """VGG-16 in 3D. `width` scales its channels (64..512): 1.0 is the paper's net (about 44 M
    parameters, slow on a CPU); 0.25 (16..128 channels) is the default."""
    path = _weights_file(weights, pretrained)
    net = VGG3d(in_channels, width)
    return load_matching(net, path) if path is not None else net


class ViT3d(nn.Module):
    """MONAI's ViT on the cube; the features are the mean of the final (normed) patch tokens."""

    def __init__(self, vit: ViT, hidden_size: int):
        super().__init__()
        self.vit, self.num_features = vit, hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.vit(x)
        return tokens.mean(dim=1)

    def cam_layers(self) -> list[str]:
        """The patch embedding (or the conv stem in its place): its output is the 3D token grid."""
        return ["vit.patch_embedding.patch_embeddings"]

    def cam_to_cube(self, raw: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """One value per patch, trilinearly resized to the (B, X, Y, Z) cube."""
        return upsample_cube(raw, shape)


@register_encoder("vit_3d")
def vit_3d(
    in_channels: int = 1,
    img_size: int = 48,
    patch_size: int = 8,
    hidden_size: int = 192,
    mlp_dim: int = 768,
    num_layers: int = 6,
    num_heads: int = 3,
    dropout_rate: float = 0.0,
    spatial_dims: int = 3,
    conv_stem: bool = False,
    pretrained: bool = False,
    weights: str | None = None,
) -> nn.Module:
    """MONAI ViT on 8^3-voxel patches of the cube (216 tokens at 48^3): a ViT-Ti width, 6 blocks.
    `conv_stem` (see `make_conv_stem`) replaces the patchify convolution; false is the plain ViT."""
    path = _weights_file(weights, pretrained)
    net = ViT(
        in_channels=in_channels, img_size=img_size, patch_size=patch_size, hidden_size=hidden_size, mlp_dim=mlp_dim,
        num_layers=num_layers, num_heads=num_heads, dropout_rate=dropout_rate, spatial_dims=spatial_dims,
        classification=False,
    )  # fmt: skip
    if conv_stem:
        net.patch_embedding.patch_embeddings = make_conv_stem(spatial_dims, in_channels, hidden_size, patch_size, width=16)
    for block in net.blocks:  # MONAI builds a cross-attention norm it never uses: DDP would wait for its gradient
        getattr(block, "norm_cross_attn", nn.Identity()).requires_grad_(False)
    if path is not None:
        load_matching(net, path)
    return ViT3d(net, hidden_size)


def _conv_bn(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SliceTransformer(nn.Module):
    """A 2D CNN encodes every `slice_step`-th slice of the cube along `slice_axis`; a Transformer
    encoder attends across the slices (learned positions, a class token) and returns its class token.

    Sagittal slices (axis 0, the default) run from one pedicle to the other, so attention can relate
    the band under an endplate in one slice to the height loss in the next.
    """

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, ...],
        slice_axis: int,
        slice_step: int,
        dim: int,
        depth: int,
        heads: int,
        max_slices: int,
        dropout: float,
    ):
        super().__init__()
        if slice_axis not in (0, 1, 2):
            raise ConfigError(f"slice_axis={slice_axis}: use 0 (sagittal), 1 (coronal) or 2 (axial)")
        layers, c_in = [], in_channels
        for c in channels:
            layers += _conv_bn(c_in, c, 2) + _conv_bn(c, c, 1)
            c_in = c
        self.encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, max_slices + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.slice_axis, self.slice_step, self.max_slices, self.num_features = slice_axis, slice_step, max_slices, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = x.movedim(2 + self.slice_axis, 1)[:, :: self.slice_step]  # (B, S, C, H, W)
        s = x.shape[1]
        if s > self.max_slices:
            raise ValueError(f"{s} slices exceed max_slices={self.max_slices}: raise it or slice_step")
        tokens = self.encoder(x.flatten(0, 1)).reshape(b, s, -1)
        tokens = torch.cat([self.cls.expand(b, -1, -1), tokens], dim=1) + self.pos[:, : s + 1]
        return self.norm(self.transformer(tokens)[:, 0])

    def cam_layers(self) -> list[str]:
        """The slice encoder's last features (the input of its global pooling): one 2D map per encoded slice."""
        return before_pools(self, "encoder")

    def cam_to_cube(self, raw: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """The (B * S, 1, a, b) maps of the S encoded slices, each resized to its slice's plane and
        repeated over the `slice_step` slices it stands for: (B, X, Y, Z)."""
        axis = self.slice_axis
        in_plane = [s for i, s in enumerate(shape) if i != axis]
        n_slices = len(range(0, shape[axis], self.slice_step))  # as forward's [:: slice_step]
        maps = F.interpolate(raw.float(), size=tuple(in_plane), mode="bilinear", align_corners=False)[:, 0]
        maps = maps.reshape(-1, n_slices, *in_plane)  # (B, S, a, b)
        stacked = F.interpolate(maps[:, None], size=(shape[axis], *in_plane), mode="nearest")[:, 0]
        return stacked.movedim(1, 1 + axis)


@register_encoder("transformer")
def transformer(
    in_channels: int = 1,
    channels: tuple[int, ...] = (32, 64, 128),
    slice_axis: int = 0,
    slice_step: int = 2,
    dim: int = 128,
    depth: int = 2,
    heads: int = 4,
    max_slices: int = 64,
    dropout: float = 0.1,
    pretrained: bool = False,
    weights: str | None = None,
) -> nn.Module:
    """The slice-sequence Transformer (see `SliceTransformer`)."""
    path = _weights_file(weights, pretrained)
    net = SliceTransformer(in_channels, tuple(channels), slice_axis, slice_step, dim, depth, heads, max_slices, dropout)
    return load_matching(net, path) if path is not None else net
