"""Compiled kernels (torch.compile) for A-FINE's preprocessing and CLIP tower, the one policy behind
`afine score --compile`, `evaluate.py --compile`, `AFINELoss(compile=True)` and the training stages'
`compile: true` (docs/scoring.md, "Compiled kernels").

What is compiled: AFINE.tower (the resize to multiples of 32, normalisation and the CLIP image tower), nearly all
of the work; the heads, mappings and adapter run as they are. Everything goes through AFINE.encode, so every
entry point gets the same compiled tower.

Shapes: each input shape is compiled once, for that shape (dynamic=False: fixed token counts give inductor its
fastest kernels, and no shape guard is left to recompile on), and reused:
- a smaller batch of images of an already compiled size (the last batch of a folder, fewer references) is padded
  with copies of its first image to the smallest compiled batch that holds it, and the extra rows dropped: each
  image's result is its own (CLIP works image by image), and padding costs less than compiling again;
- at most `max_shapes` shapes (image size x batch x grad mode x precision) are compiled per model; the images of
  any further shape run uncompiled, after a one-line warning. A folder of photos of many sizes is thus never
  compiled without end.
A compile that fails (on a CPU, inductor needs a C++ compiler) is a one-line warning and the model runs
uncompiled from then on, with the same results: the option is about speed only.
"""

from __future__ import annotations

import logging

import torch

from .errors import check_choice, warn

MAX_SHAPES = 8  # compiled shapes per model; each costs tens of seconds on a CPU (docs/scoring.md)
BACKEND = "inductor"  # what compile_model uses unless told otherwise
BACKENDS = ("inductor", "aot_eager", "eager")  # aot_eager / eager: the plumbing without code generation (tests)


class CompiledTower:
    """AFINE.tower compiled once per input shape, with padding of smaller batches and a cap on shapes."""

    def __init__(self, tower, backend: str = "inductor", max_shapes: int = MAX_SHAPES):
        self.eager = tower
        self.compiled = torch.compile(tower, backend=backend, dynamic=False)
        self.max_shapes = max_shapes
        self.batches: dict[tuple, list[int]] = {}  # per input condition (all but the batch size): batch sizes
        self.failed = False  # a compile failed: eager from then on
        self.capped = False  # the cap was reached (warned once)

    def shapes(self) -> int:
        """How many shapes are compiled."""
        return sum(map(len, self.batches.values()))

    def __call__(self, images: torch.Tensor, checkpoint_blocks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if self.failed:
            return self.eager(images, checkpoint_blocks)
        device = images.device.type
        key = (tuple(images.shape[1:]), images.dtype, str(images.device), checkpoint_blocks, torch.is_grad_enabled(),
               torch.is_inference_mode_enabled(), torch.is_autocast_enabled(device),
               torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
        b, sizes = images.shape[0], self.batches.setdefault(key, [])
        fit = min((s for s in sizes if s >= b), default=None)
        if fit is None:
            if self.shapes() >= self.max_shapes:
                if not self.capped:
                    self.capped = True
                    warn(f"compile: {self.max_shapes} input shapes compiled, the most kept per model; images of "
                         f"other shapes (here {b}x{'x'.join(map(str, key[0]))}) run uncompiled")
                return self.eager(images, checkpoint_blocks)
            sizes.append(fit := b)
        padded = images if fit == b else torch.cat([images, images[:1].expand(fit - b, *images.shape[1:])])
        try:
            x, features = self.compiled(padded, checkpoint_blocks)
        except Exception as e:  # noqa: BLE001 - a failed compile (no C++ compiler, ...): eager, same results
            result = self.eager(images, checkpoint_blocks)  # a mistake of the caller's raises here, uncompiled
            self.failed = True
            cause = e  # torch wraps the compiler's error (BackendCompilerFailed): name the compiler's own
            while getattr(cause, "inner_exception", None) or cause.__cause__:
                cause = getattr(cause, "inner_exception", None) or cause.__cause__
            reason = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
            warn(f"compile: torch.compile failed ({type(cause).__name__}: {reason[:200]}); running uncompiled")
            return result
        return (x, features) if fit == b else (x[:b], features[:b])


def compile_model(model, backend=None, max_shapes: int = MAX_SHAPES):
    """Compile `model`'s tower in place (model.encode then runs it) and return the model. Call it once the model
    is on its device. `backend`: BACKEND by default; "aot_eager" (or a torch.compile backend function) checks the
    plumbing without generating code."""
    backend = BACKEND if backend is None else backend
    if not callable(backend):
        check_choice("backend", backend, BACKENDS)
    if max_shapes < 1:
        raise ValueError(f"max_shapes must be at least 1, got {max_shapes}")
    # our cap decides which shapes compile; torch's own limit per function (8 by default) must not undercut it
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, max_shapes + 8)
    # torch's C++ toolchain lookup logs a line about CUDA on machines without it; the compile does not need it
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    model.compiled_tower = CompiledTower(model.tower, backend, max_shapes)
    return model
