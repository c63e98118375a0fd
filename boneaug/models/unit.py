"""UNIT (Liu, Breuel, Kautz 2017) for single-channel radiograph patches: two VAE-GANs, one latent.

Domains: h = healthy (non-lesion) patches, l = lesion patches. Networks (reference code
"UNIT" by mingyuliu, 1 input channel here):

- `Encoder`: 7x7 conv -> `n_downsample` x (4x4 stride-2 conv, channels x2) -> `n_res` residual
  blocks; every conv is followed by InstanceNorm (no affine, no running stats) and ReLU, except
  the second conv of a residual block (no ReLU; identity skip). Reflect padding throughout.
  The latent is ``width * 2**n_downsample`` channels at H / 2**n_downsample (256 x H/4 x W/4 for
  the paper architecture).
- `Decoder`: `n_res` residual blocks -> `n_downsample` x (nearest x2 upsample, 5x5 conv,
  LayerNorm, ReLU) -> 7x7 conv -> tanh. The reference's LayerNorm (per sample over C, H, W with
  a per-channel affine) is `nn.GroupNorm(1, C)` here: the same normalisation, with the variance
  inside the square root (the reference adds eps to the unbiased std; the difference is
  numerically negligible and GroupNorm is one fused kernel). The upsample + 5x5 conv is
  computed on the low-resolution grid (`upsample_conv5`: same parameters, same result up to
  float rounding, 36 % of the multiply-adds).
- Shared latent space by weight sharing (paper 3.1): the last `n_shared` residual blocks of
  E_h and E_l are the *same module objects*, and so are the first `n_shared` residual blocks of
  G_h and G_l. ``n_shared = 0`` shares nothing. (The reference's public master branch silently
  dropped the sharing; here it is explicit configuration.)
- `MsImageDis`: `disc_scales` scales, the input average-pooled (3x3, stride 2, padding 1,
  count_include_pad=False) between scales; each scale is `disc_layers` 4x4 stride-2 convs
  (width doubling, LeakyReLU 0.2, no norm) and a 1x1 conv to one LSGAN score map.

Parameter counts (width 64, 1 channel, n_res 4, 3 scales x 4 layers): 11.13 M per generator
(encoder + decoder of one domain, shared blocks counted in each) and 8.27 M per discriminator,
as the reference.

Latent ("reduced VAE" of the reference): the encoder outputs the mean mu; during training
z = mu + N(0, I) (fixed unit variance, so the KL term reduces to mean(mu^2)); at inference z = mu,
no noise, so a translation is deterministic. `UNIT.forward` adds the noise when `noise=True`;
`Encoder`, `Decoder` and `Translator` never do.

Tensors: images are (B, C, H, W) in [-1, 1] inside the networks (patches in [0, 1] map as
x * 2 - 1); `Translator` takes and returns [0, 1]. H and W must be multiples of
2**n_downsample. Initialisation: Kaiming-normal (fan-in, gain sqrt 2) for generator convs,
N(0, 0.02) for discriminator convs, biases 0, LayerNorm gamma ~ U(0, 1) as the reference.

This file holds the networks only: no I/O, no optimisers, no losses (see `boneaug.train.unit`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class UnitArch:
    """Sizes of the UNIT networks (a subset of `boneaug.config.UnitConfig`)."""

    in_channels: int = 1
    width: int = 64
    n_downsample: int = 2
    n_res: int = 4
    n_shared: int = 1
    disc_width: int = 64
    disc_layers: int = 4
    disc_scales: int = 3
    disc_standardize: bool = False  # D sees each image standardised (zero mean, unit sd)
    keep_exposure: bool = False  # a translation keeps its input's per-image mean and sd

    def __post_init__(self) -> None:
        checks = {
            "in_channels": self.in_channels >= 1, "width": self.width >= 1,
            "n_downsample": self.n_downsample >= 0, "n_res": self.n_res >= 0,
            "n_shared": 0 <= self.n_shared <= self.n_res, "disc_width": self.disc_width >= 1,
            "disc_layers": self.disc_layers >= 1, "disc_scales": self.disc_scales >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid UNIT architecture {self}: bad {', '.join(bad)} (n_shared must be in "
                "[0, n_res]; counts >= 0; widths, layers and scales >= 1)"
            )

    @classmethod
    def from_config(cls, config: Any) -> UnitArch:
        """From a `boneaug.config.UnitConfig` (or anything with the same attribute names)."""
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})

    @property
    def latent_channels(self) -> int:
        return self.width * 2**self.n_downsample

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this."""
        return 2**self.n_downsample


