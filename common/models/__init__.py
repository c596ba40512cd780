"""Model factory: every registered architecture, DP-compatible (GroupNorm, no in-place ops).

Use :func:`build_model` with a :class:`~consilia.common.config.ModelConfig` and the run's
:class:`~consilia.common.config.TaskSpec`.

Every entry is built from scratch (no pretrained weights, nothing downloads) and is
Opacus-compatible by construction: GroupNorm instead of BatchNorm, no in-place activations
and no in-place residual additions (an in-place op on the output of a module that carries
Opacus' backward hooks breaks per-sample gradients, opacus issue #828). The ImageNet stems
are adapted to small medical images: a stem downsamples only while its feature map stays
at least 14 px wide (28 px -> 14, 64 px -> 16; 224 px keeps the original stem).

Layout: :mod:`.spec` holds :class:`ModelSpec` (with its measured DP grad-sample mode), the
``MODELS`` registry and :func:`build_model`; :mod:`.blocks` the shared building blocks; one
module per family registers its builders when this package is imported (``small``: cnn,
lenet5; ``classic``: alexnet, vgg11; ``resnet``; ``inception``; ``efficientnet``;
``densenet``; ``vit``). torchvision and MONAI are imported only when a model is built.
"""

from __future__ import annotations

from torch import nn

# The family modules register their builders on import (MODELS.names() is sorted).
from consilia.common.models import (  # noqa: F401
    classic,
    densenet,
    efficientnet,
    inception,
    resnet,
    small,
    vit,
)
from consilia.common.models.blocks import lazy_block_class_named
from consilia.common.models.spec import (
    DEFAULT_DP_GRAD_SAMPLE_MODE,
    MODELS,
    ModelSizeError,
    ModelSpec,
    build_model,
    count_parameters,
    register_model,
)

__all__ = [
    "DEFAULT_DP_GRAD_SAMPLE_MODE",
    "MODELS",
    "ModelSizeError",
    "ModelSpec",
    "build_model",
    "count_parameters",
    "register_model",
]


def __getattr__(name: str) -> type[nn.Module]:
    """Resolve the lazily defined block classes (PEP 562), e.g. when unpickling a model.

    Their ``__module__`` is this package (see :func:`.blocks.picklable`), so pickle and
    ``torch.load`` look them up here, as ``consilia.common.models._GNBasicBlock`` etc.
    """
    return lazy_block_class_named(name)
