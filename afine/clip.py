"""CLIP with a ViT image tower, in OpenAI's parameter layout, as A-FINE uses it.

Self-contained (imports nothing but torch and the standard library) so it can be copied alone.
The image tower returns the patch-token output of every transformer block. The text tower's
parameters are held under their OpenAI names, so a full CLIP state dict loads with
`strict=True` and saves back unchanged; A-FINE never runs the text tower.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

# Non-tensor metadata that OpenAI's TorchScript archives keep in their state dict.
ARCHIVE_SCALARS = ("input_resolution", "context_length", "vocab_size")


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 for lower-precision inputs, in float64 for float64 ones (eps 1e-5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.layer_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype), self.bias.to(dtype),
                            self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with q, k, v stacked in one projection (OpenAI/nn.MultiheadAttention names)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        b, t, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, w))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width))
        )
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), self.causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, causal: bool = False):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal) for _ in range(layers)])


def resize_positional_embedding(table: torch.Tensor, tokens: int) -> torch.Tensor:
    """A-FINE's rule: resize the [N, W] table as a one-channel N x W image to [tokens, W], bicubic.

    Rows are resampled along the token axis (class row included); identity when N == tokens.
    """
    if table.shape[0] == tokens:
        return table
    wide = table[None, None].to(torch.promote_types(table.dtype, torch.float32))  # float32 at least
    resized = F.interpolate(wide, size=(tokens, table.shape[1]), mode="bicubic", align_corners=False)
    return resized[0, 0].to(table.dtype)


def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
    """Initial values std * N(0, 1); left empty on the meta device, where a model is built only to receive loaded
    weights (draws would be wasted there, and torch's meta random ops cost a second of imports on first use)."""
    x = torch.empty(shape)
    return x if x.is_meta else std * torch.randn(shape)


class VisionTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, patch_size: int, grid_size: int, output_dim: int):
        super().__init__()
        self.patch_size = patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(normal((width,), scale))
        self.positional_embedding = nn.Parameter(normal((grid_size**2 + 1, width), scale))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(normal((width, output_dim), scale))

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 (kernel = stride = patch) as one matrix product over flattened patches -> tokens [B, T, W].

        Same result as the convolution, but exact float32 on GPUs, where cuDNN convolutions default to TF32.
        """
        b, c, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        weight = self.conv1.weight
        return patches.to(weight.dtype) @ weight.reshape(weight.shape[0], -1).T

    def forward(self, x: torch.Tensor, checkpoint_blocks: bool = False) -> list[torch.Tensor]:
        """Normalised images [B, 3, H, W] (H, W multiples of the patch) -> per-block patch tokens, each [B, T, W].

        `checkpoint_blocks` recomputes each block in the backward pass to save activation memory.
        """
        x = self.embed_patches(x)  # [B, T, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + resize_positional_embedding(self.positional_embedding, x.shape[1]).to(x.dtype)
        x = self.ln_pre(x)
        features = []
        for block in self.transformer.resblocks:
            if checkpoint_blocks and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            features.append(x[:, 1:])
        return features


class CLIP(nn.Module):
    """OpenAI CLIP with a ViT image tower. Only `visual` is run; the text tower is carried for round trips.

    `text_tower=False` leaves the text tower out (its state dict then holds only `visual.*`): for scoring.
    """

    def __init__(self, embed_dim: int, vision_width: int, vision_layers: int, vision_patch_size: int,
                 grid_size: int, context_length: int, vocab_size: int, transformer_width: int,
                 transformer_layers: int, vision_heads: int | None = None, transformer_heads: int | None = None,
                 text_tower: bool = True):
        super().__init__()
        self.visual = VisionTransformer(vision_width, vision_layers, vision_heads or max(1, vision_width // 64),
                                        vision_patch_size, grid_size, embed_dim)
        self.text_tower = text_tower
        if not text_tower:
            return
        self.transformer = Transformer(transformer_width, transformer_layers,
                                       transformer_heads or max(1, transformer_width // 64), causal=True)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width,
                                            _weight=normal((vocab_size, transformer_width), 1.0))
        self.positional_embedding = nn.Parameter(normal((context_length, transformer_width), 0.01))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(normal((transformer_width, embed_dim), transformer_width**-0.5))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))

    @staticmethod
    def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
        """Architecture from tensor shapes (OpenAI's convention: 64 channels per attention head)."""
        if "visual.conv1.weight" not in state_dict or "visual.positional_embedding" not in state_dict:
            raise ValueError("not a ViT CLIP state dict: 'visual.conv1.weight' / 'visual.positional_embedding' missing")

        def count_blocks(prefix: str) -> int:
            return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})

        try:
            grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            return dict(
                embed_dim=state_dict["text_projection"].shape[1],
                vision_width=state_dict["visual.conv1.weight"].shape[0],
                vision_layers=count_blocks("visual.transformer.resblocks."),
                vision_patch_size=state_dict["visual.conv1.weight"].shape[-1],
                grid_size=grid,
                context_length=state_dict["positional_embedding"].shape[0],
                vocab_size=state_dict["token_embedding.weight"].shape[0],
                transformer_width=state_dict["ln_final.weight"].shape[0],
                transformer_layers=count_blocks("transformer.resblocks."),
            )
        except KeyError as e:
            raise ValueError(f"not a full CLIP state dict: key {e.args[0]!r} missing") from None

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> CLIP:
        """Build a float32 CLIP whose architecture follows the state dict, and load it strictly."""
        state_dict = {k: v for k, v in state_dict.items() if k not in ARCHIVE_SCALARS}
        model = cls(**cls.config_from_state_dict(state_dict))
        model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
        return model

