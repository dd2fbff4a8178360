"""An exact, parameter-free space-to-depth "autoencoder" that stands in for the VAE of a diffusers pipeline.

`encode` folds every `factor x factor` pixel block into channels (``pixel_unshuffle``): a (B, C, H, W) image in
[-1, 1] becomes a (B, C·factor², H/factor, W/factor) latent; `decode` is the exact inverse (``pixel_shuffle``).
Nothing is learnt and nothing is lost, so a tiny pixel-space diffusion model can be trained on CPU with the real
Stable Diffusion code path (latent = vae.encode(x).latent_dist.sample() · scaling_factor, U-Net on the latent,
pipeline decode = vae.decode(latents / scaling_factor)) without training a VAE first.

Diffusers compatibility:

* ``config.block_out_channels`` has log2(factor) + 1 entries, so ``StableDiffusionPipeline.vae_scale_factor``
  (2 ** (len - 1)) equals the factor; the entries are the channel counts after each 2x2 fold (informative only).
* ``config.scaling_factor`` multiplies the latent before the noise schedule, as SD's 0.18215 does. The default
  3.5 gives the latent unit variance on ``tcscale.data.synthetic`` images: measured on 2,000 images of the world
  (seed 1234, max_objects 3, 32 px) in [-1, 1], std 0.283, RMS 0.292 (1/0.283 = 3.53). Other data want
  1 / (their pixel std in [-1, 1]); pass it to the constructor.
* ``encode`` returns an ``AutoencoderKLOutput`` whose ``latent_dist`` is a point mass: ``sample(generator)`` and
  ``mode()`` both return the exact latent (no noise is drawn, the generator is not consumed).
* A non-persistent empty buffer gives the module a device and dtype (``ModelMixin.device``/``.dtype`` read them
  from parameters or buffers). The state dict is empty, so ``ModelMixin.save_pretrained`` writes config.json and
  no weights file, and the stock ``ModelMixin.from_pretrained`` would then fail ("no file named
  diffusion_pytorch_model.bin"): ``from_pretrained`` is overridden to rebuild the module from config.json alone
  (accepting, and ignoring where meaningless, the loading kwargs a pipeline passes: torch_dtype, device_map, ...).
* Saved inside a pipeline, model_index.json records ``["tcscale.models.space_to_depth", "SpaceToDepthAutoencoder"]``
  (diffusers stores the full module path of a class from a library it does not know); ``from_pretrained`` imports
  that module and finds its loader because the module namespace holds ``ModelMixin`` (diffusers looks the
  loadable base classes up by name in the component's module). Keep the ``ModelMixin`` import at module level.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin  # ModelMixin must stay a module attribute: see the docstring
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput

SYNTHETIC_SCALING_FACTOR = 3.5


class ExactLatentDistribution:
    """A point mass at the encoded latent, with the interface of diffusers' DiagonalGaussianDistribution."""

    def __init__(self, latent: torch.Tensor):
        self.mean = latent
        self.std = torch.zeros_like(latent)
        self.var = self.std
        self.logvar = torch.full_like(latent, -math.inf)
        self.deterministic = True

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: ExactLatentDistribution | None = None) -> torch.Tensor:
        return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)


class SpaceToDepthAutoencoder(ModelMixin, ConfigMixin):
    """Exact factor x factor space-to-depth encoder / depth-to-space decoder (no parameters).

    Args:
        in_channels: image channels (3 for RGB).
        factor: spatial fold per side; a power of two >= 2 (so that the pipeline's vae_scale_factor matches).
        scaling_factor: latent multiplier for the diffusion schedule (see the module docstring).
        sample_size: image side the pipeline defaults to (informative, like AutoencoderKL's).
        block_out_channels: leave None; filled with the channel count after each 2x2 fold,
            e.g. (3, 12) for factor 2 and (3, 12, 48) for factor 4. Given explicitly it must match.
        latent_channels: leave None; in_channels * factor**2. Given explicitly it must match.
        force_upcast: kept for pipelines that read it (SDXL-style); the transform is exact in any dtype.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        factor: int = 2,
        scaling_factor: float = SYNTHETIC_SCALING_FACTOR,
        sample_size: int = 32,
        block_out_channels: tuple[int, ...] | None = None,
        latent_channels: int | None = None,
        force_upcast: bool = False,
    ):
        super().__init__()
        if factor < 2 or factor & (factor - 1):
            raise ValueError(f"factor must be a power of two >= 2, got {factor}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        levels = int(math.log2(factor))
        expected_blocks = tuple(in_channels * 4**k for k in range(levels + 1))
        if block_out_channels is not None and tuple(block_out_channels) != expected_blocks:
            raise ValueError(
                f"block_out_channels must be {expected_blocks} for factor {factor}, got {block_out_channels}"
            )
        expected_latent = in_channels * factor**2
        if latent_channels is not None and latent_channels != expected_latent:
            raise ValueError(f"latent_channels must be {expected_latent} for factor {factor}, got {latent_channels}")
        # record the derived values so config.json (and the pipeline's vae_scale_factor) see them
        self.register_to_config(block_out_channels=list(expected_blocks), latent_channels=expected_latent)
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # gives .device / .dtype

    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be (B, {channels}, H, W), got shape {tuple(x.shape)}")

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple[ExactLatentDistribution]:
        """(B, C, H, W) image -> latent_dist of the (B, C·f², H/f, W/f) latent (unscaled, like AutoencoderKL)."""
        f = self.config.factor
        self._check(x, self.config.in_channels, "encode input")
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {tuple(x.shape[-2:])}")
        dist = ExactLatentDistribution(F.pixel_unshuffle(x, f))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """(B, C·f², h, w) unscaled latent -> (B, C, h·f, w·f) image; the exact inverse of encode."""
        self._check(z, self.config.latent_channels, "decode input")
        x = F.pixel_shuffle(z, self.config.factor)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True, **_) -> DecoderOutput | tuple[torch.Tensor]:
        """Encode then decode (the identity, exactly)."""
        return self.decode(self.encode(sample).latent_dist.mode(), return_dict=return_dict)

    _CONFIG_KWARGS = (
        "cache_dir",
        "force_download",
        "proxies",
        "token",
        "local_files_only",
        "revision",
        "subfolder",
        "user_agent",
        "dduf_entries",
    )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> SpaceToDepthAutoencoder:
        """Rebuild from config.json (a directory, hub id, or pipeline subfolder); there are no weights to load.

        Weight-loading kwargs a pipeline passes (device_map, low_cpu_mem_usage, variant, use_safetensors, ...) have
        nothing to act on and are ignored; torch_dtype / dtype set the (empty) buffer's dtype, as for any model.
        """
        config_kwargs = {k: kwargs[k] for k in cls._CONFIG_KWARGS if k in kwargs}
        config = cls.load_config(pretrained_model_name_or_path, **config_kwargs)
        model = cls.from_config(config)
        dtype = kwargs.get("torch_dtype") or kwargs.get("dtype")
        if isinstance(dtype, dict):  # pipelines may pass a per-component mapping
            dtype = dtype.get("default")
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
        return model.eval()

    # no-ops for pipelines that toggle these VAE memory options
    def enable_slicing(self) -> None:
        pass

    def disable_slicing(self) -> None:
        pass

    def enable_tiling(self, *args, **kwargs) -> None:
        pass

    def disable_tiling(self) -> None:
        pass


__all__ = ["ExactLatentDistribution", "SYNTHETIC_SCALING_FACTOR", "SpaceToDepthAutoencoder"]