# ---- blocks -----------------------------------------------------------------------------------
def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    """Reflect-padded conv: 'same' size for odd kernels, /stride for the 4x4 stride-2 ones."""
    pad = 1 if kernel == 4 else (kernel - 1) // 2
    return nn.Conv2d(c_in, c_out, kernel, stride, pad, padding_mode="reflect")


class ConvNormReLU(nn.Sequential):
    """conv -> InstanceNorm (no affine, no running stats) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1) -> None:
        super().__init__(_conv(c_in, c_out, kernel, stride), nn.InstanceNorm2d(c_out),
                         nn.ReLU(inplace=True))


class ResBlock(nn.Module):
    """x + IN(conv3x3(ReLU(IN(conv3x3(x))))); (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv(channels, channels, 3)
        self.norm1 = nn.InstanceNorm2d(channels)
        self.conv2 = _conv(channels, channels, 3)
        self.norm2 = nn.InstanceNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu_(self.norm1(self.conv1(x)))
        return x + self.norm2(self.conv2(y))


def res_blocks(channels: int, count: int) -> nn.Sequential:
    return nn.Sequential(*(ResBlock(channels) for _ in range(count)))


# The 4 output phases (row parity p, col parity q) of a nearest-x2-upsampled 5x5 conv each see a
# 3x3 neighbourhood of the low-resolution input: taps (0, 1 | 2, 3 | 4) for even outputs and
# (0 | 1, 2 | 3, 4) for odd ones fall on the same input pixel. _PHASE_TAPS[p] (3, 5) sums them.
_PHASE_TAPS = (((1, 1, 0, 0, 0), (0, 0, 1, 1, 0), (0, 0, 0, 0, 1)),
               ((1, 0, 0, 0, 0), (0, 1, 1, 0, 0), (0, 0, 0, 1, 1)))


def _pad_delta(strip: Tensor) -> Tensor:
    """reflect-pad minus replicate-pad (by 2) of a nearest-x2-upsampled strip (B, C, h, w)."""
    up = F.interpolate(strip, scale_factor=2, mode="nearest")
    return F.pad(up, (2, 2, 2, 2), mode="reflect") - F.pad(up, (2, 2, 2, 2), mode="replicate")


def upsample_conv5(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """conv5x5(reflect_pad2(upsample_nearest_x2(x))) computed on the low-resolution grid.

    x (B, C, H, W), weight (O, C, 5, 5) -> (B, O, 2H, 2W); H, W >= 2. Equal to the direct form up
    to float rounding (tested), with 36 % of its multiply-adds: one 3x3 conv C -> 4 O on the
    H x W input (replicate padding, which matches the upsampled reflect padding everywhere but
    the outermost padded row/column on each side), a pixel shuffle, and exact 1-D corrections of
    the first/last output row and column for that outermost padding.
    """
    n_out, n_in = weight.shape[:2]
    taps = torch.tensor(_PHASE_TAPS, dtype=weight.dtype, device=weight.device)  # (2, 3, 5)
    phase_w = torch.einsum("pak,oikl,qbl->opqiab", taps, weight, taps)  # (O, 2, 2, C, 3, 3)
    phase_w = phase_w.reshape(n_out * 4, n_in, 3, 3)
    phase_b = bias.repeat_interleave(4) if bias is not None else None
    y = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), phase_w, phase_b)  # (B, 4 O, H, W)
    y = F.pixel_shuffle(y, 2)  # (B, O, 2H, 2W)
    top = _pad_delta(x[:, :, :2])[:, :, 0]  # (B, C, 2W + 4): padded row -2
    bottom = _pad_delta(x[:, :, -2:])[:, :, -1]
    left = F.pad(_pad_delta(x[:, :, :, :2])[:, :, 1:-1, 0], (1, 1))  # (B, C, 2H + 4): col -2
    right = F.pad(_pad_delta(x[:, :, :, -2:])[:, :, 1:-1, -1], (1, 1))
    y[:, :, 0, :] += F.conv1d(top, weight[:, :, 0, :])
    y[:, :, -1, :] += F.conv1d(bottom, weight[:, :, 4, :])
    y[:, :, :, 0] += F.conv1d(left, weight[:, :, :, 0])
    y[:, :, :, -1] += F.conv1d(right, weight[:, :, :, 4])
    return y


class UpConv(nn.Module):
    """nearest x2 upsample -> 5x5 conv (reflect) -> LayerNorm (GroupNorm, one group) -> ReLU.

    (B, C_in, H, W) -> (B, C_out, 2H, 2W). The parameters are the reference's (a 5x5 conv and
    the norm's affine); the forward computes the upsample + conv on the low-resolution grid
    (`upsample_conv5`, 2.8x fewer multiply-adds, same result). `reference_forward` is the
    direct form, kept for tests.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = _conv(c_in, c_out, 5)
        self.norm = nn.GroupNorm(1, c_out)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu_(self.norm(upsample_conv5(x, self.conv.weight, self.conv.bias)))

    def reference_forward(self, x: Tensor) -> Tensor:
        up = F.interpolate(x, scale_factor=2, mode="nearest")
        return torch.relu_(self.norm(self.conv(up)))


# ---- generators -------------------------------------------------------------------------------
class Encoder(nn.Module):
    """x (B, C_in, H, W) in [-1, 1] -> mu (B, width * 2**n_down, H / 2**n_down, W / 2**n_down).

    `front` is this domain's own layers; `shared` (the last `n_shared` residual blocks) is the
    module object the other domain's encoder holds too.
    """

    def __init__(self, arch: UnitArch, shared: nn.Sequential) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvNormReLU(arch.in_channels, arch.width, 7)]
        channels = arch.width
        for _ in range(arch.n_downsample):
            layers.append(ConvNormReLU(channels, channels * 2, 4, stride=2))
            channels *= 2
        layers.extend(res_blocks(channels, arch.n_res - arch.n_shared))
        self.front = nn.Sequential(*layers)
        self.shared = shared
        self.multiple = arch.multiple

    def forward(self, x: Tensor) -> Tensor:
        return self.shared(self.front(x))


class Decoder(nn.Module):
    """z (B, width * 2**n_down, h, w) -> image (B, C_in, h * 2**n_down, w * 2**n_down) in [-1, 1].

    `shared` (the first `n_shared` residual blocks) is the module object the other domain's
    decoder holds too; `back` is this domain's own layers.
    """

    def __init__(self, arch: UnitArch, shared: nn.Sequential) -> None:
        super().__init__()
        channels = arch.latent_channels
        layers: list[nn.Module] = list(res_blocks(channels, arch.n_res - arch.n_shared))
        for _ in range(arch.n_downsample):
            layers.append(UpConv(channels, channels // 2))
            channels //= 2
        layers += [_conv(channels, arch.in_channels, 7), nn.Tanh()]
        self.shared = shared
        self.back = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.back(self.shared(z))


@dataclass(frozen=True)
class ForwardPlan:
    """Which outputs `UNIT.forward` computes (the loss weights that are 0 need none of theirs).

    recon: within-domain reconstructions x_hh, x_ll. cross: translations x_hl, x_lh.
    cycle_encode: re-encoded translations mu_hl = E_l(x_hl), mu_lh = E_h(x_lh).
    cycle_decode: cycle reconstructions x_hlh = G_h(mu_hl + n), x_lhl = G_l(mu_lh + n).
    """

    recon: bool = True
    cross: bool = True
    cycle_encode: bool = True
    cycle_decode: bool = True

    def __post_init__(self) -> None:
        if self.cycle_decode and not self.cycle_encode:
            raise ValueError("cycle_decode needs cycle_encode (it decodes the re-encoded latent)")
        if self.cycle_encode and not self.cross:
            raise ValueError("cycle_encode needs cross (it re-encodes the translations)")

    @property
    def uses_decoders(self) -> bool:
        return self.recon or self.cross


@dataclass
class UnitOutputs:
    """Everything one training forward produces; None where the plan did not ask for it."""

    mu_h: Tensor  # (B, L, h, w) E_h(x_h)
    mu_l: Tensor  # (B, L, h, w) E_l(x_l)
    x_hh: Tensor | None = None  # (B, C, H, W) G_h(z_h)
    x_ll: Tensor | None = None  # G_l(z_l)
    x_hl: Tensor | None = None  # G_l(z_h): healthy -> lesion
    x_lh: Tensor | None = None  # G_h(z_l): lesion -> healthy
    mu_hl: Tensor | None = None  # E_l(x_hl)
    mu_lh: Tensor | None = None  # E_h(x_lh)
    x_hlh: Tensor | None = None  # G_h(mu_hl + n)
    x_lhl: Tensor | None = None  # G_l(mu_lh + n)


def _split(x: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    return list(torch.split(x, list(sizes))) if len(sizes) > 1 else [x]


def _cat(xs: Sequence[Tensor]) -> Tensor:
    return torch.cat(list(xs)) if len(xs) > 1 else xs[0]


class UNIT(nn.Module):
    """E_h, E_l, G_h, G_l with shared latent blocks; `forward` does one training forward pass.

    The forward computes each needed output once and batches what shares weights: the shared
    encoder tail runs once on [E_h front(x_h); E_l front(x_l)], the shared decoder head once per
    latent (its result feeds both G_h and G_l), and each decoder's own layers once on all the
    latents it decodes. Every per-sample operation (InstanceNorm, LayerNorm) normalises each
    sample alone, so batching changes nothing but speed.
    """

    def __init__(self, arch: UnitArch, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.arch = arch
        enc_shared = res_blocks(arch.latent_channels, arch.n_shared)
        dec_shared = res_blocks(arch.latent_channels, arch.n_shared)
        self.enc_h = Encoder(arch, enc_shared)
        self.enc_l = Encoder(arch, enc_shared)
        self.gen_h = Decoder(arch, dec_shared)
        self.gen_l = Decoder(arch, dec_shared)
        init_generator_weights(self, generator)

    # (B, C, H, W) pair -> (B, L, h, w) pair; the shared tail once on both
    def encode_pair(self, x_h: Tensor, x_l: Tensor) -> tuple[Tensor, Tensor]:
        f_h, f_l = self.enc_h.front(x_h), self.enc_l.front(x_l)
        if len(self.enc_h.shared) == 0:
            return f_h, f_l
        mu_h, mu_l = _split(self.enc_h.shared(_cat([f_h, f_l])), [len(f_h), len(f_l)])
        return mu_h, mu_l

    def _shared_head(self, latents: Sequence[Tensor]) -> list[Tensor]:
        """The shared decoder head once on all `latents` (B_i, L, h, w) -> same shapes."""
        head = self.gen_h.shared
        if len(head) == 0:
            return list(latents)
        return _split(head(_cat(latents)), [len(z) for z in latents])

    def _decode(
        self, to_h: Sequence[Tensor], to_l: Sequence[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Each decoder's own layers once on all the (shared-head) latents it decodes."""
        out_h = _split(self.gen_h.back(_cat(to_h)), [len(s) for s in to_h]) if to_h else []
        out_l = _split(self.gen_l.back(_cat(to_l)), [len(s) for s in to_l]) if to_l else []
        return out_h, out_l

    @staticmethod
    def _sample(mu: Tensor, noise: bool, generator: torch.Generator | None) -> Tensor:
        if not noise:
            return mu
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps

    def forward(
        self,
        x_h: Tensor,  # (B, C, H, W) in [-1, 1], healthy
        x_l: Tensor,  # (B', C, H, W) in [-1, 1], lesion
        *,
        plan: ForwardPlan = ForwardPlan(),
        noise: bool = True,
        generator: torch.Generator | None = None,
    ) -> UnitOutputs:
        mu_h, mu_l = self.encode_pair(x_h, x_l)
        out = UnitOutputs(mu_h=mu_h, mu_l=mu_l)
        if not plan.uses_decoders:
            return out
        z_h, z_l = self._sample(mu_h, noise, generator), self._sample(mu_l, noise, generator)
        s_h, s_l = self._shared_head([z_h, z_l])
        to_h = ([s_h] if plan.recon else []) + ([s_l] if plan.cross else [])
        to_l = ([s_l] if plan.recon else []) + ([s_h] if plan.cross else [])
        dec_h, dec_l = self._decode(to_h, to_l)
        if plan.recon:
            out.x_hh, out.x_ll = dec_h.pop(0), dec_l.pop(0)
        if not plan.cross:
            return out
        out.x_lh, out.x_hl = dec_h.pop(0), dec_l.pop(0)
        if not plan.cycle_encode:
            return out
        out.mu_lh, out.mu_hl = self.encode_pair(out.x_lh, out.x_hl)
        if not plan.cycle_decode:
            return out
        z_hl = self._sample(out.mu_hl, noise, generator)  # -> G_h: h -> l -> h
        z_lh = self._sample(out.mu_lh, noise, generator)  # -> G_l: l -> h -> l
        s_hl, s_lh = self._shared_head([z_hl, z_lh])
        (out.x_hlh,), (out.x_lhl,) = self._decode([s_hl], [s_lh])
        return out

    def translator(self, direction: str = "h2l") -> Translator:
        """The deterministic map E_a then G_b for direction "a2b" (a, b in h, l), sharing these
        weights: "h2l" translates healthy -> lesion, "l2h" back, "h2h" and "l2l" reconstruct."""
        domains = {"h": (self.enc_h, self.gen_h), "l": (self.enc_l, self.gen_l)}
        source, _, target = direction.partition("2")
        if source not in domains or target not in domains:
            raise ValueError(f"direction must be 'h2l', 'l2h', 'h2h' or 'l2l', got {direction!r}")
        translator = Translator(domains[source][0], domains[target][1],
                                keep_exposure=self.arch.keep_exposure)
        # what a registry needs to rebuild it (boneaug.models.specs): weights are stored alone
        translator.spec = {"kind": "unit_translator", "arch": asdict(self.arch),
                           "direction": direction}
        return translator


class Translator(nn.Module):
    """x (B, C, H, W) in [0, 1] -> G(E(x)) in [0, 1], no latent noise (what gets registered).

    With `keep_exposure` the output takes its input's mean and sd (per image and channel): a
    standardised D is blind to them, so nothing in the game pins them, and G drifts (the local
    tibia UNIT shifted the mean by 0.10 of the range on average), which blending turns into
    grey squares. The drawn pattern is unchanged (the phantom critic's calls stay 0.80).
    """

    def __init__(self, encoder: Encoder, decoder: Decoder, *, keep_exposure: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.multiple = encoder.multiple
        self.keep_exposure = keep_exposure

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[-1] % self.multiple or x.shape[-2] % self.multiple:
            raise ValueError(
                f"Translator expects (B, C, H, W) with H and W multiples of {self.multiple}, "
                f"got shape {tuple(x.shape)}: resize patches to the training patch size"
            )
        y = self.decoder(self.encoder(x * 2 - 1))
        if self.keep_exposure:
            y = match_moments(y, x * 2 - 1)
        return (y + 1) * 0.5


def match_moments(y: Tensor, reference: Tensor, eps: float = 1e-6) -> Tensor:
    """`y` shifted and scaled to `reference`'s mean and sd, per image and channel."""
    mean_y, sd_y = y.mean((-2, -1), keepdim=True), y.std((-2, -1), keepdim=True)
    mean_r, sd_r = reference.mean((-2, -1), keepdim=True), reference.std((-2, -1), keepdim=True)
    return (y - mean_y) / (sd_y + eps) * sd_r + mean_r


# ---- discriminators ---------------------------------------------------------------------------
class MsImageDis(nn.Module):
    """Multi-scale LSGAN discriminator: x (B, C, H, W) -> [score map per scale], finest first.

    Scale s sees the input average-pooled s times; its score map is (B, 1, H / 2**(s+L),
    W / 2**(s+L)) for L = disc_layers (rounded up by the pooling).
    """

    def __init__(self, arch: UnitArch) -> None:
        super().__init__()
        self.nets = nn.ModuleList(self._scale(arch) for _ in range(arch.disc_scales))
        self.down = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.standardize = arch.disc_standardize

    @staticmethod
    def _scale(arch: UnitArch) -> nn.Sequential:
        layers: list[nn.Module] = []
        c_in, c_out = arch.in_channels, arch.disc_width
        for _ in range(arch.disc_layers):
            layers += [_conv(c_in, c_out, 4, stride=2), nn.LeakyReLU(0.2, inplace=True)]
            c_in, c_out = c_out, c_out * 2
        layers.append(nn.Conv2d(c_in, 1, 1))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        if self.standardize:  # differentiable: G's gradient flows through it
            x = (x - x.mean((1, 2, 3), keepdim=True)) / (x.std((1, 2, 3), keepdim=True) + 1e-3)
        outs = []
        for i, net in enumerate(self.nets):
            if i:
                x = self.down(x)
            outs.append(net(x))
        return outs


class Discriminators(nn.Module):
    """D_h and D_l; `forward(x_h, x_l)` scores a batch for each domain (one DDP forward)."""

    def __init__(self, arch: UnitArch, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.dis_h = MsImageDis(arch)
        self.dis_l = MsImageDis(arch)
        init_discriminator_weights(self, generator)

    def forward(self, x_h: Tensor, x_l: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        return self.dis_h(x_h), self.dis_l(x_l)


# ---- initialisation ---------------------------------------------------------------------------
def init_generator_weights(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Kaiming-normal convs (fan-in, a = 0), zero biases, LayerNorm gamma ~ U(0, 1), beta 0."""
    for m in module.modules():  # each shared module once
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in", generator=generator)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.uniform_(m.weight, 0.0, 1.0, generator=generator)
            nn.init.zeros_(m.bias)


def init_discriminator_weights(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """N(0, 0.02) convs, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02, generator=generator)
            nn.init.zeros_(m.bias)


def count_parameters(*modules: nn.Module) -> int:
    """Distinct parameters of `modules` together (a module shared between them counts once)."""
    seen: dict[int, int] = {}
    for module in modules:
        for p in module.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


__all__ = [
    "ConvNormReLU", "Decoder", "Discriminators", "Encoder", "ForwardPlan", "MsImageDis",
    "ResBlock", "Translator", "UNIT", "UnitArch", "UnitOutputs", "UpConv", "count_parameters",
    "init_discriminator_weights", "init_generator_weights", "upsample_conv5",
]
